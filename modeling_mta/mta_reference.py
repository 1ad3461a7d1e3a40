"""The reference Multi-Token Attention: MTA_SPEC sections 1-6, one function per operation.

This is the definition every fast path is tested against, so it favours being obviously right
over being fast: it materialises the full (queries x keys) score map of every head.

Shapes: q (B, H, Nq, d); k, v (B, H_kv, Nk, d); `visible` is a boolean mask broadcastable to
(B, H, Nq, Nk), True where key j may be seen by query i (causal, not padding). Query i of the
block is the i-th row: the caller lines rows up with keys through `visible`, so a block of new
queries against a longer key cache needs no special case here.

This file is copied verbatim into saved model folders (``trust_remote_code``).
"""

import math

import torch
import torch.nn.functional as F

GROUP_NORM_EPS = 1e-5


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision goes up to float32 for softmax and norm statistics; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def key_padding_left(key_padding: str, key_size: int) -> int:
    """Zero columns added on the left of the key axis (the rest, key_size - 1 - left, go right)."""
    return {"both": (key_size - 1) // 2, "left": key_size - 1, "right": 0}[key_padding]


def key_query_conv(x: torch.Tensor, weight: torch.Tensor, visible: torch.Tensor, key_padding: str) -> torch.Tensor:
    """Spec section 2 steps 1-3 (and section 5): per-head 2-D cross-correlation of a score map.

    x (B, H, Nq, Nk); weight (H, 1, c_q, c_k). Invisible entries count as 0; the query axis is
    padded above only (a query looks back at earlier queries), the key axis as `key_padding` says.
    The caller applies the mask that follows (-inf before the softmax, 0 after it).
    """
    c_q, c_k = weight.shape[-2:]
    left = key_padding_left(key_padding, c_k)
    x = x.masked_fill(~visible, 0.0)
    x = F.pad(x, (left, c_k - 1 - left, c_q - 1, 0))
    return F.conv2d(x, weight.to(x.dtype), groups=x.shape[1])


def head_mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Spec section 3: X'[g*c + e] = sum_c X[g*c + c'] * W[g, c', e], groups of c consecutive heads.

    x (B, H, Nq, Nk); weight (H / c, c, c).
    """
    batch, heads, n_q, n_k = x.shape
    groups, size, _ = weight.shape
    grouped = x.reshape(batch, groups, size, n_q, n_k)
    mixed = torch.einsum("bgcqk,gce->bgeqk", grouped, weight.to(x.dtype))
    return mixed.reshape(batch, heads, n_q, n_k)


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Spec section 4: softmax over keys in (at least) float32; rows with no visible key (padding queries) are 0.

    Such rows are softmaxed as zeros first, so neither the forward nor the backward sees a NaN.
    """
    scores = at_least_float32(scores).masked_fill(~visible, float("-inf"))
    has_key = visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~has_key, 0.0)
    return torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)


def mta_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    kq_conv_weight: torch.Tensor | None = None,
    kq_conv_post_weight: torch.Tensor | None = None,
    head_mix_weight: torch.Tensor | None = None,
    head_mix_post_weight: torch.Tensor | None = None,
    key_padding: str = "both",
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTA attention core (spec sections 1-5 and the weighted sum of section 6).

    Returns the per-head output (B, H, Nq, d) and the final attention map A' (B, H, Nq, Nk).
    Any weight left as None skips its operation; all None is standard causal attention.
    """
    heads, head_dim = q.shape[1], q.shape[-1]
    # GQA: each key/value head serves heads // H_kv consecutive query heads.
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)

    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(head_dim)
    if kq_conv_weight is not None:
        scores = key_query_conv(scores, kq_conv_weight, visible, key_padding)
    if head_mix_weight is not None:
        scores = head_mix(scores, head_mix_weight)
    probs = masked_softmax(scores, visible).to(q.dtype)
    if kq_conv_post_weight is not None:
        probs = key_query_conv(probs, kq_conv_post_weight, visible, key_padding).masked_fill(~visible, 0.0)
    if head_mix_post_weight is not None:
        probs = head_mix(probs, head_mix_post_weight)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, v), probs


def depth_scale(layer_idx: int) -> float:
    """Spec section 6: 1 - lambda_init(l), lambda_init(l) = 0.8 - 0.6 exp(-0.3 l)."""
    return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer_idx))


def group_norm(x: torch.Tensor, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Spec section 6: RMSNorm of each head's output over head_dim (float32 statistics), times weight and scale."""
    wide = at_least_float32(x)
    normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + GROUP_NORM_EPS)
    return normed.to(x.dtype) * weight * scale
