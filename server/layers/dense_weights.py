"""Per-layer all-gather of dense weights stored 1/sp per rank (``--shard-dense-weights``, FSDP-style).

Every dense weight is stored as this SP rank's rows of its TP slice (:mod:`server.layers.row_shard`). The model
runs as a sequence of units: the embedding, each decoder layer, the LM head. Just before a unit runs its weights
are all-gathered over the SP group (each TP rank its own slice, over ``ParallelState.weight_group``) into a
gather buffer, the parameters' ``data`` point at the gathered rows while it runs, and back at the stored rows
after; the next unit's gather is started before this one computes (an async collective on its own communicator,
so it runs beside the layer's compute and its SP ring). The LM head is gathered at the end of every forward (every
SP rank runs it; only SP rank 0 computes logits) and stays gathered until the next forward starts.

Decode steps whose rows are the same on every SP rank (``ForwardContext.split_mlp``: the graph-form steps of
replicated requests) gather only the LM head: every other unit runs on its stored rows, the linears all-gathering
their outputs over SP (:func:`server.layers.linear.sliced_linear`) and the embedding summing its rows' lookups.

Buffers are allocated once: two for the decoder layers (layer i uses buffer i mod 2, so layer i + 1's gather
never writes what layer i reads), each the size of the largest layer's whole TP slices, and one for the embedding
and LM head, which share it (they are never in use together). A CUDA graph captures the gathers with the layers
(into these same static buffers); inside a capture the gathers are issued in order, without the async prefetch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from server.layers.row_shard import is_row_sharded
from server.sp.groups import ParallelState

VOCAB = "vocab"  # the buffer set of the embedding and the LM head
ALIGN = 64  # elements: each gathered weight starts 128-byte aligned in its buffer (bf16), as GEMM kernels prefer


def gathered_numel(param: nn.Parameter, sp_size: int) -> int:
    """Elements a sharded parameter takes in a gather buffer: every SP rank's rows, padding included, aligned."""
    return -(-sp_size * param.numel() // ALIGN) * ALIGN


class DenseWeightGather:
    """Gathers each unit's SP-sharded dense weights just before it runs and prefetches the next unit's; see the
    module docstring. ``attach`` installs it on a model (hooks on the embedding, each decoder layer and the model)."""

    def __init__(self, model: nn.Module, pstate: ParallelState):
        self.pstate = pstate
        units = [model.embed_tokens, *model.layers, model.lm_head]
        self.units: list[list[nn.Parameter]] = [[p for p in u.parameters() if is_row_sharded(p)] for u in units]
        covered = {id(p) for ps in self.units for p in ps}
        stray = [n for n, p in model.named_parameters() if is_row_sharded(p) and id(p) not in covered]
        if stray:
            raise ValueError(f"--shard-dense-weights: sharded weights outside the embedding, the decoder layers and "
                             f"the LM head cannot be gathered: {stray}")
        last = len(units) - 1
        kinds = [VOCAB if k in (0, last) else (k - 1) % 2 for k in range(len(units))]
        dtypes = {p.dtype for ps in self.units for p in ps}
        if len(dtypes) > 1:
            raise ValueError(f"--shard-dense-weights gathers weights of one dtype, found {sorted(map(str, dtypes))}")
        # one flat buffer per set, as large as its largest unit; a unit's gathered weights are views of it, made
        # here, outside inference mode, so that parameters may point at them
        sizes: dict[object, int] = {}
        for k, params in enumerate(self.units):
            sizes[kinds[k]] = max(sizes.get(kinds[k], 0), sum(gathered_numel(p, pstate.sp_size) for p in params))
        dtype = dtypes.pop() if dtypes else torch.float32
        device = next(model.parameters()).device
        self.buffers = {kind: torch.empty(n, dtype=dtype, device=device) for kind, n in sizes.items()}
        # per unit, per parameter: (the buffer its gather fills, the rows of it that are the whole weight)
        self.views: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for k, params in enumerate(self.units):
            views, offset = [], 0
            for p in params:
                p.row_shard.stored = p.data
                n = gathered_numel(p, pstate.sp_size)
                whole = pstate.sp_size * p.numel()
                buf = self.buffers[kinds[k]][offset : offset + whole].view(pstate.sp_size * p.shape[0], *p.shape[1:])
                views.append((buf, buf[: p.row_shard.rows]))
                offset += n
            self.views.append(views)
        self.pending: dict[int, list] = {}  # unit -> its in-flight async gathers
        self.gathered: set[int] = set()
        # decode steps whose rows every SP rank holds alike run the layers on their stored rows (no weight gathers),
        # unless some layer reads a weight itself
        self.sliceable = not any(getattr(p, "read_whole", False) for ps in self.units for p in ps)
        self.sliced = False  # this forward runs on the stored rows

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the gather buffers (two decoder layers' and the vocabulary's whole TP slices)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def attach(self, model: nn.Module) -> None:
        last = len(self.units) - 1
        model.register_forward_pre_hook(lambda m, args: self.begin(args[0]))
        model.embed_tokens.register_forward_pre_hook(lambda m, args: self.before(0))
        model.embed_tokens.register_forward_hook(lambda m, args, out: self.after(0))
        for i, layer in enumerate(model.layers):
            layer.register_forward_pre_hook(lambda m, args, k=i + 1: self.before(k))
            layer.register_forward_hook(lambda m, args, out, k=i + 1: self.after(k))
        model.register_forward_hook(lambda m, args, out: self.before(last))  # logits after the forward
        model.dense_weight_gather = self

    def begin(self, ctx) -> None:
        """A forward starts: it runs on the stored rows when every row is the same on every SP rank (the decode
        steps that split dense MLPs over SP, ``ForwardContext.split_mlp``)."""
        self.sliced = self.sliceable and ctx.split_mlp

    def start(self, k: int) -> None:
        """Issue unit ``k``'s gathers (async unless a CUDA graph is being captured)."""
        if k in self.pending or k in self.gathered:
            return
        capturing = self.pstate.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        works = [dist.all_gather_into_tensor(buf, p.row_shard.stored, group=self.pstate.weight_group,
                                             async_op=not capturing)
                 for p, (buf, _) in zip(self.units[k], self.views[k])]
        self.pending[k] = [w for w in works if w is not None]

    def before(self, k: int) -> None:
        """Unit ``k`` is about to run: its weights gathered and in place, the next unit's gather started. A sliced
        forward gathers only the LM head (only SP rank 0 computes logits, from the whole head)."""
        last = len(self.units) - 1
        if k == 0:
            self.after(last)  # the LM head's rows give the shared buffer back to the embedding
        if self.sliced and k < last:
            if k + 1 == last:
                self.start(last)
            return
        self.start(k)
        for w in self.pending.pop(k, []):
            w.wait()
        for p, (_, whole) in zip(self.units[k], self.views[k]):
            p.data = whole
            p.row_shard.gathered = True
        self.gathered.add(k)
        if k + 1 < len(self.units):
            self.start(k + 1)

    def after(self, k: int) -> None:
        """Unit ``k`` has run: its parameters point at the stored rows again (the buffer is free for unit k + 2)."""
        if k not in self.gathered:
            return
        for p in self.units[k]:
            p.data = p.row_shard.stored
            p.row_shard.gathered = False
        self.gathered.discard(k)


def attach_dense_weight_gather(model: nn.Module, pstate: ParallelState) -> DenseWeightGather | None:
    """Install the per-unit gather on a model whose dense weights are sharded over SP; None when they are not."""
    if pstate.dense_shards == 1:
        return None
    gather = DenseWeightGather(model, pstate)
    gather.attach(model)
    return gather
