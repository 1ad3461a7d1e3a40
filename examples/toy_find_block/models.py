"""The two models of the toy task: a Llama baseline and the same Llama with MTA attention.

Both come from one LlamaConfig (the official toy config: 4 layers, dim 256, 2 heads, tied
embeddings, RoPE theta 1e5, dropout 0.1 on the attention probabilities). The MTA model is the
baseline's freshly initialised Llama retrofitted with identity MTA parameters, so for a given seed
both start from the very same weights and differ only by MTA.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion import retrofit_llama

from .tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

MODELS = ("baseline", "mta")

# dim 256 -> SwiGLU hidden int(2 * 4 * 256 / 3) = 682, rounded up to a multiple of 256 (official FFN rule).
SIZES = {
    "paper": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=2),
    # For CPU smoke tests only.
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
}

# The official toy config's MTA: pre-softmax key-query convolution, 2 queries x 9 keys, keys padded
# on both sides, identity init, in every layer; nothing else (no head mixing, group norm or gate).
MTA_OPTIONS = dict(
    kq_conv_size=[2, 9],
    kq_conv_post_size=None,
    key_padding="both",
    head_mix_size=None,
    head_mix_post_size=None,
    group_norm=False,
    attn_gate=None,
)


def llama_config(size: str = "paper", dropout: float = 0.1, max_positions: int = 512) -> LlamaConfig:
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    shape = SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=max_positions,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=dropout,
        # The official models start every weight at std dim ** -0.5 (truncated normal).
        initializer_range=shape["hidden_size"] ** -0.5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        **shape,
    )


def build_model(kind: str, seed: int, size: str = "paper", dropout: float = 0.1) -> torch.nn.Module:
    """A freshly initialised model; the Llama weights depend only on the seed, not on `kind`."""
    if kind not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {kind!r}")
    config = llama_config(size, dropout)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if kind == "mta":
        model = retrofit_llama(model, mta_layers=list(range(config.num_hidden_layers)), **MTA_OPTIONS)
    return model
