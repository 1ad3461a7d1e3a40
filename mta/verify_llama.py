"""Check a converted MTA folder against its Llama: logits on a fixed prompt and greedy continuations."""

import argparse

from conversion.llama_verification import verify_llama


def report_verification(src: str, dst: str) -> int:
    """Print the comparison; exit status 1 on a mismatch, 2 if a folder does not load."""
    try:
        verification = verify_llama(src, dst)
    except (OSError, ValueError) as error:  # what from_pretrained raises for a missing or broken folder
        print(f"error: {error}")
        return 2
    print(verification.summary())
    return 0 if verification.ok else 1


def run(args: argparse.Namespace) -> int:
    return report_verification(args.src, args.dst)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the Llama folder")
    parser.add_argument("dst", help="the MTA folder converted from it")
    parser.set_defaults(run=run)
