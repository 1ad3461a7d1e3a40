"""Model-level throughput on one GPU: an MTA model with the paper's recipe next to the same Llama (SDPA).

Training: tokens/s and peak memory of AdamW steps (bf16 autocast over float32 weights) at each
context length, with the same number of tokens per step. Generation: new tokens/s of greedy
decoding after a prompt, bf16 weights, each model with its own cache. Both models are built from
one Llama config of about 350M parameters (hidden 1024, 24 layers, 16 heads x 64); the MTA model
takes MTAConfig's defaults, the paper's recipe: key-query convolution 6 x 11 in every 4th layer,
head mixing in groups of 2 in all, group norm with depth scaling. Prints tables with the MTA/Llama
ratio and writes the rows as JSON.

    python benchmarks/bench_model.py --out benchmarks/results/model-h200.json
    python benchmarks/bench_model.py --size tiny --device cpu --contexts 64 --steps 2   # checks the script
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_mta import MTAConfig, MTAForCausalLM

SIZES = {
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256),
}


# The Llama's decoding attention without cuDNN: cuDNN's SDPA plans every new key length anew, 8 ms of CPU per call
# on the H200 (torch 2.11), so each generated token paid it in every layer; flash attention does not.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def build(kind: str, size: str, max_len: int, device: str) -> torch.nn.Module:
    fields = dict(SIZES[size], max_position_embeddings=max_len)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    else:
        model = MTAForCausalLM(MTAConfig(**fields))
    return model.to(device)


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def train_row(kind, size, context, tokens_per_step, steps, device) -> dict:
    model = build(kind, size, context, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = max(1, tokens_per_step // context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = time.perf_counter()
    step()  # kernels compile, the optimizer makes its state
    synchronize(device)
    first_step_s = time.perf_counter() - first
    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"model": kind, "task": "train", "context": context, "batch": batch,
            "tokens_per_s": batch * context * steps / seconds, "peak_gib": peak_gib(device),
            "first_step_s": first_step_s}


@torch.no_grad()
def generate_row(kind, size, prompt, new_tokens, batch, device) -> dict:
    model = build(kind, size, prompt + new_tokens, device).eval()
    if device.startswith("cuda"):
        model = model.bfloat16()
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)

    def generate(count):
        return model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    with sdpa_kernel(DECODE_SDPA_BACKENDS):
        generate(2)  # warm-up: kernels compile
        synchronize(device)
        start = time.perf_counter()
        prefill_only = generate(1)
        synchronize(device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        out = generate(new_tokens)
        synchronize(device)
        seconds = time.perf_counter() - start
    assert out.shape[1] == prompt + new_tokens and prefill_only.shape[1] == prompt + 1
    # The prompt's forward pass is timed apart (one-token generation) and left out of the decoding rate.
    return {"model": kind, "task": "generate", "context": prompt, "batch": batch, "new_tokens": new_tokens,
            "tokens_per_s": batch * (new_tokens - 1) / max(seconds - prefill_s, 1e-9), "prefill_s": prefill_s}


def with_ratios(rows: list[dict]) -> list[dict]:
    def key(row):
        return row["task"], row["context"], row["batch"]

    llama = {key(r): r["tokens_per_s"] for r in rows if r["model"] == "llama"}
    return [dict(r, ratio_to_llama=r["tokens_per_s"] / llama[key(r)]) for r in rows]


def table(rows: list[dict]) -> str:
    lines = ["| task | context | batch | model | tokens/s | x Llama | peak GiB |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else ""
        lines.append(f"| {r['task']} | {r['context']} | {r['batch']} | {r['model']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['ratio_to_llama']:.2f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="350m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="*", default=[4096, 16384],
                        help="training context lengths (none: generation only)")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = this / context (at least 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per row")
    parser.add_argument("--prompt", type=int, default=512, help="generation: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="generation: new tokens")
    parser.add_argument("--generate-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    rows = []
    for context in args.contexts:
        for kind in ("llama", "mta"):
            rows.append(train_row(kind, args.size, context, args.tokens_per_step, args.steps, args.device))
            print(rows[-1], flush=True)
    for batch in args.generate_batches:
        for kind in ("llama", "mta"):
            rows.append(generate_row(kind, args.size, args.prompt, args.new_tokens, batch, args.device))
            print(rows[-1], flush=True)
    rows = with_ratios(rows)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"\n{device}, torch {torch.__version__}, size {args.size}\n\n{table(rows)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": device, "size": args.size, "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
