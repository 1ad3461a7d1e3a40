"""`mta`: the project's command line."""

import argparse
import sys

from . import convert_lingua, convert_llama, demo, finetune, verify_llama


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="Multi-Token Attention for Transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module in (("demo", demo), ("convert-llama", convert_llama), ("verify-llama", verify_llama),
                         ("convert-lingua", convert_lingua), ("finetune", finetune)):
        module.add_arguments(commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
