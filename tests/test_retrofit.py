"""conversion.retrofit_llama: same weights, identity MTA parameters, the Llama's logits."""

import pytest
import torch
from transformers import LlamaConfig

from conversion import mta_config_from_llama, retrofit_llama
from mta.cli import main

from .tiny import LLAMA3_ROPE, TINY, tiny_llama


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_key_value_heads=4, tie_word_embeddings=True), dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True)],
    ids=["gqa-untied", "mha-tied", "llama3-rope-bias"],
)
def test_retrofitted_llama_gives_the_same_logits(overrides):
    llama = tiny_llama(**overrides)
    model = retrofit_llama(llama)
    assert model.config.mta_layers == [2, 6]
    assert model.config.group_norm is False and model.config.attn_gate is None
    assert model.config.rope_parameters == llama.config.rope_parameters
    assert model.model.embed_tokens.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, TINY["vocab_size"], (2, 40))
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max() <= 1e-5


def test_bf16_retrofit_keeps_the_dtype_and_follows_the_llama():
    llama = tiny_llama(torch.bfloat16)
    model = retrofit_llama(llama, head_mix_size=4)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        expected, got = llama(ids).logits.float(), model(ids).logits.float()
    assert (got - expected).norm() / expected.norm() < 2e-2  # bf16 rounding differs between attention kernels


def test_options_are_checked():
    config = LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="unknown MTA options"):
        mta_config_from_llama(config, kq_size=[3, 3])
    with pytest.raises(ValueError, match="head_mix_post_size"):
        mta_config_from_llama(config, head_mix_post_size=3)
    with pytest.warns(UserWarning, match="not identity"):
        assert mta_config_from_llama(config, group_norm=True).group_norm is True


def test_demo_runs_end_to_end(capsys, tmp_path):
    assert main(["demo", "--steps", "12", "--new-tokens", "8", "--save", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    check = next(line for line in printed.splitlines() if line.startswith("retrofit check"))
    assert float(check.rsplit("=", 1)[1]) <= 1e-5
    losses = [float(line.split("loss")[1]) for line in printed.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "model.safetensors").exists()
