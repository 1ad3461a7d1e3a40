"""The group norm alone: the Triton kernels against torch's RMSNorm (the module's two paths), forward+backward under
bf16 autocast on the attention's output as the model hands it over ((B, H, N, d) transposed to (B, N, H, d)).

For each shape: time per call by CUDA events (what a step waits for, launches included), the kernels' GPU time by
the profiler, and the relative (L2) error of the output and both gradients against the float64 reference.
Prints a table with the ratios Triton / torch.

    python benchmarks/bench_group_norm.py --out benchmarks/results/group-norm-h200.json   # the 350M model's shape
    python benchmarks/bench_group_norm.py --shapes 1x16384x32x128
    python benchmarks/bench_group_norm.py --device cpu --shapes 1x8x2x16 --repeats 1   # checks the script
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from modeling_mta.modeling_mta import MTAGroupNorm
from modeling_mta.mta_reference import group_norm

try:
    from bench_attention import timed_ms  # run as a script: its folder is on the path
except ImportError:
    from benchmarks.bench_attention import timed_ms  # imported from the repository's root (the tests)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def measure(module: MTAGroupNorm, x: torch.Tensor, dy: torch.Tensor, fused: bool, repeats: int) -> dict:
    device = x.device.type

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            y = module(x.transpose(1, 2), fused=fused)
        return y, torch.autograd.grad(y, (x, module.weight), dy)

    step()  # compiles
    if device == "cuda":
        event_ms = timed_ms(step, max_reps=repeats)
    else:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1000)
        event_ms = statistics.median(times)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    kernel_ms = sum(e.device_time_total for e in prof.key_averages()) / 1000 if device == "cuda" else None
    y, (dx, dw) = step()
    return {"event_ms": event_ms, "kernel_ms": kernel_ms, "out": y, "dx": dx, "dw": dw}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8x4096x16x64"], help="BATCHxTOKENSxHEADSxHEAD_DIM")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'shape':>16} {'path':>7} {'event ms':>9} {'kernel ms':>10} {'err out':>8} {'err dx':>8} {'err dw':>8}")
    for shape in args.shapes:
        batch, tokens, heads, head_dim = (int(x) for x in shape.split("x"))
        torch.manual_seed(0)
        module = MTAGroupNorm(head_dim, layer_idx=5, depth_scaling=True).to(args.device)
        torch.nn.init.normal_(module.weight, 1.0, 0.2)
        x = torch.randn(batch, heads, tokens, head_dim, device=args.device, dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(batch, tokens, heads, head_dim, device=args.device, dtype=torch.bfloat16)
        wide_x = x.detach().double().transpose(1, 2).requires_grad_()
        wide_w = module.weight.detach().double().requires_grad_()
        want = group_norm(wide_x, wide_w, module.scale)
        want_dx, want_dw = torch.autograd.grad(want, (wide_x, wide_w), dy.double())
        found = {}
        for path, fused in (("torch", False), ("triton", True)):
            result = measure(module, x, dy, fused, args.repeats)
            row = dict(shape=shape, path=path, event_ms=result["event_ms"], kernel_ms=result["kernel_ms"],
                       error_out=relative_error(result["out"], want),
                       error_dx=relative_error(result["dx"].transpose(1, 2), want_dx),
                       error_dw=relative_error(result["dw"], want_dw))
            found[path] = row
            rows.append(row)
            kernel = f"{row['kernel_ms']:10.3f}" if row["kernel_ms"] is not None else f"{'-':>10}"
            print(f"{shape:>16} {path:>7} {row['event_ms']:9.3f} {kernel} {row['error_out']:8.1e} "
                  f"{row['error_dx']:8.1e} {row['error_dw']:8.1e}", flush=True)
        ratio = found["triton"]["event_ms"] / found["torch"]["event_ms"]
        kernels = (f", kernels {found['triton']['kernel_ms'] / found['torch']['kernel_ms']:.2f}x"
                   if found["torch"]["kernel_ms"] else "")
        print(f"{shape:>16} triton / torch: events {ratio:.2f}x{kernels}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
