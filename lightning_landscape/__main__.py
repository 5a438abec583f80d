"""``lightning-landscape report LOGDIR`` (also ``python -m lightning_landscape report LOGDIR``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-landscape", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report", help="render a PNG summary of the landscape curves in a log directory"
    )
    report.add_argument(
        "log_dir", help="log directory of TensorBoard or CSV loggers (searched recursively)"
    )
    report.add_argument("--out", help="PNG to write (default: LOG_DIR/landscape_summary.png)")
    report.add_argument("--html", help="also write an HTML page with the picture and last values")
    args = parser.parse_args(argv)

    from lightning_landscape.report import NoLandscapeData, render

    try:
        path = render(args.log_dir, args.out, args.html)
    except (NoLandscapeData, ImportError) as err:
        print(f"lightning-landscape report: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}" + (f" and {args.html}" if args.html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
