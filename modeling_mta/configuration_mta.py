"""MTAConfig: every Llama field plus the Multi-Token Attention fields of MTA_SPEC section 9.

This file is copied verbatim into saved model folders (``trust_remote_code``), so it imports
nothing but ``transformers`` and the standard library.
"""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

KEY_PADDINGS = ("both", "left", "right")
ATTN_GATES = (None, "scalar", "vector")
MTA_INITS = ("identity",)
MTA_KERNELS = ("auto", "fused", "reference")
# Kernels wider than this are almost certainly a typo (the paper uses 6 x 11); they would also make
# the score-map convolution far more expensive than the attention itself.
MAX_KQ_CONV_SIZE = 64


def paper_mta_layers(num_hidden_layers: int) -> list[int]:
    """The paper's placement of key-query convolutions: every 4th layer, 2, 6, 10, ... (0-based)."""
    return list(range(2, num_hidden_layers, 4))


@strict
class MTAConfig(LlamaConfig):
    r"""Configuration of a Multi-Token Attention model (arXiv 2504.00927).

    Every [`LlamaConfig`] field, plus:

    mta_layers (`list[int]`, defaults to every 4th layer starting at 2):
        0-based indices of the layers that get the key-query convolutions (pre and post softmax).
    kq_conv_size (`[c_q, c_k]` or `None`, defaults to `[6, 11]`):
        Pre-softmax key-query convolution kernel: c_q queries (looking back) by c_k keys.
    kq_conv_post_size (`[c_q, c_k]` or `None`, defaults to `None`):
        Post-softmax key-query convolution kernel.
    key_padding (`"both" | "left" | "right"`, defaults to `"both"`):
        Where the key axis of the convolution is zero-padded; `"both"` needs odd c_k.
    head_mix_size (`int` or `None`, defaults to `None`):
        Pre-softmax head mixing over groups of this many consecutive heads (all layers).
    head_mix_post_size (`int` or `None`, defaults to `2`):
        Post-softmax head mixing group size (all layers); the number of heads gives full mixing.
    group_norm (`bool`, defaults to `True`):
        RMS-normalise each head's output (eps 1e-5, one weight vector shared by the heads).
    group_norm_depth_scaling (`bool`, defaults to `True`):
        With `group_norm`, also scale by `1 - (0.8 - 0.6 * exp(-0.3 * layer))`. Ignored without it.
    attn_gate (`None | "scalar" | "vector"`, defaults to `None`):
        Sigmoid output gate per head: one value per head and token, or one per channel.
    mta_init (`"identity"`):
        How new MTA parameters start: identity kernels and mixing, so the layer is plain attention.
    mta_kernel (`"auto" | "fused" | "reference"`, defaults to `"auto"`):
        Which implementation computes the attention (a runtime choice, not part of the model):
        "auto" runs the fused Triton kernel on CUDA for every call it covers and the reference
        elsewhere (with a one-time warning naming what the kernel lacks); "reference" always runs
        the reference; "fused" always runs the kernel and raises where it cannot.
    """

    model_type = "mta"
    # Head mixing and per-head kernels tie the heads together: sharding heads across devices
    # (Llama's tensor-parallel plan) would split groups, so no plan is offered.
    base_model_tp_plan = None

    mta_layers: list[int] | tuple[int, ...] | None = None
    kq_conv_size: list[int] | tuple[int, int] | None = field(default_factory=lambda: [6, 11])
    kq_conv_post_size: list[int] | tuple[int, int] | None = None
    key_padding: str = "both"
    head_mix_size: int | None = None
    head_mix_post_size: int | None = 2
    group_norm: bool = True
    group_norm_depth_scaling: bool = True
    attn_gate: str | None = None
    mta_init: str = "identity"
    mta_kernel: str = "auto"

    def __post_init__(self, **kwargs):
        if self.mta_layers is None:
            self.mta_layers = paper_mta_layers(self.num_hidden_layers)
        # Tuples are accepted for convenience; lists are what JSON gives back, so store lists.
        for name in ("mta_layers", "kq_conv_size", "kq_conv_post_size"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)
        # Validate here as well as through `@strict` so that a bad field surfaces as a plain ValueError.
        self.validate_mta()

    def validate_mta(self):
        """Part of `@strict`-powered validation: the MTA fields and their consistency with the heads."""
        num_heads = self.num_attention_heads
        if not isinstance(self.mta_layers, list) or not all(type(i) is int for i in self.mta_layers):
            raise ValueError(f"mta_layers must be a list of layer indices, got {self.mta_layers!r}")
        out_of_range = [i for i in self.mta_layers if not 0 <= i < self.num_hidden_layers]
        if out_of_range:
            raise ValueError(
                f"mta_layers {out_of_range} out of range: allowed are 0..{self.num_hidden_layers - 1} "
                f"(num_hidden_layers={self.num_hidden_layers})"
            )
        if len(set(self.mta_layers)) != len(self.mta_layers):
            raise ValueError(f"mta_layers has duplicates: {self.mta_layers}")
        if self.key_padding not in KEY_PADDINGS:
            raise ValueError(f"key_padding must be one of {KEY_PADDINGS}, got {self.key_padding!r}")
        for name in ("kq_conv_size", "kq_conv_post_size"):
            size = getattr(self, name)
            if size is None:
                continue
            if not isinstance(size, list) or len(size) != 2 or not all(type(s) is int for s in size):
                raise ValueError(f"{name} must be [c_q, c_k] (two ints) or None, got {size!r}")
            if not all(1 <= s <= MAX_KQ_CONV_SIZE for s in size):
                raise ValueError(f"{name} entries must be in 1..{MAX_KQ_CONV_SIZE}, got {size}")
            if self.key_padding == "both" and size[1] % 2 == 0:
                raise ValueError(
                    f'{name}: key_padding="both" needs an odd key size c_k, got {size[1]} '
                    '(use an odd c_k, or key_padding "left" or "right")'
                )
        for name in ("head_mix_size", "head_mix_post_size"):
            size = getattr(self, name)
            if size is None:
                continue
            if type(size) is not int or size < 1:
                raise ValueError(f"{name} must be a positive int or None, got {size!r}")
            if num_heads % size:
                divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
                raise ValueError(
                    f"{name}={size} does not divide num_attention_heads={num_heads}: allowed are {divisors}"
                )
        if self.attn_gate not in ATTN_GATES:
            raise ValueError(f"attn_gate must be one of {ATTN_GATES}, got {self.attn_gate!r}")
        if self.mta_init not in MTA_INITS:
            raise ValueError(f"mta_init must be one of {MTA_INITS}, got {self.mta_init!r}")
        if self.mta_kernel not in MTA_KERNELS:
            raise ValueError(f"mta_kernel must be one of {MTA_KERNELS}, got {self.mta_kernel!r}")

    def kq_conv_sizes_at(self, layer_idx: int) -> tuple[list[int] | None, list[int] | None]:
        """The (pre, post) key-query kernel sizes of one layer: None outside `mta_layers`."""
        if layer_idx not in self.mta_layers:
            return None, None
        return self.kq_conv_size, self.kq_conv_post_size

    def query_history_length(self) -> int:
        """How many earlier queries the attention row of a new query depends on (MTA layers only).

        The post-softmax convolution reads c_q' - 1 earlier probability rows, and each of those
        reads c_q - 1 earlier score rows through the pre-softmax convolution.
        """
        if not self.mta_layers:
            return 0
        return sum(size[0] - 1 for size in (self.kq_conv_size, self.kq_conv_post_size) if size)


__all__ = ["MTAConfig"]
