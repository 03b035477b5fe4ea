"""``fvlm-phantom``: alias of ``fvlm phantom`` (options: those of ``generate_phantom``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fvlm.cli import run_command

__all__ = ["main"]


def main(args: Sequence[str] | None = None) -> int:
    """Run ``fvlm phantom`` with ``args``; returns the exit status (2 on bad arguments)."""
    return run_command("phantom", args)


if __name__ == "__main__":
    sys.exit(main())
