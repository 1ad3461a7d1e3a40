"""Fused MTA attention in Triton: forward and backward in O(N) memory (no N x N tensor anywhere).

The reference (`mta_reference.mta_attention`) is the definition; this computes the same function
for causal attention with any of its operations: key-query convolutions before and after the softmax,
head mixing before and after it.

How the convolution avoids the score map (MTA_SPEC section 10). With q~ = q / sqrt(d) and q, k
zeroed on padding tokens, the convolved score is bilinear in (q, k):

    C[i, j] = sum_a q~[i - (c_q - 1) + a] . khat_a[j],   khat_a[j] = sum_b theta[a, b] k[j - p + b]

wherever the kernel's window sees no causally masked entry, i.e. for j <= i - D with
D = (c_q - 1) + (c_k - 1 - p). So a tile of scores is c_q matrix products of shifted query tiles
with precomputed shifted-and-mixed keys. The stripe i - D < j <= i is computed exactly on the
side: the band scores S[i', i' + delta] for the c_q + c_k - 2 offsets the stripe reads (an
N x (c_q + c_k - 2) tensor), convolved with a sheared copy of theta into the stripe values
(an N x D tensor). The kernels read those values in the diagonal tiles. Each loop over blocks runs in
three parts, masked / clean / masked: a clean tile lies wholly in its rows' past, beyond the stripe and
inside one segment, and needs no mask and no stripe value (most tiles at long N).

Post-softmax head mixing couples the c_h heads of a group: O_e = sum_c W[c, e] P_c V_e. Each source
head c runs ordinary flash attention against the group's values side by side (c_h * d wide),
giving Z_c = P_c [V_e]_e; a small kernel mixes the Z into O. The backward treats Z_c as the
output of head c and follows flash attention's algebra, with the convolution's chain rule
through khat (dK side) and the shifted query tiles (dQ side). The post-softmax convolution reuses that
scheme with mixed values of each source head's own (see `_post_conv_attention`).
"""

import math
import re

import torch
from torch.utils.checkpoint import checkpoint

try:  # Triton ships with CUDA builds of torch; without it only the reference attention runs.
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except ImportError as error:
    raise ImportError("the fused MTA attention needs Triton (pip install triton)") from error

from .mta_reference import key_padding_left

# Tests set this to fill every output buffer with NaN before the kernels run, so that an element a
# kernel fails to write cannot pass for a result.
POISON_OUTPUTS = False

MAX_QUERY_SIZE = 8
MAX_KEY_SIZE = 15
# Pre-softmax head mixing runs as heads c_p * d wide on the score side (`_premixed`); the widest such tile
# that leaves the kernels room in registers and shared memory, and with a kq conv (c_q query tiles that wide).
MAX_PREMIXED_WIDTH = 512
MAX_PREMIXED_CONV_WIDTH = 256


def fused_coverage_gap(
    head_dim: int,
    kq_conv_size: tuple[int, int] | None,
    key_padding: str,
    kq_conv_post_size: tuple[int, int] | None,
    head_mix_size: int | None,
    head_mix_post_size: int | None,
    queries_per_key: int = 1,
    dropout: bool = False,
) -> str | None:
    """None if the fused kernels compute this configuration (in training, prefill and decoding; with attention
    `dropout` or without), else the name of what they lack. `queries_per_key`: query heads per key/value head
    (GQA)."""
    if kq_conv_post_size is not None:
        if dropout:
            return "attention dropout with a post-softmax key-query convolution"
        c_q, c_k = kq_conv_post_size
        if c_q > MAX_QUERY_SIZE or c_k > MAX_KEY_SIZE:
            return f"post-softmax key-query kernel {c_q} x {c_k} (kernel: up to {MAX_QUERY_SIZE} x {MAX_KEY_SIZE})"
    if head_mix_size is not None:
        # Side by side where the group's heads read different key heads, or convolve with kernels of their own.
        side_by_side = queries_per_key % head_mix_size != 0 or kq_conv_size is not None
        widest = MAX_PREMIXED_WIDTH if kq_conv_size is None else MAX_PREMIXED_CONV_WIDTH
        if side_by_side and (head_mix_size & (head_mix_size - 1) or head_mix_size * head_dim > widest):
            return (f"pre-softmax head mixing in groups of {head_mix_size} at head_dim {head_dim} (kernel: groups "
                    f"that share a key head, or group size x head_dim a power of two up to {MAX_PREMIXED_WIDTH}, "
                    f"{MAX_PREMIXED_CONV_WIDTH} with a key-query convolution)")
    if head_dim not in (16, 32, 64, 128):
        return f"head_dim {head_dim} (kernel: 16, 32, 64, 128)"
    if kq_conv_size is not None:
        c_q, c_k = kq_conv_size
        if c_q > MAX_QUERY_SIZE or c_k > MAX_KEY_SIZE:
            return f"key-query kernel {c_q} x {c_k} (kernel: up to {MAX_QUERY_SIZE} x {MAX_KEY_SIZE})"
    return None


# --------------------------------------------------------------------------------------------
# Kernels. Layout: q (B, H, N, DQK), k (B, H_k, N, DQK), v (B, H_kv, N, D), last dimension contiguous;
# query head h reads key head h // GQA_K and value head h // GQA. DQK = D and H_k = H_kv but with
# pre-softmax head mixing between heads that read different key heads (`_premixed`). Token t of
# row b belongs to the segment [start, end) = (seg_start[b, t], seg_end[b, t]) and is real iff
# start <= t < end: a query sees the keys of its segment up to itself, and the convolution reads
# nothing outside it. A segment is a row's real tokens between left and right padding, or one
# document of a packed row.
# Offsets that can exceed 2**31 are built from int64 program ids.


@triton.jit
def _program(H):
    """This program's block index, its (batch * heads) index in int64 (offsets may pass 2**31),
    batch row and head."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    return pid, bh, bh // H, bh % H


@triton.jit
def _segments(seg_start_ptr, seg_end_ptr, b, tokens, N, PACKED: tl.constexpr):
    """The segments [start, end) of `tokens` in row b: with PACKED one per token (an empty one for positions
    outside the row), else the row's one segment, splat so that the compiler knows it is the same for all."""
    if PACKED:
        inside = (tokens >= 0) & (tokens < N)
        return (tl.load(seg_start_ptr + b * N + tokens, mask=inside, other=0),
                tl.load(seg_end_ptr + b * N + tokens, mask=inside, other=0))
    else:
        same = tl.zeros_like(tokens)
        return tl.load(seg_start_ptr + b) + same, tl.load(seg_end_ptr + b) + same


@triton.jit
def _key_range(rows, rs, re, N, BN: tl.constexpr):
    """The key blocks [lo, hi) that the real rows among `rows` can see."""
    real = (rows >= rs) & (rows < re)
    lo = tl.min(tl.where(real, rs, N), axis=0) // BN * BN
    return lo, tl.max(tl.where(real, rows + 1, 0), axis=0)


@triton.jit
def _khat_kernel(
    k_ptr, theta_ptr, khat_ptr, seg_start_ptr, seg_end_ptr,
    stride_kb, stride_kh, stride_kn,
    N, H, GQA,
    C_Q: tl.constexpr, C_K: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    PACKED: tl.constexpr, C_P: tl.constexpr,
):
    """khat[b, h, a, j] = sum_b' theta[h, a, b'] k[j - PAD + b'] (k zero outside j's segment; theta per column
    block with C_P > 1, `_theta_columns`)."""
    pid, bh, b, h = _program(H)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    cols = tl.arange(0, D)
    k_base = k_ptr + b * stride_kb + (h // GQA) * stride_kh
    for a in tl.static_range(C_Q):
        acc = _mixed_keys(k_base, theta_ptr, h, a, rows, rs, re, stride_kn, C_Q, C_K, PAD, D, C_P)
        out = khat_ptr + ((bh * C_Q + a) * N + rows[:, None]) * D + cols[None, :]
        tl.store(out, acc.to(khat_ptr.dtype.element_ty), mask=(rows < N)[:, None])


@triton.jit
def _mixed_keys(k_base, theta_ptr, h, a, rows, rs, re, stride_kn, C_Q: tl.constexpr, C_K: tl.constexpr,
                PAD: tl.constexpr, D: tl.constexpr, C_P: tl.constexpr):
    """khat_a of `rows` in float32: sum_t theta[a, t] k[j - PAD + t], k zero outside row j's segment [rs, re),
    with each column's kernel (`_theta_columns`)."""
    cols = tl.arange(0, D)
    acc = tl.zeros([rows.shape[0], D], dtype=tl.float32)
    for t in tl.static_range(C_K):
        src = rows - PAD + t
        ok = (src >= rs) & (src < re)
        kt = tl.load(k_base + src[:, None] * stride_kn + cols[None, :], mask=ok[:, None], other=0.0)
        acc += _theta_columns(theta_ptr, h, a, t, C_Q, C_K, C_P, D) * kt.to(tl.float32)
    return acc


@triton.jit
def _source_head(h, p, C_P: tl.constexpr):
    """The head whose kernel column block p of query head h's key tiles takes: with pre-softmax head mixing side by
    side (C_P > 1), source head p of h's group; else h itself (p = 0)."""
    return h // C_P * C_P + p


@triton.jit
def _column_block(W: tl.constexpr, C_P: tl.constexpr):
    """Which of the C_P column blocks (one per source head with pre-mixing side by side) each of W columns lies in."""
    return tl.arange(0, W) // (W // C_P)


@triton.jit
def _theta_columns(theta_ptr, h, a, t, C_Q: tl.constexpr, C_K: tl.constexpr, C_P: tl.constexpr, W: tl.constexpr):
    """theta[source, a, t] for each of a key tile's W columns (a scalar for one source head)."""
    if C_P == 1:
        return tl.load(theta_ptr + (h * C_Q + a) * C_K + t)
    else:
        source = _source_head(h, _column_block(W, C_P), C_P)
        return tl.load(theta_ptr + (source * C_Q + a) * C_K + t)[None, :]


@triton.jit
def _add_theta_grad(dtheta_ptr, h, a, t, terms, C_Q: tl.constexpr, C_K: tl.constexpr, C_P: tl.constexpr,
                    W: tl.constexpr):
    """Adds the sum of a (rows x W) tile of terms of theta[., a, t]'s gradient to each column block's source head."""
    if C_P == 1:
        tl.atomic_add(dtheta_ptr + (h * C_Q + a) * C_K + t, tl.sum(tl.sum(terms, axis=1), axis=0))
    else:
        column_sums = tl.sum(terms, axis=0)
        block = _column_block(W, C_P)
        for p in tl.static_range(C_P):
            tl.atomic_add(dtheta_ptr + (_source_head(h, p, C_P) * C_Q + a) * C_K + t,
                          tl.sum(tl.where(block == p, column_sums, 0.0), axis=0))


@triton.jit
def _band_scores_kernel(
    q_ptr, k_ptr, band_ptr, seg_start_ptr, seg_end_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    N, H, GQA, scale,
    WB: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, PACKED: tl.constexpr, C_P: tl.constexpr,
):
    """band[b, h, p, w, i] = q~[i] . k[i + w - (WB - 1)] over the p-th of C_P blocks of columns (each source
    head's share with pre-mixing side by side; all of them for C_P = 1): the scores on and just below the
    diagonal."""
    pid, bh, b, h = _program(H)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    row_ok = (rows >= rs) & (rows < re)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + cols[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32) * scale
    k_base = k_ptr + b * stride_kb + (h // GQA) * stride_kh
    for w in tl.static_range(WB):
        src = rows + w - (WB - 1)
        ok = (src >= rs) & (src < re)
        kt = tl.load(k_base + src[:, None] * stride_kn + cols[None, :], mask=ok[:, None], other=0.0)
        part = tl.sum(tl.reshape(q * kt.to(tl.float32), (BLOCK, C_P, D // C_P)), axis=2)
        block = tl.arange(0, C_P)
        tl.store(band_ptr + ((bh * C_P + block[None, :]) * WB + w) * N + rows[:, None], part,
                 mask=(rows < N)[:, None])


@triton.jit
def _band_scores_bwd_kernel(
    q_ptr, k_ptr, dband_ptr, dq_ptr, dk_ptr, seg_start_ptr, seg_end_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    N, H, H_KV, GQA, scale,
    WB: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, PACKED: tl.constexpr, C_P: tl.constexpr,
):
    """Adds the band scores' gradients to dq (B, H, N, d) and dk (B, H_kv, N, d), both float32."""
    pid, bh, b, h = _program(H)
    kvh = h // GQA
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    row_ok = (rows >= rs) & (rows < re)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    dq = tl.zeros([BLOCK, D], dtype=tl.float32)
    dk = tl.zeros([BLOCK, D], dtype=tl.float32)
    for w in range(WB):
        delta = w - (WB - 1)
        # dq~[i] += dband[w, i] k[i + delta]
        src = rows + delta
        ok = (src >= rs) & (src < re)
        kt = tl.load(k_base + src[:, None] * stride_kn + cols[None, :], mask=ok[:, None], other=0.0)
        dq += _band_grad(dband_ptr, bh, w, rows, row_ok, N, WB, C_P, D) * kt.to(tl.float32)
        # dk[j] += dband[w, j - delta] q~[j - delta]: query j - delta of j's segment
        src = rows - delta
        ok = (src >= rs) & (src < re)
        qt = tl.load(q_base + src[:, None] * stride_qn + cols[None, :], mask=ok[:, None], other=0.0)
        dk += _band_grad(dband_ptr, bh, w, src, ok, N, WB, C_P, D) * (qt.to(tl.float32) * scale)
    out = (rows[:, None] * D + cols[None, :])
    tl.atomic_add(dq_ptr + bh * N * D + out, dq * scale, mask=row_ok[:, None])
    tl.atomic_add(dk_ptr + (b * H_KV + kvh) * N * D + out, dk, mask=row_ok[:, None])


@triton.jit
def _band_grad(dband_ptr, bh, w, rows, ok, N, WB: tl.constexpr, C_P: tl.constexpr, D: tl.constexpr):
    """The gradient of band row w at `rows`, for each column of a (rows x D) tile: its column block's."""
    if C_P == 1:
        return tl.load(dband_ptr + (bh * WB + w) * N + rows, mask=ok, other=0.0)[:, None]
    else:
        block = _column_block(D, C_P)
        return tl.load(dband_ptr + ((bh * C_P + block[None, :]) * WB + w) * N + rows[:, None], mask=ok[:, None],
                       other=0.0)


@triton.jit
def _stripe_kernel(
    band_ptr, theta_ptr, cband_ptr, seg_start_ptr, N, H,
    C_Q: tl.constexpr, C_K: tl.constexpr, WB: tl.constexpr, STRIPE: tl.constexpr, T_BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PACKED: tl.constexpr, C_P: tl.constexpr,
):
    """cband[b, h, t, i] = C[i, i - STRIPE + 1 + t]. Row w of the band holds S[i', i' + w - (WB - 1)], so the
    window of stripe entry (t, i) at kernel tap (a, c) reads band row t + c + s of column i - s, s = C_Q - 1 - a;
    rows from WB on lie above the diagonal (zero), and so does a query before the start of i's segment. With
    C_P column blocks (pre-mixing side by side) each block's band meets its source head's kernel. The taps c of
    one row of the kernel are one (t, c, i) tile."""
    pid, bh, b, h = _program(H)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    t = tl.arange(0, T_BLOCK)
    rs, _ = _segments(seg_start_ptr, seg_start_ptr, b, rows, N, PACKED)
    acc = tl.zeros([T_BLOCK, BLOCK], dtype=tl.float32)
    for p in tl.static_range(C_P):
        for a in range(C_Q):  # a plain loop: unrolled, the taps' loads were hoisted (spills)
            theta, tile = _stripe_taps(band_ptr, theta_ptr, bh * C_P + p, _source_head(h, p, C_P), a, t, rows, rs,
                                       N, C_Q, C_K, WB, STRIPE, K_BLOCK)
            acc += tl.sum(theta[None, :, None] * tile, axis=1)
    tl.store(cband_ptr + (bh * STRIPE + t[:, None]) * N + rows[None, :], acc,
             mask=(t < STRIPE)[:, None] & (rows < N)[None, :])


@triton.jit
def _stripe_taps(band_ptr, theta_ptr, band_row, source, a, t, rows, rs, N, C_Q: tl.constexpr, C_K: tl.constexpr,
                 WB: tl.constexpr, STRIPE: tl.constexpr, K_BLOCK: tl.constexpr):
    """Row a of the source head's kernel (K_BLOCK, zero past C_K) and what its taps c read for stripe entry (t, i):
    band row t + c + s of column i - s (a (t, c, i) tile), where that query counts (`_stripe_source`)."""
    s = C_Q - 1 - a
    c = tl.arange(0, K_BLOCK)
    theta = tl.load(theta_ptr + (source * C_Q + a) * C_K + c, mask=c < C_K, other=0.0)
    src, keep = _stripe_source(rows, rs, N, s)
    w = t[:, None] + c[None, :] + s
    ok = (w < WB) & (t < STRIPE)[:, None] & (c < C_K)[None, :]
    tile = tl.load(band_ptr + (band_row * WB + w[:, :, None]) * N + src[None, None, :],
                   mask=ok[:, :, None] & keep[None, None, :], other=0.0)
    return theta, tile


@triton.jit
def _stripe_source(rows, rs, N, s):
    """The band column that stripe column i reads at query shift s, and whether that query counts (it lies in i's
    segment and in the row)."""
    src = rows - s
    return src, (src >= rs) & (src >= 0) & (rows < N)


@triton.jit
def _stripe_bwd_kernel(
    band_ptr, theta_ptr, dcband_ptr, dband_ptr, dtheta_ptr, seg_start_ptr, N, H,
    C_Q: tl.constexpr, C_K: tl.constexpr, WB: tl.constexpr, STRIPE: tl.constexpr, T_BLOCK: tl.constexpr,
    W_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PACKED: tl.constexpr, C_P: tl.constexpr,
):
    """`_stripe_kernel`'s backward for one block of columns: dband of these band columns (each receives from the
    stripe columns i' + s), and theta's gradient from these stripe columns (float32 atomics)."""
    pid, bh, b, h = _program(H)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    t = tl.arange(0, T_BLOCK)
    w = tl.arange(0, W_BLOCK)
    c = tl.arange(0, K_BLOCK)
    rs, _ = _segments(seg_start_ptr, seg_start_ptr, b, rows, N, PACKED)
    g = tl.load(dcband_ptr + (bh * STRIPE + t[:, None]) * N + rows[None, :],
                mask=(t < STRIPE)[:, None] & (rows < N)[None, :], other=0.0)
    for p in tl.static_range(C_P):
        source = _source_head(h, p, C_P)
        dband = tl.zeros([W_BLOCK, BLOCK], dtype=tl.float32)
        for a in range(C_Q):
            s = C_Q - 1 - a
            theta, tile = _stripe_taps(band_ptr, theta_ptr, bh * C_P + p, source, a, t, rows, rs, N, C_Q, C_K, WB,
                                       STRIPE, K_BLOCK)
            dtheta = tl.sum(tl.sum(g[:, None, :] * tile, axis=2), axis=0)
            tl.atomic_add(dtheta_ptr + (source * C_Q + a) * C_K + c, dtheta, mask=c < C_K)
            # Band column i' feeds stripe column i' + s (entry w - c - s) where the query i' lies in that column's
            # segment.
            dst = rows + s
            dst_start, _ = _segments(seg_start_ptr, seg_start_ptr, b, dst, N, PACKED)
            _, feeds = _stripe_source(dst, dst_start, N, s)
            u = w[:, None] - c[None, :] - s
            ok = (u >= 0) & (u < STRIPE) & (w < WB)[:, None] & (c < C_K)[None, :]
            dg = tl.load(dcband_ptr + (bh * STRIPE + u[:, :, None]) * N + dst[None, None, :],
                         mask=ok[:, :, None] & feeds[None, None, :], other=0.0)
            dband += tl.sum(theta[None, :, None] * dg, axis=1)
        tl.store(dband_ptr + ((bh * C_P + p) * WB + w[:, None]) * N + rows[None, :], dband,
                 mask=(w < WB)[:, None] & (rows < N)[None, :])


@triton.jit
def _query_tiles(q_base, rows, rs, re, stride_qn, C_Q: tl.constexpr, D: tl.constexpr):
    """The c_q query tiles that the convolved scores of `rows` read: tile a holds the queries at i - (c_q - 1) + a,
    zero outside i's segment. Without the convolution (C_Q = 1), the rows' own queries."""
    d = tl.arange(0, D)
    tiles = ()
    for a in tl.static_range(C_Q):
        src = rows - (C_Q - 1) + a
        ok = (src >= rs) & (src < re)
        tiles = tiles + (tl.load(q_base + src[:, None] * stride_qn + d[None, :], mask=ok[:, None], other=0.0),)
    return tiles


@triton.jit
def _key_tiles(k_base, khat_base, cols, stride_kn, N, HAS_CONV: tl.constexpr, C_Q: tl.constexpr, D: tl.constexpr):
    """The key tiles of `cols` that pair with the query tiles: khat_a, the keys mixed by row a of the kernel, with the
    convolution; else the keys."""
    d = tl.arange(0, D)
    tiles = ()
    for a in tl.static_range(C_Q):
        if HAS_CONV:
            ptrs = khat_base + (a * N + cols[:, None]) * D + d[None, :]
        else:
            ptrs = k_base + cols[:, None] * stride_kn + d[None, :]
        tiles = tiles + (tl.load(ptrs, mask=(cols < N)[:, None], other=0.0),)
    return tiles


@triton.jit
def _own_key_tiles(k_base, theta_ptr, h, cols, cs, ce, stride_kn, N, HAS_CONV: tl.constexpr, C_Q: tl.constexpr,
                   C_K: tl.constexpr, PAD: tl.constexpr, D: tl.constexpr, C_P: tl.constexpr):
    """`_key_tiles` for the key-major kernels, which load them once per program: with the convolution they mix
    khat_a from the keys themselves (bit for bit the values `_khat_kernel` stores), so that the backward's khat
    (c_q times the keys' memory) is gone before those kernels run."""
    if HAS_CONV:
        tiles = ()
        for a in tl.static_range(C_Q):
            acc = _mixed_keys(k_base, theta_ptr, h, a, cols, cs, ce, stride_kn, C_Q, C_K, PAD, D, C_P)
            tiles = tiles + (tl.where((cols < N)[:, None], acc, 0.0).to(k_base.dtype.element_ty),)
        return tiles
    else:
        return _key_tiles(k_base, k_base, cols, stride_kn, N, False, 1, D)


@triton.jit
def _along_rows(x, KEY_MAJOR: tl.constexpr):
    """A vector over a tile's query rows, laid along its query axis. The query-major kernels hold (queries x keys)
    tiles; the key-major ones (keys x queries), so that each of their products has the key block as its M side and
    takes its operands as they are, with no transposed copy through shared memory."""
    return x[None, :] if KEY_MAJOR else x[:, None]


@triton.jit
def _along_cols(x, KEY_MAJOR: tl.constexpr):
    """A vector over a tile's key columns, laid along its key axis (see `_along_rows`)."""
    return x[:, None] if KEY_MAJOR else x[None, :]


@triton.jit
def _key_major(x, KEY_MAJOR: tl.constexpr):
    """A tile (or a stack of them, (E, tile)) as (keys x queries): as it is in a key-major kernel, else transposed."""
    if KEY_MAJOR:
        return x
    elif len(x.shape) == 3:
        return tl.permute(x, (0, 2, 1))
    else:
        return tl.trans(x)


@triton.jit
def _scores(qs, ks, cband_base, rows, cols, N, scale, C_Q: tl.constexpr, STRIPE: tl.constexpr,
            DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Scores of a tile of rows and cols after the key-query convolution, before any mask: the sum of c_q products of
    shifted queries with mixed keys, and on the stripe (which only MASKED tiles reach) its exact values."""
    if KEY_MAJOR:
        s = tl.zeros([cols.shape[0], rows.shape[0]], dtype=tl.float32)
        for a in tl.static_range(C_Q):
            s = tl.dot(ks[a], tl.trans(qs[a]), s, input_precision=DOT_PRECISION)
    else:
        s = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
        for a in tl.static_range(C_Q):
            s = tl.dot(qs[a], tl.trans(ks[a]), s, input_precision=DOT_PRECISION)
    s = s * scale
    if MASKED and STRIPE > 0:
        r, c = _along_rows(rows, KEY_MAJOR), _along_cols(cols, KEY_MAJOR)
        t = c - r + (STRIPE - 1)
        in_stripe = (t >= 0) & (t < STRIPE) & _along_rows(rows < N, KEY_MAJOR)
        exact = tl.load(cband_base + t * N + r, mask=in_stripe, other=0.0)
        s = tl.where(in_stripe, exact, s)
    return s


@triton.jit
def _visible(rows, cols, rs, re, KEY_MAJOR: tl.constexpr):
    row_ok = (rows >= rs) & (rows < re)
    r, c = _along_rows(rows, KEY_MAJOR), _along_cols(cols, KEY_MAJOR)
    return (c <= r) & (c >= _along_rows(rs, KEY_MAJOR)) & _along_rows(row_ok, KEY_MAJOR)


@triton.jit
def _stripe(rows, cols, STRIPE: tl.constexpr, KEY_MAJOR: tl.constexpr):
    t = _along_cols(cols, KEY_MAJOR) - _along_rows(rows, KEY_MAJOR) + (STRIPE - 1)
    return (t >= 0) & (t < STRIPE)


@triton.jit
def _clean_key_blocks(rows, rs, re, lo, hi, NEAR: tl.constexpr, BN: tl.constexpr):
    """Splits the key blocks [lo, hi) of a query block at clean_lo <= clean_hi: the blocks in between lie whole in
    every row's past, beyond the NEAR offsets next to the diagonal (the stripe, the band), so they need no mask and
    no stripe value. None unless all rows are real."""
    all_real = tl.min(((rows >= rs) & (rows < re)).to(tl.int32), axis=0) > 0
    start = (tl.max(rs, axis=0) + BN - 1) // BN * BN
    end = tl.maximum(tl.min(rows, axis=0) - NEAR + 1, 0) // BN * BN
    clean_lo = tl.where(all_real, tl.minimum(tl.maximum(lo, start), hi), hi)
    return clean_lo, tl.where(all_real, tl.maximum(tl.minimum(end, hi), clean_lo), hi)


@triton.jit
def _clean_query_blocks(cols, cs, ce, lo, hi, NEAR: tl.constexpr, BM: tl.constexpr):
    """Splits the query blocks [lo, hi) of a key block at clean_lo <= clean_hi: each row of the blocks in between
    sees all of its keys, beyond the NEAR offsets next to the diagonal. None unless the keys are real and of one
    segment."""
    one_segment = (tl.min(cs, axis=0) == tl.max(cs, axis=0)) & (
        tl.min(((cols >= cs) & (cols < ce)).to(tl.int32), axis=0) > 0)
    start = (tl.max(cols, axis=0) + NEAR + BM - 1) // BM * BM
    end = tl.min(ce, axis=0) // BM * BM
    clean_lo = tl.where(one_segment, tl.minimum(tl.maximum(lo, start), hi), hi)
    return clean_lo, tl.where(one_segment, tl.maximum(tl.minimum(end, hi), clean_lo), hi)


@triton.jit
def _masked_blocks(lo, clean_lo, clean_hi, hi, B: tl.constexpr):
    """How many blocks of [lo, hi) lie outside the clean ones [clean_lo, clean_hi): those before, then those after.
    One loop takes both (one copy of the masked step's code: compile time)."""
    return tl.cdiv(clean_lo - lo, B) + tl.cdiv(hi - clean_hi, B)


@triton.jit
def _masked_block(i, lo, clean_lo, clean_hi, B: tl.constexpr):
    """The start of masked block i (see `_masked_blocks`)."""
    before = tl.cdiv(clean_lo - lo, B)
    return tl.where(i < before, lo + i * B, clean_hi + (i - before) * B)


@triton.jit
def _value_tile(v_ptr, b, first, cols, stride_vb, stride_vh, stride_vn, N, GQA, E: tl.constexpr, D: tl.constexpr):
    """The values of the E heads first, first + 1, ... side by side: a (cols x E * d) tile."""
    c = tl.arange(0, E * D)
    kv_head = (first + c // D) // GQA
    ptrs = v_ptr + b * stride_vb + kv_head[None, :] * stride_vh + cols[:, None] * stride_vn + (c % D)[None, :]
    return tl.load(ptrs, mask=(cols < N)[:, None], other=0.0)


@triton.jit
def _first_value(h, C_H: tl.constexpr, OWN_VALUES: tl.constexpr):
    """The first of the C_H value heads that source head h multiplies its probabilities with, side by side: its
    group's (post-softmax head mixing), or with OWN_VALUES its own, at h * C_H (the post-softmax kq conv's mixed
    values, one set per source head)."""
    return h * C_H if OWN_VALUES else h // C_H * C_H


@triton.jit
def _value_chunk(h, C_H: tl.constexpr, E: tl.constexpr, OWN_VALUES: tl.constexpr):
    """The first value head of this program's chunk: source head h's C_H value heads (`_first_value`), taken E at
    a time (chunk = program axis 2) where all C_H do not fit side by side."""
    return _first_value(h, C_H, OWN_VALUES) + tl.program_id(2) * E


@triton.jit
def _dropout_scale(seed_ptr, b, first, rows, cols, N, H, dropout_p, E: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """(E, tile): 1 / (1 - p) where target head first + e keeps the probability (i, j), else 0.
    The mask belongs to the target head (dropout acts on the mixed probabilities) and is a function of
    (seed, batch row, head, i, j) alone, so the backward draws the same one."""
    head = b * H + first + tl.arange(0, E)
    r, c = _along_rows(rows, KEY_MAJOR), _along_cols(cols, KEY_MAJOR)
    offsets = (head[:, None, None] * N + r[None, :, :]) * N + c[None, :, :]
    return tl.where(tl.rand(tl.load(seed_ptr), offsets) >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _by_head(x, C_H: tl.constexpr, D: tl.constexpr):
    """(R, C_H * D), the c_h heads side by side -> (C_H, R, D)."""
    return tl.permute(tl.reshape(x, (x.shape[0], C_H, D)), (1, 0, 2))


@triton.jit
def _side_by_side(x, C_H: tl.constexpr, D: tl.constexpr):
    """(C_H, R, D) -> (R, C_H * D)."""
    return tl.reshape(tl.permute(x, (1, 0, 2)), (x.shape[1], C_H * D))


@triton.jit
def _online_softmax(s, m, l):
    """One key block of the online softmax: the block's unnormalised probabilities, the factor that rescales
    what came before, and the new running max and sum."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    return p, alpha, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def _near_diagonal(rows, cols, N, BAND: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """For each entry (i, j) of a tile, its offset i - j below the diagonal and whether it is one of the BAND
    nearest (0 .. BAND - 1): where the post-softmax kq conv needs the scores (`sband`) and adds their gradient."""
    offset = _along_rows(rows, KEY_MAJOR) - _along_cols(cols, KEY_MAJOR)
    return offset, (offset >= 0) & (offset < BAND) & _along_rows(rows < N, KEY_MAJOR)


@triton.jit
def _fwd_step(
    acc, m, l, qs, n0, rows, rs, re, k_base, khat_base, cband_base, sband_base, v_ptr, seed_ptr, b, first,
    stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, BN: tl.constexpr,
    D: tl.constexpr, DQK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The forward's running output, max and sum after the key block at n0; the scores of the BAND offsets next to
    the diagonal go to sband (B, H, BAND, N) as well, -inf where masked."""
    cols = n0 + tl.arange(0, BN)
    ks = _key_tiles(k_base, khat_base, cols, stride_kn, N, HAS_CONV, C_Q, DQK)
    s = _scores(qs, ks, cband_base, rows, cols, N, scale, C_Q, STRIPE, DOT_PRECISION, MASKED, False)
    if MASKED:
        s = tl.where(_visible(rows, cols, rs, re, False), s, float("-inf"))
        if BAND > 0:
            offset, near = _near_diagonal(rows, cols, N, BAND, False)
            tl.store(sband_base + offset * N + rows[:, None], s, mask=near)
    p, alpha, m_new, l = _online_softmax(s, m, l)
    values = _value_tile(v_ptr, b, first, cols, stride_vb, stride_vh, stride_vn, N, GQA, E, D)
    keep = _dropout_scale(seed_ptr, b, first, rows, cols, N, H, dropout_p, E, False) if DROPOUT else 0.0
    return acc * alpha[:, None] + _probs_times_values(p, values, keep, E, D, DOT_PRECISION, DROPOUT), m_new, l


@triton.jit
def _mta_fwd_kernel(
    q_ptr, k_ptr, v_ptr, khat_ptr, cband_ptr, z_ptr, lse_ptr, sband_ptr, seg_start_ptr, seg_end_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, H, GQA_K, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, NEAR: tl.constexpr,
    C_H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DQK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr,
    OWN_VALUES: tl.constexpr,
):
    pid, bh, b, h = _program(H)
    first = _value_chunk(h, C_H, E, OWN_VALUES)
    rows = pid * BM + tl.arange(0, BM)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    k_base = k_ptr + b * stride_kb + (h // GQA_K) * stride_kh
    khat_base = khat_ptr + bh * C_Q * N * DQK
    cband_base = cband_ptr + bh * STRIPE * N
    sband_base = sband_ptr + bh * BAND * N
    qs = _query_tiles(q_ptr + b * stride_qb + h * stride_qh, rows, rs, re, stride_qn, C_Q, DQK)

    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, E * D], dtype=tl.float32)
    lo, hi = _key_range(rows, rs, re, N, BN)
    clean_lo, clean_hi = _clean_key_blocks(rows, rs, re, lo, hi, NEAR, BN)
    for n0 in range(clean_lo, clean_hi, BN):
        acc, m, l = _fwd_step(acc, m, l, qs, n0, rows, rs, re, k_base, khat_base, cband_base, sband_base, v_ptr,
                              seed_ptr, b, first, stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA, scale,
                              dropout_p, HAS_CONV, C_Q, STRIPE, BAND, BN, D, DQK, DOT_PRECISION, DROPOUT, E, False)
    for i in range(0, _masked_blocks(lo, clean_lo, clean_hi, hi, BN)):
        n0 = _masked_block(i, lo, clean_lo, clean_hi, BN)
        acc, m, l = _fwd_step(acc, m, l, qs, n0, rows, rs, re, k_base, khat_base, cband_base, sband_base, v_ptr,
                              seed_ptr, b, first, stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA, scale,
                              dropout_p, HAS_CONV, C_Q, STRIPE, BAND, BN, D, DQK, DOT_PRECISION, DROPOUT, E, True)
    has_key = l > 0
    z = acc / tl.where(has_key, l, 1.0)[:, None]
    c = tl.program_id(2) * E * D + tl.arange(0, E * D)  # this chunk's columns of Z
    tl.store(z_ptr + (bh * N + rows[:, None]) * (C_H * D) + c[None, :], z.to(z_ptr.dtype.element_ty),
             mask=(rows < N)[:, None])
    tl.store(lse_ptr + bh * N + rows, tl.where(has_key, m + tl.log(tl.where(has_key, l, 1.0)), 0.0), mask=rows < N)


@triton.jit
def _probs_times_values(p, values, keep, E: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DROPOUT: tl.constexpr):
    """P [V_e]_e for E value heads side by side, each through its target head's dropout mask."""
    if DROPOUT and E > 1:  # E batched products of (dropped P) V_e
        kept = keep * p[None, :, :]
        return _side_by_side(tl.dot(kept.to(values.dtype), _by_head(values, E, D), input_precision=DOT_PRECISION),
                             E, D)
    else:
        return tl.dot(_one_mask(p, keep, DROPOUT).to(values.dtype), values, input_precision=DOT_PRECISION)


@triton.jit
def _one_mask(p, keep, DROPOUT: tl.constexpr):
    """p through the dropout mask of one target head (keep is (1, tile)): with one value head held, the
    products stay plain 2-D ones, which take the large tilings (3-D products need small ones)."""
    return p * tl.reshape(keep, p.shape) if DROPOUT else p


@triton.jit
def _probs(s, lse, rows, cols, rs, re, MASKED: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """The probabilities of a tile, recomputed from its scores and the rows' log-sum-exp."""
    p = tl.exp(s - _along_rows(lse, KEY_MAJOR))
    if MASKED:
        p = tl.where(_visible(rows, cols, rs, re, KEY_MAJOR), p, 0.0)
    return p


@triton.jit
def _dprobs(dz, values, keep, E: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
            KEY_MAJOR: tl.constexpr):
    """The share of dP = sum_e dZ_e V_e^T of E value heads side by side, through their dropout masks."""
    if DROPOUT and E > 1:
        if KEY_MAJOR:
            dp = tl.dot(_by_head(values, E, D), tl.permute(_by_head(dz, E, D), (0, 2, 1)),
                        input_precision=DOT_PRECISION)
        else:
            dp = tl.dot(_by_head(dz, E, D), tl.permute(_by_head(values, E, D), (0, 2, 1)),
                        input_precision=DOT_PRECISION)
        return tl.sum(dp * keep, axis=0)
    elif KEY_MAJOR:
        return _one_mask(tl.dot(values, tl.trans(dz), input_precision=DOT_PRECISION), keep, DROPOUT)
    else:
        return _one_mask(tl.dot(dz, tl.trans(values), input_precision=DOT_PRECISION), keep, DROPOUT)


@triton.jit
def _dz_tile(dz_ptr, bh, rows, N, C_H: tl.constexpr, chunk, E: tl.constexpr, D: tl.constexpr):
    """The output gradients of Z for `rows`, value heads chunk * E .. (chunk + 1) * E - 1 of the group: (rows x E * d)."""
    c = chunk * E * D + tl.arange(0, E * D)
    return tl.load(dz_ptr + (bh * N + rows[:, None]) * (C_H * D) + c[None, :], mask=(rows < N)[:, None], other=0.0)


@triton.jit
def _dprobs_all_chunks(dz_ptr, v_ptr, seed_ptr, bh, b, h, rows, cols, N, H, GQA, dropout_p,
                       stride_vb, stride_vh, stride_vn, C_H: tl.constexpr, E: tl.constexpr, D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr, OWN_VALUES: tl.constexpr,
                       KEY_MAJOR: tl.constexpr):
    """dP of a tile over all C_H value heads, E at a time: for groups too wide to hold side by side."""
    dp = tl.zeros((_along_rows(rows, KEY_MAJOR) + _along_cols(cols, KEY_MAJOR)).shape, dtype=tl.float32)
    # A loop, not unrolled (static_range): unrolled, the dZ tiles of all chunks, invariant over key blocks, were
    # hoisted out of the dQ kernel's key loop together (a group of 16 at d = 128 in float32 asked 240 KB).
    for chunk in range(C_H // E):
        first = _first_value(h, C_H, OWN_VALUES) + chunk * E
        values = _value_tile(v_ptr, b, first, cols, stride_vb, stride_vh, stride_vn, N, GQA, E, D)
        keep = _dropout_scale(seed_ptr, b, first, rows, cols, N, H, dropout_p, E, KEY_MAJOR) if DROPOUT else 0.0
        dp += _dprobs(_dz_tile(dz_ptr, bh, rows, N, C_H, chunk, E, D), values, keep, E, D, DOT_PRECISION, DROPOUT,
                      KEY_MAJOR)
    return dp


@triton.jit
def _dvalues(p, dz, keep, E: tl.constexpr, D: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
             KEY_MAJOR: tl.constexpr):
    """P^T dZ_e for E value heads side by side, with the P each met (through its dropout mask)."""
    if DROPOUT and E > 1:
        kept = _key_major(keep * p[None, :, :], KEY_MAJOR)
        return _side_by_side(tl.dot(kept.to(dz.dtype), _by_head(dz, E, D), input_precision=DOT_PRECISION), E, D)
    else:
        return tl.dot(_key_major(_one_mask(p, keep, DROPOUT).to(dz.dtype), KEY_MAJOR), dz,
                      input_precision=DOT_PRECISION)


@triton.jit
def _add_band_grad(ds, dsband_base, rows, cols, N, BAND: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """dS plus the gradient that the scores next to the diagonal (`sband`) received directly."""
    if BAND > 0:
        offset, near = _near_diagonal(rows, cols, N, BAND, KEY_MAJOR)
        ds += tl.load(dsband_base + offset * N + _along_rows(rows, KEY_MAJOR), mask=near, other=0.0)
    return ds


@triton.jit
def _dkdv_step(
    dks, dvalues, ks, values, m0, cols, q_base, cband_base, dsband_base, dz_ptr, v_ptr, lse_ptr, delta_ptr,
    seg_start_ptr, seg_end_ptr, seed_ptr, bh, b, h, stride_qn, stride_vb, stride_vh, stride_vn, N, H, GQA, scale,
    dropout_p, C_Q: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, C_H: tl.constexpr, BM: tl.constexpr,
    D: tl.constexpr, DQK: tl.constexpr, DOT_PRECISION: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr,
    E: tl.constexpr, OWN_VALUES: tl.constexpr, MASKED: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """The key-major backward's accumulators after the query block at m0: the gradients of the key tiles (khat_a
    with the convolution) and, for groups held side by side, of the values."""
    rows = m0 + tl.arange(0, BM)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    lse = tl.load(lse_ptr + bh * N + rows, mask=rows < N, other=0.0)
    delta = _along_rows(tl.load(delta_ptr + bh * N + rows, mask=rows < N, other=0.0), KEY_MAJOR)
    qs = _query_tiles(q_base, rows, rs, re, stride_qn, C_Q, DQK)
    p = _probs(_scores(qs, ks, cband_base, rows, cols, N, scale, C_Q, STRIPE, DOT_PRECISION, MASKED, KEY_MAJOR),
               lse, rows, cols, rs, re, MASKED, KEY_MAJOR)
    if E == C_H:
        dz = _dz_tile(dz_ptr, bh, rows, N, C_H, 0, C_H, D)
        keep = (_dropout_scale(seed_ptr, b, h // C_H * C_H, rows, cols, N, H, dropout_p, C_H, KEY_MAJOR) if DROPOUT
                else 0.0)
        ds = p * (_dprobs(dz, values, keep, C_H, D, DOT_PRECISION, DROPOUT, KEY_MAJOR) - delta)
        dvalues += _dvalues(p, dz, keep, C_H, D, DOT_PRECISION, DROPOUT, KEY_MAJOR)
    else:
        ds = p * (_dprobs_all_chunks(dz_ptr, v_ptr, seed_ptr, bh, b, h, rows, cols, N, H, GQA, dropout_p,
                                     stride_vb, stride_vh, stride_vn, C_H, E, D, DOT_PRECISION, DROPOUT, OWN_VALUES,
                                     KEY_MAJOR) - delta)
    if MASKED:
        ds = _add_band_grad(ds, dsband_base, rows, cols, N, BAND, KEY_MAJOR)
    if MASKED and STRIPE > 0:
        ds = tl.where(_stripe(rows, cols, STRIPE, KEY_MAJOR), 0.0, ds)  # the stripe's gradient goes through the band
    ds = _key_major(ds.to(qs[0].dtype), KEY_MAJOR)
    updated = ()
    for a in tl.static_range(C_Q):
        updated = updated + (tl.dot(ds, qs[a], dks[a], input_precision=DOT_PRECISION),)
    return updated, dvalues


@triton.jit
def _mta_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, cband_ptr, theta_ptr, dz_ptr, lse_ptr, delta_ptr, dsband_ptr,
    dk_ptr, dv_ptr, dtheta_ptr, seg_start_ptr, seg_end_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, H, H_K, H_KV, GQA_K, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, C_K: tl.constexpr, PAD: tl.constexpr, STRIPE: tl.constexpr,
    BAND: tl.constexpr, NEAR: tl.constexpr, C_H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
    DQK: tl.constexpr, DOT_PRECISION: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr,
    C_P: tl.constexpr, OWN_VALUES: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """One key block of one source head: gradients of k and theta, and of the group's values when they fit
    side by side (E = C_H; else `_mta_bwd_dv_kernel` makes those). Its tiles are (keys x queries) with KEY_MAJOR,
    else (queries x keys) (`_key_major_tiles`)."""
    pid, bh, b, h = _program(H)
    kh = h // GQA_K
    cols = pid * BN + tl.arange(0, BN)
    cs, ce = _segments(seg_start_ptr, seg_end_ptr, b, cols, N, PACKED)
    col_ok = (cols >= cs) & (cols < ce)
    d = tl.arange(0, DQK)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + kh * stride_kh
    cband_base = cband_ptr + bh * STRIPE * N
    dsband_base = dsband_ptr + bh * BAND * N
    first = _first_value(h, C_H, OWN_VALUES)
    ks = _own_key_tiles(k_base, theta_ptr, h, cols, cs, ce, stride_kn, N, HAS_CONV, C_Q, C_K, PAD, DQK, C_P)
    values = _value_tile(v_ptr, b, first, cols, stride_vb, stride_vh, stride_vn, N, GQA, E, D) if E == C_H else 0.0
    dvalues = tl.zeros([BN, E * D], dtype=tl.float32)
    dks = ()  # d C / d khat_a for each query shift a; without the convolution (C_Q = 1) d C / d k
    for a in tl.static_range(C_Q):
        dks = dks + (tl.zeros([BN, DQK], dtype=tl.float32),)
    # The queries that see key j are j .. (end of j's segment) - 1.
    lo = (pid * BN) // BM * BM
    hi = tl.max(tl.where(col_ok, ce, 0), axis=0)
    clean_lo, clean_hi = _clean_query_blocks(cols, cs, ce, lo, hi, NEAR, BM)
    for m0 in range(clean_lo, clean_hi, BM):
        dks, dvalues = _dkdv_step(dks, dvalues, ks, values, m0, cols, q_base, cband_base, dsband_base, dz_ptr, v_ptr,
                                  lse_ptr, delta_ptr, seg_start_ptr, seg_end_ptr, seed_ptr, bh, b, h, stride_qn,
                                  stride_vb, stride_vh, stride_vn, N, H, GQA, scale, dropout_p, C_Q, STRIPE, BAND,
                                  C_H, BM, D, DQK, DOT_PRECISION, PACKED, DROPOUT, E, OWN_VALUES, False,
                                  KEY_MAJOR)
    for i in range(0, _masked_blocks(lo, clean_lo, clean_hi, hi, BM)):
        m0 = _masked_block(i, lo, clean_lo, clean_hi, BM)
        dks, dvalues = _dkdv_step(dks, dvalues, ks, values, m0, cols, q_base, cband_base, dsband_base, dz_ptr, v_ptr,
                                  lse_ptr, delta_ptr, seg_start_ptr, seg_end_ptr, seed_ptr, bh, b, h, stride_qn,
                                  stride_vb, stride_vh, stride_vn, N, H, GQA, scale, dropout_p, C_Q, STRIPE, BAND,
                                  C_H, BM, D, DQK, DOT_PRECISION, PACKED, DROPOUT, E, OWN_VALUES, True,
                                  KEY_MAJOR)

    if E == C_H:
        _add_dvalues(dv_ptr, dvalues, b, first, cols, col_ok, N, H_KV, GQA, E, D)
    dk_base = dk_ptr + (b * H_K + kh) * N * DQK
    if HAS_CONV:
        # khat_a[j] = sum_t theta[a, t] k[j - PAD + t]: send each khat gradient back through the kernel.
        for t in tl.static_range(C_K):
            dst = cols - PAD + t
            ok = (dst >= cs) & (dst < ce) & col_ok
            kt = tl.load(k_base + dst[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            dk_t = tl.zeros([BN, DQK], dtype=tl.float32)
            for a in tl.static_range(C_Q):
                dk_t += _theta_columns(theta_ptr, h, a, t, C_Q, C_K, C_P, DQK) * dks[a]
                _add_theta_grad(dtheta_ptr, h, a, t, tl.where(col_ok[:, None], dks[a], 0.0) * kt * scale, C_Q, C_K,
                                C_P, DQK)
            tl.atomic_add(dk_base + dst[:, None] * DQK + d[None, :], dk_t * scale, mask=ok[:, None])
    else:
        tl.atomic_add(dk_base + cols[:, None] * DQK + d[None, :], dks[0] * scale, mask=col_ok[:, None])


@triton.jit
def _add_dvalues(dv_ptr, dvalues, b, first, cols, col_ok, N, H_KV, GQA, E: tl.constexpr, D: tl.constexpr):
    """Adds a (cols x E * d) tile of value gradients, heads first.. side by side, to dv (B, H_kv, N, d) float32."""
    c = tl.arange(0, E * D)
    kv_head = (first + c // D) // GQA
    tl.atomic_add(dv_ptr + (b * H_KV * N + cols[:, None]) * D + kv_head[None, :] * N * D + (c % D)[None, :],
                  dvalues, mask=col_ok[:, None])


@triton.jit
def _dv_step(
    dvalues, ks, m0, cols, q_base, cband_base, dz_ptr, lse_ptr, seg_start_ptr, seg_end_ptr, seed_ptr, bh, b, first,
    chunk, stride_qn, N, H, scale, dropout_p,
    C_Q: tl.constexpr, STRIPE: tl.constexpr, C_H: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
    DQK: tl.constexpr, DOT_PRECISION: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr,
    MASKED: tl.constexpr, KEY_MAJOR: tl.constexpr,
):
    """The value gradients of one chunk after the query block at m0."""
    rows = m0 + tl.arange(0, BM)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    lse = tl.load(lse_ptr + bh * N + rows, mask=rows < N, other=0.0)
    qs = _query_tiles(q_base, rows, rs, re, stride_qn, C_Q, DQK)
    p = _probs(_scores(qs, ks, cband_base, rows, cols, N, scale, C_Q, STRIPE, DOT_PRECISION, MASKED, KEY_MAJOR),
               lse, rows, cols, rs, re, MASKED, KEY_MAJOR)
    keep = _dropout_scale(seed_ptr, b, first, rows, cols, N, H, dropout_p, E, KEY_MAJOR) if DROPOUT else 0.0
    return dvalues + _dvalues(p, _dz_tile(dz_ptr, bh, rows, N, C_H, chunk, E, D), keep, E, D, DOT_PRECISION, DROPOUT,
                              KEY_MAJOR)


@triton.jit
def _mta_bwd_dv_kernel(
    q_ptr, k_ptr, theta_ptr, cband_ptr, dz_ptr, lse_ptr, dv_ptr, seg_start_ptr, seg_end_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    N, H, H_KV, GQA_K, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, C_K: tl.constexpr, PAD: tl.constexpr, STRIPE: tl.constexpr,
    NEAR: tl.constexpr, C_H: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DQK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr, C_P: tl.constexpr, OWN_VALUES: tl.constexpr,
    KEY_MAJOR: tl.constexpr,
):
    """For groups too wide to hold side by side: one key block of one source head, the gradients of one
    chunk of E of its group's values (P^T dZ_e, P recomputed)."""
    pid, bh, b, h = _program(H)
    first = _value_chunk(h, C_H, E, OWN_VALUES)
    chunk = tl.program_id(2)
    cols = pid * BN + tl.arange(0, BN)
    cs, ce = _segments(seg_start_ptr, seg_end_ptr, b, cols, N, PACKED)
    col_ok = (cols >= cs) & (cols < ce)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    cband_base = cband_ptr + bh * STRIPE * N
    ks = _own_key_tiles(k_ptr + b * stride_kb + (h // GQA_K) * stride_kh, theta_ptr, h, cols, cs, ce, stride_kn, N,
                        HAS_CONV, C_Q, C_K, PAD, DQK, C_P)
    dvalues = tl.zeros([BN, E * D], dtype=tl.float32)
    lo = (pid * BN) // BM * BM
    hi = tl.max(tl.where(col_ok, ce, 0), axis=0)
    clean_lo, clean_hi = _clean_query_blocks(cols, cs, ce, lo, hi, NEAR, BM)
    for m0 in range(clean_lo, clean_hi, BM):
        dvalues = _dv_step(dvalues, ks, m0, cols, q_base, cband_base, dz_ptr, lse_ptr, seg_start_ptr, seg_end_ptr,
                           seed_ptr, bh, b, first, chunk, stride_qn, N, H, scale, dropout_p, C_Q, STRIPE, C_H, BM, D,
                           DQK, DOT_PRECISION, PACKED, DROPOUT, E, False, KEY_MAJOR)
    for i in range(0, _masked_blocks(lo, clean_lo, clean_hi, hi, BM)):
        m0 = _masked_block(i, lo, clean_lo, clean_hi, BM)
        dvalues = _dv_step(dvalues, ks, m0, cols, q_base, cband_base, dz_ptr, lse_ptr, seg_start_ptr, seg_end_ptr,
                           seed_ptr, bh, b, first, chunk, stride_qn, N, H, scale, dropout_p, C_Q, STRIPE, C_H, BM, D,
                           DQK, DOT_PRECISION, PACKED, DROPOUT, E, True, KEY_MAJOR)
    _add_dvalues(dv_ptr, dvalues, b, first, cols, col_ok, N, H_KV, GQA, E, D)


@triton.jit
def _dq_step(
    dqs, qs, dz, n0, rows, rs, re, k_base, khat_base, cband_base, dcband_base, dsband_base, v_ptr, dz_ptr, seed_ptr,
    bh, b, h, lse, delta, stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, C_H: tl.constexpr,
    BN: tl.constexpr, D: tl.constexpr, DQK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
    E: tl.constexpr, OWN_VALUES: tl.constexpr, MASKED: tl.constexpr,
):
    """The query-major backward's accumulators (the gradient of each query tile) after the key block at n0; on the
    stripe, dC goes to dcband instead."""
    cols = n0 + tl.arange(0, BN)
    ks = _key_tiles(k_base, khat_base, cols, stride_kn, N, HAS_CONV, C_Q, DQK)
    p = _probs(_scores(qs, ks, cband_base, rows, cols, N, scale, C_Q, STRIPE, DOT_PRECISION, MASKED, False),
               lse, rows, cols, rs, re, MASKED, False)
    if E == C_H:
        values = _value_tile(v_ptr, b, _first_value(h, C_H, OWN_VALUES), cols, stride_vb, stride_vh, stride_vn, N,
                             GQA, C_H, D)
        keep = _dropout_scale(seed_ptr, b, h // C_H * C_H, rows, cols, N, H, dropout_p, C_H, False) if DROPOUT else 0.0
        dp = _dprobs(dz, values, keep, C_H, D, DOT_PRECISION, DROPOUT, False)
    else:
        dp = _dprobs_all_chunks(dz_ptr, v_ptr, seed_ptr, bh, b, h, rows, cols, N, H, GQA, dropout_p,
                                stride_vb, stride_vh, stride_vn, C_H, E, D, DOT_PRECISION, DROPOUT, OWN_VALUES, False)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = _add_band_grad(ds, dsband_base, rows, cols, N, BAND, False)
    if MASKED and STRIPE > 0:
        stripe = _stripe(rows, cols, STRIPE, False) & (rows < N)[:, None]
        t = cols[None, :] - rows[:, None] + (STRIPE - 1)
        tl.store(dcband_base + t * N + rows[:, None], ds, mask=stripe)
        ds = tl.where(stripe, 0.0, ds)
    ds = ds.to(qs[0].dtype)
    updated = ()
    for a in tl.static_range(C_Q):
        updated = updated + (tl.dot(ds, ks[a], dqs[a], input_precision=DOT_PRECISION),)
    return updated


@triton.jit
def _mta_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, khat_ptr, cband_ptr, dz_ptr, lse_ptr, delta_ptr, dsband_ptr, dq_ptr, dcband_ptr, seg_start_ptr,
    seg_end_ptr, seed_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    N, H, GQA_K, GQA, scale, dropout_p,
    HAS_CONV: tl.constexpr, C_Q: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, NEAR: tl.constexpr,
    C_H: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DQK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PACKED: tl.constexpr, DROPOUT: tl.constexpr, E: tl.constexpr,
    OWN_VALUES: tl.constexpr,
):
    """One query block of one source head: the gradient of q, and the stripe's share of dC."""
    pid, bh, b, h = _program(H)
    rows = pid * BM + tl.arange(0, BM)
    rs, re = _segments(seg_start_ptr, seg_end_ptr, b, rows, N, PACKED)
    d = tl.arange(0, DQK)
    k_base = k_ptr + b * stride_kb + (h // GQA_K) * stride_kh
    khat_base = khat_ptr + bh * C_Q * N * DQK
    cband_base = cband_ptr + bh * STRIPE * N
    dcband_base = dcband_ptr + bh * STRIPE * N
    dsband_base = dsband_ptr + bh * BAND * N
    qs = _query_tiles(q_ptr + b * stride_qb + h * stride_qh, rows, rs, re, stride_qn, C_Q, DQK)
    dz = _dz_tile(dz_ptr, bh, rows, N, C_H, 0, C_H, D) if E == C_H else 0.0
    lse = tl.load(lse_ptr + bh * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(delta_ptr + bh * N + rows, mask=rows < N, other=0.0)

    dqs = ()  # the gradient of each query tile (C_Q is 1 without the convolution)
    for a in tl.static_range(C_Q):
        dqs = dqs + (tl.zeros([BM, DQK], dtype=tl.float32),)
    lo, hi = _key_range(rows, rs, re, N, BN)
    clean_lo, clean_hi = _clean_key_blocks(rows, rs, re, lo, hi, NEAR, BN)
    for n0 in range(clean_lo, clean_hi, BN):
        dqs = _dq_step(dqs, qs, dz, n0, rows, rs, re, k_base, khat_base, cband_base, dcband_base, dsband_base, v_ptr,
                       dz_ptr, seed_ptr, bh, b, h, lse, delta, stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA,
                       scale, dropout_p, HAS_CONV, C_Q, STRIPE, BAND, C_H, BN, D, DQK, DOT_PRECISION, DROPOUT, E,
                       OWN_VALUES, False)
    for i in range(0, _masked_blocks(lo, clean_lo, clean_hi, hi, BN)):
        n0 = _masked_block(i, lo, clean_lo, clean_hi, BN)
        dqs = _dq_step(dqs, qs, dz, n0, rows, rs, re, k_base, khat_base, cband_base, dcband_base, dsband_base, v_ptr,
                       dz_ptr, seed_ptr, bh, b, h, lse, delta, stride_kn, stride_vb, stride_vh, stride_vn, N, H, GQA,
                       scale, dropout_p, HAS_CONV, C_Q, STRIPE, BAND, C_H, BN, D, DQK, DOT_PRECISION, DROPOUT, E,
                       OWN_VALUES, True)

    dq_base = dq_ptr + bh * N * DQK
    for a in tl.static_range(C_Q):
        # Query tile a of row i is the query at i - (C_Q - 1) + a.
        dst = rows - (C_Q - 1 - a)
        ok = (dst >= rs) & (dst < re)
        tl.atomic_add(dq_base + dst[:, None] * DQK + d[None, :], dqs[a] * scale, mask=ok[:, None])


@triton.jit
def _mix_tile(ptr, head, rows, col0, N, W: tl.constexpr, D: tl.constexpr):
    """Columns col0 .. col0 + D - 1 of `rows` of one head of a (B, H, N, W) tensor, in float32 (zero past N)."""
    cols = col0 + tl.arange(0, D)
    return tl.load(ptr + (head * N + rows[:, None]) * W + cols[None, :], mask=(rows < N)[:, None], other=0.0).to(
        tl.float32)


@triton.jit
def _mix_store(ptr, x, head, rows, col0, N, W: tl.constexpr, D: tl.constexpr):
    """`_mix_tile`'s inverse: stores x (rows x D) in the tensor's dtype."""
    cols = col0 + tl.arange(0, D)
    tl.store(ptr + (head * N + rows[:, None]) * W + cols[None, :], x.to(ptr.dtype.element_ty),
             mask=(rows < N)[:, None])


@triton.jit
def _mix_program(H, C_H: tl.constexpr, BLOCK: tl.constexpr):
    """This program's group g (axis 1: batch row x group), the flat index of the group's first head, and its rows."""
    bg = tl.program_id(1).to(tl.int64)
    groups = H // C_H
    first = bg // groups * H + bg % groups * C_H
    return bg % groups, first, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _mix_forward_kernel(z_ptr, mix_ptr, out_ptr, N, H, C_H: tl.constexpr, D: tl.constexpr, W: tl.constexpr,
                        BLOCK: tl.constexpr):
    """O_e = sum_c W[g, c, e] Z_c[e] for a block of rows of one group g; Z_c[e] is column block e of source head c's
    z, or its only block where z is d wide (W = D)."""
    g, first, rows = _mix_program(H, C_H, BLOCK)
    for e in range(C_H):
        acc = tl.zeros([BLOCK, D], dtype=tl.float32)
        for c in range(C_H):
            weight = tl.load(mix_ptr + (g * C_H + c) * C_H + e)
            acc += weight * _mix_tile(z_ptr, first + c, rows, e * D if W > D else 0, N, W, D)
        _mix_store(out_ptr, acc, first + e, rows, 0, N, D, D)


@triton.jit
def _mix_backward_kernel(dout_ptr, z_ptr, mix_ptr, dz_ptr, delta_ptr, dmix_ptr, N, H, C_H: tl.constexpr,
                         D: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    """For a block of rows of one group: dZ_c[e] = W[c, e] dO_e (summed over e where z is d wide), delta_c = the sum
    of dZ_c * Z_c over the row, as the attention's backward will read them (dZ rounded to its dtype), and this
    block's share of dW[c, e] = sum Z_c[e] . dO_e, added to dmix (float32)."""
    g, first, rows = _mix_program(H, C_H, BLOCK)
    for c in range(C_H):
        delta = tl.zeros([BLOCK], dtype=tl.float32)
        dz_sum = tl.zeros([BLOCK, D], dtype=tl.float32)  # where z is d wide
        for e in range(C_H):
            dout = _mix_tile(dout_ptr, first + e, rows, 0, N, D, D)
            z = _mix_tile(z_ptr, first + c, rows, e * D if W > D else 0, N, W, D)
            weight = tl.load(mix_ptr + (g * C_H + c) * C_H + e)
            tl.atomic_add(dmix_ptr + (g * C_H + c) * C_H + e, tl.sum(tl.sum(z * dout, axis=1), axis=0))
            if W > D:
                dz = (weight * dout).to(dz_ptr.dtype.element_ty)
                _mix_store(dz_ptr, dz, first + c, rows, e * D, N, W, D)
                delta += tl.sum(dz.to(tl.float32) * z, axis=1)
            else:
                dz_sum += weight * dout
        if W == D:
            dz = dz_sum.to(dz_ptr.dtype.element_ty)
            _mix_store(dz_ptr, dz, first + c, rows, 0, N, W, D)
            delta = tl.sum(dz.to(tl.float32) * _mix_tile(z_ptr, first + c, rows, 0, N, W, D), axis=1)
        tl.store(delta_ptr + (first + c) * N + rows, delta, mask=rows < N)


@triton.jit
def _dropout_keep_kernel(out_ptr, seed_ptr, N, H, dropout_p, C_H: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(2).to(tl.int64) // (H // C_H)
    g = tl.program_id(2) % (H // C_H)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = _dropout_scale(seed_ptr, b, g * C_H, rows, cols, N, H, dropout_p, C_H, False)
    head = b * H + g * C_H + tl.arange(0, C_H)
    ok = (rows < N)[None, :, None] & (cols < N)[None, None, :]
    tl.store(out_ptr + (head[:, None, None] * N + rows[None, :, None]) * N + cols[None, None, :], scale, mask=ok)


# `first` (the position of q_rows' first row) grows by one each decode step: see `_mta_decode_kernel`'s L.
@triton.jit(do_not_specialize=["first"])
def _decode_queries_kernel(
    q_ptr, theta_ptr, qhat_ptr, start_ptr, stride_qb, stride_qh, stride_qn, R, M, first, H, scale,
    C_Q: tl.constexpr, C_K: tl.constexpr, C_P: tl.constexpr, DQK: tl.constexpr, BLOCK: tl.constexpr,
):
    """qhat[b, h, m, t] = scale * sum_a theta[a, t] q[r - (C_Q - 1) + a] for the last M of the R query rows (r = R - M
    + m, at position first + r), each column block with its source head's kernel (`_theta_columns`); rows before
    q_rows' first or before the row's first real key (start[b]) count as zero. t = program axis 2."""
    pid, bh, b, h = _program(H)
    t = tl.program_id(2)
    m = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DQK)
    start = tl.load(start_ptr + b)
    acc = tl.zeros([BLOCK, DQK], dtype=tl.float32)
    for a in tl.static_range(C_Q):
        src = R - M + m - (C_Q - 1) + a
        ok = (src >= 0) & (first + src >= start) & (m < M)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + src[:, None] * stride_qn + cols[None, :], mask=ok[:, None],
                    other=0.0)
        acc += _theta_columns(theta_ptr, h, a, t, C_Q, C_K, C_P, DQK) * q.to(tl.float32)
    out = qhat_ptr + ((bh * M + m[:, None]) * C_K + t) * DQK + cols[None, :]
    tl.store(out, (acc * scale).to(qhat_ptr.dtype.element_ty), mask=(m < M)[:, None])


# L, the cache's length, grows by one each step: specialized (Triton compiles apart the lengths divisible by 16), the
# first such length in a generation compiled the kernel anew in the middle of it.
@triton.jit(do_not_specialize=["L"])
def _mta_decode_kernel(
    qhat_ptr, k_ptr, v_ptr, cband_ptr, z_ptr, lse_ptr, sband_ptr, start_ptr,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    M, L, H, GQA_K, GQA,
    C_K: tl.constexpr, PAD: tl.constexpr, STRIPE: tl.constexpr, BAND: tl.constexpr, C_H: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DQK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    E: tl.constexpr, OWN_VALUES: tl.constexpr,
):
    """New query rows against a cache of L keys: row m is the token at L - M + m, and its scores are
    C[i, j] = sum_b qhat_b[i] . k[j - PAD + b] away from the diagonal (qhat: the queries mixed by the
    kernel, scale included), the exact stripe values (cband, (B, H, STRIPE, M)) near it. Keys from
    start[b] on are real. Query head h reads key head h // GQA_K (DQK wide) and value head h // GQA, or with
    OWN_VALUES its own C_H (`_first_value`). Also stores the rows' log-sum-exp (B, H, M) and the scores of the BAND
    offsets next to the diagonal (B, H, BAND, M), as the training forward does for the post-softmax kq conv."""
    pid, bh, b, h = _program(H)
    rows = pid * BM + tl.arange(0, BM)
    pos = L - M + rows
    start = tl.load(start_ptr + b)
    first = _value_chunk(h, C_H, E, OWN_VALUES)
    row_ok = (rows < M) & (pos >= start)
    d = tl.arange(0, DQK)
    k_base = k_ptr + b * stride_kb + (h // GQA_K) * stride_kh
    qhat_base = qhat_ptr + bh * M * C_K * DQK

    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, E * D], dtype=tl.float32)
    for n0 in range(start // BN * BN, tl.max(tl.where(row_ok, pos + 1, 0), axis=0), BN):
        cols = n0 + tl.arange(0, BN)
        s = tl.zeros([BM, BN], dtype=tl.float32)
        for t in tl.static_range(C_K):
            src = cols - PAD + t
            ok = (src >= start) & (src < L)
            kt = tl.load(k_base + src[:, None] * stride_kn + d[None, :], mask=ok[:, None], other=0.0)
            qh = tl.load(qhat_base + (rows[:, None] * C_K + t) * DQK + d[None, :], mask=(rows < M)[:, None],
                         other=0.0)
            s += tl.dot(qh, tl.trans(kt), input_precision=DOT_PRECISION)
        if STRIPE > 0:
            t = cols[None, :] - pos[:, None] + (STRIPE - 1)
            in_stripe = (t >= 0) & (t < STRIPE) & (rows < M)[:, None]
            exact = tl.load(cband_ptr + (bh * STRIPE + t) * M + rows[:, None], mask=in_stripe, other=0.0)
            s = tl.where(in_stripe, exact, s)
        visible = (cols[None, :] <= pos[:, None]) & (cols[None, :] >= start) & row_ok[:, None]
        s = tl.where(visible, s, float("-inf"))
        if BAND > 0:
            offset, near = _near_diagonal(pos, cols, L, BAND, False)
            tl.store(sband_ptr + (bh * BAND + offset) * M + rows[:, None], s, mask=near & (rows < M)[:, None])
        p, alpha, m_new, l = _online_softmax(s, m, l)
        values = _value_tile(v_ptr, b, first, cols, stride_vb, stride_vh, stride_vn, L, GQA, E, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=DOT_PRECISION)
        m = m_new
    has_key = l > 0
    z = acc / tl.where(has_key, l, 1.0)[:, None]
    c = tl.program_id(2) * E * D + tl.arange(0, E * D)
    tl.store(z_ptr + (bh * M + rows[:, None]) * (C_H * D) + c[None, :], z.to(z_ptr.dtype.element_ty),
             mask=(rows < M)[:, None])
    tl.store(lse_ptr + bh * M + rows, tl.where(has_key, m + tl.log(tl.where(has_key, l, 1.0)), 0.0), mask=rows < M)


# --------------------------------------------------------------------------------------------
# Host side.


def stripe_scores(band: torch.Tensor, theta32: torch.Tensor, stripe: int, seg_start: torch.Tensor) -> torch.Tensor:
    """Exact convolved scores C[i, i - stripe + 1 + t] for t < stripe, from the band scores (B, H, C_P, c_q + c_k
    - 2, N): (B, H, stripe, N), float32 (`_stripe_kernel`). theta32 (H, 1, c_q, c_k) float32; seg_start (B, N) or
    (B, 1) int32."""
    batch, heads, c_p, width, n = band.shape
    c_q, c_k = theta32.shape[-2:]
    cband = _output((batch, heads, stripe, n), band, torch.float32)
    tiles = _stripe_tiles(stripe, width, c_k)
    _stripe_kernel[_grid(n, tiles["BLOCK"], batch * heads)](
        band.contiguous(), theta32, cband, seg_start, n, heads, C_Q=c_q, C_K=c_k, WB=width, STRIPE=stripe,
        PACKED=seg_start.shape[-1] > 1, C_P=c_p, **tiles)
    return cband


def stripe_scores_backward(band, theta32, stripe, seg_start, dscores, dtheta) -> torch.Tensor:
    """The gradient of `stripe_scores` with respect to the band (float32); adds theta's to dtheta (float32)."""
    batch, heads, c_p, width, n = band.shape
    c_q, c_k = theta32.shape[-2:]
    dband = _output(band.shape, band, torch.float32)
    tiles = _stripe_tiles(stripe, width, c_k)
    _stripe_bwd_kernel[_grid(n, tiles["BLOCK"], batch * heads)](
        band, theta32, dscores.contiguous(), dband, dtheta, seg_start, n, heads, C_Q=c_q, C_K=c_k, WB=width,
        STRIPE=stripe, PACKED=seg_start.shape[-1] > 1, C_P=c_p, W_BLOCK=triton.next_power_of_2(width), **tiles)
    return dband


def _stripe_tiles(stripe: int, width: int, c_k: int) -> dict:
    """Block sizes of the stripe kernels (the backward adds W_BLOCK, the band's rows): their (stripe or band rows x
    taps x columns) tiles hold about STRIPE_TILE elements."""
    rows, taps = triton.next_power_of_2(max(stripe, width)), triton.next_power_of_2(c_k)
    return dict(T_BLOCK=triton.next_power_of_2(stripe), K_BLOCK=taps, BLOCK=max(16, STRIPE_TILE // (rows * taps)))


def _output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _grid(n: int, block: int, batch_heads: int, chunks: int = 1):
    return (triton.cdiv(n, block), batch_heads, chunks)


def value_chunk(c_h: int, head_dim: int) -> int:
    """How many of a group's c_h value heads one program holds side by side: all for 1, 2 or 4 (the tilings
    measured on the GPU), else the largest power of two up to 4 that divides c_h and keeps E * d <= 256."""
    if c_h in (1, 2, 4):
        return c_h
    e = 4
    while c_h % e or e * head_dim > 256:
        e //= 2
    return e


# The row kernels (khat, band scores and their backward) hold (ROW_BLOCK x d) float32 tiles: with 4 warps at
# d = 128 they spilled to the stack (5.8 KB per thread in the band backward; benchmarks/compile_report.py).
ROW_BLOCK, ROW_KERNEL_WARPS = 64, 8
# Elements of the stripe kernels' (band rows x kernel taps x columns) float32 tiles: with 4 warps, 32 registers
# per thread each.
STRIPE_TILE = 4096

# Rows per program of the head-mixing kernels (each holds a few (rows x d) float32 tiles).
MIX_BLOCK = 32
# New rows per program of the decode query mixing (a step has one, or c_q' with a post-softmax kq conv).
DECODE_QUERY_ROWS = 16

KERNELS = ("fwd", "dkdv", "dq", "dv")
# Per kernel (of KERNELS), a (BM, BN, num_warps, num_stages) to use instead of `_tiles`' choice:
# benchmarks set it to compare tilings, tests to run each shape of tiling.
TILES_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}


def _tiles(kernel: str, head_dim: int, c_q: int, e: int, chunks: int, element_size: int,
           dropout: bool) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of one kernel. Half precision: the fastest of a few candidates timed on an
    H200 (benchmarks/sweep_tiles.py; benchmarks/NOTES.md). float32, dropout over several value heads (its 3-D
    products) and groups in chunks keep small tiles: the c_q query-shift accumulators and the shifted tiles each
    step loads must fit registers and shared memory (with the large tiles, a group of 16 with dropout asked 295 KB)."""
    if kernel in TILES_OVERRIDE:
        return TILES_OVERRIDE[kernel]
    # Groups in chunks load dZ and V of every chunk at each step of the backward: two stages of those took
    # 320-430 KB of shared memory on an H200 (group of 12 at d = 64).
    stages = 1 if chunks > 1 and kernel in ("dkdv", "dq") else 2
    large = _large_tiles(element_size, chunks, dropout, e)
    if large and c_q > 1 and e * head_dim <= 256:  # (no dV kernel: that is for groups in chunks)
        if head_dim == 128 and c_q <= 2 and e == 1:  # two query shifts leave room for larger query blocks
            return dict(fwd=(128, 64, 8, 1), dkdv=(64, 32, 4, 1), dq=(64, 32, 4, 1))[kernel]
        if head_dim <= 64 and e * head_dim <= 128:
            return dict(fwd=(64, 64, 4, 2), dkdv=(64, 32, 4, 2), dq=(32, 64, 4, 2))[kernel]
        if head_dim == 128:
            key_major = _key_major_tiles(head_dim, c_q, e, chunks, element_size, dropout)
            return dict(fwd=(64, 32, 4, 1), dkdv=(64, 32, 8, 2) if key_major else (32, 64, 8, 1),
                        dq=(32, 64, 8, 1))[kernel]
    if c_q > 1 or head_dim * e > 256:
        if head_dim <= 64:
            return 32, 32, 4, stages
        # float32 tiles take twice the shared memory: at 32 x 32 the kernel asked for more than an H200 has.
        return (16, 16, 4, 1) if element_size > 2 else (32, 32, 8, 1)
    if large and kernel == "fwd":
        return 128, 64, 8, 2
    return (64, 64, 4, stages) if head_dim <= 64 else (64, 32, 4, stages)


def _large_tiles(element_size: int, chunks: int, dropout: bool, e: int) -> bool:
    """Whether the kernels may take the large tilings: half precision, the group's value heads side by side, and no
    3-D products (dropout over several value heads)."""
    return element_size == 2 and chunks == 1 and (not dropout or e == 1)


def _key_major_tiles(head_dim: int, c_q: int, e: int, chunks: int, element_size: int, dropout: bool) -> bool:
    """Whether the key-major kernels hold (keys x queries) tiles, so that every product has the key block as its M
    side and no operand goes through shared memory to be transposed. Measured on an H200 (benchmarks/NOTES.md,
    session 9): 7-11% faster for kq-conv layers at head_dim 128 (with 64-query blocks, whose (queries x keys) form
    spilled 2.7 KB per thread), 4-7% slower for kq-conv layers at 64 and head-mix-only layers."""
    return c_q > 2 and head_dim == 128 and e * head_dim <= 256 and _large_tiles(element_size, chunks, dropout, e)


# (kernel, tiling, constants, dtype) -> the tiling that fit this GPU's shared memory, where it was not the one asked.
_FITTED_TILINGS: dict = {}


def _launch(kernel, grid, args, tiling, constants):
    """Runs `kernel` with a tiling over grid(BM, BN). A tiling that needs more shared memory than this GPU has
    (Triton refuses it before anything runs) is retried with fewer pipeline stages, then with smaller tiles."""
    # Triton's interpreter (the CPU tests) ignores keyword arguments that the kernel does not take; the GPU refuses
    # them.
    unknown = set(constants) - set(getattr(kernel, "arg_names", constants))
    if unknown:
        raise TypeError(f"{kernel.fn.__name__} takes no {sorted(unknown)}")
    key = (kernel, tiling, tuple(sorted(constants.items())), args[0].dtype)
    bm, bn, warps, stages = _FITTED_TILINGS.get(key, tiling)
    while True:
        try:
            kernel[grid(bm, bn)](*args, BM=bm, BN=bn, num_warps=warps, num_stages=stages, **constants)
            break
        except OutOfResources:
            if stages > 1:
                stages -= 1
            elif max(bm, bn) > 16:
                bm, bn = (bm // 2, bn) if bm >= bn else (bm, bn // 2)
            else:
                raise
    if (bm, bn, warps, stages) != tiling:
        _FITTED_TILINGS[key] = (bm, bn, warps, stages)


def _value_heads(heads: int, v_heads: int, c_h: int) -> tuple[bool, int]:
    """(own values, query heads per value head): whether each query head has c_h value heads of its own (v holds
    heads * c_h: the post-softmax kq conv's mixed values, `_post_conv_values`), and else how many query heads share
    one value head (GQA)."""
    own = c_h > 1 and v_heads == heads * c_h
    return own, 1 if own else heads // v_heads


class _Launch:
    """What the kernels of one call are compiled and launched with, from the shapes of its inputs."""

    def __init__(self, q, v, theta, key_padding, c_h, seg_start, dropout_p, band=0):
        self.has_conv = theta is not None
        self.c_q, self.c_k = theta.shape[-2:] if self.has_conv else (1, 1)
        self.pad = key_padding_left(key_padding, self.c_k) if self.has_conv else 0
        self.stripe = (self.c_q - 1) + (self.c_k - 1 - self.pad) if self.has_conv else 0
        # With pre-softmax head mixing side by side, the keys' column blocks are c_p source heads with kernels of
        # their own.
        self.c_p = q.shape[-1] // v.shape[-1] if self.has_conv else 1
        self.c_h = c_h
        own_values, self.value_share = _value_heads(q.shape[1], v.shape[1], c_h)
        self.e = value_chunk(c_h, v.shape[-1])
        self.chunks = c_h // self.e
        # q and k are wider than the values (c_p * d) with pre-softmax head mixing (`_premixed`): the scale is the
        # head's, and the tilings are those of the wider side.
        self.scale = 1.0 / math.sqrt(v.shape[-1])
        self.head_dim, self.element_size, self.dropout = q.shape[-1], q.element_size(), dropout_p > 0
        self.constants = dict(
            HAS_CONV=self.has_conv, C_Q=self.c_q, STRIPE=self.stripe, BAND=band, NEAR=max(self.stripe, band), C_H=c_h,
            D=v.shape[-1], DQK=q.shape[-1], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            PACKED=seg_start.shape[-1] > 1, DROPOUT=dropout_p > 0, E=self.e, OWN_VALUES=own_values,
        )

    def tiling(self, kernel: str) -> tuple[int, int, int, int]:
        return _tiles(kernel, self.head_dim, self.c_q, self.e, self.chunks, self.element_size, self.dropout)

    def key_constants(self) -> dict:
        """The constants of the key-major kernels (dK/dV and dV), which mix their key tiles themselves."""
        key_major = _key_major_tiles(self.head_dim, self.c_q, self.e, self.chunks, self.element_size, self.dropout)
        return dict(self.constants, C_K=self.c_k, PAD=self.pad, C_P=self.c_p, KEY_MAJOR=key_major)


def _strides(q, k, v):
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))


def _fused_forward(q, k, v, theta, key_padding, c_h, seg_start, seg_end, dropout_p, seed, band=0):
    """Z (B, H, N, c_h * d): each source head's probabilities times the values of its group (or its own c_h value
    heads, v (B, H * c_h, N, d)), side by side (through each target head's dropout mask); the rows' log-sum-exp
    (B, H, N); and the scores S[i, i - t] of the `band` offsets t next to the diagonal (B, H, band, N), -inf where
    masked; both float32."""
    batch, heads, n, _ = q.shape
    run = _Launch(q, v, theta, key_padding, c_h, seg_start, dropout_p, band)
    theta32 = theta.float().contiguous() if run.has_conv else q.new_zeros(1, dtype=torch.float32)
    khat, cband = _conv_inputs(q, k, theta32, run, seg_start, seg_end)
    z = _output((batch, heads, n, c_h * v.shape[-1]), q)
    lse = _output((batch, heads, n), q, torch.float32)
    # Masked entries are never written: -inf from the start.
    sband = torch.full((batch, heads, band, n), float("-inf"), device=q.device, dtype=torch.float32)
    _launch(_mta_fwd_kernel, lambda bm, bn: _grid(n, bm, batch * heads, run.chunks),
            (q, k, v, khat, cband, z, lse, sband, seg_start, seg_end, seed, *_strides(q, k, v),
             n, heads, heads // k.shape[1], run.value_share, run.scale, dropout_p), run.tiling("fwd"),
            run.constants)
    return z, lse, sband


def _fused_backward(dz, delta, q, k, v, theta, lse, key_padding, c_h, seg_start, seg_end, dropout_p, seed,
                    dsband=None):
    """Gradients of q, k, v (in their dtypes) and of theta (float32; empty without a convolution), from dZ and delta
    (per row, the sum of dZ * Z in float32) and the gradient of the scores next to the diagonal (`_fused_forward`'s
    sband), if any.

    Ordered for peak memory: khat (c_q times the keys) lives only through the query-major kernel, and the float32
    dQ is cast down before the key-major kernels (which mix their key tiles themselves) add to dK and dV."""
    batch, heads, n, head_dim = q.shape
    k_heads, v_heads = k.shape[1], v.shape[1]
    band = dsband.shape[2] if dsband is not None else 0
    dsband = dsband.contiguous() if dsband is not None else q.new_zeros(1, dtype=torch.float32)
    run = _Launch(q, v, theta, key_padding, c_h, seg_start, dropout_p, band)
    dz = dz.to(q.dtype).contiguous()
    theta32 = theta.float().contiguous() if run.has_conv else q.new_zeros(1, dtype=torch.float32)
    khat, cband = _conv_inputs(q, k, theta32, run, seg_start, seg_end)
    dq = torch.zeros(batch, heads, n, head_dim, device=q.device, dtype=torch.float32)
    dcband = torch.zeros_like(cband)
    _launch(_mta_bwd_dq_kernel, lambda bm, bn: _grid(n, bm, batch * heads),
            (q, k, v, khat, cband, dz, lse, delta, dsband, dq, dcband, seg_start, seg_end, seed, *_strides(q, k, v),
             n, heads, heads // k_heads, run.value_share, run.scale, dropout_p), run.tiling("dq"), run.constants)
    del khat
    dk = torch.zeros(batch, k_heads, n, head_dim, device=q.device, dtype=torch.float32)
    dtheta = torch.zeros_like(theta32)
    if run.has_conv and run.stripe > 0:
        # Made again rather than kept: held through the dQ kernel, it would add to the backward's peak.
        band = _band(q, k, run, seg_start, seg_end)
        dband = stripe_scores_backward(band, theta32, run.stripe, seg_start, dcband, dtheta)
        _band_scores_bwd_kernel[_grid(n, ROW_BLOCK, batch * heads)](
            q, k, dband, dq, dk, seg_start, seg_end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            n, heads, k_heads, heads // k_heads, run.scale,
            WB=run.c_q + run.c_k - 2, BLOCK=ROW_BLOCK, D=head_dim, PACKED=run.constants["PACKED"], C_P=run.c_p,
            num_warps=ROW_KERNEL_WARPS,
        )
        del band, dband
    dq = dq.to(q.dtype)
    dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    key_constants = run.key_constants()
    _launch(_mta_bwd_dkdv_kernel, lambda bm, bn: _grid(n, bn, batch * heads),
            (q, k, v, cband, theta32, dz, lse, delta, dsband, dk, dv, dtheta, seg_start, seg_end, seed,
             *_strides(q, k, v), n, heads, k_heads, v_heads, heads // k_heads, run.value_share, run.scale, dropout_p),
            run.tiling("dkdv"), key_constants)
    if run.chunks > 1:
        _launch(_mta_bwd_dv_kernel, lambda bm, bn: _grid(n, bn, batch * heads, run.chunks),
                (q, k, theta32, cband, dz, lse, dv, seg_start, seg_end, seed,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 n, heads, v_heads, heads // k_heads, run.value_share, run.scale, dropout_p), run.tiling("dv"),
                {name: value for name, value in key_constants.items() if name != "BAND"})  # (it takes no dS)
    dtheta = dtheta.to(theta.dtype) if run.has_conv else q.new_empty(0)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dtheta


def _rowwise_dot(dz: torch.Tensor, z: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """delta = sum over the last dimension of dz * z in float32, (B, H, N), a block of rows at a time: at once,
    the float32 copies and their product took 6 times dz's memory, the backward's highest peak."""
    delta = torch.empty(z.shape[:-1], device=z.device, dtype=torch.float32)
    for start in range(0, z.shape[-2], rows):
        part = slice(start, start + rows)
        delta[..., part] = (dz[..., part, :].float() * z[..., part, :].float()).sum(-1)
    return delta


# The kernels as operators of their own (torch.library), so that torch.compile keeps them whole in its
# graphs. The namespace comes from this module's name: a copy of this file loaded from a model folder
# (trust_remote_code) registers its own operators beside the installed package's.
_NAMESPACE = "mta_" + re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{_NAMESPACE}::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor | None, mix: torch.Tensor | None,
    key_padding: str, c_h: int, seg_start: torch.Tensor, seg_end: torch.Tensor, dropout_p: float, seed: torch.Tensor,
    band: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, z, lse, sband). With post-softmax head mixing (`mix`), z is what the kernels made (`_fused_forward`)
    and the output its mixture; without, the output is z itself and the z returned is empty (an operator's outputs
    may not alias). lse and sband (the scores of the `band` offsets next to the diagonal) take gradients: the
    post-softmax kq conv recomputes probabilities from them."""
    # The kernels pick their own precisions; autocast would recast the few torch operations around them.
    with torch.autocast(q.device.type, enabled=False):
        z, lse, sband = _fused_forward(q, k, v, theta, key_padding, c_h, seg_start, seg_end, dropout_p, seed, band)
        if mix is None:
            return z, z.new_empty(0), lse, sband
        return _mix_forward(z, mix, v.shape[-1]), z, lse, sband


@_attention_op.register_fake
def _(q, k, v, theta, mix, key_padding, c_h, seg_start, seg_end, dropout_p, seed, band):
    rows = (*q.shape[:3],)
    z = q.new_empty(*rows, c_h * v.shape[3]) if mix is not None else q.new_empty(0)
    out = q.new_empty(*rows, v.shape[3] if mix is not None else c_h * v.shape[3])
    return out, z, q.new_empty(rows, dtype=torch.float32), q.new_empty(*rows[:2], band, rows[2], dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, dsband: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, theta: torch.Tensor | None, mix: torch.Tensor | None, z: torch.Tensor, lse: torch.Tensor,
    key_padding: str, c_h: int, seg_start: torch.Tensor, seg_end: torch.Tensor, dropout_p: float, seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v, theta and mix (the last two empty where absent)."""
    with torch.autocast(q.device.type, enabled=False):
        if mix is None:
            dz, delta, dmix = dout, _rowwise_dot(dout, z), q.new_empty(0)
        else:
            dz, delta, dmix = _mix_backward(dout, z, mix)
        if dlse is not None:
            # lse's gradient reaches each score as dlse * P: the same as lowering delta (dS = P (dP - delta)).
            delta = delta - dlse
        if dsband is not None and dsband.shape[2] == 0:
            dsband = None
        dq, dk, dv, dtheta = _fused_backward(dz, delta, q, k, v, theta, lse, key_padding, c_h, seg_start, seg_end,
                                             dropout_p, seed, dsband)
        return dq, dk, dv, dtheta, dmix


@_attention_backward_op.register_fake
def _(dout, dlse, dsband, q, k, v, theta, mix, z, lse, key_padding, c_h, seg_start, seg_end, dropout_p, seed):
    # Contiguous, whatever the inputs' strides, as the kernels write them.
    dtheta = theta.new_empty(theta.shape) if theta is not None else q.new_empty(0)
    dmix = mix.new_empty(mix.shape) if mix is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dtheta, dmix


def _save_for_backward(ctx, inputs, output):
    q, k, v, theta, mix, key_padding, c_h, seg_start, seg_end, dropout_p, seed, band = inputs
    out, z, lse, sband = output
    ctx.save_for_backward(q, k, v, theta, mix, out if mix is None else z, lse, seg_start, seg_end, seed)
    ctx.key_padding, ctx.c_h, ctx.dropout_p = key_padding, c_h, dropout_p
    ctx.mark_non_differentiable(z)


def _attention_backward(ctx, dout, _dz, dlse, dsband):
    q, k, v, theta, mix, z, lse, seg_start, seg_end, seed = ctx.saved_tensors
    dq, dk, dv, dtheta, dmix = _attention_backward_op(dout, dlse, dsband, q, k, v, theta, mix, z, lse,
                                                      ctx.key_padding, ctx.c_h, seg_start, seg_end, ctx.dropout_p,
                                                      seed)
    return (dq, dk, dv, dtheta if theta is not None else None, dmix if mix is not None else None,
            None, None, None, None, None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_save_for_backward)


def _band(q, k, run, seg_start, seg_end):
    """The band scores (B, H, C_P, c_q + c_k - 2, N) that the stripe is convolved from (`_band_scores_kernel`)."""
    batch, heads, n, head_dim = q.shape
    width = run.c_q + run.c_k - 2
    band = _output((batch, heads, run.c_p, width, n), q, torch.float32)
    _band_scores_kernel[_grid(n, ROW_BLOCK, batch * heads)](
        q, k, band, seg_start, seg_end, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, heads, heads // k.shape[1], run.scale, WB=width, BLOCK=ROW_BLOCK, D=head_dim,
        PACKED=run.constants["PACKED"], C_P=run.c_p, num_warps=ROW_KERNEL_WARPS,
    )
    return band


def _conv_inputs(q, k, theta32, run, seg_start, seg_end):
    """khat (B, H, c_q, N, d) and the exact stripe scores (B, H, stripe, N); placeholders without a convolution."""
    batch, heads, n, head_dim = q.shape
    none = q.new_zeros(1, dtype=torch.float32)
    if not run.has_conv:
        return q.new_zeros(1), none
    khat = _output((batch, heads, run.c_q, n, head_dim), q)
    _khat_kernel[_grid(n, ROW_BLOCK, batch * heads)](
        k, theta32, khat, seg_start, seg_end, k.stride(0), k.stride(1), k.stride(2),
        n, heads, heads // k.shape[1], C_Q=run.c_q, C_K=run.c_k, PAD=run.pad, BLOCK=ROW_BLOCK, D=head_dim,
        PACKED=run.constants["PACKED"], C_P=run.c_p, num_warps=ROW_KERNEL_WARPS,
    )
    if run.stripe == 0:
        return khat, none
    return khat, stripe_scores(_band(q, k, run, seg_start, seg_end), theta32, run.stripe, seg_start)


def _mix_forward(z: torch.Tensor, mix: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Post-softmax head mixing, O_e = sum_c W[g, c, e] Z_c[e] (B, H, N, d), in float32 and one pass over z. z (B, H,
    N, c_h * d) holds, for each source head c, P_c times each of its group's values side by side; where it is only
    d wide (`_kernel_group`: the group's value heads are one), P_c V, the same for every e."""
    batch, heads, n, width = z.shape
    groups, c_h, _ = mix.shape
    out = _output((batch, heads, n, head_dim), z)
    _mix_forward_kernel[_grid(n, MIX_BLOCK, batch * groups)](
        z, mix.float().contiguous(), out, n, heads, C_H=c_h, D=head_dim, W=width, BLOCK=MIX_BLOCK)
    return out


def _mix_backward(dout: torch.Tensor, z: torch.Tensor, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The mixing's backward in one pass over dO and z: dZ (z's shape and dtype), delta (B, H, N) = the sum of
    dZ * Z per row in float32 (what the attention's backward needs next), and dW (mix's shape and dtype)."""
    batch, heads, n, head_dim = dout.shape
    groups, c_h, _ = mix.shape
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    delta = torch.empty(batch, heads, n, device=z.device, dtype=torch.float32)
    dmix = torch.zeros(mix.shape, device=z.device, dtype=torch.float32)
    _mix_backward_kernel[_grid(n, MIX_BLOCK, batch * groups)](
        dout.contiguous(), z, mix.float().contiguous(), dz, delta, dmix, n, heads, C_H=c_h, D=head_dim,
        W=z.shape[-1], BLOCK=MIX_BLOCK)
    return dz, delta, dmix.to(mix.dtype)


def _premixed(q: torch.Tensor, k: torch.Tensor, mix: torch.Tensor, convolved: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose plain scores are the pre-softmax-mixed ones: S'_e = sum_c W[c, e] q_c . k_c over the
    c_p heads c of e's group. Where the group's heads read one key head (GQA), that is (sum_c W[c, e] q_c) . k:
    mixed queries, the keys as they are. Else, and where each source head's scores are `convolved` with a kernel of
    its own first (the kernels then give each column block its source head's kernel), the group's heads side by
    side, c_p * d wide: Q_e = [W[c, e] q_c]_c against one key head per group K_g = [k_c]_c. Autograd takes the
    kernels' gradients of these back to q, k and the weights."""
    batch, heads, n, head_dim = q.shape
    groups, c_p, _ = mix.shape
    by_source = q.view(batch, groups, c_p, 1, n, head_dim) * mix.to(q.dtype)[None, :, :, :, None, None]  # (c, e)
    if (heads // k.shape[1]) % c_p == 0 and not convolved:
        return by_source.sum(2).reshape(q.shape), k
    length = k.shape[2]  # n, or the cache's length when decoding
    keys = k.repeat_interleave(heads // k.shape[1], dim=1).view(batch, groups, c_p, length, head_dim)
    wide_q = by_source.permute(0, 1, 3, 4, 2, 5).reshape(batch, heads, n, c_p * head_dim)
    return wide_q, keys.permute(0, 1, 3, 2, 4).reshape(batch, groups, length, c_p * head_dim)


def _kernel_group(heads: int, kv_heads: int, c_h: int, dropout_p: float = 0.0) -> int:
    """The group size to run the kernels with. Where each head-mixing group reads one key/value head (GQA groups
    of a multiple of c_h query heads, as in a retrofitted Llama 3) its c_h value heads are one, and P_c [V_e]_e
    is c_h copies of P_c V: the kernels make P_c V once (1 instead of c_h products; `_mix_forward` weighs it per
    target head). Dropout gives each target head its own mask, so then the copies differ."""
    return 1 if c_h > 1 and not dropout_p and (heads // kv_heads) % c_h == 0 else c_h


def mta_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kq_conv_weight: torch.Tensor | None = None,
    head_mix_post_weight: torch.Tensor | None = None,
    key_padding: str = "both",
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    head_mix_weight: torch.Tensor | None = None,
    kq_conv_post_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal MTA attention core, fused: the output (B, H, N, d) of `mta_reference.mta_attention`.

    `segments` = (seg_start, seg_end), integer tensors (B, N): token t of row b belongs to the span
    [seg_start[b, t], seg_end[b, t]) and is real iff it lies inside it. Attention and convolution stay
    inside each span, as if each ran alone: the documents of a packed row (`document_segments`), or, as
    (B, 1) tensors, one span per row, its real tokens between padding (`row_segments`). Default: whole rows.
    Covers a pre-softmax kq conv (c_q <= 8, c_k <= 15), post-softmax head mixing in groups of any size
    (all heads included; beyond 4 the group's value heads are taken `value_chunk` at a time), and pre-softmax
    head mixing (`head_mix_weight`, (H / c_p, c_p, c_p)), with or without a kq conv (`_premixed`), and a
    post-softmax kq conv (`kq_conv_post_weight`, (H, 1, c_q', c_k'), up to the same sizes; not with dropout).
    `dropout_p` drops entries of the final attention maps (after head mixing) as the reference does in
    training; the masks follow from `dropout_seed` (`dropout_keep_scale` makes them), by default drawn
    from torch's generator.
    """
    batch, heads, n, head_dim = q.shape
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"{heads} query heads cannot share {k.shape[1]} key/value heads")
    _check_coverage(q, k, kq_conv_weight, head_mix_weight, head_mix_post_weight, key_padding, kq_conv_post_weight,
                    dropout=dropout_p > 0)
    device = q.device
    if segments is None:
        segments = row_segments(torch.zeros(batch, device=device), torch.full((batch,), n, device=device))
    if len(segments) != 2 or any(t.shape not in ((batch, n), (batch, 1)) for t in segments) \
            or segments[0].shape != segments[1].shape:
        raise ValueError(f"segments must be two (batch, seq_len) = ({batch}, {n}) or two ({batch}, 1) tensors, "
                         f"got {[tuple(t.shape) for t in segments]}")
    seg_start, seg_end = (t.to(device=device, dtype=torch.int32).contiguous() for t in segments)
    q, k, v = _in_autocast_dtype(q, k, v)
    c_h = head_mix_post_weight.shape[-1] if head_mix_post_weight is not None else 1
    group = _kernel_group(heads, k.shape[1], c_h, dropout_p)
    if head_mix_weight is not None:
        q, k = _premixed(q, k, head_mix_weight, convolved=kq_conv_weight is not None)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if dropout_p and dropout_seed is None:
        seed = torch.randint(2**31 - 1, (1,), device=device, dtype=torch.int64)
    else:
        seed = torch.full((1,), dropout_seed or 0, device=device, dtype=torch.int64)
    if kq_conv_post_weight is not None:
        return _post_conv_attention(q, k, v, kq_conv_weight, kq_conv_post_weight, head_mix_post_weight, key_padding,
                                    group, seg_start, seg_end, seed)
    out, _, _, _ = _attention_op(q, k, v, kq_conv_weight, head_mix_post_weight, key_padding, group, seg_start,
                                 seg_end, float(dropout_p), seed, 0)
    return out


# The post-softmax kq conv (MTA_SPEC section 5). Per source head c and target head e of its group (e = c without head
# mixing), the output is O_e[i] = sum_c W[c, e] sum_j A'_c[i, j] V_e[j] with A'_c = conv'_c(P_c) kept to j <= i. With
# the values mixed by the kernel, vhat_{c,a,e}[j'] = sum_b theta'_c[a, b] V_e[j' + p' - b], and Y_{c,a,e} = P_c vhat_{c,a,e}
# (the kernels, each source head with c_q' x n_e value heads of its own), that is
#     O_e[i] = sum_c W[c, e] (sum_a Y_{c,a,e}[i - s_a] - R_{c,e}[i]),   s_a = c_q' - 1 - a,
# where R takes out what vhat holds beyond the diagonal: the terms whose value V[m] has m > i. Those come from the
# p' probabilities next to the diagonal of rows i - s_a (only for s_a < p'), which the kernel hands over as scores
# (sband) with the rows' log-sum-exp, so R is O(N p') and autograd carries its gradient back into the kernels.


def _post_conv_attention(q, k, v, theta, theta_post, mix, key_padding, group, seg_start, seg_end, seed):
    """The attention output (B, H, N, d) with a post-softmax kq conv (theta_post (H, 1, c_q', c_k')) and then the
    post-softmax head mixing `mix`, if any; `group` is the kernels' group size (`_kernel_group`: 1 where a group's
    value heads are one)."""
    heads = q.shape[1]
    c_q, c_k = theta_post.shape[-2:]
    left = key_padding_left(key_padding, c_k)
    weights = mix.float() if mix is not None else torch.ones(heads, 1, 1, device=q.device)
    theta32 = theta_post.float()
    targets = v.repeat_interleave(heads // v.shape[1], dim=1)  # (B, H, N, d): each target head's values
    vhat = _PostConvValues.apply(targets, theta32, left, weights.shape[-1], group, seg_start, seg_end)
    y, _, lse, sband = _attention_op(q, k, vhat, theta, None, key_padding, c_q * group, seg_start, seg_end, 0.0, seed,
                                     left)
    # Made again in the backward too: kept, the float32 shifted Y and the values' rolled copies for R were 7 more.
    out = checkpoint(_post_conv_rows, y, lse, sband, theta32, weights, targets, group, seg_start, seg_end,
                     use_reentrant=False)
    return out.to(q.dtype)


def _post_conv_rows(y, lse, sband, theta32, weights, targets, group, seg_start, seg_end):
    """`_post_conv_attention`'s output from Y (B, H, N, c_q' * n_e * d), the rows' log-sum-exp and the scores next to
    the diagonal: Y shifted by its rows' offsets and added inside each segment, less what it holds beyond the
    diagonal, mixed (float32)."""
    c_q, left, n = theta32.shape[-2], sband.shape[2], y.shape[2]
    y = y.unflatten(-1, (c_q, group, -1))  # (B, H, N, c_q', n_e, d)
    beyond = _beyond_diagonal(torch.exp(sband - lse[:, :, None, :]), theta32, left)  # (B, H, c_q', p', N)
    rows = torch.arange(n, device=y.device)
    shifted, held = 0.0, 0.0
    for a in range(c_q):
        s = c_q - 1 - a
        # Row i reads row i - s_a of its own segment (rolled rows that wrap around are never kept); padding stays 0.
        keep = ((rows - s >= seg_start) & (rows < seg_end)).float()[:, None]  # (B, 1, N)
        shifted = shifted + torch.roll(y[:, :, :, a], s, dims=2) * keep[..., None, None]
        held = held + torch.roll(beyond[:, :, a], s, dims=-1) * keep[:, :, None]

    def ahead(m):  # V[i + m], and whether key i + m is in row i's segment
        return torch.roll(targets, -m, dims=2), (rows + m < seg_end).float()[:, None]

    return _mixed_post_conv_output(shifted, held, weights, group, ahead)


def _mixed_post_conv_output(shifted, held, weights, group, ahead):
    """O_e = sum_c W[c, e] (shifted_{c, e} - R_{c, e}): the shifted and added Y (B, H, rows, n_e, d), mixed over each
    group's source heads, less R = sum_m held[m - 1] V_e[i + m] (held (B, H, p', rows), the weights that Y gave keys
    beyond the diagonal); `ahead(m)` gives those keys' values (B, H, rows, d) and where they count (a 0/1 factor per
    row)."""
    groups, c_h = weights.shape[0], weights.shape[-1]
    by_group = shifted.unflatten(1, (groups, c_h))
    if group == 1:
        out = torch.einsum("bgcnd,gce->bgend", by_group[..., 0, :], weights)
    else:
        out = torch.einsum("bgcned,gce->bgend", by_group, weights)
    out = out.flatten(1, 2)
    held = torch.einsum("bgcmn,gce->bgemn", held.unflatten(1, (groups, c_h)), weights).flatten(1, 2)
    for m in range(1, held.shape[2] + 1):
        values, inside = ahead(m)
        out = out - (held[:, :, m - 1] * inside)[..., None] * values
    return out


def _post_conv_decode(q_rows, k, v, theta, theta_post, mix, key_padding, group, key_start, new_rows):
    """`_post_conv_attention` for the last `new_rows` rows against a cache (`_decode`'s arguments): the decode kernel
    makes Y, the log-sum-exp and the scores next to the diagonal for the c_q' - 1 rows before them as well (as far as
    q_rows reaches: earlier rows count as zero), with the values mixed along the whole cache."""
    heads, rows, length = q_rows.shape[1], q_rows.shape[2], k.shape[2]
    c_q, c_k = theta_post.shape[-2:]
    left = key_padding_left(key_padding, c_k)
    weights = mix.float() if mix is not None else torch.ones(heads, 1, 1, device=q_rows.device)
    theta32 = theta_post.float()
    targets = v.repeat_interleave(heads // v.shape[1], dim=1)
    seg_start = key_start.to(torch.int32)[:, None]
    vhat = _post_conv_values(targets, theta32, left, weights.shape[-1], group, seg_start, torch.full_like(seg_start,
                                                                                                         length))
    window = min(new_rows + c_q - 1, rows)
    y, lse, sband = _decode(q_rows, k, vhat.to(v.dtype), theta, key_padding, c_q * group, key_start, window, left)
    y = y.float().unflatten(-1, (c_q, group, -1))  # (B, H, window, c_q', n_e, d): a few rows, float32 as the weights
    beyond = _beyond_diagonal(torch.exp(sband - lse[:, :, None, :]), theta32, left)  # (B, H, c_q', p', window)
    shifted = sum(_rows_back(y[:, :, :, a], c_q - 1 - a, 2, new_rows) for a in range(c_q))
    held = sum(_rows_back(beyond[:, :, a], c_q - 1 - a, 3, new_rows) for a in range(c_q))
    positions = length - new_rows + torch.arange(new_rows, device=q_rows.device)

    def ahead(m):  # V[i + m], and whether that key is in the cache
        return targets[:, :, (positions + m).clamp(max=length - 1)], (positions + m < length).float()

    return _mixed_post_conv_output(shifted, held, weights, group, ahead)


def _rows_back(x, s, dim, count):
    """The last `count` rows (along dim) of x shifted back by s: row r is x's row (len - count + r - s), zero before
    x's first."""
    zeros = x.new_zeros(*x.shape[:dim], s, *x.shape[dim + 1:])
    return torch.cat([zeros, x], dim).narrow(dim, x.shape[dim] - count, count)


class _PostConvValues(torch.autograd.Function):
    """`_post_conv_values` in the values' dtype, with a backward that needs only its inputs. Through autograd it kept
    the c_k' shifted copies of each head's n_e value heads for theta's gradient (10 of the 32 times the values' bytes
    that the layer kept, 3 x 5 kernel with mixing of 2); made again in the backward instead (`checkpoint`), their
    float32 temporaries raised the backward's peak (32 x 128, 64k: 28.1 -> 32.6 GiB; benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, targets, theta32, left, c_h, group, seg_start, seg_end):
        ctx.save_for_backward(targets, theta32, seg_start, seg_end)
        ctx.left, ctx.c_h, ctx.group = left, c_h, group
        vhat = _post_conv_values(targets, theta32, left, c_h, group, seg_start, seg_end)
        # Cast only where the dtype changes: with a `.to` that changed nothing (float32 values), torch 2.11's dynamo
        # gave this Function wrong gradients (torch 2.13 did not).
        return vhat if vhat.dtype == targets.dtype else vhat.to(targets.dtype)

    @staticmethod
    def backward(ctx, dvhat):
        """One kernel column t at a time: theta[., a, t]'s gradient sums dvhat_a times the values that vhat_a read
        through t, and the values' gradient takes sum_a theta[a, t] dvhat_a back to the rows those came from."""
        targets, theta32, seg_start, seg_end = ctx.saved_tensors
        batch, heads, n, d = targets.shape
        c_q, c_k = theta32.shape[-2:]
        exact = torch.promote_types(targets.dtype, torch.float32)
        value_heads = _post_conv_value_heads(heads, ctx.c_h, ctx.group, targets.device)
        dvhat = dvhat.unflatten(1, (heads, c_q, ctx.group))  # (B, H, c_q', n_e, N, d)
        dtheta = torch.zeros_like(theta32)
        dsources = torch.zeros(batch, heads, ctx.group, n, d, device=targets.device, dtype=exact)
        rows = torch.arange(n, device=targets.device)
        for t in range(c_k):
            shifted, inside = _values_read(targets, rows + ctx.left - t, seg_start, seg_end, value_heads, exact)
            through_t = 0.0
            for a in range(c_q):
                dvhat_a = dvhat[:, :, a].to(exact)
                dtheta[:, 0, a, t] = torch.einsum("bhend,bhend->h", dvhat_a, shifted).to(dtheta.dtype)
                through_t = through_t + theta32[None, :, 0, a, t, None, None, None] * dvhat_a
            # Row j read the values at j + left - t: its gradient goes there (what rolls around is outside: zero).
            dsources += torch.roll(through_t * inside, ctx.left - t, dims=3)
        dtargets = torch.zeros(batch, heads, n, d, device=targets.device, dtype=exact)
        dtargets.index_add_(1, value_heads.flatten(), dsources.flatten(1, 2))
        return dtargets.to(targets.dtype), dtheta, None, None, None, None, None


def _values_read(targets, src, seg_start, seg_end, value_heads, dtype):
    """(B, H, n_e, N, d): row j of source head h's value head e is V_e[src[j]] (zero outside j's segment), in dtype;
    and where it is inside, (B, 1, 1, N, 1)."""
    inside = ((src >= seg_start) & (src < seg_end)).to(dtype)[:, None, None, :, None]
    return targets[:, :, src.clamp(0, targets.shape[2] - 1)][:, value_heads].to(dtype) * inside, inside


def _post_conv_value_heads(heads, c_h, group, device):
    """(H, n_e): the target heads whose values source head h mixes: its group's c_h, or where they are one (n_e = 1)
    its own."""
    source = torch.arange(heads, device=device)[:, None]
    return source // c_h * c_h + torch.arange(group, device=device) if group > 1 else source


def _post_conv_values(targets, theta32, left, c_h, group, seg_start, seg_end):
    """vhat (B, H * c_q' * n_e, N, d): for source head h, kernel row a and value head e of n_e = `group` (its group's
    c_h target heads, or where they are one, h's), vhat[j] = sum_t theta'_h[a, t] V_e[j + left - t], V_e zero
    outside j's segment. Source head h's values are h * c_q' * n_e + a * n_e + e."""
    heads, n, c_k = targets.shape[1], targets.shape[2], theta32.shape[-1]
    value_heads = _post_conv_value_heads(heads, c_h, group, targets.device)
    rows = torch.arange(n, device=targets.device)
    vhat = 0.0
    for t in range(c_k):
        shifted = _values_read(targets, rows + left - t, seg_start, seg_end, value_heads, targets.dtype)[0]
        vhat = vhat + theta32[None, :, 0, :, t, None, None, None] * shifted[:, :, None]
    return vhat.flatten(1, 3)


def _beyond_diagonal(near, theta32, left):
    """(B, H, c_q', p', N): entry (a, m - 1, r) is the weight that Y_a's row r (its vhat) gave V[r + s_a + m], a key
    beyond the diagonal of output row r + s_a: sum over t of P[r, r - t] theta'[a, p' - s_a - m - t]. near (B, H, p',
    N) holds P[r, r - t]."""
    c_q = theta32.shape[-2]
    device = near.device
    a = torch.arange(c_q, device=device)[:, None, None]
    t = torch.arange(left, device=device)[None, :, None]
    m = torch.arange(1, left + 1, device=device)[None, None, :]
    tap = left - (c_q - 1 - a) - m - t  # (c_q', p', p'): the kernel column, where >= 0
    coefficients = theta32[:, 0][:, a, tap.clamp(min=0)] * (tap >= 0)  # (H, c_q', t, m)
    return torch.einsum("bhtn,hatm->bhamn", near, coefficients)


def mta_decode_fused(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kq_conv_weight: torch.Tensor | None,
    head_mix_post_weight: torch.Tensor | None,
    key_padding: str,
    key_start: torch.Tensor,
    new_rows: int,
    head_mix_weight: torch.Tensor | None = None,
    kq_conv_post_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last `new_rows` rows of causal MTA attention against a cache, fused, forward only: (B, H, new_rows, d).

    k, v (B, H_kv, L, d) hold the whole cache, new tokens last; q_rows (B, H, R, d) the queries at the last R
    positions, the new tokens' and, for a convolution, up to c_q - 1 before them (earlier rows count as zero).
    Keys from key_start[b] on are real (left padding before). No N x N tensor: the kernel's queries are mixed
    first (c_k of them per row) and meet each key once, and the stripe near the diagonal is computed exactly.
    Pre-softmax head mixing (`head_mix_weight`): where each group's heads read one key head and there is no
    convolution it mixes the queries alone (`_premixed`) and reads the cache as it is; else the group's keys are
    put side by side from the cache at each call (a copy of the layer's cache) against the wide queries.
    A post-softmax kq conv (`kq_conv_post_weight`) reads c_q' - 1 more earlier rows, and mixes the whole cache's
    values at each call (`_post_conv_decode`).
    """
    heads, head_dim = q_rows.shape[1], q_rows.shape[3]
    _check_coverage(q_rows, k, kq_conv_weight, head_mix_weight, head_mix_post_weight, key_padding,
                    kq_conv_post_weight)
    q_rows, k, v = _in_autocast_dtype(q_rows, k, v)
    if head_mix_weight is not None:
        q_rows, k = _premixed(q_rows, k, head_mix_weight, convolved=kq_conv_weight is not None)
    c_h = head_mix_post_weight.shape[-1] if head_mix_post_weight is not None else 1
    group = _kernel_group(heads, v.shape[1], c_h)
    theta = kq_conv_weight if kq_conv_weight is not None else q_rows.new_ones(heads, 1, 1, 1)
    return _decode_op(q_rows, k.contiguous(), v.contiguous(), theta, head_mix_post_weight, key_padding, group,
                      key_start.to(torch.int32), new_rows, kq_conv_post_weight)


@torch.library.custom_op(f"{_NAMESPACE}::decode", mutates_args=())
def _decode_op(
    q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, mix: torch.Tensor | None,
    key_padding: str, c_h: int, key_start: torch.Tensor, new_rows: int, theta_post: torch.Tensor | None,
) -> torch.Tensor:
    with torch.autocast(q_rows.device.type, enabled=False):
        if theta_post is not None:
            out = _post_conv_decode(q_rows, k, v, theta, theta_post, mix, key_padding, c_h, key_start, new_rows)
            return out.to(q_rows.dtype).contiguous()  # (the strides that the fake output promises)
        z = _decode(q_rows, k, v, theta, key_padding, c_h, key_start, new_rows)[0]
        return _mix_forward(z, mix, v.shape[-1]) if mix is not None else z


@_decode_op.register_fake
def _(q_rows, k, v, theta, mix, key_padding, c_h, key_start, new_rows, theta_post):
    width = v.shape[3] if mix is not None or theta_post is not None else c_h * v.shape[3]
    return q_rows.new_empty(q_rows.shape[0], q_rows.shape[1], new_rows, width)


def _decode(q_rows, k, v, theta, key_padding, c_h, key_start, new_rows, near=0):
    """Z (B, H, new_rows, c_h * d) for the new rows, their log-sum-exp (B, H, new_rows) and the scores of the `near`
    offsets next to the diagonal (B, H, near, new_rows; -inf where masked), as `_fused_forward` makes them. q_rows and
    k may be wider than the values (pre-softmax mixing side by side, `_premixed`): c_p = their width / d column
    blocks, each the share of one source head, mixed by that head's kernel. v may hold c_h value heads of each
    query head's own (B, H * c_h, L, d; the post-softmax kq conv's)."""
    batch, heads, rows, width_qk = q_rows.shape
    head_dim = v.shape[-1]
    c_p = width_qk // head_dim
    length = k.shape[2]
    c_q, c_k = theta.shape[-2:]
    pad = key_padding_left(key_padding, c_k)
    stripe = (c_q - 1) + (c_k - 1 - pad)
    first = length - rows  # position of q_rows' first row
    scale = 1.0 / math.sqrt(head_dim)
    # Kernels rather than torch operations: a decode step's time is on the host, about the number of its operations
    # (a kq-conv layer's call took 1.25 ms with the queries mixed and the band made by 65 of them; benchmarks/NOTES.md).
    if c_q == c_k == c_p == 1:
        # No convolution: each new row's own query, unmasked: a row before its batch row's first real key sees no key.
        qhat = (q_rows[:, :, rows - new_rows:, None].float() * scale).to(q_rows.dtype).contiguous()
    else:
        theta32 = theta.float().contiguous()
        qhat = _output((batch, heads, new_rows, c_k, width_qk), q_rows)
        _decode_queries_kernel[(triton.cdiv(new_rows, DECODE_QUERY_ROWS), batch * heads, c_k)](
            q_rows, theta32, qhat, key_start, q_rows.stride(0), q_rows.stride(1), q_rows.stride(2), rows, new_rows,
            first, heads, scale, C_Q=c_q, C_K=c_k, C_P=c_p, DQK=width_qk, BLOCK=DECODE_QUERY_ROWS)
    cband = q_rows.new_zeros(1, dtype=torch.float32)
    if stripe > 0:
        # The band of q_rows: training's band kernel on rows 0..R-1, with the keys from position `first` on as its
        # rows and each batch row's real keys from key_start - first (negative: keys before q_rows' first row).
        start = key_start - first
        width = c_q + c_k - 2
        band = _output((batch, heads, c_p, width, rows), q_rows, torch.float32)
        keys = k[:, :, first:]
        _band_scores_kernel[_grid(rows, ROW_BLOCK, batch * heads)](
            q_rows, keys, band, start, torch.full_like(start, rows), q_rows.stride(0), q_rows.stride(1),
            q_rows.stride(2), keys.stride(0), keys.stride(1), keys.stride(2), rows, heads, heads // k.shape[1], scale,
            WB=width, BLOCK=ROW_BLOCK, D=width_qk, PACKED=False, C_P=c_p, num_warps=ROW_KERNEL_WARPS)
        # The stripe of a new row reads band columns up to c_q - 1 rows back, all inside q_rows.
        cband = stripe_scores(band, theta32, stripe, start[:, None])
        cband = cband[..., rows - new_rows:].contiguous()
    z = _output((batch, heads, new_rows, c_h * head_dim), q_rows)
    lse = _output((batch, heads, new_rows), q_rows, torch.float32)
    sband = torch.full((batch, heads, near, new_rows), float("-inf"), device=q_rows.device, dtype=torch.float32)
    own_values, value_share = _value_heads(heads, v.shape[1], c_h)
    e = value_chunk(c_h, head_dim)
    # One stage: the c_k shifted key tiles of a step, pipelined, took 245 KB (d = 64) and 481 KB (d = 128) of
    # shared memory at three stages on an H200.
    tiling = (16, 64 if head_dim * e <= 256 and width_qk <= 128 else 32, 4, 1)
    _launch(_mta_decode_kernel, lambda bm, bn: _grid(new_rows, bm, batch * heads, c_h // e),
            (qhat, k, v, cband, z, lse, sband, key_start, k.stride(0), k.stride(1), k.stride(2), v.stride(0),
             v.stride(1), v.stride(2), new_rows, length, heads, heads // k.shape[1], value_share), tiling,
            dict(C_K=c_k, PAD=pad, STRIPE=stripe, BAND=near, C_H=c_h, D=head_dim, DQK=width_qk, E=e,
                 DOT_PRECISION="ieee" if q_rows.dtype == torch.float32 else "tf32", OWN_VALUES=own_values))
    return z, lse, sband


def dropout_keep_scale(batch: int, heads: int, n: int, c_h: int, dropout_p: float, dropout_seed: int,
                       device) -> torch.Tensor:
    """The dropout the fused kernel applies for `dropout_seed`, as a (B, H, N, N) float32 map: 1 / (1 - p) where
    it keeps an entry of the final attention map, 0 where it drops it. N x N: for tests and inspection."""
    out = torch.empty(batch, heads, n, n, device=device, dtype=torch.float32)
    seed = torch.full((1,), dropout_seed, device=device, dtype=torch.int64)
    block = 32
    _dropout_keep_kernel[(triton.cdiv(n, block), triton.cdiv(n, block), batch * heads // c_h)](
        out, seed, n, heads, dropout_p, C_H=c_h, BLOCK=block)
    return out


def _check_coverage(q, k, kq_conv_weight, head_mix_weight, head_mix_post_weight, key_padding, kq_conv_post_weight=None,
                    dropout=False):
    def size(conv):
        return tuple(conv.shape[-2:]) if conv is not None else None

    gap = fused_coverage_gap(q.shape[-1], size(kq_conv_weight), key_padding, size(kq_conv_post_weight),
                             head_mix_weight.shape[-1] if head_mix_weight is not None else None,
                             head_mix_post_weight.shape[-1] if head_mix_post_weight is not None else None,
                             q.shape[1] // k.shape[1], dropout)
    if gap is not None:
        raise ValueError(f"the fused MTA kernel does not cover {gap}")


def _in_autocast_dtype(q, k, v):
    """Under autocast (bf16 mixed-precision training) q and k leave RoPE in float32 while v is already in the
    autocast dtype; the kernels' products need one dtype, so they run in the autocast dtype, as SDPA does."""
    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(t.to(dtype) for t in (q, k, v))


def row_segments(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments of rows whose real tokens are [start[b], end[b]) (padding around them): one per row, (B, 1)."""
    return tuple(t.to(torch.int32)[:, None] for t in (start, end))


def document_segments(begins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segments of packed rows: `begins` (B, N) bool is True where a document starts (always at t = 0)."""
    n = begins.shape[-1]
    positions = torch.arange(n, device=begins.device)
    start = torch.where(begins, positions, 0).cummax(-1).values
    # A token's document ends where the next one begins: the first begin to its right.
    begins_next = torch.cat([begins[:, 1:], torch.zeros_like(begins[:, :1])], dim=-1)
    next_begin = torch.where(begins_next, positions + 1, n)
    end = next_begin.flip(-1).cummin(-1).values.flip(-1)
    return start.int(), end.int()
