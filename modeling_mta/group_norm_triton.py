"""The group norm (MTA_SPEC section 6: RMSNorm of each head's output over head_dim, one weight for all heads) in
Triton: forward and backward each one pass over their tensors. `mta_reference.group_norm` is the definition.

The attention's output arrives as (B, N, H, d) strided over a (B, H, N, d) tensor; the kernels read it where it
lies and write the normed output contiguous (what the output projection reads), and the input's gradient with the
input's strides (what the attention's backward reads), so no copy is made either way.
"""

import re

import torch
import triton
import triton.language as tl

from .mta_reference import GROUP_NORM_EPS

# Elements of a program's (tokens x head_dim) block, up to 64 tokens: at head_dim 256, 64 tokens spilled to the
# stack in the backward (760 bytes; benchmarks/compile_report.py). The backward's programs each sum the weight's
# gradient over several blocks.
BLOCK_ELEMENTS = 8192
MAX_BACKWARD_PROGRAMS = 4096


@triton.jit
def _block(x_ptr, n0, N, H, stride_b, stride_n, stride_h, BLOCK: tl.constexpr, D: tl.constexpr,
           D_BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Tokens n0 .. n0 + BLOCK - 1 of this program's (batch row, head) (axis 1) in a (B, N, H, D) tensor with these
    strides (last dimension contiguous): their offsets there, their row indices in a contiguous (B, N, H) layout,
    the masks of the rows and of the block, and x in float32 (float64 with WIDE), zero outside. One head's tokens lie
    contiguous in the attention's (B, H, N, d) output: each block is one read."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    n = n0 + tl.arange(0, BLOCK)
    d = tl.arange(0, D_BLOCK)
    real = n < N
    mask = real[:, None] & (d < D)[None, :]
    strided = (b * stride_b + h * stride_h + n * stride_n)[:, None] + d[None, :]
    x = tl.load(x_ptr + strided, mask=mask, other=0.0)
    return strided, (b * N + n) * H + h, real, mask, x.to(tl.float64) if WIDE else x.to(tl.float32)


@triton.jit
def _group_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, stride_b, stride_n, stride_h, eps,
                           BLOCK: tl.constexpr, D: tl.constexpr, D_BLOCK: tl.constexpr, WIDE: tl.constexpr):
    _, row, real, mask, x = _block(x_ptr, tl.program_id(0) * BLOCK, N, H, stride_b, stride_n, stride_h, BLOCK, D,
                                   D_BLOCK, WIDE)
    d = tl.arange(0, D_BLOCK)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(x.dtype)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + row[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd, mask=real)


@triton.jit
def _group_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H, stride_b, stride_n, stride_h,
                           BLOCK: tl.constexpr, D: tl.constexpr, D_BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """dx = rstd (g - xhat mean(g xhat)) with g = dy w, xhat = x rstd; this program's share of dw = sum dy xhat
    over its token blocks, stored in its row of dw (programs, D)."""
    d = tl.arange(0, D_BLOCK)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float64 if WIDE else tl.float32)
    dw = tl.zeros([D_BLOCK], dtype=w.dtype)
    for n0 in range(tl.program_id(0) * BLOCK, N, tl.num_programs(0) * BLOCK):
        strided, row, real, mask, x = _block(x_ptr, n0, N, H, stride_b, stride_n, stride_h, BLOCK, D, D_BLOCK, WIDE)
        dy = tl.load(dy_ptr + row[:, None] * D + d[None, :], mask=mask, other=0.0).to(x.dtype)
        rstd = tl.load(rstd_ptr + row, mask=real, other=0.0).to(x.dtype)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        tl.store(dx_ptr + strided, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    program = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(dw_ptr + program * D + d, dw, mask=d < D)


def _constants(x: torch.Tensor) -> dict:
    d_block = triton.next_power_of_2(x.shape[-1])
    return dict(BLOCK=min(64, BLOCK_ELEMENTS // d_block), D=x.shape[-1], D_BLOCK=d_block, WIDE=x.dtype == torch.float64)


def _layout(x: torch.Tensor) -> tuple:
    return x.shape[1], x.shape[2], x.stride(0), x.stride(1), x.stride(2)


def _like_input(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor for x's gradient, with x's strides where its last dimension is contiguous (which the kernels
    take as given; other inputs they copy first)."""
    if x.stride(-1) != 1:
        return x.new_empty(x.shape)
    return x.new_empty_strided(x.shape, x.stride())


_NAMESPACE = "mta_" + re.sub(r"\W", "_", __name__)  # (per copy of this file, as in mta_triton)


@torch.library.custom_op(f"{_NAMESPACE}::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y (B, N, H, d) contiguous in x's dtype, rstd (B * N * H) in float32 (float64 for float64 x)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = torch.empty(x.shape[:-1].numel(), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    batch, n, heads, _ = x.shape
    constants = _constants(x)
    _group_norm_fwd_kernel[(triton.cdiv(n, constants["BLOCK"]), batch * heads)](
        x, weight.contiguous(), y, rstd, *_layout(x), GROUP_NORM_EPS, **constants)
    return y, rstd


@_group_norm_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1].numel(), dtype=torch.promote_types(x.dtype, torch.float32))


@torch.library.custom_op(f"{_NAMESPACE}::group_norm_backward", mutates_args=())
def _group_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx with x's strides, dw in weight's dtype)."""
    dx = _like_input(x)
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, n, heads, head_dim = x.shape
    constants = _constants(x)
    blocks = min(triton.cdiv(n, constants["BLOCK"]), max(1, MAX_BACKWARD_PROGRAMS // (batch * heads)))
    dw = torch.empty(blocks * batch * heads, head_dim, device=x.device, dtype=rstd.dtype)
    _group_norm_bwd_kernel[(blocks, batch * heads)](dy.contiguous(), x, weight.contiguous(), rstd, dx, dw,
                                                    *_layout(x), **constants)
    return dx, dw.sum(0).to(weight.dtype)


@_group_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return _like_input(x), weight.new_empty(weight.shape)


def _save_for_backward(ctx, inputs, output):
    x, weight = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _group_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    return _group_norm_backward_op(dy, x, weight, rstd)


_group_norm_op.register_autograd(_group_norm_backward, setup_context=_save_for_backward)


def group_norm_fused(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm of x (B, N, H, d) over d (statistics in float32), times weight (d): `mta_reference.group_norm(x,
    weight)` with one rounding, of the output, to x's dtype. Returns a contiguous tensor."""
    if x.dim() != 4 or weight.shape != x.shape[-1:]:
        raise ValueError(f"group_norm_fused takes x (B, N, H, d) and weight (d,), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return _group_norm_op(x, weight)[0]
