"""``fvlm phantom`` / ``fvlm-phantom``: generate the synthetic CT phantom from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .generate import SPLITS, generate_phantom
from .study import DEFAULT_SHAPE, DEFAULT_SPACING, MIN_SHAPE

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "fvlm phantom") -> argparse.ArgumentParser:
    """The argument parser (every option of :func:`fvlm.phantom.generate_phantom`)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Generate synthetic CT studies (NIfTI volumes in HU, TotalSegmentator v2 label maps, "
            "findings/impression reports, disease labels and a manifest) for tests and the demo."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="output folder (images/, masks/, reports.csv, labels.csv, manifest.csv, phantom.json)",
    )
    parser.add_argument(
        "--n-studies", type=int, default=32, metavar="N", help="number of studies to generate"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed (>= 0); study i is the same for any --n-studies",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("D", "H", "W"),
        help="canonical grid in voxels: inferior->superior, posterior->anterior, left->right "
        f"(at least {' '.join(map(str, MIN_SHAPE))})",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=list(DEFAULT_SPACING),
        metavar=("d", "h", "w"),
        help="voxel size in mm along the same axes; the body fills shape x spacing",
    )
    parser.add_argument(
        "--splits",
        type=float,
        nargs=3,
        default=[0.7, 0.15, 0.15],
        metavar=SPLITS,
        help="fractions of train/val/test studies (sum 1)",
    )
    parser.add_argument(
        "--preset",
        default="paper",
        metavar="NAME|PATH",
        help="anatomy table: preset (paper, chest) or YAML file; its 'phantom' diseases are the "
        "label columns",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return parser


def main(args: list[str] | None = None) -> int:
    """Run the phantom generator; returns the exit status (2 on bad arguments)."""
    parser = build_parser("fvlm phantom" if args is not None else "fvlm-phantom")
    options = parser.parse_args(args)
    try:
        manifest = generate_phantom(
            options.out,
            n_studies=options.n_studies,
            seed=options.seed,
            shape=options.shape,
            spacing=options.spacing,
            splits=options.splits,
            preset=options.preset,
            progress=not options.quiet,
        )
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if not options.quiet:
        print(f"Wrote {options.n_studies} phantom studies; manifest: {manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
