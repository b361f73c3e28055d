"""The built-in model directory: deterministic, complete, and what transformers saves and loads."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, MiniMaxConfig, MiniMaxForCausalLM

from server.models import builtin
from server.models.builtin import BUILTIN_VERSION, builtin_model_path
from server.tokenizer import Tokenizer

FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return builtin_model_path(str(tmp_path_factory.mktemp("cache")))


def _read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    with safe_open(path, "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_file_set_and_config(model_dir):
    assert os.path.basename(model_dir) == BUILTIN_VERSION
    assert set(os.listdir(model_dir)) == FILES
    assert not [n for n in os.listdir(os.path.dirname(model_dir)) if n.startswith(".")]  # no temp dir left
    config = _read_config(model_dir)
    tok = Tokenizer.from_pretrained(model_dir)
    assert config["architectures"] == ["MiniMaxForCausalLM"] and config["model_type"] == "minimax"
    assert config["layer_types"] == ["linear_attention"] * 7 + ["full_attention"]
    assert config["vocab_size"] == tok.vocab_size == 2048
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": config["rope_theta"]}
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    with open(os.path.join(model_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [im_end, endoftext]
    assert tok.eos_token_ids == [im_end, endoftext]
    assert tok.has_chat_template


def test_generation_is_deterministic(model_dir, tmp_path):
    again = builtin_model_path(str(tmp_path))
    for name in FILES:
        with open(os.path.join(model_dir, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name


def test_cache_is_reused_and_env_var(model_dir, monkeypatch):
    stamp = os.stat(os.path.join(model_dir, "model.safetensors")).st_mtime_ns
    assert builtin_model_path(os.path.dirname(model_dir)) == model_dir
    monkeypatch.setenv("SERVER_CACHE_DIR", os.path.dirname(model_dir))
    assert builtin_model_path() == model_dir
    assert os.stat(os.path.join(model_dir, "model.safetensors")).st_mtime_ns == stamp


def test_losing_a_generation_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its copy into place while this one is still writing: this one's rename fails,
    it discards its temporary directory and returns the winner's files."""
    write = builtin.write_builtin_model
    calls = []

    def write_while_another_process_wins(directory: str) -> None:
        calls.append(directory)
        write(directory)
        if len(calls) == 1:
            assert builtin_model_path(str(tmp_path)) == os.path.join(str(tmp_path), BUILTIN_VERSION)

    monkeypatch.setattr(builtin, "write_builtin_model", write_while_another_process_wins)
    path = builtin_model_path(str(tmp_path))
    assert len(calls) == 2 and path == os.path.join(str(tmp_path), BUILTIN_VERSION)
    assert os.listdir(tmp_path) == [BUILTIN_VERSION]  # the loser's temporary directory is gone
    assert set(os.listdir(path)) == FILES


def test_weight_names_and_shapes_match_save_pretrained(model_dir, tmp_path):
    """Our checkpoint holds exactly the tensors (names, shapes, and the derived decay buffers' values) that
    transformers writes for the same config."""
    config = MiniMaxConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    MiniMaxForCausalLM(config).save_pretrained(str(tmp_path))
    ours = os.path.join(model_dir, "model.safetensors")
    assert _tensor_shapes(ours) == _tensor_shapes(os.path.join(tmp_path, "model.safetensors"))
    with safe_open(ours, "pt") as a, safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as b:
        for name in a.keys():
            if name.endswith(("slope_rate", "_decay")):
                torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=0, atol=0)
            elif name.endswith("norm.weight"):
                assert torch.equal(a.get_tensor(name), torch.ones(a.get_slice(name).get_shape()))
            else:
                assert abs(a.get_tensor(name).std().item() - 0.02) < 0.002, name


def test_transformers_loads_and_runs(model_dir):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    assert model.dtype == torch.float32
    # 300 tokens: more than one lightning block of 256.
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 300, 2048) and torch.isfinite(logits).all()
    assert logits.std() > 0.05  # random weights still give non-degenerate logits


def test_autotokenizer_chat_template(model_dir):
    ref, ours = AutoTokenizer.from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Where does the ferry go?"},
        {"role": "assistant", "content": "Across the river."},
        {"role": "user", "content": "And then? 你好"},
    ]
    text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ours.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system\nYou are brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nAnd then? 你好<|im_end|>\n<|im_start|>assistant\n")
    ids = ref.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text, add_special_tokens=False)
    assert ids.count(ours.token_to_id("<|im_start|>")) == 5 and ids[-1] == ours.token_to_id("\u010a")  # "\n"
    # The trained BPE merges common words: far fewer tokens than bytes.
    assert len(ref.encode("the river town and the market square")) < 12
