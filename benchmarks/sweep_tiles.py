"""Candidate tilings of each fused MTA kernel, timed on one GPU: the measurements behind `_tiles`' choices.

For each layer (kq conv 6 x 11 + head mix 2; head mix 2 alone), head shape and kernel, every candidate
(BM, BN, warps, stages) is timed with the other kernels at their defaults: the forward for "fwd", the whole
backward for "dkdv" and "dq" (so the differences are that kernel's). bf16, batch 1. Every candidate compiles
first, in parallel processes, into Triton's cache; the timing process then finds them there. Prints a table
with each time's ratio to the default tiling's and writes the rows as JSON.

    python benchmarks/sweep_tiles.py --n 4096 --out sweep.json
"""

import argparse
import json
import multiprocessing
from pathlib import Path

import torch
from bench_attention import timed_ms  # (a sibling script)

from modeling_mta import mta_triton
from modeling_mta.mta_triton import mta_attention_fused

# Pre-vetted with benchmarks/compile_report.py (fits an H200's shared memory, few spills).
CANDIDATES = {
    ("kq", 64): dict(fwd=[(64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
                     dkdv=[(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2)],
                     dq=[(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2)]),
    ("kq", 128): dict(fwd=[(64, 32, 8, 1), (64, 64, 8, 1), (64, 32, 4, 1)],
                      dkdv=[(32, 32, 4, 1), (64, 32, 8, 1), (32, 64, 8, 1)],
                      dq=[(32, 32, 4, 1), (64, 32, 8, 1), (32, 64, 8, 1)]),
    ("headmix", 64): dict(fwd=[(128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
                          dkdv=[(64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2)],
                          dq=[(128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)]),
    ("headmix", 128): dict(fwd=[(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
                           dkdv=[(64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2)],
                           dq=[(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)]),
}
HEADS = {64: 16, 128: 32}


def inputs(layer: str, head_dim: int, n: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    heads = HEADS[head_dim]

    def rand(*shape, spread=1.0):
        return (spread * torch.randn(*shape, generator=generator, device="cuda")).bfloat16().requires_grad_()

    q, k, v = (rand(1, heads, n, head_dim) for _ in range(3))
    theta = rand(heads, 1, 6, 11, spread=0.1) if layer == "kq" else None
    mix = rand(heads // 2, 2, 2, spread=0.5)
    return [t for t in (q, k, v, theta, mix) if t is not None], theta is not None


def make_step(layer, head_dim, kernel, tiling, n):
    """What one timing repeat runs, with `tiling` for `kernel`: the forward for "fwd", else the backward."""
    tensors, has_theta = inputs(layer, head_dim, n)
    q, k, v = tensors[:3]
    theta = tensors[3] if has_theta else None
    mta_triton.TILES_OVERRIDE = {kernel: tiling} if tiling else {}
    if kernel == "fwd":
        def step():
            with torch.no_grad():
                mta_attention_fused(q, k, v, theta, tensors[-1])
    else:
        out = mta_attention_fused(q, k, v, theta, tensors[-1])
        grad = torch.ones_like(out)

        def step():
            torch.autograd.grad(out, tensors, grad, retain_graph=True)
    return step


def compile_one(job):
    layer, head_dim, kernel, tiling = job
    try:
        make_step(layer, head_dim, kernel, tiling, 256)()
        torch.cuda.synchronize()
        return None
    except Exception as error:  # reported in the table; the timing skips it
        return f"{type(error).__name__}: {str(error)[:120]}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=12, help="processes that compile the candidates")
    parser.add_argument("--compile-only", action="store_true", help="fill Triton's cache and stop (no timing)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    jobs = [(layer, head_dim, kernel, tiling) for (layer, head_dim), kernels in CANDIDATES.items()
            for kernel, tilings in kernels.items() for tiling in [None] + tilings]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        errors = dict(zip(jobs, pool.map(compile_one, jobs, chunksize=1)))
    if args.compile_only:
        return
    rows = []
    print(f"{torch.cuda.get_device_name()}, bf16, batch 1, N = {args.n}; ms (ratio to the default tiling)")
    for (layer, head_dim, kernel, tiling), error in errors.items():
        default = mta_triton._tiles(kernel, head_dim, 6 if layer == "kq" else 1, 2, 1, 2, False)
        row = dict(layer=layer, heads=HEADS[head_dim], head_dim=head_dim, kernel=kernel,
                   tiling=list(tiling or default), default=tiling is None, error=error)
        if error is None:
            mta_triton._FITTED_TILINGS.clear()
            step = make_step(layer, head_dim, kernel, tiling, args.n)
            step()  # warm
            row["ms"] = timed_ms(step, max_reps=args.reps)
            # A tiling too large for shared memory runs smaller (`_launch`): say which ran.
            row["ran_as"] = [list(t) for t in mta_triton._FITTED_TILINGS.values()] or None
        rows.append(row)
        base = next(r for r in rows if r["layer"] == layer and r["head_dim"] == head_dim and r["kernel"] == kernel)
        ratio = f"({row['ms'] / base['ms']:.2f})" if error is None and base.get("ms") else ""
        shown = f"{row['ms']:9.2f} {ratio}" if error is None else error
        if error is None and row["ran_as"]:
            shown += f"  ran as {row['ran_as']}"
        print(f"{layer:>8} {HEADS[head_dim]:>2}x{head_dim:<3} {kernel:>5} {str(tuple(row['tiling'])):>17}"
              f"{' default' if tiling is None else '        '} {shown}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
