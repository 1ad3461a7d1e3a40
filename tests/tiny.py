"""Tiny models built locally, and MTA parameters pushed away from identity."""

import itertools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_mta import MTAConfig, MTAForCausalLM
from modeling_mta.modeling_mta import MTAGroupNorm, MTAHeadMix, MTAKeyQueryConv

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_llama(dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    """A random Llama with 7 layers, so that the paper's every-4th-layer placement gives layers 2 and 6."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 7, **overrides})).to(dtype).eval()


# Every combination of the four score-map operations; key padding, group norm and gate cycle
# through their values so that each appears with several combinations.
OP_COMBOS = []
for i, (pre, post, mix, mix_post) in enumerate(itertools.product([None, [3, 3]], [None, [2, 5]], [None, 2], [None, 4])):
    OP_COMBOS.append(
        dict(
            kq_conv_size=pre,
            kq_conv_post_size=post,
            head_mix_size=mix,
            head_mix_post_size=mix_post,
            key_padding=["both", "left", "right"][i % 3],
            group_norm=i % 2 == 0,
            group_norm_depth_scaling=i % 4 == 0,
            attn_gate=[None, "scalar", "vector"][i % 3],
        )
    )


def combo_id(combo: dict) -> str:
    return "-".join(f"{k}={v}".replace(" ", "") for k, v in combo.items())


def mta_config(**overrides) -> MTAConfig:
    return MTAConfig(**{**TINY, "mta_layers": [0, 2], **overrides})


@torch.no_grad()
def randomize_mta(model: torch.nn.Module, seed: int = 0, spread: float = 0.3) -> torch.nn.Module:
    """Put every MTA parameter at a random non-identity value (identity + noise)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(t):
        return spread * torch.randn(t.shape, generator=generator).to(t)

    for module in model.modules():
        if isinstance(module, (MTAKeyQueryConv, MTAHeadMix)):
            module.weight.copy_(module.identity() + noise(module.weight))
        elif isinstance(module, MTAGroupNorm):
            module.weight.copy_(1 + noise(module.weight))
    for name, param in model.named_parameters():
        if name.endswith("self_attn.gate.weight") or name.endswith("self_attn.gate.bias"):
            param.copy_(noise(param))
    return model


def random_mta_model(seed: int = 0, dtype=torch.float32, **overrides) -> MTAForCausalLM:
    torch.manual_seed(seed)
    model = MTAForCausalLM(mta_config(**overrides)).to(dtype)
    return randomize_mta(model, seed).eval()
