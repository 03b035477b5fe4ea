"""``fvlm preprocess`` / ``fvlm-preprocess``: build the study cache from a manifest.

The options are generated from :class:`~fvlm.preprocess.config.PreprocessConfig` by jsonargparse,
so ``--help`` documents each of them and ``--config configs/preprocess/abdomen.yaml`` works, with
command-line values overriding the file. Exit codes: 0 all studies ok, 1 some studies failed (the
others are in the cache), 2 nothing was done (bad options, manifest, anatomy table, missing
TotalSegmentator weights, cache in use), 130 interrupted.
"""

from __future__ import annotations

import sys

from jsonargparse import ActionConfigFile, ArgumentParser

from fvlm.anatomy import AnatomyTableError

from .cache import CacheBusy
from .config import PreprocessConfig
from .manifest import ManifestError
from .segmentation import TotalSegmentatorUnavailable

__all__ = ["build_parser", "main"]

_EPILOG = (
    "Output: <cache>/studies/<id>/{image.npy, anatomy.npy, meta.json, report.json} and "
    "<cache>/manifest.csv (every study, ok or failed with a reason). Rerunning skips studies whose "
    "inputs and settings are unchanged. Exit code 1 if any study failed."
)


def build_parser() -> ArgumentParser:
    """The jsonargparse parser (also used by tests and ``--print_config``)."""
    parser = ArgumentParser(
        prog="fvlm preprocess",
        description=(
            "Preprocess CT studies for fVLM: canonical axes, resampling, HU window, anatomy masks "
            "grouped by the anatomy table, per-anatomy report decomposition; one cache entry "
            "per study, in parallel, resumable."
        ),
        epilog=_EPILOG,
        env_prefix="FVLM_PREPROCESS",
        default_env=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of options.")
    parser.add_class_arguments(PreprocessConfig, fail_untyped=True, sub_configs=True)
    return parser


def main(args: list[str] | None = None) -> int:
    """Run the pipeline; returns the exit code (see module docstring)."""
    parser = build_parser()
    namespace = parser.parse_args(sys.argv[1:] if args is None else args)
    namespace.pop("config", None)
    try:
        config = PreprocessConfig(**namespace.as_dict())
        from .runner import run_preprocess  # heavy imports only once the options are valid

        summary = run_preprocess(config)
    except (
        ManifestError,
        AnatomyTableError,
        TotalSegmentatorUnavailable,
        CacheBusy,
        ValueError,
    ) as err:
        print(f"fvlm preprocess: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fvlm preprocess: interrupted; finished studies are in the cache, rerun to resume",
            file=sys.stderr,
        )
        return 130
    print(summary.format())
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
