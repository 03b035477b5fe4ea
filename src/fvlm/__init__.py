"""fvlm: fine-grained (anatomy-level) vision-language pre-training for 3D CT.

``from fvlm import FVLM`` is the Python API of a trained model (:mod:`fvlm.pretrained`); it is
imported on first use, so ``import fvlm`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["FVLM", "__version__"]

if TYPE_CHECKING:
    from fvlm.pretrained import FVLM


def __getattr__(name: str) -> Any:  # noqa: ANN401 - module attribute hook
    if name == "FVLM":
        from fvlm.pretrained import FVLM

        return FVLM
    raise AttributeError(f"module 'fvlm' has no attribute {name!r}")
