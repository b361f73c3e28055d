"""Command-line flags of ``launch_server.py``: the HTTP side's own flags plus one flag per ``EngineConfig`` field.

SGLang's spellings are the primary names; vLLM's common spellings are accepted as aliases (``--tensor-parallel-size``
for ``--tp-size`` ...), and ``--help`` lists both. Parsing imports neither torch nor the engine, so ``--help`` and a
flag mistake answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields, replace

from server.config import (
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    ULYSSES_LAYERS,
    EngineConfig,
)
from server.entrypoints.reasoning_parsers import REASONING_PARSER_NAMES
from server.entrypoints.tool_parsers import TOOL_PARSER_NAMES

BUILTIN_MODEL_NAME = "builtin"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerArgs:
    """What the HTTP process needs: where to listen, how to name the model, and the engine's configuration."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: str = BUILTIN_MODEL_NAME
    api_key: str | None = None
    log_level: str = "info"
    max_request_bytes: int = 64 << 20
    allow_control_tokens_in_chat: bool = False
    shutdown_grace_period: float = 5.0
    watchdog_timeout: float = 300.0
    chat_template: str | None = None
    tool_call_parser: str | None = None  # a name of server.entrypoints.tool_parsers, or auto
    reasoning_parser: str | None = None  # a name of server.entrypoints.reasoning_parsers
    default_max_tokens: int | None = None  # None: the rest of the context (OpenAI routes), 128 for /generate
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers, preflights are 405
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    revision: str | None = None  # of a Hugging Face model id given as --model-path / --tokenizer-path

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and what to change: :meth:`validate_flags`, then
        :meth:`validate_model` (which needs model directories: :meth:`with_local_model` resolves Hugging Face ids)."""
        self.validate_flags()
        self.validate_model()

    def validate_flags(self) -> None:
        """Every check that needs no model files (engine flags included); loads torch only once all else passed."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not self.served_model_name:
            raise ValueError("--served-model-name must not be empty")
        if self.api_key == "":
            raise ValueError("--api-key must not be empty; leave it out to serve without a key")
        if self.engine.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.engine.max_waiting_requests}")
        if self.engine.cpu_cache_gb <= 0:
            raise ValueError(f"--cpu-cache-gb must be > 0, got {self.engine.cpu_cache_gb}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if not self.shutdown_grace_period >= 0:
            raise ValueError(f"--shutdown-grace-period must be >= 0, got {self.shutdown_grace_period}")
        if not self.watchdog_timeout > 0:
            raise ValueError(f"--watchdog-timeout must be > 0, got {self.watchdog_timeout}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"--default-max-tokens must be >= 1, got {self.default_max_tokens}")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("--allow-credentials needs explicit --allowed-origins: browsers refuse credentials for "
                             "the origin '*'")
        for flag, path in (("--model-path", self.engine.model_path), ("--tokenizer-path", self.engine.tokenizer_path)):
            if path is not None:
                check_model_source(flag, path)
        if self.chat_template is not None:
            check_chat_template(self.chat_template)
        self.engine.validate()

    def with_local_model(self) -> ServerArgs:
        """These arguments with Hugging Face model ids replaced by their local snapshot directories (downloaded
        into the Hugging Face cache if needed; see ``server/models/hub.py``). ``ValueError`` if one cannot be had."""
        from server.models.hub import resolve_model_path

        engine = self.engine
        for flag, name in (("--model-path", "model_path"), ("--tokenizer-path", "tokenizer_path")):
            path = getattr(engine, name)
            if path is not None and not os.path.isdir(path):
                engine = replace(engine, **{name: resolve_model_path(path, self.revision, flag=flag)})
        return replace(self, engine=engine)

    def validate_model(self) -> None:
        """Check that the model directory holds a model that can be split over ``--tp-size`` and
        ``--ulysses-degree``, before anything starts."""
        for flag, path in (("--model-path", self.engine.model_path), ("--tokenizer-path", self.engine.tokenizer_path)):
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"{flag} {path!r} is not a directory (a Hugging Face model id is resolved to one by "
                                 "ServerArgs.with_local_model first)")
        from server.models.builtin import VOCAB_SIZE, builtin_config
        from server.models.loader import MODEL_CLASSES, check_model_parallelism, read_model_config

        path = self.engine.model_path
        if path is None:  # the built-in model's shapes, without generating it
            raw = builtin_config(VOCAB_SIZE, 0, 1)
            cfg = MODEL_CLASSES[raw["architectures"][0]].config_class.from_hf(raw)
            check_model_parallelism("<built-in model>", cfg, self.engine.tp_size, "dummy",
                                    self.engine.ulysses_degree, self.engine.ulysses_layers,
                                    shard_dense_weights=self.engine.shard_dense_weights)
        else:
            check_model_parallelism(path, read_model_config(path), self.engine.tp_size, self.engine.load_format,
                                    self.engine.ulysses_degree, self.engine.ulysses_layers,
                                    shard_dense_weights=self.engine.shard_dense_weights)


def check_model_source(flag: str, path: str) -> None:
    """Raise ``ValueError`` unless ``path`` is a directory or has the form of a Hugging Face model id."""
    from server.models.hub import looks_like_repo_id

    if not os.path.isdir(path) and not looks_like_repo_id(path):
        raise ValueError(f"{flag} {path!r} is neither a directory nor a Hugging Face model id ('org/name'); give the "
                         "directory of a Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json) or its "
                         "id on the Hub")


def parse_list(value: str) -> list[str]:
    """vLLM's JSON list (``'["http://a", "http://b"]'``) or a comma-separated list (``http://a,http://b``)."""
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return items
    return [item.strip() for item in value.split(",") if item.strip()]


def check_chat_template(value: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a jinja chat template or the path of a file holding one."""
    import jinja2

    from server.tokenizer import compile_chat_template

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    elif "{" in value:
        text = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a jinja template (a template holds "
                         "'{{' or '{%')")
    try:
        compile_chat_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"--chat-template: the template does not compile: {e.message} (line {e.lineno})") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_server.py",
        description="OpenAI-compatible LLM server with sequence-parallel prefill.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = EngineConfig()
    srv = p.add_argument_group("HTTP server")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    srv.add_argument("--port", type=int, default=30000, help="port to listen on (0 picks a free one)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model name clients send; default: --model-path as given (a directory or a Hugging "
                          "Face id), or 'builtin'")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every route but /health, /metrics, /docs, /redoc "
                          "and /openapi.json (and CORS preflights): /v1/*, /generate, /tokenize, /detokenize, "
                          "/flush_cache, /start_profile and /stop_profile")
    srv.add_argument("--default-max-tokens", type=int, default=None,
                     help="the completion length when a request leaves max_tokens out (or null), at most what the "
                          "context leaves; default: the rest of the context on the OpenAI routes (vLLM's), 128 on "
                          "/generate (SGLang's)")
    srv.add_argument("--allowed-origins", type=parse_list, default=[],
                     help="CORS: origins whose browser pages may call the server, as a JSON list or comma-separated "
                          "('*' for any); default: none (no CORS headers, preflights answered 405)")
    srv.add_argument("--allowed-methods", type=parse_list, default=["*"], help="CORS: allowed methods")
    srv.add_argument("--allowed-headers", type=parse_list, default=["*"], help="CORS: allowed request headers")
    srv.add_argument("--allow-credentials", action="store_true",
                     help="CORS: let browsers send cookies and Authorization (needs explicit --allowed-origins)")
    srv.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="also the engine's and the ranks'")
    srv.add_argument("--max-request-bytes", type=int, default=64 << 20,
                     help="larger request bodies are answered 413")
    srv.add_argument("--allow-control-tokens-in-chat", action="store_true",
                     help="let chat message content contain control tokens such as <|im_start|> (trusted clients "
                          "only: such content can forge turns); by default it is encoded as plain text")
    srv.add_argument("--chat-template", default=None,
                     help="the chat template for /v1/chat/completions, /v1/responses and /tokenize: a jinja template "
                          "string or the path of a file holding one; default: the model's (tokenizer_config.json "
                          "or chat_template.jinja)")
    srv.add_argument("--tool-call-parser", default=None, choices=TOOL_PARSER_NAMES, metavar="NAME",
                     help="read tool calls from chat output in this format (hermes, qwen3_coder, llama3_json, glm45, "
                          "minimax_m2, deepseek_v3, deepseek_v31, kimi_k2, gpt-oss; auto: by the chat template); "
                          "needed for tool_choice auto")
    srv.add_argument("--enable-auto-tool-choice", action="store_true",
                     help="accepted for vLLM command lines; tool_choice auto is on whenever --tool-call-parser is set")
    srv.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSER_NAMES, metavar="NAME",
                     help="return chat reasoning apart from the answer, in reasoning_content (qwen3, deepseek-r1, "
                          "deepseek-v3, glm45, minimax-m2, kimi, kimi_k2, gpt-oss)")
    srv.add_argument("--shutdown-grace-period", type=float, default=5.0,
                     help="seconds that requests in flight get to finish after SIGTERM/SIGINT before they are ended "
                          "with an error")
    srv.add_argument("--watchdog-timeout", type=float, default=300.0,
                     help="seconds an engine step may take; a longer one (a hung or stopped worker) fails the requests "
                          "in it and marks the server unhealthy")

    mdl = p.add_argument_group("model")
    mdl.add_argument("--model-path", "--model", default=None,
                     help="a Hugging Face model directory, or a model id on the Hub ('org/name': downloaded into the "
                          "Hugging Face cache, or taken from it with HF_HUB_OFFLINE=1; HF_TOKEN for gated models); "
                          "default: the small built-in model (random weights)")
    mdl.add_argument("--tokenizer-path", "--tokenizer", default=None,
                     help="tokenizer directory or Hugging Face id; default: the model's")
    mdl.add_argument("--revision", default=None,
                     help="branch, tag or commit of a Hugging Face id given as --model-path / --tokenizer-path; "
                          "default: main")
    mdl.add_argument("--trust-remote-code", action="store_true",
                     help="accepted for vLLM compatibility and has no effect: every supported architecture is "
                          "implemented in this package, no code from a checkpoint is ever run")
    mdl.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                     help="auto: the checkpoint's dtype on CUDA (bfloat16 for float32 checkpoints), float32 on CPU")
    mdl.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS,
                     help="dummy: random weights of the checkpoint's shapes (benchmarks)")
    mdl.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                     help="fp8: quantize a high-precision checkpoint's linear and MoE expert weights per channel at "
                          "load; FP8 checkpoints run in FP8 without it")
    mdl.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=KV_CACHE_DTYPES,
                     help="auto: the model's dtype; fp8_e4m3: KV pages in FP8 (half the bytes, twice the tokens)")
    mdl.add_argument("--max-model-len", "--context-length", type=int, default=None,
                     help="longest prompt + completion in tokens; default: the model's max_position_embeddings")
    mdl.add_argument("--seed", "--random-seed", type=int, default=d.seed,
                     help="seed of the random weights and of unseeded sampling")

    par = p.add_argument_group("parallelism")
    par.add_argument("--sp-size", type=int, default=d.sp_size, help="sequence-parallel group size")
    par.add_argument("--tp-size", "--tensor-parallel-size", "-tp", type=int, default=d.tp_size,
                     help="tensor-parallel group size")
    par.add_argument("--ulysses-degree", type=int, default=d.ulysses_degree,
                     help="Ulysses degree U: split prefill chunks are computed on a U x (sp / U) mesh (all-to-all "
                          "over heads inside groups of U SP ranks, the ring across them); must divide --sp-size and "
                          "each TP rank's heads; 1 = the plain ring")
    par.add_argument("--ulysses-layers", default=d.ulysses_layers, choices=ULYSSES_LAYERS,
                     help="the layers that use the Ulysses mesh: all, or linear (lightning and Gated DeltaNet layers; "
                          "softmax layers then run the ring over the whole SP group)")
    par.add_argument("--sp-min-tokens", type=int, default=d.sp_min_tokens,
                     help="a prefill chunk with at least this many new tokens is split over the SP group")
    par.add_argument("--ring-mode", default=d.ring_mode, choices=("ring", "allgather"),
                     help="how softmax layers see the other SP ranks' KV during SP prefill")
    par.add_argument("--lasp-mode", default=d.lasp_mode, choices=("ring", "allgather"),
                     help="how lightning-attention layers get their incoming state (allgather = LASP-2)")
    par.add_argument("--disable-seq-parallel-tp", dest="seq_parallel_tp", action="store_false",
                     default=argparse.SUPPRESS,
                     help="keep the residual stream replicated over TP during long SP prefills")
    par.add_argument("--dist-init-addr", default=None,
                     help="tcp://host:port for the ranks' rendezvous (node 0's address with --nnodes > 1); "
                          "default: a free local port")
    par.add_argument("--enable-expert-parallel", action="store_true", default=d.enable_expert_parallel,
                     help="MoE experts spread over all sp x tp ranks (all-to-all), not sliced over TP on each")
    par.add_argument("--shard-dense-weights", action="store_true", default=d.shard_dense_weights,
                     help="dense weights stored 1/sp per rank, all-gathered over SP one layer at a time before use "
                          "(no effect at --sp-size 1)")
    par.add_argument("--nnodes", type=int, default=d.nnodes,
                     help="nodes of one server; each runs sp x tp / nnodes ranks (TP inside a node)")
    par.add_argument("--node-rank", type=int, default=d.node_rank,
                     help="this node's index; node 0 serves HTTP, the others run only their worker ranks")

    run = p.add_argument_group("runtime")
    run.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu"), help="auto: cuda if available")
    run.add_argument("--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS,
                     help="auto: flashinfer on CUDA if installed, torch otherwise")
    run.add_argument("--max-running-requests", "--max-num-seqs", type=int, default=d.max_running_requests,
                     help="requests decoded together in one batch")
    run.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                     help="requests queued beyond the running ones; more are answered 429 with Retry-After")
    run.add_argument("--chunked-prefill-size", "--max-num-batched-tokens", type=int, default=d.chunked_prefill_size,
                     help="max new tokens per step; <= 0 disables chunking")
    run.add_argument("--page-size", "--block-size", type=int, default=d.page_size, help="KV cache page size in tokens")
    run.add_argument("--cuda-graph-max-bs", type=int, default=d.cuda_graph_max_bs,
                     help="decode steps of up to this many requests replay a CUDA graph captured at start-up")
    run.add_argument("--cuda-graph-max-extend-tokens", type=int, default=d.cuda_graph_max_extend_tokens,
                     help="short extend steps (a turn's new tokens over a cached prefix) of up to this many tokens "
                          "replay a CUDA graph per token bucket (16, 32, ...); 0 (default): none")
    run.add_argument("--disable-cuda-graph", "--enforce-eager", dest="cuda_graph", action="store_const", const="off",
                     default=argparse.SUPPRESS, help="run every step eagerly")
    run.add_argument("--disable-sp-split-mlp", dest="sp_split_mlp", action="store_false", default=argparse.SUPPRESS,
                     help="sp > 1: every SP rank computes the whole dense MLP in decode steps of replicated requests "
                          "(by default each computes 1/sp of it and the results are summed)")
    run.add_argument("--disable-overlap-schedule", dest="overlap_schedule", action="store_false",
                     default=argparse.SUPPRESS,
                     help="wait for each step's tokens before preparing the next step (no host / device overlap)")
    run.add_argument("--disable-prefix-cache", "--disable-radix-cache", "--no-enable-prefix-caching",
                     dest="enable_prefix_cache", action="store_false", default=argparse.SUPPRESS,
                     help="do not keep ended requests' KV for later shared prefixes")
    run.add_argument("--enable-prefix-caching", dest="enable_prefix_cache", action="store_true",
                     default=argparse.SUPPRESS, help="keep them (the default; vLLM's spelling)")
    run.add_argument("--prefix-cache-snapshots", type=int, default=d.prefix_cache_snapshots,
                     help="linear-attention state snapshots the prefix cache keeps (hybrid models); default: up to "
                          "64, within a quarter of the cache budget")
    run.add_argument("--mem-fraction-static", "--gpu-memory-utilization", type=float, default=d.mem_fraction_static,
                     help="fraction of GPU memory for weights and caches")
    run.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens,
                     help="at most this many KV-cache tokens per rank (default: as many as the memory budget holds)")
    run.add_argument("--cpu-cache-gb", type=float, default=d.cpu_cache_gb, help="cache budget on CPU, in GiB")
    run.add_argument("--profile-dir", default=d.profile_dir,
                     help="enable POST /start_profile and /stop_profile: every rank's torch.profiler trace and op "
                          "table go to this directory (on each node)")
    return p


def parse_server_args(argv: list[str] | None = None) -> ServerArgs:
    """Parse ``argv`` (argparse exits 2 on unknown flags or bad values); ``ServerArgs.validate`` is left to the
    caller so that it can print its one-line error."""
    ns = vars(build_parser().parse_args(argv))
    engine = EngineConfig(**{f.name: ns[f.name] for f in fields(EngineConfig) if f.name in ns})
    name = ns["served_model_name"] or (ns["model_path"] or BUILTIN_MODEL_NAME)
    return ServerArgs(
        engine=engine,
        host=ns["host"],
        port=ns["port"],
        served_model_name=name,
        api_key=ns["api_key"],
        log_level=ns["log_level"],
        max_request_bytes=ns["max_request_bytes"],
        allow_control_tokens_in_chat=ns["allow_control_tokens_in_chat"],
        shutdown_grace_period=ns["shutdown_grace_period"],
        watchdog_timeout=ns["watchdog_timeout"],
        chat_template=ns["chat_template"],
        tool_call_parser=ns["tool_call_parser"],
        reasoning_parser=ns["reasoning_parser"],
        default_max_tokens=ns["default_max_tokens"],
        allowed_origins=tuple(ns["allowed_origins"]),
        allowed_methods=tuple(ns["allowed_methods"]),
        allowed_headers=tuple(ns["allowed_headers"]),
        allow_credentials=ns["allow_credentials"],
        revision=ns["revision"],
    )
