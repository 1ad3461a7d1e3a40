"""Write a Llama folder with random weights in the shape of a real model, for machines that cannot download one.

    python -m examples.random_llama DST --shape llama-3.2-1b

The shapes are those of the published configs (layers, widths, heads, vocabulary, RoPE scaling), so
conversion, fine-tuning speed and memory are those of the real model; the weights are a fresh
random initialisation, so the losses say nothing about quality. There is no tokenizer: fine-tune
with `--tokenizer bytes`.
"""

import argparse
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion.safe_output import staged_output

LLAMA3_VOCAB = dict(vocab_size=128256, bos_token_id=128000, eos_token_id=128001)
SHAPES = {
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
    "llama-3.2-1b": dict(**LLAMA3_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(**LLAMA3_VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
}


def write_random_llama(dst: str, shape: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> int:
    """Write the folder; the number of parameters."""
    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    # Initialising a billion parameters is much faster on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    with staged_output(None, dst) as staging:
        model.save_pretrained(staging)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dst", help="the folder to write (absent or empty)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parameters = write_random_llama(args.dst, args.shape, args.seed)
    print(f"wrote {args.dst}: a random {args.shape}-shaped Llama, {parameters:,} parameters in bfloat16, "
          f"in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
