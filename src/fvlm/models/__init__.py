"""Plain-PyTorch models of fVLM: 3D ViT, anatomy pooling, text encoder and the two CLIP variants.

Nothing here imports Lightning; ``fvlm.lit_modules`` wraps these classes for training.
"""

from fvlm.models.anatomy_pooling import AnatomyPooling, token_membership
from fvlm.models.fine_grained_clip import FineGrainedCLIP, FineGrainedOutput, LogitScale
from fvlm.models.global_clip import GlobalCLIP
from fvlm.models.intensity_windows import IntensityWindows
from fvlm.models.network import NETWORK_KINDS, NetworkKind, build_network, network_options
from fvlm.models.text import MINILM, TextEncoder, load_tokenizer, resolve_text_model, text_keys
from fvlm.models.vision import (
    CheckpointReport,
    VisionConfig,
    VisionTransformer3D,
    load_2d_checkpoint,
)

__all__ = [
    "MINILM",
    "NETWORK_KINDS",
    "AnatomyPooling",
    "CheckpointReport",
    "FineGrainedCLIP",
    "FineGrainedOutput",
    "GlobalCLIP",
    "IntensityWindows",
    "LogitScale",
    "NetworkKind",
    "TextEncoder",
    "VisionConfig",
    "VisionTransformer3D",
    "build_network",
    "load_2d_checkpoint",
    "load_tokenizer",
    "network_options",
    "resolve_text_model",
    "text_keys",
    "token_membership",
]
