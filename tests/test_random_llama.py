"""examples/random_llama.py: random Llama folders in published shapes, which convert-llama accepts."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion import convert_llama
from examples.random_llama import SHAPES, main


def test_a_random_llama_folder_converts(tmp_path, capsys):
    assert main([str(tmp_path / "llama"), "--shape", "tiny"]) == 0
    assert "186,432 parameters" in capsys.readouterr().out
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert llama.dtype == torch.bfloat16 and llama.config.num_hidden_layers == SHAPES["tiny"]["num_hidden_layers"]
    assert convert_llama(tmp_path / "llama", tmp_path / "mta").config.mta_layers == [2]


def test_the_real_shapes_have_the_published_sizes():
    sizes = {}
    for shape in ("llama-3.2-1b", "llama-3.1-8b"):
        with torch.device("meta"):
            sizes[shape] = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).parameters())
    assert sizes == {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248}
