"""Per-token decode latency against context length: cached MTA model next to the same Llama.

Each step is one new token against a cache of `context` tokens. With MTACache a step costs
O(context) per head, like a key/value cache for plain attention, so both columns should grow
linearly and their ratio stay roughly flat.

    python benchmarks/bench_decode.py                      # CPU, tiny model, 256 .. 8192
    python benchmarks/bench_decode.py --device cuda --contexts 1024 4096 16384 65536 --hidden 1024 --heads 16
"""

import argparse
import statistics
import time

import torch
from torch.nn.attention import sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

import modeling_mta  # noqa: F401  (registers the model)
from bench_model import DECODE_SDPA_BACKENDS  # (a sibling script)
from conversion import retrofit_llama
from modeling_mta.modeling_mta import CACHE_FIELD


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_ms_per_token(model, context: int, steps: int, chunk: int, device: str, vocab: int) -> float:
    ids = torch.randint(0, vocab, (1, context + steps), device=device)
    cache = None
    for start in range(0, context, chunk):  # chunked prefill keeps the reference's score map small
        out = model(ids[:, start : min(start + chunk, context)], use_cache=True, **{CACHE_FIELD: cache})
        cache = getattr(out, CACHE_FIELD)
    times = []
    for t in range(context, context + steps):
        synchronize(device)
        begin = time.perf_counter()
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache})
        synchronize(device)
        times.append(time.perf_counter() - begin)
        cache = getattr(out, CACHE_FIELD)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per context (median reported)")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk size")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    vocab = 256
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=max(args.contexts) + args.steps,
    )
    llama = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    mta = retrofit_llama(llama, kq_conv_post_size=[3, 5], head_mix_size=2, mta_layers=list(range(args.layers)))
    print(
        f"device {args.device}, {args.dtype}, {args.layers} layers x {args.heads} heads x {args.hidden // args.heads}, "
        f"MTA: kq {mta.config.kq_conv_size} + post {mta.config.kq_conv_post_size} in every layer, "
        f"head mix {mta.config.head_mix_size} / {mta.config.head_mix_post_size}; median of {args.steps} steps"
    )
    print(f"{'context':>8} | {'Llama ms/token':>14} | {'MTA ms/token':>12} | {'MTA / Llama':>11}")
    print(f"{'-' * 8}-+-{'-' * 14}-+-{'-' * 12}-+-{'-' * 11}")
    for context in args.contexts:
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            llama_ms = decode_ms_per_token(llama, context, args.steps, args.chunk, args.device, vocab)
        mta_ms = decode_ms_per_token(mta, context, args.steps, args.chunk, args.device, vocab)
        print(f"{context:>8} | {llama_ms:>14.2f} | {mta_ms:>12.2f} | {mta_ms / llama_ms:>11.2f}")


if __name__ == "__main__":
    main()
