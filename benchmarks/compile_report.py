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

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from modeling_mta import group_norm_triton as gn
from modeling_mta import mta_triton as mt

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

FLOAT_ARGS = {"scale", "dropout_p", "eps"}
INT32_POINTERS = {"seg_start_ptr", "seg_end_ptr", "start_ptr"}
INT64_POINTERS = {"seed_ptr"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "cband_ptr", "dcband_ptr", "band_ptr", "dband_ptr", "theta_ptr",
                    "dtheta_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "sband_ptr", "dsband_ptr", "w_ptr", "rstd_ptr",
                    "dw_ptr"}


def signature(kernel, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*i32" if name in INT32_POINTERS else "*i64" if name in INT64_POINTERS
                         else "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def aligned(kernel, sig: dict) -> dict:
    """The divisibility hints a launch gives Triton: pointers from torch and the strides and lengths of the
    benchmarks' shapes are multiples of 16. Without them the loads cannot be asynchronous copies, and the
    report would miss the shared memory that their pipelining takes."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in sig.items()
            if kind.startswith("*") or (kind == "i32" and (name.startswith("stride") or name in ("N", "M", "L")))}


def report(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16") -> str:
    sig = signature(kernel, constexprs, dtype)
    source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned(kernel, sig))
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
    parser.add_argument("--tiles", nargs="*", default=[], metavar="BM,BN,WARPS,STAGES",
                        help="tilings to report for every kernel besides each kernel's default")
    parser.add_argument("--kernels", nargs="+", default=list(mt.KERNELS), choices=mt.KERNELS)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", action="store_true",
                        help="also packed rows, dropout, a group of 16 (value heads in chunks), a post-softmax kq "
                             "conv, the decode kernel, the stripe's and the group norm's kernels")
    args = parser.parse_args()
    extra = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
    for head_dim in args.head_dims:
        layers = [(True, 2, {}), (False, 2, {})]
        if args.variants:
            layers += [(True, 2, dict(PACKED=True)), (True, 1, dict(DROPOUT=True)), (True, 2, dict(DROPOUT=True)),
                       (True, 16, dict(DROPOUT=True)),
                       # a post-softmax 3 x 5 conv ("both": 2 offsets) and head mixing of 2: 3 x 2 own value heads
                       (True, 6, dict(BAND=2, OWN_VALUES=True))]
        for has_conv, c_h, flags in layers:
            c_q, c_k, pad = (6, 11, 5) if has_conv else (1, 1, 0)
            stripe = (c_q - 1) + (c_k - 1 - pad) if has_conv else 0
            e = mt.value_chunk(c_h, head_dim)
            for kernel in args.kernels:
                if kernel == "dv" and e == c_h:
                    continue  # only groups in chunks have a dV kernel
                for tiles in [mt._tiles(kernel, head_dim, c_q, e, c_h // e, 2, flags.get("DROPOUT", False))] + extra:
                    report_kernel(kernel, head_dim, has_conv, c_q, c_k, pad, stripe, c_h, e, flags, *tiles)
        if args.variants:
            decode = dict(C_K=11, PAD=5, STRIPE=10, BAND=0, C_H=2, BM=16, BN=64 if head_dim <= 128 else 32, D=head_dim,
                          DQK=head_dim, DOT_PRECISION="tf32", E=2, OWN_VALUES=False)
            print(f"d={head_dim:<3} decode 6x11 c_h=2  {report(mt._mta_decode_kernel, decode, 4, 1)}", flush=True)
            # with a post-softmax 3 x 5 conv: 3 x 2 own value heads, 2 at a time, and the band's scores
            post = dict(decode, BAND=2, C_H=6, OWN_VALUES=True)
            print(f"d={head_dim:<3} decode 6x11 post 3x5  {report(mt._mta_decode_kernel, post, 4, 1)}", flush=True)
    if args.variants:  # the stripe's convolution (no head_dim), one and two source heads per column block
        tiles = mt._stripe_tiles(10, 15, 11)
        for c_p in (1, 2):
            stripe = dict(C_Q=6, C_K=11, WB=15, STRIPE=10, PACKED=False, C_P=c_p, **tiles)
            print(f"stripe 6x11 C_P={c_p}  fwd {report(mt._stripe_kernel, stripe, 4, 1, 'fp32')}", flush=True)
            print(f"stripe 6x11 C_P={c_p}  bwd {report(mt._stripe_bwd_kernel, dict(stripe, W_BLOCK=16), 4, 1, 'fp32')}",
                  flush=True)
        for head_dim in (64, 128, 256):  # the group norm: launched with Triton's default warps and stages
            norm = gn._constants(torch.empty(0, head_dim, dtype=torch.bfloat16))
            for name, kernel in (("fwd", gn._group_norm_fwd_kernel), ("bwd", gn._group_norm_bwd_kernel)):
                print(f"d={head_dim:<3} group norm {name}  {report(kernel, norm, 4, 3)}", flush=True)


KERNEL_FUNCTIONS = {"fwd": mt._mta_fwd_kernel, "dkdv": mt._mta_bwd_dkdv_kernel, "dq": mt._mta_bwd_dq_kernel,
                    "dv": mt._mta_bwd_dv_kernel}


def report_kernel(kernel, head_dim, has_conv, c_q, c_k, pad, stripe, c_h, e, flags, bm, bn, warps, stages):
    constexprs = dict(dict(HAS_CONV=has_conv, C_Q=c_q, STRIPE=stripe, C_H=c_h, BM=bm, BN=bn, D=head_dim, DQK=head_dim,
                           DOT_PRECISION="tf32", PACKED=False, DROPOUT=False, E=e, BAND=0, OWN_VALUES=False), **flags)
    constexprs["NEAR"] = max(stripe, constexprs["BAND"])
    if kernel in ("dkdv", "dv"):  # the key-major kernels mix their key tiles themselves
        constexprs.update(C_K=c_k, PAD=pad, C_P=1, KEY_MAJOR=mt._key_major_tiles(head_dim, c_q, e, c_h // e, 2,
                                                                              constexprs["DROPOUT"]))
    if kernel == "dv":  # (it takes no dS)
        del constexprs["BAND"]
    extra = "".join(f" {name.lower()}" for name, on in dict(flags, KEY_MAJOR=constexprs.get("KEY_MAJOR")).items() if on)
    label = (f"d={head_dim:<3} conv={'6x11' if has_conv else 'none':<4} c_h={c_h:<2} E={e} BM={bm:<3} BN={bn:<3} "
             f"warps={warps} stages={stages}{extra}")
    print(f"{label}  {kernel:<5} {report(KERNEL_FUNCTIONS[kernel], constexprs, warps, stages)}", flush=True)


if __name__ == "__main__":
    main()
