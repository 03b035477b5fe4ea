"""LightningModules that wire fvlm's plain PyTorch pieces, and the LightningCLI."""

from fvlm.lit_modules.co_teaching import CoTeachingModule
from fvlm.lit_modules.fine_grained import FineGrainedCLIPModule
from fvlm.lit_modules.global_clip import GlobalCLIPModule

__all__ = ["CoTeachingModule", "FineGrainedCLIPModule", "GlobalCLIPModule"]
