"""python -m quanta info"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quanta", description="quanta command line")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="version, kernel paths, threads, CUDA")
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import quanta
        quanta.print_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
