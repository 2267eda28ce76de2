"""Command line:
  python -m train build CONFIG --out DIR [--work DIR] [--from-stage STAGE] [--ray-address ADDR]
  python -m train init DATA --target COL --task classification|regression --out CONFIG.toml"""

import argparse
import sys

from . import pipeline
from .config import ConfigError
from .data import DataError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a bundle from a TOML config")
    build.add_argument("config", help="path to train/configs/NAME.toml")
    build.add_argument("--out", required=True, help="bundle directory to write (models/NAME); "
                       "written only when the build completes")
    build.add_argument("--work", default=None, help="stage cache folder (default work/NAME)")
    build.add_argument(
        "--from-stage",
        default=None,
        choices=pipeline.STAGES,
        help="recompute this stage and every later one, even when cached",
    )
    build.add_argument("--ray-address", default=None,
                       help="Ray cluster for posterior.executor = \"ray\" (\"auto\" or HOST:PORT)")
    init = sub.add_parser("init", help="write a starting config for your own data")
    init.add_argument("data", help="a .csv (header row required) or .npz (arrays x, y) file, "
                      "or a source such as sklearn:load_wine")
    init.add_argument("--target", default=None, help="the target column (CSV; required there)")
    init.add_argument("--features", nargs="+", default=None, help="feature columns (default: all but the target)")
    init.add_argument("--task", required=True, choices=["classification", "regression"])
    init.add_argument("--out", required=True, help="config file to write (CONFIG.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            pipeline.build(args.config, args.out, work=args.work, from_stage=args.from_stage,
                           ray_address=args.ray_address)
        elif args.command == "init":
            from .init import init as write_config
            out = write_config(args.data, args.target, args.task, args.out, args.features, args.force)
            print(f"wrote {out}; build it with: python -m train build {out} --out models/NAME")
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as e:  # the message names the file
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
