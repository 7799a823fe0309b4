"""Command line: `python -m linalign_jax.assets list` and `python -m linalign_jax.assets fetch NAME...`."""
from __future__ import annotations

import argparse
import sys

from linalign_jax.assets import cache_root, fetch, list_assets
from linalign_jax.errors import LinalignError


def _table(rows: list) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linalign_jax.assets", description=__doc__)
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $LINALIGN_CACHE or ~/.cache/linalign_jax)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="show the registry")
    fetch_parser = commands.add_parser("fetch", help="download, verify and assemble assets into the cache")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)

    if args.command == "list":
        rows = [("NAME", "KIND", "SIZE", "LICENCE", "DESCRIPTION")]
        rows += [(a.name, a.kind, a.size, a.licence, a.description) for a in list_assets()]
        print(_table(rows))
        print(f"\ncache: {cache_root(args.cache_dir)}")
        return 0
    try:
        for name in args.names:
            print(f"{name}: {fetch(name, args.cache_dir)}")
    except LinalignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
