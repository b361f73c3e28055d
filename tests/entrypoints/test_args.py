"""launch_server.py flags map onto EngineConfig and ServerArgs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from server.config import EngineConfig
from server.entrypoints.args import ServerArgs, parse_server_args
from tests.helpers import REPO


def test_every_flag_reaches_its_field(tmp_path):
    argv = ["--host", "0.0.0.0", "--port", "8001", "--served-model-name", "m", "--api-key", "k", "--log-level",
            "debug", "--model-path", str(tmp_path), "--tokenizer-path", str(tmp_path), "--dtype", "bfloat16",
            "--load-format", "dummy", "--max-model-len", "4096", "--seed", "3", "--sp-size", "4", "--tp-size", "2",
            "--ulysses-degree", "2", "--ulysses-layers", "linear", "--sp-min-tokens", "512", "--ring-mode", "allgather",
            "--lasp-mode", "allgather", "--shard-dense-weights",
            "--disable-seq-parallel-tp", "--dist-init-addr", "tcp://10.0.0.1:5000", "--device", "cpu",
            "--attention-backend", "torch", "--max-running-requests", "8", "--max-waiting-requests", "16",
            "--chunked-prefill-size", "2048", "--page-size", "32", "--mem-fraction-static", "0.5",
            "--cpu-cache-gb", "2.5"]
    engine = EngineConfig(model_path=str(tmp_path), tokenizer_path=str(tmp_path), device="cpu", dtype="bfloat16",
                          load_format="dummy", sp_size=4, tp_size=2, ulysses_degree=2, ulysses_layers="linear",
                          sp_min_tokens=512,
                          max_model_len=4096, max_running_requests=8, max_waiting_requests=16,
                          chunked_prefill_size=2048, page_size=32, mem_fraction_static=0.5, cpu_cache_gb=2.5,
                          attention_backend="torch", ring_mode="allgather", lasp_mode="allgather",
                          seq_parallel_tp=False, shard_dense_weights=True, seed=3,
                          dist_init_addr="tcp://10.0.0.1:5000")
    assert parse_server_args(argv) == ServerArgs(engine, "0.0.0.0", 8001, "m", "k", "debug")


def test_defaults():
    args = parse_server_args([])
    assert args == ServerArgs(EngineConfig())
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 30000, "builtin")
    assert parse_server_args(["--model-path", "/m"]).served_model_name == "/m"


@pytest.mark.parametrize("argv, flag", [
    (["--port", "70000"], "--port"),
    (["--api-key", ""], "--api-key"),
    (["--cpu-cache-gb", "0"], "--cpu-cache-gb"),
    (["--tp-size", "0"], "--tp-size"),
    (["--sp-size", "2", "--ulysses-degree", "4"], "--ulysses-degree"),
    (["--sp-size", "2", "--shard-dense-weights", "--quantization", "fp8"], "--shard-dense-weights"),
    (["--tokenizer-path", "/no/such/dir"], "--tokenizer-path"),
    (["--chat-template", "/no/such/template.jinja"], "--chat-template"),
    (["--chat-template", "{% for m in messages %}{{ m.content }}"], "--chat-template"),  # unclosed block
])
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        parse_server_args(argv).validate()


def test_chat_template_flag_takes_a_file_or_a_string(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    for value in (template, str(tmp_path / "t.jinja")):
        args = parse_server_args(["--chat-template", value])
        args.validate()
        assert args.chat_template == value


@pytest.mark.parametrize("alias, primary", [
    (["--tensor-parallel-size", "2"], ["--tp-size", "2"]),
    (["-tp", "2"], ["--tp-size", "2"]),
    (["--gpu-memory-utilization", "0.7"], ["--mem-fraction-static", "0.7"]),
    (["--context-length", "4096"], ["--max-model-len", "4096"]),
    (["--max-num-seqs", "8"], ["--max-running-requests", "8"]),
    (["--max-num-batched-tokens", "2048"], ["--chunked-prefill-size", "2048"]),
    (["--block-size", "32"], ["--page-size", "32"]),
    (["--random-seed", "7"], ["--seed", "7"]),
    (["--enforce-eager"], ["--disable-cuda-graph"]),
    (["--no-enable-prefix-caching"], ["--disable-prefix-cache"]),
    (["--disable-radix-cache"], ["--disable-prefix-cache"]),
    (["--enable-prefix-caching"], []),
    (["--model", "/m", "--tokenizer", "/t"], ["--model-path", "/m", "--tokenizer-path", "/t"]),
    (["--trust-remote-code", "--dtype", "bfloat16"], ["--dtype", "bfloat16"]),
])
def test_vllm_flag_names_are_aliases(alias, primary):
    assert parse_server_args(alias) == parse_server_args(primary)


def test_aliased_flags_reach_the_engine():
    engine = parse_server_args(["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.7", "--enforce-eager",
                                "--max-num-seqs", "8", "--no-enable-prefix-caching"]).engine
    assert (engine.tp_size, engine.mem_fraction_static, engine.cuda_graph, engine.max_running_requests,
            engine.enable_prefix_cache) == (2, 0.7, "off", 8, False)


def test_help_shows_the_aliases_next_to_the_primary_names():
    from server.entrypoints.args import build_parser

    text = " ".join(build_parser().format_help().split())
    for both in ("--tp-size TP_SIZE, --tensor-parallel-size TP_SIZE",
                 "--mem-fraction-static MEM_FRACTION_STATIC, --gpu-memory-utilization",
                 "--disable-cuda-graph, --enforce-eager", "--allowed-origins", "--default-max-tokens", "--revision"):
        assert both in text, both


def test_server_flags_of_the_first_hour():
    args = parse_server_args(["--default-max-tokens", "64", "--allowed-origins", '["http://a.example", "http://b"]',
                              "--allowed-methods", "GET,POST", "--allowed-headers", "authorization",
                              "--allow-credentials", "--revision", "v2"])
    assert (args.default_max_tokens, args.allowed_origins, args.allowed_methods, args.allowed_headers,
            args.allow_credentials, args.revision) == (64, ("http://a.example", "http://b"), ("GET", "POST"),
                                                       ("authorization",), True, "v2")
    assert parse_server_args(["--allowed-origins", "*"]).allowed_origins == ("*",)
    assert parse_server_args([]).allowed_origins == ()


@pytest.mark.parametrize("argv, message", [
    (["--default-max-tokens", "0"], "--default-max-tokens"),
    (["--allowed-origins", "*", "--allow-credentials"], "--allow-credentials"),
    (["--model-path", "/no/such/dir"], "neither a directory nor a Hugging Face model id"),
    (["--model-path", "a/b/c"], "neither a directory nor a Hugging Face model id"),
])
def test_first_hour_flag_mistakes(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_server_args(argv).validate_flags()


def test_hub_id_passes_the_flag_checks():
    parse_server_args(["--model-path", "meta-llama/Llama-3.1-8B-Instruct", "--device", "cpu"]).validate_flags()
    assert parse_server_args(["--model-path", "org/name"]).served_model_name == "org/name"


def test_parsing_and_flag_checks_do_not_import_torch():
    code = ("import sys\n"
            "from server.entrypoints.args import build_parser, parse_server_args\n"
            "build_parser().format_help()\n"
            "try:\n    parse_server_args(['--port', '70000']).validate_flags()\nexcept ValueError:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("argv, rc", [(["--help"], 0), (["--tensor-parallel-sise", "2"], 2), (["--port", "70000"], 2),
                                      (["--dtype", "float8"], 2), (["--model-path", "/no/such/dir"], 2)])
def test_help_and_flag_mistakes_answer_within_2_s(argv, rc):
    """Wall time of the whole command (interpreter start included; about 0.2 s unloaded)."""
    start = time.monotonic()
    r = subprocess.run([sys.executable, "launch_server.py", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == rc, r.stderr
    assert elapsed < 2.0, f"{argv}: {elapsed:.2f} s"
