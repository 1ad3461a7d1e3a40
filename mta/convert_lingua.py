"""Convert a checkpoint of the official MTA code (consolidated lingua folder) into an MTA model folder."""

import argparse

from conversion import ConversionError, convert_lingua


def run(args: argparse.Namespace) -> int:
    try:
        conversion = convert_lingua(args.src, args.dst, overwrite=args.overwrite)
    except ConversionError as error:
        print(f"error: {error}")
        return 2
    print(conversion.summary())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="the consolidated checkpoint folder: consolidated.pth and params.json")
    parser.add_argument("dst", help="the MTA folder to write (must be absent or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST (once the new one is complete)")
    parser.set_defaults(run=run)
