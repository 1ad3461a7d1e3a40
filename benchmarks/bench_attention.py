"""Attention-core benchmark on one GPU: causal SDPA against the fused MTA kernel and the reference.

For each (heads x head_dim) and sequence length, batch 1, bf16: forward and forward+backward time
(median over repeats, CUDA events) and peak memory of
  sdpa         torch's scaled_dot_product_attention, causal (flash attention)
  mta_kq       fused MTA, a key-query-convolution layer: pre-softmax kq conv 6 x 11 + post-softmax head mix 2
  mta_headmix  fused MTA, a head-mix-only layer: post-softmax head mix 2
  mta_premix   fused MTA, pre-softmax head mix 2 (no kq conv; without GQA its q and k run 2 x d wide)
  mta_premix_kq  fused MTA, the kq-conv layer with pre-softmax head mix 2 as well (q and k 2 x d wide)
  mta_post     fused MTA, post-softmax kq conv 3 x 5 + head mix 2 (no pre-softmax conv)
  reference    the reference MTA attention on the kq-conv layer, until it runs out of memory
Prints a table with ratios to SDPA and writes the rows as JSON.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h200.json
    python benchmarks/bench_attention.py --markdown benchmarks/results/attention-h200.json   # README table
    python benchmarks/bench_attention.py --gqa 4 --lengths 16384   # Llama-3-like: 4 query heads per k/v head
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_mta import mta_triton
from modeling_mta.mta_reference import mta_attention
from modeling_mta.mta_triton import mta_attention_fused

SHAPES = [(16, 64), (32, 128)]
LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]


def make_inputs(heads: int, head_dim: int, n: int, generator: torch.Generator, gqa: int = 1):
    def rand(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=generator, device="cuda")).bfloat16()

    q = rand(1, heads, n, head_dim).requires_grad_()
    k, v = (rand(1, heads // gqa, n, head_dim).requires_grad_() for _ in range(2))
    theta = rand(heads, 1, 6, 11, spread=0.3)
    theta[:, :, 5, 5] += 1.0  # identity plus noise: scores stay in a realistic range
    mix = (torch.eye(2, device="cuda") + 0.3 * torch.randn(heads // 2, 2, 2, generator=generator, device="cuda"))
    return q, k, v, theta.requires_grad_(), mix.bfloat16().requires_grad_()


def implementations(n: int):
    visible = None

    def reference(q, k, v, theta, mix):
        nonlocal visible
        if visible is None:
            visible = torch.ones(n, n, device="cuda", dtype=torch.bool).tril()
        return mta_attention(q, k, v, visible, theta, None, None, mix)[0]

    return {
        "sdpa": lambda q, k, v, theta, mix: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                           enable_gqa=k.shape[1] < q.shape[1]),
        "mta_kq": lambda q, k, v, theta, mix: mta_attention_fused(q, k, v, theta, mix),
        "mta_headmix": lambda q, k, v, theta, mix: mta_attention_fused(q, k, v, None, mix),
        "mta_premix": lambda q, k, v, theta, mix: mta_attention_fused(q, k, v, head_mix_weight=mix),
        "mta_premix_kq": lambda q, k, v, theta, mix: mta_attention_fused(q, k, v, theta, mix, head_mix_weight=mix),
        # A post-softmax 3 x 5 kq conv (the middle of theta: identity plus noise) and head mixing, no pre-softmax conv.
        "mta_post": lambda q, k, v, theta, mix: mta_attention_fused(q, k, v, None, mix,
                                                                     kq_conv_post_weight=theta[:, :, 3:, 3:8]),
        "reference": reference,
    }


def timed_ms(fn, budget_ms: float = 1000.0, max_reps: int = 20) -> float:
    """Median time of fn (already warm) over repeats that fit the budget, at least 2."""
    times = []
    while len(times) < max_reps and (len(times) < 2 or sum(times) < budget_ms):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def measure(impl, inputs) -> dict:
    q, k, v, theta, mix = inputs
    grad = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            impl(q, k, v, theta, mix)

    def forward_backward():
        out = impl(q, k, v, theta, mix)
        torch.autograd.grad(out, (q, k, v, theta, mix), grad, allow_unused=True)

    first = time.perf_counter()
    forward_backward()  # compiles the kernels on first use
    torch.cuda.synchronize()
    first_call_s = time.perf_counter() - first
    forward()
    fwd = timed_ms(forward)
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd = timed_ms(forward_backward)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd, "peak_gib": peak, "first_call_s": first_call_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--shapes", nargs="+", default=[f"{h}x{d}" for h, d in SHAPES], help="HEADSxHEAD_DIM")
    parser.add_argument("--impls", nargs="+", default=["sdpa", "mta_kq", "mta_headmix", "mta_premix", "reference"])
    parser.add_argument("--gqa", type=int, default=1,
                        help="query heads per key/value head (with 2 or more, each head-mixing group of 2 reads one)")
    parser.add_argument("--max-reference-len", type=int, default=16384, help="skip the reference beyond this N")
    parser.add_argument("--tiles", nargs="+", default=[], metavar="KERNEL=BM,BN,WARPS,STAGES",
                        help=f"tilings to use instead of the default, per kernel of {mta_triton.KERNELS}")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="print the rows of this JSON file as a markdown table and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return
    for tiles in args.tiles:
        kernel, tiling = tiles.split("=")
        mta_triton.TILES_OVERRIDE[kernel] = tuple(int(x) for x in tiling.split(","))

    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch 1, bf16, causal, "
          f"{args.gqa} query head(s) per k/v head")
    header = f"{'heads x d':>9} {'N':>6} {'impl':>12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'fwd/SDPA':>9} {'f+b/SDPA':>9}"
    print(header)
    for shape in args.shapes:
        heads, head_dim = (int(x) for x in shape.split("x"))
        for n in args.lengths:
            generator = torch.Generator(device="cuda").manual_seed(n)
            inputs = make_inputs(heads, head_dim, n, generator, args.gqa)
            baseline = None
            for name, impl in implementations(n).items():
                if name not in args.impls:
                    continue
                row = {"impl": name, "heads": heads, "kv_heads": heads // args.gqa, "head_dim": head_dim, "seq_len": n}
                if name == "reference" and n > args.max_reference_len:
                    row.update(fwd_ms=None, fwd_bwd_ms=None, peak_gib=None, note="skipped: beyond --max-reference-len")
                else:
                    try:
                        row.update(measure(impl, inputs))
                    except torch.OutOfMemoryError:
                        row.update(fwd_ms=None, fwd_bwd_ms=None, peak_gib=None, note="out of memory")
                    torch.cuda.empty_cache()
                if name == "sdpa":
                    baseline = row
                rows.append(row)
                print(format_row(row, baseline), flush=True)
                if args.out:  # after every row, so that a run cut short keeps what it measured
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1) + "\n")


def markdown_table(rows: list[dict]) -> str:
    """fwd+bwd ms (ratio to SDPA) and peak GiB per implementation the rows hold, one line per shape and length."""
    impls = [name for name in implementations(0) if any(r["impl"] == name for r in rows)]
    lines = ["| heads x d | N | " + " | ".join(f"{name} fwd+bwd ms (x SDPA), GiB" for name in impls) + " |",
             "|---|---:|" + "---:|" * len(impls)]
    keys = sorted({(r["heads"], r["head_dim"], r["seq_len"]) for r in rows})
    for heads, head_dim, n in keys:
        found = {r["impl"]: r for r in rows if (r["heads"], r["head_dim"], r["seq_len"]) == (heads, head_dim, n)}
        base = found.get("sdpa", {}).get("fwd_bwd_ms")
        cells = []
        for name in impls:
            row = found.get(name, {})
            if row.get("fwd_bwd_ms") is None:
                cells.append(row.get("note", "-").split(":")[0])
                continue
            ratio = f" ({row['fwd_bwd_ms'] / base:.1f}x)" if base and name != "sdpa" else ""
            cells.append(f"{row['fwd_bwd_ms']:.2f}{ratio}, {row['peak_gib']:.2f}")
        lines.append(f"| {heads} x {head_dim} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_row(row: dict, baseline: dict | None) -> str:
    def cell(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    def ratio(key):
        if row.get(key) is None or not baseline or baseline.get(key) is None:
            return "-"
        return f"{row[key] / baseline[key]:.1f}x"

    text = (f"{row['heads']:>4} x {row['head_dim']:<3} {row['seq_len']:>6} {row['impl']:>12} {cell('fwd_ms', '9.2f')} "
            f"{cell('fwd_bwd_ms', '11.2f')} {cell('peak_gib', '9.2f')} {ratio('fwd_ms'):>9} {ratio('fwd_bwd_ms'):>9}")
    return text + (f"  ({row['note']})" if row.get("note") else "")


if __name__ == "__main__":
    main()
