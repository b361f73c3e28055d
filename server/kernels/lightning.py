"""Triton lightning attention: varlen prefill, LASP state correction, and decode.

Same math and conventions as :mod:`server.kernels.lightning_ref` (docs/sp.md: LASP): per head ``lambda = exp(-slope)``,
``S_t = lambda * S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t``; states are ``[H, Dk, Dv]`` fp32; every decay is
computed as ``exp(-slope * n)`` with ``n >= 0``.

Prefill walks each sequence block by block in one fused kernel: per block the intra part (masked, decayed
``Q K^T`` times ``V``), the inter part (``Q`` times the carried state) and the state update, with the state held
in registers. One program owns one (sequence, head, value-slice) and, when a sequence must be cut for
parallelism, one *segment* of it: a first pass then computes every segment's zero-state ``M`` and the main pass
starts each segment from ``lambda^(L j) S_0 + sum_{i<j} lambda^(L (j-1-i)) M_i`` (all exponents >= 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from server.kernels.triton_env import sm_count

DEFAULT_BLOCK = 64


# Lengths that change from call to call (segment sizes, split counts) are not specialized on (Triton would compile
# a variant per "== 1" / "divisible by 16" combination of them: tens of compilations on a fresh host, each
# seconds); they only bound loops and offset positions read from CU_SEQLENS, so nothing is lost.
@triton.jit(do_not_specialize=["SEG_LEN", "NUM_SEG"])
def _lightning_prefill_kernel(
    Q, K, V, OUT, SLOPES, CU_SEQLENS, S0, M_SEG, S_FINAL,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    H, DK, DV, SEG_LEN, NUM_SEG,
    BLOCK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    HAS_S0: tl.constexpr, STATE_ONLY: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (sequence, head, value slice, segment) per program; grid ``(B * H * NV, NUM_SEG)``.

    Q/K ``[T, H, DK]``, V ``[T, H, DV]`` (last dim contiguous), OUT ``[T, H, DV]`` contiguous, SLOPES ``[H]`` fp32,
    CU_SEQLENS ``[B + 1]``, S0/S_FINAL ``[B, H, DK, DV]`` fp32, M_SEG ``[B, NUM_SEG, H, DK, DV]`` fp32.
    STATE_ONLY: the first pass, which writes every non-final segment's zero-state ``M`` to M_SEG and no output.
    """
    pid = tl.program_id(0)
    i_seg = tl.program_id(1)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // H
    i_h = i_bh % H
    bos = tl.load(CU_SEQLENS + i_b)
    seq_len = tl.load(CU_SEQLENS + i_b + 1) - bos
    n_seg = tl.maximum(tl.cdiv(seq_len, SEG_LEN), 1)
    # The last segment's M is never needed: its state goes to S_FINAL in the main pass.
    n_prog_seg = n_seg
    if STATE_ONLY:
        n_prog_seg = n_seg - 1
    if i_seg >= n_prog_seg:
        return
    seg_start = i_seg * SEG_LEN
    seg_n = tl.minimum(seq_len - seg_start, SEG_LEN)
    slope = tl.load(SLOPES + i_h).to(tl.float32)
    # 64-bit base pointers at the segment start, 32-bit offsets inside it (the wrapper bounds SEG_LEN so they
    # fit): wide per-element address arithmetic would cost registers the tiles need.
    first_row = (bos + seg_start).to(tl.int64)
    Q += first_row * stride_qt + i_h * stride_qh
    K += first_row * stride_kt + i_h * stride_kh
    V += first_row * stride_vt + i_h * stride_vh
    OUT += (first_row * H + i_h) * DV

    offs_c = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    state_offs = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    head_state = (i_b * H + i_h).to(tl.int64) * DK * DV

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if not STATE_ONLY:
        if HAS_S0:
            s0 = tl.load(S0 + head_state + state_offs, mask=state_mask, other=0.0)
            state += s0 * tl.exp(-slope * seg_start.to(tl.float32))
        # Earlier segments are full length L; M_i reaches segment j decayed by L * (j - 1 - i) steps.
        for i in range(0, i_seg):
            m_ptr = M_SEG + ((i_b * NUM_SEG + i) * H + i_h).to(tl.int64) * DK * DV + state_offs
            m_i = tl.load(m_ptr, mask=state_mask, other=0.0)
            state += m_i * tl.exp(-slope * ((i_seg - 1 - i) * SEG_LEN).to(tl.float32))

    # Loop invariants: the inter decay lambda^(i+1) and the intra decay lambda^(i-j) for j <= i.
    q_decay = tl.exp(-slope * (offs_c + 1).to(tl.float32))
    diff = offs_c[:, None] - offs_c[None, :]
    intra_decay = tl.where(diff >= 0, tl.exp(-slope * tl.maximum(diff, 0).to(tl.float32)), 0.0)

    for start in range(0, seg_n, BLOCK):
        offs_t = start + offs_c
        mask_t = offs_t < seg_n
        mask_tk = mask_t[:, None] & mask_k[None, :]
        k = tl.load(K + offs_t[:, None] * stride_kt + offs_k[None, :], mask=mask_tk, other=0.0)
        mask_tv = mask_t[:, None] & mask_v[None, :]
        v = tl.load(V + offs_t[:, None] * stride_vt + offs_v[None, :], mask=mask_tv, other=0.0)
        if not STATE_ONLY:
            q = tl.load(Q + offs_t[:, None] * stride_qt + offs_k[None, :], mask=mask_tk, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra_decay
            out = tl.dot(q, state.to(q.dtype), input_precision=PRECISION) * q_decay[:, None]
            out = tl.dot(scores.to(v.dtype), v, out, input_precision=PRECISION)
            tl.store(OUT + offs_t[:, None] * (H * DV) + offs_v[None, :], out.to(OUT.dtype.element_ty), mask=mask_tv)
        # S <- lambda^n S + sum_i lambda^(n-1-i) k_i^T v_i for the n valid rows of this block.
        n_blk = tl.minimum(seg_n - start, BLOCK)
        v_decay = tl.exp(-slope * tl.maximum(n_blk - 1 - offs_c, 0).to(tl.float32))
        v_dec = (v * v_decay[:, None]).to(v.dtype)
        state = state * tl.exp(-slope * n_blk.to(tl.float32))
        state = tl.dot(tl.trans(k), v_dec, state, input_precision=PRECISION)

    if STATE_ONLY:
        m_ptr = M_SEG + ((i_b * NUM_SEG + i_seg) * H + i_h).to(tl.int64) * DK * DV + state_offs
        tl.store(m_ptr, state, mask=state_mask)
    elif i_seg == n_seg - 1:
        tl.store(S_FINAL + head_state + state_offs, state, mask=state_mask)


@triton.jit(do_not_specialize=["NUM_SPLIT"])
def _lightning_correction_kernel(
    Q, O_IN, OUT, SLOPES, CU_SEQLENS, STATES,
    stride_qt, stride_qh, stride_ot, stride_oh,
    H, DK, DV, NUM_SPLIT,
    BLOCK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, PRECISION: tl.constexpr,
):
    """``OUT = O_IN + (Q * lambda^(i+1)) @ S_in`` per sequence; grid ``(B * H * NV, NUM_SPLIT)``.

    Q ``[T, H, DK]``, O_IN ``[T, H, DV]`` (last dims contiguous), OUT ``[T, H, DV]`` contiguous, STATES
    ``[B, H, DK, DV]`` fp32. Split s handles blocks s, s + NUM_SPLIT, ... of its sequence.
    """
    pid = tl.program_id(0)
    i_split = tl.program_id(1)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // H
    i_h = i_bh % H
    bos = tl.load(CU_SEQLENS + i_b).to(tl.int64)
    seq_len = tl.load(CU_SEQLENS + i_b + 1).to(tl.int64) - bos
    slope = tl.load(SLOPES + i_h).to(tl.float32)
    offs_c = tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    s_ptr = STATES + (i_b * H + i_h).to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    state = tl.load(s_ptr, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
    for start in range(i_split * BLOCK, seq_len, NUM_SPLIT * BLOCK):
        offs_t = start + offs_c
        mask_t = offs_t < seq_len
        rows = bos + offs_t
        q = tl.load(Q + rows[:, None] * stride_qt + i_h * stride_qh + offs_k[None, :],
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        mask_o = mask_t[:, None] & mask_v[None, :]
        o = tl.load(O_IN + rows[:, None] * stride_ot + i_h * stride_oh + offs_v[None, :], mask=mask_o, other=0.0)
        decay = tl.exp(-slope * (offs_t + 1).to(tl.float32))
        o = o.to(tl.float32) + tl.dot(q.to(tl.float32), state, input_precision=PRECISION) * decay[:, None]
        tl.store(OUT + (rows[:, None] * H + i_h) * DV + offs_v[None, :], o.to(OUT.dtype.element_ty), mask=mask_o)


@triton.jit
def _lightning_decode_kernel(
    Q, K, V, OUT, SLOPES, POOL, SLOTS,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ps, stride_ph,
    H, DK, DV,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
):
    """One token per request; grid ``(B * H * NV,)``. Q/K ``[B, H, DK]``, V ``[B, H, DV]``, OUT ``[B, H, DV]``
    contiguous, POOL ``[S, H, DK, DV]`` fp32 (inner ``[DK, DV]`` contiguous), SLOTS ``[B]``: the pool row of
    each request, updated in place (``S <- lambda S + k^T v``) before ``o = q S``."""
    pid = tl.program_id(0)
    i_v = pid % NV
    i_bh = pid // NV
    i_b = i_bh // H
    i_h = i_bh % H
    slot = tl.load(SLOTS + i_b).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    lam = tl.exp(-tl.load(SLOPES + i_h).to(tl.float32))
    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    k = tl.load(K + i_b * stride_kb + i_h * stride_kh + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(V + i_b * stride_vb + i_h * stride_vh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    p = POOL + slot * stride_ps + i_h * stride_ph + offs_k[:, None] * DV + offs_v[None, :]
    mask = mask_k[:, None] & mask_v[None, :]
    state = tl.load(p, mask=mask, other=0.0) * lam + k[:, None] * v[None, :]
    tl.store(p, state, mask=mask)
    o = tl.sum(q[:, None] * state, axis=0)
    tl.store(OUT + (i_b * H + i_h) * DV + offs_v, o.to(OUT.dtype.element_ty), mask=mask_v)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the exactness path (CPU parity, tests); half inputs take the tensor-core path.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {tuple(t.stride())}")


def lightning_prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_states: torch.Tensor | None = None,
    *,
    block: int = DEFAULT_BLOCK,
    block_v: int | None = None,
    num_segments: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen lightning prefill. q/k ``[T, H, Dk]``, v ``[T, H, Dv]`` packed by ``cu_seqlens [B+1]``;
    slopes ``[H]``; initial_states ``[B, H, Dk, Dv]`` fp32 or None (zeros, the LASP ``M`` mode).

    Returns ``o [T, H, Dv]`` in q's dtype and final states ``[B, H, Dk, Dv]`` fp32.
    ``block`` is the intra block (>= 16, power of 2), ``block_v`` the value slice per program;
    ``num_segments`` cuts each sequence for parallelism (default: about one program per SM).
    """
    _check_last_dim_contiguous(q=q, k=k, v=v)
    n_tok, h, dk = q.shape
    dv = v.shape[-1]
    b = cu_seqlens.numel() - 1
    dev = q.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int32)
    sl = slopes.to(device=dev, dtype=torch.float32).contiguous()
    o = torch.empty(n_tok, h, dv, dtype=q.dtype, device=dev)
    final = torch.empty(b, h, dk, dv, dtype=torch.float32, device=dev)
    if b == 0:
        return o, final
    bk = max(16, triton.next_power_of_2(dk))
    bv = block_v or min(64, max(16, triton.next_power_of_2(dv)))
    nv = triton.cdiv(dv, bv)
    programs = b * h * nv
    if num_segments is None:
        # A program holds a whole SM (3-stage pipelined tiles fill its shared memory), so aim for one wave of
        # one program per SM; cutting costs a first pass that reads k and v of all but the last segment.
        num_segments = max(1, sm_count(dev) // programs)
    # Every sequence holds at most n_tok tokens, so segments of this length number at most num_segments.
    seg_len = block * max(1, triton.cdiv(triton.cdiv(max(n_tok, 1), num_segments), block))
    # The kernel addresses rows inside a segment with 32-bit offsets: cap the segment so they cannot overflow.
    max_stride = max(q.stride(0), k.stride(0), v.stride(0), h * dv)
    seg_len = min(seg_len, block * ((2**31 - 1) // max_stride // block - 1))
    num_segments = triton.cdiv(max(n_tok, 1), seg_len)
    s0 = initial_states.to(device=dev, dtype=torch.float32).contiguous() if initial_states is not None else final
    m_seg = final
    common = dict(BLOCK=block, BK=bk, BV=bv, NV=nv, HAS_S0=initial_states is not None,
                  PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    args = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), h, dk, dv, seg_len,
            num_segments)
    if num_segments > 1:
        m_seg = torch.empty(b, num_segments, h, dk, dv, dtype=torch.float32, device=dev)
        _lightning_prefill_kernel[(programs, num_segments)](
            q, k, v, o, sl, cu, s0, m_seg, final, *args, STATE_ONLY=True, **common)
    _lightning_prefill_kernel[(programs, num_segments)](
        q, k, v, o, sl, cu, s0, m_seg, final, *args, STATE_ONLY=False, **common)
    return o, final


def lightning_state_correction_triton(
    o: torch.Tensor,
    q: torch.Tensor,
    slopes: torch.Tensor,
    cu_seqlens: torch.Tensor,
    states: torch.Tensor,
    *,
    block: int = DEFAULT_BLOCK,
    block_v: int | None = None,
) -> torch.Tensor:
    """LASP correction ``O + (Q * lambda^(i+1)) @ S_in`` (i = index within the sequence), as a new tensor.

    o ``[T, H, Dv]``, q ``[T, H, Dk]``, states ``[B, H, Dk, Dv]`` fp32; returns ``[T, H, Dv]`` in o's dtype.
    """
    _check_last_dim_contiguous(o=o, q=q)
    n_tok, h, dk = q.shape
    dv = o.shape[-1]
    b = cu_seqlens.numel() - 1
    dev = q.device
    out = torch.empty(n_tok, h, dv, dtype=o.dtype, device=dev)
    if b == 0 or n_tok == 0:
        return out.copy_(o)
    bk = max(16, triton.next_power_of_2(dk))
    bv = block_v or min(64, max(16, triton.next_power_of_2(dv)))
    nv = triton.cdiv(dv, bv)
    programs = b * h * nv
    num_split = max(1, min(triton.cdiv(4 * sm_count(dev), programs), triton.cdiv(n_tok, block)))
    _lightning_correction_kernel[(programs, num_split)](
        q, o, out, slopes.to(device=dev, dtype=torch.float32).contiguous(),
        cu_seqlens.to(device=dev, dtype=torch.int32), states.to(device=dev, dtype=torch.float32).contiguous(),
        q.stride(0), q.stride(1), o.stride(0), o.stride(1), h, dk, dv, num_split,
        BLOCK=block, BK=bk, BV=bv, NV=nv, PRECISION=_precision(q.dtype), num_warps=4,
    )
    return out


def lightning_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    state_pool: torch.Tensor,
    slots: torch.Tensor,
    *,
    block_v: int = 32,
) -> torch.Tensor:
    """One decode token per request. q/k ``[B, H, Dk]``, v ``[B, H, Dv]``, state_pool ``[S, H, Dk, Dv]`` fp32
    (updated in place at rows ``slots [B]``). Returns ``o [B, H, Dv]`` in q's dtype."""
    _check_last_dim_contiguous(q=q, k=k, v=v)
    if state_pool.dtype != torch.float32 or state_pool.stride(-1) != 1 or state_pool.stride(-2) != state_pool.shape[-1]:
        raise ValueError("state_pool must be fp32 with contiguous [Dk, Dv] states per (slot, head)")
    b, h, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty(b, h, dv, dtype=q.dtype, device=q.device)
    if b == 0:
        return o
    bk = max(16, triton.next_power_of_2(dk))
    bv = min(block_v, max(16, triton.next_power_of_2(dv)))
    nv = triton.cdiv(dv, bv)
    _lightning_decode_kernel[(b * h * nv,)](
        q, k, v, o, slopes.to(device=q.device, dtype=torch.float32).contiguous(), state_pool,
        slots.to(device=q.device),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        state_pool.stride(0), state_pool.stride(1), h, dk, dv,
        BK=bk, BV=bv, NV=nv, num_warps=4,
    )
    return o
