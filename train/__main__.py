"""Command line: `python -m train build CONFIG --out DIR [--work DIR] [--from-stage STAGE]`."""

import argparse
import sys

from . import pipeline


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a bundle from a TOML config")
    build.add_argument("config", help="path to train/configs/NAME.toml")
    build.add_argument("--out", required=True, help="bundle directory to write (models/NAME)")
    build.add_argument("--work", default=None, help="stage cache folder (default work/NAME)")
    build.add_argument(
        "--from-stage",
        default=None,
        choices=pipeline.STAGES,
        help="recompute this stage and every later one, even when cached",
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        pipeline.build(args.config, args.out, work=args.work, from_stage=args.from_stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
