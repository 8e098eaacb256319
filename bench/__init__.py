"""The benchmarks (`python -m bench`, docs/performance.md)."""

from __future__ import annotations

import argparse
from typing import Any


def with_quick_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser,
                        quick: dict[str, Any]) -> argparse.Namespace:
    """`--quick`: `quick`'s value for every option the command line left at its default."""
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args
