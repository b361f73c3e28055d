"""Kernel dispatch: the fast kernel on CUDA where one exists, the plain-torch reference otherwise.

Every op here has the signature and semantics of its ``*_ref`` twin; callers never pick a backend.
On CUDA: RMSNorm, SiLU-and-multiply, RoPE, lightning attention and merges run the Triton kernels (merge_state on
flashinfer where installed), attention_runs runs flashinfer for fp16/bf16 where installed, the gated delta rule
runs fla-core's kernels for fp16/bf16 where installed (Gated DeltaNet's for a per-head gate, KDA's for a
per-channel one). The fast modules are imported on first CUDA use, so CPU processes never build Triton kernels.
"""

from __future__ import annotations

import torch

from server.kernels.attention_ref import attention_with_lse_ref
from server.kernels.gdn_ref import (
    causal_conv1d_decode_ref,
    causal_conv1d_prefill_ref,
    gdn_chunk_affine_ref,
    gdn_decode_ref,
    gdn_prefill_ref,
    gdn_state_correction_ref,
)
from server.kernels.lightning_ref import (
    lightning_decode_ref,
    lightning_prefill_ref,
    lightning_state_correction_ref,
)
from server.kernels.merge_state_ref import merge_state_ref, merge_states_ref
from server.kernels.pointwise_ref import rms_norm_ref, rope_ref, silu_and_mul_ref
from server.runs import Run, runs_to_positions

LIGHTNING_BLOCK = 64

# Process-wide backend choice (``--attention-backend``): "auto" uses the fast kernels on CUDA, "flashinfer"
# requires flashinfer for softmax attention, "torch" runs the plain references everywhere (debugging, parity).
_backend = "auto"


def set_kernel_backend(name: str) -> None:
    global _backend
    if name not in ("auto", "flashinfer", "torch"):
        raise ValueError(f"unknown kernel backend {name!r}")
    if name == "flashinfer":
        try:
            import flashinfer  # noqa: F401
        except ImportError as e:
            raise ValueError("--attention-backend flashinfer was given but flashinfer is not installed "
                             "(pip install -e '.[gpu]'), or use auto/torch") from e
    _backend = name


def _fast(x: torch.Tensor) -> bool:
    return x.is_cuda and _backend != "torch"


def attention_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_runs: list[Run], k_runs: list[Run], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention where key j is visible to query i iff ``pos(k_j) <= pos(q_i)`` (the reference; backends
    bring their own, see :meth:`server.backends.attention.AttentionBackend.attention_runs`).

    q ``[Nq, Hq, D]``, k/v ``[Nk, Hk, D]`` (GQA: ``Hq % Hk == 0``). Returns ``o [Nq, Hq, D]`` (q's dtype) and
    ``lse [Nq, Hq]`` fp32 in base 2 (-inf for rows that see no key).
    """
    q_pos = runs_to_positions(q_runs, q.device)
    k_pos = runs_to_positions(k_runs, q.device)
    return attention_with_lse_ref(q, k, v, q_pos, k_pos, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """See :func:`server.kernels.pointwise_ref.rms_norm_ref`."""
    if _fast(x) and weight.dtype == x.dtype and x.stride(-1) == 1:
        from server.kernels.pointwise import MAX_NORM_WIDTH, rms_norm_triton

        if x.shape[-1] <= MAX_NORM_WIDTH:
            return rms_norm_triton(x, weight, eps, zero_centered)
    return rms_norm_ref(x, weight, eps, zero_centered)


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """See :func:`server.kernels.pointwise_ref.silu_and_mul_ref`."""
    if _fast(h) and h.stride(-1) == 1:
        from server.kernels.pointwise import silu_and_mul_triton

        return silu_and_mul_triton(h)
    return silu_and_mul_ref(h)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """See :func:`server.kernels.pointwise_ref.rope_ref`. On CUDA the result is written into ``x`` (callers use the
    returned tensor and never ``x`` again)."""
    if _fast(x) and x.dim() == 3 and x.stride(-1) == 1 and cos.dtype == x.dtype:
        from server.kernels.pointwise import rope_triton_

        return rope_triton_(x, cos, sin)
    return rope_ref(x, cos, sin)


def lightning_prefill(q, k, v, slopes, cu_seqlens, initial_states=None):
    """See :func:`server.kernels.lightning_ref.lightning_prefill_ref`."""
    if _fast(q):
        from server.kernels.lightning import lightning_prefill_triton

        return lightning_prefill_triton(q, k, v, slopes, cu_seqlens, initial_states)
    return lightning_prefill_ref(q, k, v, slopes, cu_seqlens, initial_states, LIGHTNING_BLOCK)


def lightning_state_correction(o, q, slopes, cu_seqlens, states):
    """See :func:`server.kernels.lightning_ref.lightning_state_correction_ref`."""
    if _fast(q):
        from server.kernels.lightning import lightning_state_correction_triton

        return lightning_state_correction_triton(o, q, slopes, cu_seqlens, states)
    return lightning_state_correction_ref(o, q, slopes, cu_seqlens, states)


def lightning_decode(q, k, v, slopes, state_pool, slots):
    """See :func:`server.kernels.lightning_ref.lightning_decode_ref`."""
    if _fast(q):
        from server.kernels.lightning import lightning_decode_triton

        return lightning_decode_triton(q, k, v, slopes, state_pool, slots)
    return lightning_decode_ref(q, k, v, slopes, state_pool, slots)


def _fla_delta_rule(q: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, recurrent: bool):
    """fla-core's kernel for this gated delta rule when it can serve ``q``/``v`` (CUDA, fp16/bf16: fla has no fp32
    path): the Gated DeltaNet kernels for one decay per head (g ``[..., Hv]``), the KDA kernels for one per key
    channel (g ``[..., Hv, Dk]``); chunked for prefill, fused recurrent for decode. None where it cannot."""
    if not _fast(v) or v.dtype not in (torch.float16, torch.bfloat16) or v.shape[-1] % 16 or q.shape[-1] % 16:
        return None  # fla's tiles need head dims that are multiples of 16
    try:
        if g.dim() > beta.dim():
            from fla.ops.kda import chunk_kda, fused_recurrent_kda

            return fused_recurrent_kda if recurrent else chunk_kda
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError:
        return None
    return fused_recurrent_gated_delta_rule if recurrent else chunk_gated_delta_rule


def gdn_prefill(q, k, v, g, beta, cu_seqlens, initial_states=None):
    """See :func:`server.kernels.gdn_ref.gdn_prefill_ref`; on CUDA fla's chunked kernel where installed."""
    kernel = _fla_delta_rule(q, v, g, beta, recurrent=False)
    if kernel is None:
        return gdn_prefill_ref(q, k, v, g, beta, cu_seqlens, initial_states)
    rep = v.shape[1] // q.shape[1]  # fla's chunked kernel wants one q/k head per value head
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    b, hv, dk, dv = len(lens), v.shape[1], q.shape[-1], v.shape[-1]
    init = initial_states if initial_states is not None else \
        torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=v.device)
    finals = init.float().clone()
    keep = (lens > 0).nonzero().flatten()  # empty sequences (empty SP chunks) keep their state
    if keep.numel() == 0:
        return torch.empty_like(v), finals
    cu = torch.cat([lens.new_zeros(1), lens[keep].cumsum(0)]).long()
    o, out_states = kernel(  # every argument by name: fla's positional order differs by function
        q=q.repeat_interleave(rep, 1).to(v.dtype).unsqueeze(0), k=k.repeat_interleave(rep, 1).to(v.dtype).unsqueeze(0),
        v=v.unsqueeze(0), g=g.float().unsqueeze(0), beta=beta.float().unsqueeze(0), scale=dk**-0.5,
        initial_state=finals[keep].contiguous(), output_final_state=True, use_qk_l2norm_in_kernel=True,
        cu_seqlens=cu)
    finals[keep] = out_states.float()
    return o[0], finals


def gdn_chunk_affine(q, k, v, g, beta, cu_seqlens):
    """See :func:`server.kernels.gdn_ref.gdn_chunk_affine_ref` (its prefill pass through :func:`gdn_prefill`)."""
    return gdn_chunk_affine_ref(q, k, v, g, beta, cu_seqlens, prefill=gdn_prefill)


def gdn_state_correction(o_loc, q_tilde, cu_seqlens, states):
    """See :func:`server.kernels.gdn_ref.gdn_state_correction_ref` (batched matmuls: fast as it is)."""
    return gdn_state_correction_ref(o_loc, q_tilde, cu_seqlens, states)


def gdn_decode(q, k, v, g, beta, state_pool, slots):
    """See :func:`server.kernels.gdn_ref.gdn_decode_ref`; on CUDA fla's fused recurrent kernel where installed."""
    kernel = _fla_delta_rule(q, v, g, beta, recurrent=True)
    if kernel is None:
        return gdn_decode_ref(q, k, v, g, beta, state_pool, slots)
    rep = v.shape[1] // q.shape[1]
    # by name: the fifth positional parameter of fla's fused recurrent GDN kernel is ``gk`` (per-key decays)
    o, st = kernel(
        q=q.repeat_interleave(rep, 1).to(v.dtype).unsqueeze(1), k=k.repeat_interleave(rep, 1).to(v.dtype).unsqueeze(1),
        v=v.unsqueeze(1), g=g.float().unsqueeze(1), beta=beta.float().unsqueeze(1), scale=q.shape[-1] ** -0.5,
        initial_state=state_pool[slots], output_final_state=True, use_qk_l2norm_in_kernel=True)
    state_pool[slots] = st.float()
    return o[:, 0]


def causal_conv1d_prefill(x, weight, bias, cu_seqlens, conv_states=None):
    """See :func:`server.kernels.gdn_ref.causal_conv1d_prefill_ref` (torch's conv1d per sequence)."""
    return causal_conv1d_prefill_ref(x, weight, bias, cu_seqlens, conv_states)


def causal_conv1d_decode(x, weight, bias, state_pool, slots):
    """See :func:`server.kernels.gdn_ref.causal_conv1d_decode_ref`."""
    return causal_conv1d_decode_ref(x, weight, bias, state_pool, slots)


def merge_states(o: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor | None = None,
                 o_local: torch.Tensor | None = None):
    """See :func:`server.kernels.merge_state_ref.merge_states_ref`."""
    if _fast(o):
        from server.kernels.merge_state import merge_states as merge_states_fast

        return merge_states_fast(o, lse, keep, o_local)
    return merge_states_ref(o, lse, keep, o_local)


def merge_state(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """See :func:`server.kernels.merge_state_ref.merge_state_ref`."""
    if _fast(o_a):
        from server.kernels.merge_state import merge_state as merge_state_fast

        return merge_state_fast(o_a, lse_a, o_b, lse_b)
    return merge_state_ref(o_a, lse_a, o_b, lse_b)


def merge_state_into(o_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge ``(o, lse)`` into the accumulator ``(o_acc, lse_acc)`` in place (o_acc typically fp32)."""
    if _fast(o_acc):
        from server.kernels.merge_state import merge_state_triton

        merge_state_triton(o_acc, lse_acc, o, lse.float(), out=o_acc, out_lse=lse_acc)
        return
    merged, merged_lse = merge_state_ref(o_acc, lse_acc, o.to(o_acc.dtype), lse.float())
    o_acc.copy_(merged)
    lse_acc.copy_(merged_lse)
