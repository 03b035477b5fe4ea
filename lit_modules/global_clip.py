"""``GlobalCLIPModule``: the global CLIP baseline (whole volume vs whole report; Tab. 4, row 1)."""

from __future__ import annotations

from typing import Any, ClassVar

from fvlm.lit_modules.contrastive import ContrastiveModule
from fvlm.models import NetworkKind

__all__ = ["GlobalCLIPModule"]


class GlobalCLIPModule(ContrastiveModule):
    """CLIP on the same data and towers as fVLM, for comparison.

    With ``fncn`` on, studies whose every anatomy is normal are positives of each other (the
    paper's patient-level definition of normal); the default is plain CLIP (``fncn: false``).
    ``num_anatomies`` and ``pooling_heads`` are accepted (and ignored) so the same data-module
    link and YAML work.
    """

    network_kind: ClassVar[NetworkKind] = "global"

    def __init__(
        self, fncn: bool = False, identical_text_positive: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(fncn=fncn, identical_text_positive=identical_text_positive, **kwargs)
