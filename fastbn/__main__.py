"""fastbn's command line: ``python -m fastbn {demo,info,bench} ...``."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="BatchNorm2d on a tiny input, checked by hand")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run
        return 0 if run(seed=args.seed) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
