"""``fvlm preprocess`` (and its alias ``fvlm-preprocess``): build the study cache from a manifest.

The options are the fields of :class:`~fvlm.preprocess.config.PreprocessConfig`, so ``--help``
documents each of them and ``--config configs/preprocess/abdomen.yaml`` works, with command-line
values overriding the file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fvlm.anatomy import AnatomyTableError
from fvlm.cli import run_command

from .cache import CacheBusy
from .config import PreprocessConfig
from .manifest import ManifestError
from .segmentation import TotalSegmentatorUnavailable

__all__ = ["main", "preprocess"]


def preprocess(config: PreprocessConfig) -> int:
    """Run the pipeline and print its summary.

    Output: ``<cache>/studies/<id>/{image.npy, anatomy.npy, meta.json, report.json}`` and
    ``<cache>/manifest.csv`` (every study, ok or failed with a reason). Rerunning skips studies
    whose inputs and settings are unchanged and whose cache files are intact. Exit codes: 0 all
    studies ok, 1 some studies failed (the others are in the cache), 2 nothing was done (bad
    options, manifest, anatomy table, missing TotalSegmentator weights, cache in use), 3 stopped
    early because the cache could not be written (disk full, quota, file-size limit; every
    previous cache entry is kept), 4 with ``--fail_on_fallback``: the LLM decomposer fell back to
    the keyword rules for some anatomies, 130 interrupted.
    """
    from .runner import run_preprocess  # heavy imports only once the options are valid

    try:
        summary = run_preprocess(config)
    except (ManifestError, AnatomyTableError, TotalSegmentatorUnavailable, CacheBusy) as err:
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


def main(args: Sequence[str] | None = None) -> int:
    """Run ``fvlm preprocess`` with ``args``; returns the exit code (see :func:`preprocess`)."""
    return run_command("preprocess", args)


if __name__ == "__main__":
    sys.exit(main())
