"""Multi-Token Attention (arXiv 2504.00927) for Transformers: MTAModel and MTAForCausalLM.

A Llama whose attention may convolve the score map over queries x keys, mix heads in groups,
and normalise and gate each head's output (MTA_SPEC.md). The math lives in `mta_reference.py`;
this file holds the parameters and wires them into a Llama-shaped model, so a Llama state dict
loads unchanged and identity MTA parameters reproduce the Llama exactly.

This file is copied verbatim into saved model folders, where `trust_remote_code=True` loads it
beside `configuration_mta.py`, `mta_reference.py` and `mta_triton.py` (the fused kernel, used when
Triton is there): keep its imports relative or from transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_mta import MTAConfig
from .mta_reference import GROUP_NORM_EPS, depth_scale, key_padding_left, mta_attention

try:
    from .group_norm_triton import group_norm_fused
    from .mta_triton import document_segments, fused_coverage_gap, mta_attention_fused, mta_decode_fused, row_segments
except ImportError:  # no Triton: the reference attention and torch's RMSNorm serve everywhere
    mta_attention_fused = group_norm_fused = None

logger = logging.get_logger(__name__)

# transformers 5.2x renamed the cache argument and output field `past_key_values` to `cache`;
# speak the installed version's name so that neither version warns.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# The attention submodules that hold MTA parameters (everything else is a Llama parameter).
MTA_MODULE_NAMES = ("kq_conv", "kq_conv_post", "head_mix", "head_mix_post", "group_norm", "gate")


def is_mta_parameter(name: str) -> bool:
    """Whether a parameter name (e.g. `model.layers.2.self_attn.kq_conv.weight`) is an MTA parameter."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-3] == "self_attn" and parts[-2] in MTA_MODULE_NAMES


class MTACache(DynamicCache):
    """A DynamicCache that also keeps the (rotated) queries of the MTA layers that convolve over queries.

    A new query's attention row depends on up to `config.query_history_length()` earlier queries
    (MTA_SPEC section 2), which a key/value cache does not hold. They are stored as extra cache
    layers after the model's own, one per such layer in order, so that beam-search reordering,
    cropping and batch selection treat them exactly like the keys.
    """

    def __init__(self, config: MTAConfig):
        super().__init__()
        query_layers = sorted(config.mta_layers) if config.query_history_length() else []
        self.query_slot = {layer: config.num_hidden_layers + i for i, layer in enumerate(query_layers)}

    def update_queries(self, queries: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Append this call's queries (B, H, n, d); return every query of the layer so far."""
        all_queries, _ = self.update(queries, queries[..., :0], self.query_slot[layer_idx])
        return all_queries


class MTAKeyQueryConv(nn.Module):
    """One kernel of shape (c_q, c_k) per head, in conv2d layout (H, 1, c_q, c_k)."""

    def __init__(self, num_heads: int, size: list[int], key_padding: str):
        super().__init__()
        self.key_padding = key_padding
        self.weight = nn.Parameter(torch.empty(num_heads, 1, *size))

    def identity(self) -> torch.Tensor:
        """The kernel that leaves the score map unchanged: a single 1 at (c_q - 1, aligned key)."""
        kernel = torch.zeros_like(self.weight)
        c_q, c_k = kernel.shape[-2:]
        kernel[:, :, c_q - 1, key_padding_left(self.key_padding, c_k)] = 1.0
        return kernel

    def init_weights(self, std: float):
        init.copy_(self.weight, self.identity())

    def extra_repr(self) -> str:
        heads, _, c_q, c_k = self.weight.shape
        return f"heads={heads}, size=({c_q}, {c_k}), key_padding={self.key_padding!r}"


class MTAHeadMix(nn.Module):
    """Mixing weights (H / c_h, c_h, c_h) for groups of c_h consecutive heads."""

    def __init__(self, num_heads: int, group_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads // group_size, group_size, group_size))

    def identity(self) -> torch.Tensor:
        groups, size, _ = self.weight.shape
        return torch.eye(size, dtype=self.weight.dtype, device=self.weight.device).expand(groups, size, size)

    def init_weights(self, std: float):
        init.copy_(self.weight, self.identity())


class MTAGroupNorm(nn.Module):
    """RMSNorm over head_dim with one weight shared by all heads, optionally depth-scaled."""

    def __init__(self, head_dim: int, layer_idx: int, depth_scaling: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.scale = depth_scale(layer_idx) if depth_scaling else 1.0

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """`mta_reference.group_norm` of x (B, N, H, d) on x's dtype (float32 statistics inside): with `fused` by
        the Triton kernels (`group_norm_fused`: one rounding, of the output), else by torch's fused RMSNorm (the
        weight times the depth scale rounded to x's dtype first). GPU time forward+backward at 8 x 4096 tokens,
        16 x 64 (H200): the Triton kernels 0.11 ms, torch's RMSNorm 0.84 with the copy that makes x contiguous
        (benchmarks/NOTES.md)."""
        weight = self.weight * self.scale
        if fused:
            return group_norm_fused(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x.contiguous(), (x.shape[-1],), weight.to(x.dtype), GROUP_NORM_EPS)

    def init_weights(self, std: float):
        init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, scale={self.scale:.4f}"


class MTAGate(nn.Linear):
    """Sigmoid output gate: head_dim -> 1 (scalar) or head_dim (vector) gate values, with bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(super().forward(x))

    def init_weights(self, std: float):
        init.normal_(self.weight, mean=0.0, std=std)
        init.zeros_(self.bias)


MTA_MODULE_TYPES = (MTAKeyQueryConv, MTAHeadMix, MTAGroupNorm, MTAGate)


def mta_modules(config: MTAConfig, layer_idx: int) -> dict[str, nn.Module]:
    """The MTA submodules of one attention layer, keyed by attribute name; operations not configured are absent."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    pre_size, post_size = config.kq_conv_sizes_at(layer_idx)
    modules = {}
    if pre_size:
        modules["kq_conv"] = MTAKeyQueryConv(heads, pre_size, config.key_padding)
    if post_size:
        modules["kq_conv_post"] = MTAKeyQueryConv(heads, post_size, config.key_padding)
    if config.head_mix_size:
        modules["head_mix"] = MTAHeadMix(heads, config.head_mix_size)
    if config.head_mix_post_size:
        modules["head_mix_post"] = MTAHeadMix(heads, config.head_mix_post_size)
    if config.group_norm:
        modules["group_norm"] = MTAGroupNorm(head_dim, layer_idx, config.group_norm_depth_scaling)
    if config.attn_gate is not None:
        modules["gate"] = MTAGate(head_dim, 1 if config.attn_gate == "scalar" else head_dim, bias=True)
    return modules


class AttentionLayout:
    """Which keys each query may see in one forward call, shared by all layers.

    Row r is the query at position past_len - history + r: this call's queries, preceded by the
    `history` cached queries that MTA's query-axis convolution reads. A 2-D `attention_mask`
    (B, past_len + query_len) marks padding with 0: a padding token is invisible as a key and sees
    nothing as a query (spec section 2). A 4-D mask (what compiled static caches pass) is taken as
    given: bool True, or float 0, = visible.

    Packed rows (no mask, no cache, `position_ids` not going up somewhere inside a row, or flash
    attention's `cu_seq_lens_q`, as transformers' DataCollatorWithFlattening makes them) hold several
    documents: attention runs on each document alone, so neither attention nor convolution crosses them.

    The reference attention reads the boolean map (`visible`), or runs per document (`documents`); the
    fused kernel reads each token's span (`segments`), which exists for packed rows and for padding
    only on the left and/or right. All are built on first use, once per call.
    """

    def __init__(
        self, attention_mask, batch, query_len, past_len, history, device, output_attentions=False, position_ids=None,
        cu_seq_lens=None,
    ):
        key_len = past_len + query_len
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape != (batch, key_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new tokens) = "
                f"({batch}, {key_len})"
            )
        if attention_mask is not None and attention_mask.dim() == 4 and history:
            raise ValueError("4-D attention masks cannot describe the cached queries that MTA layers convolve over")
        self.attention_mask = attention_mask
        self.batch, self.query_len, self.past_len, self.history = batch, query_len, past_len, history
        self.device = device
        self.output_attentions = output_attentions
        self.position_ids = position_ids
        self.cu_seq_lens = cu_seq_lens
        self._visible = None
        self._segments = None
        self._begins = None
        self._key_starts = None

    def visible(self) -> torch.Tensor:
        """Boolean (B, 1, history + query_len, past_len + query_len)."""
        if self._visible is None:
            self._visible = self._build_visible()
        return self._visible

    def _build_visible(self) -> torch.Tensor:
        mask = self.attention_mask
        if mask is not None and mask.dim() == 4:
            return mask if mask.dtype == torch.bool else mask == 0
        key_len = self.past_len + self.query_len
        query_pos = torch.arange(self.past_len - self.history, key_len, device=self.device)
        key_pos = torch.arange(key_len, device=self.device)
        visible = (key_pos[None, :] <= query_pos[:, None])[None, None]
        if mask is None:
            return visible.expand(self.batch, 1, self.history + self.query_len, key_len)
        valid = mask.bool()
        return visible & valid[:, None, None, :] & valid[:, None, self.past_len - self.history :, None]

    def document_begins(self) -> torch.Tensor | None:
        """(B, N) bool, True where a document begins; None unless the rows are packed."""
        if self._begins is None:
            self._begins = (self._build_begins(),)
        return self._begins[0]

    def _build_begins(self):
        if self.attention_mask is not None or self.past_len:
            return None
        if self.cu_seq_lens is not None:
            if self.batch != 1 or int(self.cu_seq_lens[-1]) != self.query_len:
                raise ValueError(
                    f"cu_seq_lens_q {self.cu_seq_lens.tolist()} must end at the sequence length {self.query_len} "
                    f"of a single packed row (batch {self.batch})"
                )
            begins = torch.zeros(1, self.query_len, dtype=torch.bool, device=self.device)
            begins[0, self.cu_seq_lens[:-1].to(self.device)] = True
        elif self.position_ids is not None:
            positions = self.position_ids.expand(self.batch, -1)
            begins = torch.ones_like(positions, dtype=torch.bool)
            begins[:, 1:] = positions[:, 1:] <= positions[:, :-1]  # a position that does not go up starts a document
        else:
            return None
        return begins if bool(begins[:, 1:].any()) else None

    def documents(self) -> list[list[tuple[int, int]]] | None:
        """Per row, the [start, end) spans of its documents; None unless the rows are packed."""
        begins = self.document_begins()
        if begins is None:
            return None
        rows = []
        for row in begins.cpu().tolist():
            starts = [t for t, begin in enumerate(row) if begin]
            rows.append(list(zip(starts, starts[1:] + [self.query_len])))
        return rows

    def key_starts(self) -> torch.Tensor | None:
        """Against a cache: per row, the first real key, (B,) int32, when every key from it on is real (left
        padding, or none); else None."""
        if self._key_starts is None:
            self._key_starts = (self._build_key_starts(),)
        return self._key_starts[0]

    def _build_key_starts(self):
        key_len = self.past_len + self.query_len
        if self.attention_mask is None:
            return torch.zeros(self.batch, dtype=torch.int32, device=self.device)
        run = self._real_run()
        if run is None:
            return None
        start, end = run
        empty = start == end
        if not bool((empty | (end == key_len)).all()):  # right padding: not what generation makes
            return None
        return torch.where(empty, key_len, start).int()

    def _real_run(self):
        """(start, end) per row when the 2-D mask's real tokens are one run with padding only around it, else None."""
        mask = self.attention_mask
        if mask.dim() != 2:
            return None
        valid = mask.bool()
        count = valid.sum(-1)
        start = torch.where(count > 0, valid.int().argmax(-1), 0)
        positions = torch.arange(valid.shape[-1], device=valid.device)
        ranged = (positions >= start[:, None]) & (positions < (start + count)[:, None])
        return (start, start + count) if bool((ranged == valid).all()) else None

    def segments(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per token, the [start, end) of its span: its document, as two (B, N) int32 tensors, or its row's
        real tokens, as two (B, 1); None if the mask is not of that form or a cache is in use."""
        if self._segments is None:
            self._segments = (self._build_segments(),)
        return self._segments[0]

    def _build_segments(self):
        if self.past_len or self.history:
            return None
        if self.document_begins() is not None:
            return document_segments(self.document_begins())
        mask = self.attention_mask
        if mask is None:
            zeros = torch.zeros(self.batch, dtype=torch.int32, device=self.device)
            return row_segments(zeros, zeros + self.query_len)
        run = self._real_run()
        return row_segments(*run) if run is not None else None


class MTAAttention(nn.Module):
    """Llama attention with the MTA operations this layer's config asks for."""

    def __init__(self, config: MTAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout

        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=config.attention_bias)

        modules = mta_modules(config, layer_idx)
        for name in MTA_MODULE_NAMES:
            setattr(self, name, modules.get(name))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: AttentionLayout,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq_len, _ = hidden_states.shape
        split_heads = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(split_heads).transpose(1, 2)
        key = self.k_proj(hidden_states).view(split_heads).transpose(1, 2)
        value = self.v_proj(hidden_states).view(split_heads).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        history = layout.history if self.convolves_queries() else 0
        if self.convolves_queries() and isinstance(cache, MTACache):
            all_queries = cache.update_queries(query, self.layer_idx)
            query = all_queries[:, :, all_queries.shape[2] - (history + seq_len) :]

        spans = self.fused_spans(query, layout)
        if spans is not None and layout.past_len:
            output = mta_decode_fused(
                query,
                key,
                value,
                self.kq_conv.weight if self.kq_conv is not None else None,
                self.head_mix_post.weight if self.head_mix_post is not None else None,
                self.config.key_padding,
                key_start=spans,
                new_rows=seq_len,
                head_mix_weight=self.head_mix.weight if self.head_mix is not None else None,
                kq_conv_post_weight=self.kq_conv_post.weight if self.kq_conv_post is not None else None,
            )
            probs = None
        elif spans is not None:
            output = mta_attention_fused(
                query,
                key,
                value,
                kq_conv_weight=self.kq_conv.weight if self.kq_conv is not None else None,
                head_mix_post_weight=self.head_mix_post.weight if self.head_mix_post is not None else None,
                key_padding=self.config.key_padding,
                segments=spans,
                kq_conv_post_weight=self.kq_conv_post.weight if self.kq_conv_post is not None else None,
                dropout_p=self.attention_dropout if self.training else 0.0,
                head_mix_weight=self.head_mix.weight if self.head_mix is not None else None,
            )
            probs = None
        elif layout.documents() is not None:
            output, probs = self.attend_per_document(query, key, value, layout.documents())
        else:
            visible = layout.visible()
            output, probs = self.attend(query, key, value, visible[..., visible.shape[-2] - (history + seq_len) :, :])
            output, probs = output[:, :, history:], probs[:, :, history:]
        output = output.transpose(1, 2)  # (B, N, H, d): group norm and gate act per head and token
        if self.group_norm is not None:
            output = self.group_norm(output, fused=self.fuses_group_norm(output))
        if self.gate is not None:
            output = self.gate(output)
        output = self.o_proj(output.reshape(batch, seq_len, -1))
        return output, probs

    def attend(self, query, key, value, visible) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference attention core with this layer's MTA parameters."""
        return mta_attention(
            query,
            key,
            value,
            visible,
            kq_conv_weight=self.kq_conv.weight if self.kq_conv is not None else None,
            kq_conv_post_weight=self.kq_conv_post.weight if self.kq_conv_post is not None else None,
            head_mix_weight=self.head_mix.weight if self.head_mix is not None else None,
            head_mix_post_weight=self.head_mix_post.weight if self.head_mix_post is not None else None,
            key_padding=self.config.key_padding,
            dropout=self.attention_dropout,
            training=self.training,
        )

    def attend_per_document(self, query, key, value, documents) -> tuple[torch.Tensor, torch.Tensor]:
        """Each document of each packed row on its own; attention maps are zero across documents."""
        batch, heads, n, head_dim = query.shape
        output = query.new_zeros(batch, heads, n, value.shape[-1])
        probs = query.new_zeros(batch, heads, n, n)
        for b, spans in enumerate(documents):
            for start, end in spans:
                causal = torch.ones(end - start, end - start, dtype=torch.bool, device=query.device).tril()
                part = slice(start, end)
                out, p = self.attend(query[b : b + 1, :, part], key[b : b + 1, :, part], value[b : b + 1, :, part], causal)
                output[b, :, part] = out[0]
                probs[b, :, part, part] = p[0]
        return output, probs

    def fused_spans(self, query: torch.Tensor, layout: AttentionLayout):
        """What the fused kernels need to know of the layout, or None to run the reference: the token spans
        (`AttentionLayout.segments`) without a cache, each row's first real key (`key_starts`) against one.

        `config.mta_kernel`: "reference" never fuses; "auto" fuses CUDA tensors when the kernel covers
        the call; "fused" also fuses CPU tensors (under TRITON_INTERPRET=1, for tests) and raises
        where it cannot.
        """
        if not self.kernels_allowed(query):
            return None
        if mta_attention_fused is None:
            gap = "this machine (Triton is not installed)"
        elif layout.output_attentions:
            gap = "output_attentions (it never forms the attention maps)"
        elif layout.past_len and torch.is_grad_enabled() and query.requires_grad:
            gap = "gradients through a forward pass against a cache"
        elif self.spans(layout) is None:
            gap = "attention masks other than left padding, against a cache" if layout.past_len else \
                "attention masks other than left/right padding"
        else:
            gap = fused_coverage_gap(
                self.head_dim,
                tuple(self.kq_conv.weight.shape[-2:]) if self.kq_conv is not None else None,
                self.config.key_padding,
                tuple(self.kq_conv_post.weight.shape[-2:]) if self.kq_conv_post is not None else None,
                self.head_mix.weight.shape[-1] if self.head_mix is not None else None,
                self.head_mix_post.weight.shape[-1] if self.head_mix_post is not None else None,
                query.shape[1] // self.config.num_key_value_heads,
                dropout=self.training and self.attention_dropout > 0,
            )
        if gap is None:
            return self.spans(layout)
        if self.config.mta_kernel == "fused":
            raise ValueError(f"mta_kernel='fused', but the fused MTA kernel does not cover {gap}")
        logger.warning_once(f"The fused MTA kernel does not cover {gap}: using the reference attention there.")
        return None

    def kernels_allowed(self, x: torch.Tensor) -> bool:
        """Whether `config.mta_kernel` lets Triton kernels run on x: "fused" always, "auto" on CUDA tensors."""
        return self.config.mta_kernel == "fused" or (self.config.mta_kernel == "auto" and x.is_cuda)

    def fuses_group_norm(self, output: torch.Tensor) -> bool:
        """Whether the group norm runs as Triton kernels: wherever kernels may (they cover every case)."""
        return group_norm_fused is not None and self.kernels_allowed(output)

    @staticmethod
    def spans(layout: AttentionLayout):
        return layout.key_starts() if layout.past_len else layout.segments()

    def convolves_queries(self) -> bool:
        """Whether this layer's attention rows depend on earlier queries (a kq conv with c_q > 1)."""
        return any(conv is not None and conv.weight.shape[-2] > 1 for conv in (self.kq_conv, self.kq_conv_post))


class MTADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MTAConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MTAAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        layout: AttentionLayout,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, layout, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class MTAPreTrainedModel(PreTrainedModel):
    config_class = MTAConfig
    config: MTAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MTADecoderLayer"]
    _can_record_outputs = {"hidden_states": MTADecoderLayer, "attentions": MTAAttention}

    def _init_weights(self, module: nn.Module):
        super()._init_weights(module)
        # `mta_init="identity"` (the only choice): kernels and mixing start as a no-op.
        if isinstance(module, MTA_MODULE_TYPES):
            module.init_weights(self.config.initializer_range)


class MTAModel(MTAPreTrainedModel):
    def __init__(self, config: MTAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MTADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = MTACache(self.config)

        batch, query_len = inputs_embeds.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        given_positions = position_ids  # only positions from the caller can mark packed documents
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + query_len, device=inputs_embeds.device)[None]
        history = min(past_len, self.config.query_history_length())
        if cache is not None and self.config.query_history_length() and not isinstance(cache, MTACache):
            raise TypeError(
                f"{type(cache).__name__} keeps keys and values only, but this model's MTA layers convolve over "
                "earlier queries: pass an MTACache (from modeling_mta import MTACache), or let the model make one"
            )
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        layout = AttentionLayout(
            attention_mask, batch, query_len, past_len, history, inputs_embeds.device, bool(output_attentions),
            given_positions, kwargs.get("cu_seq_lens_q"),
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, layout, cache=cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})


class MTAForCausalLM(MTAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MTAConfig):
        super().__init__(config)
        self.model = MTAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() would make a plain DynamicCache; MTAModel makes an MTACache itself instead.
        return False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


__all__ = ["MTACache", "MTAForCausalLM", "MTAModel", "MTAPreTrainedModel"]
