"""A forward pass in the official MTA code's own conventions, to check the lingua converter against.

Written for the tests from the official code's definitions (facebookresearch/RAM projects/mta on
lingua), independently of this package: activations in (batch, sequence, heads, head_dim) layout,
the rotary embedding as complex multiplication of adjacent dimension pairs, head mixing as
nn.Linear over the head axis, the key-query convolution as an explicit sum of shifted score maps.
Which operations a layer has is read off the tensors present in its state dict.
Order per layer: scores -> kq kernel -> wpsm -> mask -> softmax -> after-softmax kernel -> zero the
mask -> head_kernel or wposm -> values -> subln -> gate -> wo.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x (B, S, H, D): dimensions (2i, 2i+1) as one complex number, turned by position * theta^(-2i/D)."""
    batch, seq, heads, dim = x.shape
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    turn = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    pairs = torch.view_as_complex(x.reshape(batch, seq, heads, dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * turn[None, :, None, :]).reshape(batch, seq, heads, dim)


def shifted_sum(maps: torch.Tensor, kernel: torch.Tensor, pad_key: str) -> torch.Tensor:
    """out[h, i, j] = sum_{a, b} kernel[h, 0, a, b] * maps[h, i - (q - 1) + a, j - left + b], zero outside."""
    q, k = kernel.shape[-2:]
    left = {"both": (k - 1) // 2, "left": k - 1, "right": 0}[pad_key]
    n_q, n_k = maps.shape[-2:]
    padded = F.pad(maps, (left, k - 1 - left, q - 1, 0))
    out = torch.zeros_like(maps)
    for a in range(q):
        for b in range(k):
            out += kernel[:, 0, a, b][None, :, None, None] * padded[:, :, a : a + n_q, b : b + n_k]
    return out


def linear_over_heads(maps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear(n_heads, n_heads) applied to the head axis of (B, H, Q, K) maps: out[e] = sum_c W[e, c] x[c]."""
    return F.linear(maps.transpose(1, -1), weight).transpose(1, -1)


def head_kernel_mix(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Groups g of c heads: out[g, e] = sum_c x[g, c] kernel[g, c, e]."""
    batch, heads, n_q, n_k = maps.shape
    groups, size, _ = kernel.shape
    grouped = maps.reshape(batch, groups, size, n_q, n_k)
    out = torch.stack([(grouped[:, g].transpose(1, -1) @ kernel[g]).transpose(1, -1) for g in range(groups)], 1)
    return out.reshape(batch, heads, n_q, n_k)


def attention(x: torch.Tensor, w: dict, layer: int, args: dict) -> torch.Tensor:
    mta = args["mta"]
    batch, seq, _ = x.shape
    head_dim = args.get("head_dim") or args["dim"] // args["n_heads"]
    q = (x @ w["attention.wq.weight"].T).view(batch, seq, -1, head_dim)
    k = (x @ w["attention.wk.weight"].T).view(batch, seq, -1, head_dim)
    v = (x @ w["attention.wv.weight"].T).view(batch, seq, -1, head_dim)
    q, k = rotary(q, args["rope_theta"]), rotary(k, args["rope_theta"])
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # kv head h serves query heads h*rep ... h*rep+rep-1
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if "attention.mta_kernel" in w:
        scores = shifted_sum(scores.masked_fill(~causal, 0.0), w["attention.mta_kernel"], mta["pad_key"])
    if "attention.wpsm.weight" in w:
        scores = linear_over_heads(scores, w["attention.wpsm.weight"])
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    if "attention.mta_kernel_after_sm" in w:
        probs = shifted_sum(probs.masked_fill(~causal, 0.0), w["attention.mta_kernel_after_sm"], mta["pad_key"])
        probs = probs.masked_fill(~causal, 0.0)
    if "attention.head_kernel" in w:
        probs = head_kernel_mix(probs, w["attention.head_kernel"])
    elif "attention.wposm.weight" in w:
        probs = linear_over_heads(probs, w["attention.wposm.weight"])

    out = (probs @ v).transpose(1, 2)  # (B, S, H, D)
    if "attention.subln.weight" in w:
        rescale = 1 - (0.8 - 0.6 * math.exp(-0.3 * layer)) if mta["layer_norm_rescale"] else 1.0
        out = rms_norm(out, w["attention.subln.weight"], 1e-5) * rescale
    if "attention.gate.weight" in w:
        out = out * torch.sigmoid(F.linear(out, w["attention.gate.weight"], w["attention.gate.bias"]))
    return out.reshape(batch, seq, -1) @ w["attention.wo.weight"].T


@torch.no_grad()
def lingua_logits(args: dict, state: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the official model with model arguments `args` and (lingua-named) `state` for `tokens` (B, S)."""
    h = state["tok_embeddings.weight"][tokens]
    for layer in range(args["n_layers"]):
        prefix = f"layers.{layer}."
        w = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
        h = h + attention(rms_norm(h, w["attention_norm.weight"], args["norm_eps"]), w, layer, args)
        x = rms_norm(h, w["ffn_norm.weight"], args["norm_eps"])
        gate, up = x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w["feed_forward.w2.weight"].T
    output = state["tok_embeddings.weight"] if args["weight_tying"] else state["output.weight"]
    return rms_norm(h, state["norm.weight"], args["norm_eps"]) @ output.T
