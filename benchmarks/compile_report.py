"""Compile the fused MTA kernels for sm_90 without a GPU and print registers, spills and shared memory.

Triton's wheel carries ptxas and cuobjdump, so this runs on any machine: a cheap check that a
configuration compiles and fits in registers before spending GPU time on it.

    python benchmarks/compile_report.py
"""

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from modeling_mta import mta_triton as mt

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

FLOAT_ARGS = {"scale"}
INT32_POINTERS = {"start_ptr", "end_ptr"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "cband_ptr", "dcband_ptr", "band_ptr", "dband_ptr", "theta_ptr",
                    "dtheta_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def signature(kernel, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INT32_POINTERS else "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def report(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16") -> str:
    source = ASTSource(fn=kernel, signature=signature(kernel, constexprs, dtype), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage).group(1)
    stack = re.search(r"STACK:(\d+)", usage).group(1)
    local = re.search(r"LOCAL:(\d+)", usage).group(1)
    wgmma = compiled.asm["ptx"].count("wgmma.mma_async")
    return f"regs {regs:>3}  stack {stack:>5}  local {local:>5}  smem {compiled.metadata.shared:>6}  wgmma {wgmma:>3}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="*", default=[], help="BM,BN,WARPS,STAGES tilings to report besides the default")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    for head_dim in args.head_dims:
        for has_conv, c_h in ((True, 2), (False, 2)):
            c_q, c_k, pad = (6, 11, 5) if has_conv else (1, 1, 0)
            stripe = (c_q - 1) + (c_k - 1 - pad) if has_conv else 0
            for blocks in [mt._blocks(head_dim, c_q, c_h, 2)] + [tuple(int(x) for x in b.split(",")) for b in args.blocks]:
                report_layer(head_dim, has_conv, c_q, c_k, pad, stripe, c_h, *blocks)


def report_layer(head_dim, has_conv, c_q, c_k, pad, stripe, c_h, bm, bn, warps, stages):
    common = dict(HAS_CONV=has_conv, C_Q=c_q, STRIPE=stripe, C_H=c_h, BM=bm, BN=bn, D=head_dim, DOT_PRECISION="tf32")
    label = f"d={head_dim:<3} conv={'6x11' if has_conv else 'none':<4} c_h={c_h} BM={bm} BN={bn} warps={warps} stages={stages}"
    print(f"{label}  fwd   {report(mt._mta_fwd_kernel, common, warps, stages)}", flush=True)
    print(f"{label}  dkdv  {report(mt._mta_bwd_dkdv_kernel, dict(common, C_K=c_k, PAD=pad), warps, stages)}", flush=True)
    print(f"{label}  dq    {report(mt._mta_bwd_dq_kernel, common, warps, stages)}", flush=True)


if __name__ == "__main__":
    main()
