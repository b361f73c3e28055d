"""The built-in default model: a small hybrid MiniMax generated locally, so the server runs with no download.

`builtin_model_path()` returns a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that is generated on first use and cached on disk. Everything
is deterministic: the tokenizer is a byte-level BPE trained on text built here from a fixed seed, and the
weights are random normals from a seeded generator, so every machine gets byte-identical files.

The weights are random, so generations are gibberish; the point is that every part of the serving path
(tokenizer, chat template, hybrid lightning + softmax layers, MoE, stop tokens) runs for real.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

# Bump when the generated files change, so that old caches are not reused.
BUILTIN_VERSION = "builtin-v2"
SEED = 1234

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 2048

# ChatML; the roles are those of the OpenAI API (docs/server.md).
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'developer', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('Only system, developer, user, assistant and tool roles are supported, got ' "
    "+ message['role']) }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_PROSE = """\
The town sits where two rivers meet, and most of its streets run downhill toward the water. In the morning
the bakers open first, then the fishmongers, and by eight o'clock the market square is full of carts, dogs
and people arguing about the price of apples. Nobody is in a hurry, yet everything gets done.

An old library stands at the top of the hill. Its shelves hold maps of the coast, letters from sailors,
and a long row of notebooks in which a retired teacher wrote down the weather every day for forty years.
On windy afternoons students come to read them, because the handwriting is neat and the numbers tell a
story: the winters have grown shorter, and the first frost arrives about two weeks later than it used to.

Cooking in this part of the country is simple. You take what the garden gives you, add salt, oil and a
little patience, and let the pot do the rest. A good soup needs onions, carrots, a handful of beans and an
hour on a low fire. Bread is baked twice a week, and whatever is left on Sunday becomes pudding on Monday.

Computers arrived late, but they arrived everywhere at once. The post office keeps its records in a small
database, the school teaches children to write programs that draw spirals, and the harbour master reads
tide tables on a screen instead of on paper. When a question is hard, people still ask each other first.

If you ask a question, you will usually get an answer, and often a second answer you did not ask for.
Questions about the ferry, the road to the north, or the best place to watch the sunset are answered at
once. Questions about the future are answered with a shrug and an invitation to come back next year.
"""

_WORDS = {
    "adj": (
        "quiet bright small large ancient modern careful quick slow green blue red golden silver warm cold "
        "heavy light strange simple clever gentle busy empty narrow wide patient curious honest tired happy"
    ).split(),
    "noun": (
        "river town garden window teacher student machine program library market bridge ferry harbour "
        "kitchen letter notebook question answer morning evening island mountain forest road engine model "
        "server request token message network memory signal pattern number system friend neighbour"
    ).split(),
    "verb": (
        "found carried painted opened closed measured followed answered built repaired watched explained "
        "counted described remembered visited crossed wrote read changed moved helped started finished"
    ).split(),
    "prep": "near behind under over beside across through after before without inside around".split(),
    "adverb": "quietly slowly carefully quickly often rarely suddenly gently clearly almost never again".split(),
    "name": "Anna Ben Clara David Elena Farid Grace Hugo Ines Jonas Kira Luca Maya Noah Olga Pavel".split(),
}

_SENTENCE_TEMPLATES = [
    "The {adj} {noun} {verb} the {noun} {prep} the {adj} {noun}.",
    "{name} {adverb} {verb} a {adj} {noun}.",
    "Why did {name} say the {noun} was {adj}?",
    "In {year}, {count} {noun}s {verb} the {noun} {prep} the {noun}.",
    "{name} and {name} {verb} the {noun}, and then they {verb} it {adverb}.",
    '"Is the {noun} {adj}?" asked {name}. "Yes, {adverb} {adj}," said {name}.',
    "Step {count}: open the {noun}, check the {noun}, and write {count}.{count} in the {adj} {noun}.",
]


def training_text(seed: int, n_sentences: int = 4000) -> list[str]:
    """The bundled prose plus generated sentences (fixed seed): enough distinct words for ~2K merges."""
    rng = random.Random(seed)
    lines = _PROSE.split("\n")
    for _ in range(n_sentences):
        template = rng.choice(_SENTENCE_TEMPLATES)
        # Each placeholder draws independently, so repeated placeholders get different words.
        fields = {key: _Draw(rng, words) for key, words in _WORDS.items()}
        fields["year"] = _Draw(rng, [str(y) for y in range(1900, 2030)])
        fields["count"] = _Draw(rng, [str(n) for n in range(0, 1000)])
        lines.append(template.format_map(fields))
    return lines


class _Draw:
    """A template field that draws a new word from `words` every time it is formatted."""

    def __init__(self, rng: random.Random, words: list[str]) -> None:
        self.rng = rng
        self.words = words

    def __format__(self, spec: str) -> str:
        return self.rng.choice(self.words)


def train_builtin_tokenizer() -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE (every byte is a base token, so any text encodes) with the ChatML
    special tokens first: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_text(SEED), trainer)
    return tokenizer


def builtin_config(vocab_size: int, eos_token_id: int, pad_token_id: int) -> dict:
    """config.json of the built-in model: 8 layers in the real checkpoints' 7:1 lightning:softmax layout."""
    num_layers = 8
    # MiniMax-Text-01 scales the residual branch by (2 * num_layers) ** 0.25 in every sub-layer.
    alpha = (2 * num_layers) ** 0.25
    rope_theta = 1e6
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "num_hidden_layers": num_layers,
        "layer_types": ["linear_attention"] * 7 + ["full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 256,
        "hidden_act": "silu",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "block_size": 256,
        "max_position_embeddings": 8192,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "full_attn_alpha_factor": alpha,
        "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": alpha,
        "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": alpha,
        "mlp_beta_factor": 1.0,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


def _lightning_decay_buffers(config: dict, layer: int) -> dict[str, torch.Tensor]:
    """The decay tables `transformers` keeps as persistent buffers of a lightning layer (and so writes into
    MiniMax checkpoints): ALiBi-style slopes scaled down linearly with depth, and their per-block decays."""
    heads, layers, block = config["num_attention_heads"], config["num_hidden_layers"], config["block_size"]
    depth_factor = 1 - layer / (layers - 1 + 1e-5) + 1e-5
    slope = (2 ** (-8 / heads)) ** (torch.arange(heads) + 1) * depth_factor
    slope = slope[:, None, None]
    pos = torch.arange(block) + 1
    lag = slope * (pos[:, None] - pos[None, :])[None, None]
    return {
        "slope_rate": slope,
        "query_decay": torch.exp(-slope * pos[:, None]),
        "key_decay": torch.exp(-slope * (block - pos[:, None])),
        "diagonal_decay": torch.exp(torch.where(lag >= 0, -lag, float("-inf"))),
    }


def builtin_weights(config: dict, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random weights under the Hugging Face MiniMax checkpoint names: linear weights ~ N(0, 0.02), norm
    weights 1. Lightning qkv_proj is [3 * H * Dh, hidden] with q, k, v interleaved per head; experts keep the
    checkpoint's w1 (gate) / w3 (up) [I, hidden] and w2 (down) [hidden, I]."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    std = config["initializer_range"]
    weights: dict[str, torch.Tensor] = {}

    def normal(name: str, *shape: int) -> None:
        weights[name] = torch.empty(shape).normal_(0.0, std, generator=gen)

    def ones(name: str, size: int) -> None:
        weights[name] = torch.ones(size)

    normal("model.embed_tokens.weight", config["vocab_size"], hidden)
    for i, layer_type in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        ones(p + "input_layernorm.weight", hidden)
        ones(p + "post_attention_layernorm.weight", hidden)
        if layer_type == "linear_attention":
            normal(p + "self_attn.qkv_proj.weight", 3 * heads * head_dim, hidden)
            normal(p + "self_attn.out_proj.weight", hidden, heads * head_dim)
            normal(p + "self_attn.output_gate.weight", heads * head_dim, hidden)
            ones(p + "self_attn.norm.weight", heads * head_dim)
            for name, buffer in _lightning_decay_buffers(config, i).items():
                weights[p + "self_attn." + name] = buffer.contiguous()
        else:
            normal(p + "self_attn.q_proj.weight", heads * head_dim, hidden)
            normal(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden)
            normal(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
            normal(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        normal(p + "block_sparse_moe.gate.weight", config["num_local_experts"], hidden)
        for e in range(config["num_local_experts"]):
            normal(p + f"block_sparse_moe.experts.{e}.w1.weight", inter, hidden)
            normal(p + f"block_sparse_moe.experts.{e}.w3.weight", inter, hidden)
            normal(p + f"block_sparse_moe.experts.{e}.w2.weight", hidden, inter)
    ones("model.norm.weight", hidden)
    normal("lm_head.weight", config["vocab_size"], hidden)
    return weights


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_builtin_model(directory: str) -> None:
    """Write every file of the built-in model into `directory` (which must exist), logging each stage."""
    start = time.monotonic()
    tokenizer = train_builtin_tokenizer()
    log.info("built-in model: tokenizer trained in %.1f s; writing the weights", time.monotonic() - start)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    _write_json(
        os.path.join(directory, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        os.path.join(directory, "generation_config.json"),
        {"eos_token_id": [eos, pad], "pad_token_id": pad},
    )
    config = builtin_config(tokenizer.get_vocab_size(with_added_tokens=True), eos, pad)
    _write_json(os.path.join(directory, "config.json"), config)
    save_file(builtin_weights(config), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def builtin_model_path(cache_dir: str | None = None) -> str:
    """Directory of the built-in model, generated on first use.

    It lives in `<cache_dir>/<BUILTIN_VERSION>`; `cache_dir` defaults to $SERVER_CACHE_DIR, else ~/.cache/sp-server.
    The files are written to a temporary directory beside it and renamed into place in one step, so
    processes that start together never see a half-written model: the first rename wins, the others
    discard their copy and use it.
    """
    root = (
        cache_dir or os.environ.get("SERVER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sp-server")
    )
    path = os.path.join(root, BUILTIN_VERSION)
    if os.path.isdir(path):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{BUILTIN_VERSION}.tmp-", dir=root)
    log.info("generating the built-in model into %s (first use only; set SERVER_CACHE_DIR to move it)", path)
    start = time.monotonic()
    try:
        write_builtin_model(tmp)
        os.rename(tmp, path)
        log.info("built-in model generated in %.1f s: %s", time.monotonic() - start, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
