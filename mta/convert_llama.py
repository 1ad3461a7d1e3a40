"""Convert a Llama checkpoint folder into an MTA folder that computes exactly what the Llama computed."""

import argparse

from conversion import RETROFIT_DEFAULTS, ConversionError, convert_llama
from conversion.llama_conversion import NEW_PARAMETER_DTYPES

from .verify_llama import report_verification


def recipe_options(args: argparse.Namespace) -> dict:
    """The MTA options given on the command line (see `add_recipe_arguments`); the others take RETROFIT_DEFAULTS."""
    # Options left out are absent from `args` (argparse.SUPPRESS).
    return {name: getattr(args, name) for name in (*RETROFIT_DEFAULTS, "mta_layers") if hasattr(args, name)}


def run(args: argparse.Namespace) -> int:
    try:
        conversion = convert_llama(args.src, args.dst, overwrite=args.overwrite, new_dtype=args.dtype,
                                   **recipe_options(args))
    except ConversionError as error:
        print(f"error: {error}")
        return 2
    print(conversion.summary())
    return report_verification(args.src, args.dst) if args.verify else 0


def layer_list(text: str) -> list[int]:
    if text.lower() == "none":
        return []
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 2,6,10 or 'none', got {text!r}")


def kernel_size(text: str) -> list[int] | None:
    if text.lower() == "none":
        return None
    try:
        c_q, c_k = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected QxK like 6x11, or 'none', got {text!r}")
    return [c_q, c_k]


def group_size(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of heads or 'none', got {text!r}")


def _size(value: list[int] | None) -> str:
    return "none" if value is None else "x".join(map(str, value))


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the MTA recipe of a retrofitted Llama; `recipe_options` reads them back."""
    d = RETROFIT_DEFAULTS
    mta = parser.add_argument_group("MTA recipe (defaults: identity-preserving paper recipe)")
    mta.add_argument("--mta-layers", type=layer_list, default=argparse.SUPPRESS, metavar="L1,L2,..",
                     help="layers with key-query convolutions, 0-based (default: every 4th, 2,6,10,...)")
    mta.add_argument("--kq-conv-size", type=kernel_size, default=argparse.SUPPRESS, metavar="QxK",
                     help=f"pre-softmax kernel, queries x keys, or none (default {_size(d['kq_conv_size'])})")
    mta.add_argument("--kq-conv-post-size", type=kernel_size, default=argparse.SUPPRESS, metavar="QxK",
                     help=f"post-softmax kernel or none (default {_size(d['kq_conv_post_size'])})")
    mta.add_argument("--key-padding", choices=("both", "left", "right"), default=argparse.SUPPRESS,
                     help=f"where the key axis is padded (default {d['key_padding']})")
    mta.add_argument("--head-mix-size", type=group_size, default=argparse.SUPPRESS, metavar="N",
                     help=f"pre-softmax head-mixing group size or none (default {d['head_mix_size'] or 'none'})")
    mta.add_argument("--head-mix-post-size", type=group_size, default=argparse.SUPPRESS, metavar="N",
                     help=f"post-softmax head-mixing group size or none (default {d['head_mix_post_size'] or 'none'})")
    mta.add_argument("--group-norm", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                     help="per-head group norm: NOT identity, the model then differs from the Llama (default off)")
    mta.add_argument("--group-norm-depth-scaling", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                     help="with --group-norm, scale by 1 - (0.8 - 0.6 exp(-0.3 layer)) (default on)")
    mta.add_argument("--attn-gate", choices=("scalar", "vector"), default=argparse.SUPPRESS,
                     help="sigmoid output gate: NOT identity, the model then differs from the Llama (default none)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the Llama folder (config.json, safetensors or torch weights, tokenizer)")
    parser.add_argument("dst", help="the MTA folder to write (must be absent or empty, unless --overwrite)")
    add_recipe_arguments(parser)
    parser.add_argument("--dtype", choices=NEW_PARAMETER_DTYPES, help="dtype of the new MTA parameters "
                        "(default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (once the new one is complete)")
    parser.add_argument("--verify", action="store_true", help="afterwards, run `mta verify-llama SRC DST`")
    parser.set_defaults(run=run)
