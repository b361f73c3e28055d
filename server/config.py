"""Engine configuration: one frozen dataclass shared by the offline API, the server flags and the workers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where a device is asked for: `launch_server.py --help` stays fast
    import torch


class CommMode(str, enum.Enum):
    """How a split chunk's layers see the other SP ranks: ``ring`` passes KV (softmax) or states (LASP / GDN) from
    rank to rank; ``allgather`` gathers every rank's KV (softmax) or chunk messages (LASP-2 / GDN) at once."""

    RING = "ring"
    ALLGATHER = "allgather"


class CudaGraphMode(str, enum.Enum):
    """``auto``: capture decode graphs on CUDA; ``off``; ``eager``: pad decode steps into the graphs' static
    buffers but run them eagerly (any device: how the CPU tests cover the graph path)."""

    AUTO = "auto"
    OFF = "off"
    EAGER = "eager"


class UlyssesLayers(str, enum.Enum):
    """Which layers of a split chunk run on the Ulysses mesh: ``all``, or ``linear`` (lightning, GDN; softmax layers
    then run the plain ring over the whole SP group)."""

    ALL = "all"
    LINEAR = "linear"


ATTENTION_BACKENDS = ("auto", "flashinfer", "torch")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
CUDA_GRAPH_MODES = tuple(m.value for m in CudaGraphMode)
ULYSSES_LAYERS = tuple(m.value for m in UlyssesLayers)
QUANTIZATIONS = ("fp8",)
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
# fields given as strings (flags, keyword arguments) and held as these enums
_ENUM_FIELDS = {"ring_mode": CommMode, "lasp_mode": CommMode, "cuda_graph": CudaGraphMode,
                "ulysses_layers": UlyssesLayers}


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine (all of its ranks) needs to start.

    ``model_path=None`` selects the built-in model (generated locally on first use). Sizes of the caches come
    from ``mem_fraction_static`` of device memory on CUDA and from ``cpu_cache_gb`` on CPU.
    """

    model_path: str | None = None
    tokenizer_path: str | None = None
    device: str = "auto"  # auto | cuda | cpu
    dtype: str = "auto"  # auto: the checkpoint's dtype on CUDA (bf16 if fp32), float32 on CPU
    load_format: str = "auto"
    # None: as the checkpoint is (FP8 checkpoints run FP8); "fp8": also quantize a high-precision checkpoint's linear
    # weights per channel at load (docs/kernels.md, "FP8 GEMMs")
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto: the model's dtype | fp8_e4m3: KV pages in FP8 with per-tensor scales
    sp_size: int = 1
    tp_size: int = 1
    ulysses_degree: int = 1  # U: the SP group is a U x (sp / U) mesh for split prefill chunks; 1 = the plain ring
    # which layers of a split chunk use that mesh: "all", or "linear" (lightning and GDN layers; softmax layers then
    # run the plain ring over the whole SP group)
    ulysses_layers: str = "all"
    sp_min_tokens: int = 1024  # a prefill chunk with at least this many new tokens is split over the SP group
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_running_requests: int = 64
    max_waiting_requests: int = 1024
    chunked_prefill_size: int = 8192  # max new tokens per step (prefill chunk size); <= 0 disables chunking
    page_size: int = 16
    mem_fraction_static: float = 0.85
    cpu_cache_gb: float = 1.0
    # at most this many KV tokens per rank (SGLang's --max-total-tokens): caps the budget above, e.g. to share one
    # GPU between engines; None: no cap
    max_total_tokens: int | None = None
    attention_backend: str = "auto"
    ring_mode: str = "ring"  # ring | allgather: how softmax layers see other SP ranks' KV during SP prefill
    lasp_mode: str = "ring"  # ring | allgather (LASP-2): how lightning layers get their incoming state
    seq_parallel_tp: bool = True  # long SP prefills keep the residual stream sharded over TP
    cuda_graph: str = "auto"  # auto: capture decode graphs on CUDA | off | eager: pad decode steps, no capture
    cuda_graph_max_bs: int = 64  # the largest decode batch replayed from a graph
    # the largest short extend step (new tokens of every request together) replayed from a graph (token buckets 16,
    # 32, ... up to it; 256 covers an agent's short turns); 0: none, until the captured form is checked on GPUs
    cuda_graph_max_extend_tokens: int = 0
    # sp > 1: graph decode steps whose rows are all replicated split dense MLPs over the SP ranks
    # (docs/sp.md, "Decode: dense MLPs split over the SP ranks")
    sp_split_mlp: bool = True
    # MoE experts spread over all sp x tp ranks (E / N each; rows exchanged by all-to-all) instead of every rank
    # holding each expert's 1/tp slice (docs/sp.md, "Expert parallelism")
    enable_expert_parallel: bool = False
    # dense weights (attention projections, dense MLPs, embeddings, LM head) stored 1/sp per rank and all-gathered
    # over the SP group one layer at a time, the next layer's gather prefetched (docs/sp.md, "Dense weights over SP")
    shard_dense_weights: bool = False
    # rank 0 prepares step N+1 while the device runs step N; step N's tokens reach the host one step later
    # (docs/architecture.md, "Overlapped steps"). None: on CUDA, and on CPU with one rank (several CPU ranks share
    # the cores that would overlap, and the token broadcast is a blocking gloo call there)
    overlap_schedule: bool | None = None
    enable_prefix_cache: bool = True  # ended requests leave their KV (and state snapshots) for later prefixes
    # linear-attention state snapshots the prefix cache keeps (hybrid models); None: up to 64, within a quarter of
    # the cache budget
    prefix_cache_snapshots: int | None = None
    seed: int = 0
    profile_dir: str | None = None  # where POST /start_profile ... /stop_profile write every rank's profile; None: off
    dist_init_addr: str | None = None  # tcp://host:port for the workers' rendezvous; a free local port if None
    nnodes: int = 1
    node_rank: int = 0

    def __post_init__(self) -> None:
        for name, kind in _ENUM_FIELDS.items():  # an unknown value stays as given: validate() names the flag
            value = getattr(self, name)
            if value in {m.value for m in kind}:
                object.__setattr__(self, name, kind(value))

    @property
    def world_size(self) -> int:
        return self.sp_size * self.tp_size

    @property
    def local_world_size(self) -> int:
        """Ranks per node: node k runs ranks ``k * local_world_size ..`` (TP inside a node, SP across nodes)."""
        return self.world_size // self.nnodes

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and what to change."""
        checks = [
            (self.sp_size >= 1, f"--sp-size must be >= 1, got {self.sp_size}"),
            (self.tp_size >= 1, f"--tp-size must be >= 1, got {self.tp_size}"),
            (
                self.ulysses_degree >= 1 and self.sp_size % self.ulysses_degree == 0,
                f"--ulysses-degree must be >= 1 and divide --sp-size {self.sp_size}, got {self.ulysses_degree}",
            ),
            (self.quantization is None or self.quantization in QUANTIZATIONS,
             f"--quantization must be one of {QUANTIZATIONS} or left out, got {self.quantization!r}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"--kv-cache-dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"),
            (self.ulysses_layers in ULYSSES_LAYERS,
             f"--ulysses-layers must be one of {ULYSSES_LAYERS}, got {self.ulysses_layers!r}"),
            (self.device in ("auto", "cuda", "cpu"), f"--device must be auto, cuda or cpu, got {self.device!r}"),
            (self.dtype in DTYPES, f"--dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (
                self.load_format in LOAD_FORMATS,
                f"--load-format must be one of {LOAD_FORMATS}, got {self.load_format!r}",
            ),
            (
                self.attention_backend in ATTENTION_BACKENDS,
                f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}",
            ),
            (
                self.page_size >= 1 and (self.page_size & (self.page_size - 1)) == 0,
                f"--page-size must be a power of two, got {self.page_size}",
            ),
            (
                0.0 < self.mem_fraction_static < 1.0,
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}",
            ),
            (self.max_running_requests >= 1, f"--max-running-requests must be >= 1, got {self.max_running_requests}"),
            (self.sp_min_tokens >= 1, f"--sp-min-tokens must be >= 1, got {self.sp_min_tokens}"),
            (self.ring_mode in ("ring", "allgather"), f"--ring-mode must be ring or allgather, got {self.ring_mode!r}"),
            (self.lasp_mode in ("ring", "allgather"), f"--lasp-mode must be ring or allgather, got {self.lasp_mode!r}"),
            (self.max_model_len is None or self.max_model_len >= 1, "--max-model-len must be >= 1"),
            (self.max_total_tokens is None or self.max_total_tokens >= self.page_size,
             f"--max-total-tokens must be at least one page ({self.page_size} tokens), got {self.max_total_tokens}"),
            (self.cuda_graph in CUDA_GRAPH_MODES,
             f"cuda_graph must be one of {CUDA_GRAPH_MODES}, got {self.cuda_graph!r}"),
            (self.cuda_graph_max_bs >= 0, f"--cuda-graph-max-bs must be >= 0, got {self.cuda_graph_max_bs}"),
            (self.cuda_graph_max_extend_tokens >= 0,
             f"--cuda-graph-max-extend-tokens must be >= 0, got {self.cuda_graph_max_extend_tokens}"),
            (self.overlap_schedule in (None, True, False),
             f"overlap_schedule must be True, False or None (auto), got {self.overlap_schedule!r}"),
            (self.prefix_cache_snapshots is None or self.prefix_cache_snapshots >= 0,
             f"--prefix-cache-snapshots must be >= 0, got {self.prefix_cache_snapshots}"),
            (not (self.shard_dense_weights and self.quantization),
             "--shard-dense-weights does not shard FP8 weights; drop it or --quantization"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.sp_size > 1 and 0 < self.chunked_prefill_size < 2 * self.sp_size:
            raise ValueError(f"--chunked-prefill-size must be at least 2 x --sp-size ({2 * self.sp_size}) so that a "
                             f"prompt chunk can be split over the SP group, got {self.chunked_prefill_size}")
        if self.nnodes < 1 or self.world_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --sp-size x --tp-size = {self.world_size}")
        if self.nnodes > 1 and self.tp_size > self.local_world_size:
            raise ValueError(f"--tp-size {self.tp_size} must fit in one node ({self.local_world_size} ranks per node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr tcp://HOST:PORT of node 0, the same on every node")
        import torch  # last: every check above answers a flag mistake without loading it

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is visible; use --device cpu")
        if self.torch_device().type == "cuda" and self.local_world_size > torch.cuda.device_count():
            raise ValueError(
                f"--sp-size {self.sp_size} x --tp-size {self.tp_size} needs {self.local_world_size} GPUs per node, "
                f"but {torch.cuda.device_count()} are visible"
            )
        if self.attention_backend == "flashinfer" and self.torch_device().type != "cuda":
            raise ValueError("--attention-backend flashinfer needs a CUDA device; use torch on CPU")
