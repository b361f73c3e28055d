"""Merge partial attention results ``(o, lse)`` by their base-2 log-sum-exp: Triton, or flashinfer on CUDA.

Semantics of :mod:`server.kernels.merge_state_ref`: ``lse = log2(sum_k 2^lse_k)``,
``o = sum_k o_k 2^(lse_k - lse)``, fp32 accumulation, ``-inf`` rows contribute nothing, an all ``-inf`` row
gives ``o = 0``, ``lse = -inf``.

One Triton kernel serves both forms: state 0 comes from one tensor and states ``1..K-1`` from a second tensor
strided along its leading dim, so a two-way merge reads its inputs where they are and a K-way merge reads one
stacked ``[K, N, H, D]`` tensor without copies.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_rows"])  # the row count changes every call and only bounds the masks
def _merge_states_kernel(
    O_FIRST, LSE_FIRST, O_REST, LSE_REST, O_OUT, LSE_OUT, KEEP, O_LOCAL,
    n_rows, H, D,
    s_of_n, s_of_h, s_lf_n, s_lf_h,
    s_or_k, s_or_n, s_or_h, s_lr_k, s_lr_n, s_lr_h,
    s_oo_n, s_oo_h, s_lo_n, s_lo_h, s_ol_n, s_ol_h,
    NUM_REST: tl.constexpr, BLOCK_R: tl.constexpr, BD: tl.constexpr, HAS_KEEP: tl.constexpr,
):
    """Rows are (n, h) pairs, ``BLOCK_R`` of them per program, each a full head dim. o tensors ``[N, H, D]`` with
    a contiguous last dim (the rest ``[K-1, N, H, D]``), lse tensors ``[N, H]`` fp32 (rest ``[K-1, N, H]``).
    The output may alias the first input: each program reads its rows before writing them. NUM_REST is a
    compile-time count so the loop unrolls and all parts' loads are in flight together. With HAS_KEEP, rows n
    whose ``KEEP[n]`` is 0 output ``O_LOCAL``'s row instead of the merge (their lse output is the merge's)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    n = (rows // H).to(tl.int64)
    h = rows % H
    offs_d = tl.arange(0, BD)
    mask = mask_r[:, None] & (offs_d[None, :] < D)

    # Online merge: running max m, weight sum den and weighted sum acc, all relative to m.
    m = tl.load(LSE_FIRST + n * s_lf_n + h * s_lf_h, mask=mask_r, other=float("-inf")).to(tl.float32)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.exp2(m - m_safe)
    acc = tl.load(O_FIRST + n[:, None] * s_of_n + h[:, None] * s_of_h + offs_d[None, :], mask=mask, other=0.0)
    acc = acc.to(tl.float32) * den[:, None]
    for k in tl.static_range(NUM_REST):
        lse = tl.load(LSE_REST + k * s_lr_k + n * s_lr_n + h * s_lr_h, mask=mask_r, other=float("-inf"))
        o = tl.load(O_REST + k * s_or_k + n[:, None] * s_or_n + h[:, None] * s_or_h + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_new_safe)
        w = tl.exp2(lse - m_new_safe)
        acc = acc * alpha[:, None] + o * w[:, None]
        den = den * alpha + w
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    has = den > 0
    out = tl.where(has[:, None], acc / tl.where(has, den, 1.0)[:, None], 0.0)
    out_lse = tl.where(has, m_safe + tl.log2(tl.where(has, den, 1.0)), float("-inf"))
    if HAS_KEEP:
        local = (tl.load(KEEP + n, mask=mask_r, other=1) == 0)
        o_local = tl.load(O_LOCAL + n[:, None] * s_ol_n + h[:, None] * s_ol_h + offs_d[None, :],
                          mask=mask & local[:, None], other=0.0).to(tl.float32)
        out = tl.where(local[:, None], o_local, out)
    tl.store(O_OUT + n[:, None] * s_oo_n + h[:, None] * s_oo_h + offs_d[None, :], out.to(O_OUT.dtype.element_ty),
             mask=mask)
    tl.store(LSE_OUT + n * s_lo_n + h * s_lo_h, out_lse, mask=mask_r)


def _launch(o_first, lse_first, o_rest, lse_rest, num_rest, o_out, lse_out, keep=None, o_local=None) -> None:
    has_keep = keep is not None
    local = o_local if has_keep else o_first
    for name, t in (("o", o_first), ("o", o_rest), ("out", o_out), ("o_local", local)):
        if t.stride(-1) != 1:
            raise ValueError(f"merge_state: {name} needs a contiguous head dim, got strides {tuple(t.stride())}")
    n, h, d = o_first.shape
    if n * h == 0:
        return
    bd = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // bd))
    rest_o = (o_rest.stride(0), o_rest.stride(1), o_rest.stride(2)) if o_rest.dim() == 4 else (0, *o_rest.stride()[:2])
    rest_l = (lse_rest.stride(0), lse_rest.stride(1), lse_rest.stride(2)) if lse_rest.dim() == 3 \
        else (0, *lse_rest.stride())
    _merge_states_kernel[(triton.cdiv(n * h, block_r),)](
        o_first, lse_first, o_rest, lse_rest, o_out, lse_out, keep if has_keep else lse_first, local,
        n * h, h, d,
        o_first.stride(0), o_first.stride(1), lse_first.stride(0), lse_first.stride(1),
        *rest_o, *rest_l,
        o_out.stride(0), o_out.stride(1), lse_out.stride(0), lse_out.stride(1), local.stride(0), local.stride(1),
        NUM_REST=num_rest, BLOCK_R=block_r, BD=bd, HAS_KEEP=has_keep, num_warps=4,
    )


def merge_state_triton(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    out: torch.Tensor | None = None,
    out_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way merge. o ``[N, H, D]`` (any float dtypes), lse ``[N, H]`` fp32 base 2.

    Writes ``out`` (default: new, o_a's dtype) and ``out_lse`` (default: new fp32); either may be o_a / lse_a
    for an in-place merge into an accumulator.
    """
    out = torch.empty_like(o_a) if out is None else out
    out_lse = torch.empty_like(lse_a, dtype=torch.float32) if out_lse is None else out_lse
    _launch(o_a, lse_a, o_b, lse_b, 1, out, out_lse)
    return out, out_lse


def merge_states_triton(o: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor | None = None,
                        o_local: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K-way merge. o ``[K, N, H, D]``, lse ``[K, N, H]`` fp32 base 2 (both may be strided views with a
    contiguous last dim) -> ``o [N, H, D]`` (o's dtype), ``lse [N, H]``. With ``keep`` ``[N]``, the rows whose flag
    is 0 get ``o_local`` ``[N, H, D]``'s row instead of the merge."""
    kk, n, h, d = o.shape
    out = torch.empty(n, h, d, dtype=o.dtype, device=o.device)
    out_lse = torch.empty(n, h, dtype=torch.float32, device=o.device)
    if kk == 0:
        return out.zero_(), out_lse.fill_(float("-inf"))
    _launch(o[0], lse[0], o[1:], lse[1:], kk - 1, out, out_lse, keep, o_local)
    return out, out_lse


@functools.cache
def flashinfer_cascade():
    """flashinfer's cascade module (``merge_state``, ``merge_states``) or None where it is not installed."""
    try:
        import flashinfer.cascade as cascade
    except ImportError:
        return None
    return cascade


def _flashinfer_fits(*tensors: torch.Tensor) -> bool:
    o = tensors[0]
    return (
        o.is_cuda
        and o.dtype in (torch.float16, torch.bfloat16)
        and all(t.dtype == o.dtype for t in tensors)
        and o.shape[-1] in (64, 128, 256)
        and flashinfer_cascade() is not None
    )


def merge_state(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way merge (see :func:`merge_state_triton`): flashinfer's kernel where it is installed and takes
    these inputs (CUDA, half dtypes, head dim 64/128/256), Triton otherwise."""
    if _flashinfer_fits(o_a, o_b):
        return flashinfer_cascade().merge_state(o_a.contiguous(), lse_a.float().contiguous(), o_b.contiguous(),
                                                lse_b.float().contiguous())
    return merge_state_triton(o_a, lse_a.float(), o_b, lse_b.float())


def merge_states(o: torch.Tensor, lse: torch.Tensor, keep: torch.Tensor | None = None,
                 o_local: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K-way merge (see :func:`merge_states_triton`). Always Triton: flashinfer's ``merge_states`` wants
    ``[N, K, H, D]`` and a transposing copy would double the bytes moved (see docs/kernels.md)."""
    return merge_states_triton(o, lse.float(), keep, o_local)
