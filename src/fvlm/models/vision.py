"""3D Vision Transformer image encoder built from MONAI's ViT blocks, with 2D-checkpoint inflation.

Axes. Volumes are ``(B, 1, D, H, W)`` in the cache's canonical orientation (axis 0 inferior ->
superior, axis 1 posterior -> anterior, axis 2 left -> right). The paper (A.2) gives its crop
``96, 256, 384`` and its patch ``16, 16, 32`` "along the axial, coronal and sagittal axes": the
axial axis is the one the axial slices are stacked along (our ``D``, 5 mm spacing), the coronal axis
runs through coronal planes (``H``, posterior -> anterior) and the sagittal axis through sagittal
planes (``W``, left -> right). So the paper's numbers map to ``(D, H, W)`` in that order:
``img_size=(96, 256, 384)``, ``patch_size=(16, 16, 32)``, a ``6 x 16 x 12 = 1,152`` token grid. A
token then covers 80 x 16 x 32 mm.

Inflation of a 2D ImageNet/MAE ViT: the 2D image plane is mapped onto the axial plane ``(H, W)``
(what a radiologist reads as one image), and the slice axis ``D`` is the inflated one.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, PatchEmbeddingBlock, SABlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from fvlm.models.intensity_windows import IntensityWindows, check_windows

__all__ = [
    "CheckpointReport",
    "ViTBlock",
    "VisionConfig",
    "VisionPreset",
    "VisionTransformer3D",
    "inflate_patch_kernel",
    "inflate_position_embedding",
    "load_2d_checkpoint",
    "read_init_source",
    "warn_if_uninitialised",
]

log = logging.getLogger(__name__)

VisionPreset = Literal["vit_base", "vit_tiny"]
Triple = tuple[int, int, int]

_PRESETS: dict[str, dict[str, object]] = {
    # The paper's encoder: ViT-B/16 widths on the paper's crop and patch.
    "vit_base": {
        "img_size": (96, 256, 384),
        "patch_size": (16, 16, 32),
        "hidden_size": 768,
        "mlp_dim": 3072,
        "num_layers": 12,
        "num_heads": 12,
    },
    # A CPU-sized encoder for tests and the phantom demo (4 x 4 x 4 = 64 tokens).
    "vit_tiny": {
        "img_size": (16, 32, 32),
        "patch_size": (4, 8, 8),
        "hidden_size": 64,
        "mlp_dim": 128,
        "num_layers": 2,
        "num_heads": 4,
    },
}


@dataclass
class VisionConfig:
    """Shape of the 3D ViT; the defaults are the paper's ViT-B on its crop (see module docstring).

    Attributes:
        img_size: Training crop ``(D, H, W)`` in voxels; sets the learned position-embedding grid.
            Other sizes divisible by ``patch_size`` are accepted at run time (the position
            embeddings are interpolated), so evaluation may use a different crop.
        patch_size: Patch ``(D, H, W)`` in voxels.
        hidden_size: Token width ``C``.
        mlp_dim: Width of the transformer MLP.
        num_layers: Number of transformer blocks.
        num_heads: Attention heads per block.
        dropout: Dropout of the embeddings, attention weights and MLPs (0 for MAE-initialised runs).
            With dropout the attention runs MONAI's explicit path (an ``N x N`` matrix per head)
            instead of fused SDPA, whose dropout MONAI keeps on in evaluation.
        qkv_bias: Bias on the fused qkv projection; True matches timm/MAE checkpoints.
        checkpoint_activations: Recompute each block in the backward pass (saves memory at the
            cost of about one extra forward); only active in training mode.
        init_from: Optional 2D ViT/MAE weights to inflate at construction: a local checkpoint
            file (``.pth``/``.pt``/``.safetensors``) or a timm pretrained model name such as
            ``vit_base_patch16_224.mae`` (the paper's MAE ImageNet-1K ViT-B), which timm fetches
            from the Hugging Face hub or its cache (see :func:`read_init_source`).
        hu_windows: Optional HU windows ``[[low, high], ...]``, one input channel each
            (:class:`~fvlm.models.intensity_windows.IntensityWindows`); ``None`` feeds the cached
            intensities as one channel (the paper).
        source_hu_window: The HU window the cache maps to [0, 1] (preprocessing ``hu_window``);
            required with ``hu_windows``.
    """

    img_size: Triple = (96, 256, 384)
    patch_size: Triple = (16, 16, 32)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    checkpoint_activations: bool = False
    init_from: str | None = field(default=None)
    hu_windows: list[tuple[float, float]] | None = None
    source_hu_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so configs compare and hash predictably.
        self.img_size = _triple(self.img_size, "img_size")
        self.patch_size = _triple(self.patch_size, "patch_size")
        for name, size, patch in zip("DHW", self.img_size, self.patch_size, strict=True):
            if size % patch:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size} "
                    f"on axis {name}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if min(self.hidden_size, self.mlp_dim, self.num_layers, self.num_heads) < 1:
            raise ValueError("hidden_size, mlp_dim, num_layers and num_heads must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.hu_windows is not None:
            if self.source_hu_window is None:
                raise ValueError(
                    "hu_windows needs source_hu_window, the HU range the cache maps to [0, 1] "
                    "(the preprocessing hu_window)"
                )
            self.source_hu_window = (
                float(self.source_hu_window[0]),
                float(self.source_hu_window[1]),
            )
            self.hu_windows = check_windows(self.hu_windows, self.source_hu_window)

    @property
    def in_channels(self) -> int:
        """Input channels of the patch embedding: one per HU window, else 1."""
        return len(self.hu_windows) if self.hu_windows else 1

    @classmethod
    def preset(cls, name: VisionPreset, **overrides: object) -> VisionConfig:
        """Build a named preset (``vit_base`` = paper, ``vit_tiny`` = CPU) with field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; choose one of {sorted(_PRESETS)}")
        return replace(cls(**_PRESETS[name]), **overrides)  # type: ignore[arg-type]

    @classmethod
    def vit_base(cls, **overrides: object) -> VisionConfig:
        """The paper's ViT-B (768/3072/12/12) on the 96x256x384 crop with 16x16x32 patches."""
        return cls.preset("vit_base", **overrides)

    @classmethod
    def vit_tiny(cls, **overrides: object) -> VisionConfig:
        """A 64-wide, 2-layer ViT on a 16x32x32 crop with 4x8x8 patches, for tests and demos."""
        return cls.preset("vit_tiny", **overrides)

    @property
    def grid_size(self) -> Triple:
        """Token grid ``(d, h, w)`` of ``img_size``."""
        return grid_of(self.img_size, self.patch_size)


def _triple(value: object, name: str) -> Triple:
    items = tuple(int(v) for v in value)  # type: ignore[attr-defined]
    if len(items) != 3 or min(items) < 1:
        raise ValueError(f"{name} must be three positive ints (D, H, W), got {value!r}")
    return items  # type: ignore[return-value]


def grid_of(shape: tuple[int, ...], patch_size: tuple[int, ...]) -> Triple:
    """Token grid of a ``(D, H, W)`` volume; raises when a side is not a multiple of the patch.

    A partial patch would silently drop voxels at the border (a Conv3d floors), so that an anatomy
    lying there would have voxels but no token; the crop must be a multiple instead.
    """
    if len(shape) != 3 or any(s % p for s, p in zip(shape, patch_size, strict=True)):
        raise ValueError(
            f"volume shape {tuple(shape)} must be three sides divisible by patch {patch_size}"
        )
    return tuple(s // p for s, p in zip(shape, patch_size, strict=True))  # type: ignore[return-value]


class ViTBlock(nn.Module):
    """Pre-norm ViT block composed of MONAI's public ``SABlock`` and ``MLPBlock``.

    MONAI's own ``TransformerBlock`` also builds a cross-attention LayerNorm that self-attention
    never uses; its parameters would get no gradient, which DDP (``find_unused_parameters=False``)
    rejects. Composing the two blocks keeps the same parameter names (``norm1``, ``attn``,
    ``norm2``, ``mlp``), hence the same checkpoints, without touching MONAI's attributes.

    Attention uses fused ``scaled_dot_product_attention`` when ``dropout`` is 0. MONAI passes its
    dropout rate to that call whatever ``self.training`` says, so with dropout the block takes
    MONAI's explicit path instead, whose ``nn.Dropout`` follows train/eval: evaluation stays
    deterministic without setting anything inside MONAI's modules.
    """

    def __init__(
        self, hidden_size: int, mlp_dim: int, num_heads: int, dropout: float, qkv_bias: bool
    ) -> None:
        """Build one block (creation order as MONAI's, so a seed gives the same weights)."""
        super().__init__()
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SABlock(
            hidden_size,
            num_heads,
            dropout,
            qkv_bias=qkv_bias,
            use_flash_attention=dropout == 0.0,
        )
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``; ``(B, N, C)`` in and out."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3D(nn.Module):
    """A plain 3D ViT returning all patch tokens (no CLS): anatomy pooling needs every token.

    Built from MONAI's ``PatchEmbeddingBlock`` (Conv3d patchify + learned position embeddings) and
    :class:`ViTBlock` layers (pre-norm, fused qkv, SDPA attention), followed by a final LayerNorm,
    so the parameter layout follows timm's ViT closely enough for :func:`load_2d_checkpoint`.
    """

    def __init__(self, config: VisionConfig | None = None) -> None:
        """Build the encoder; inflates ``config.init_from`` when it is set.

        Args:
            config: Encoder shape; ``None`` gives the paper's ViT-B.
        """
        super().__init__()
        self.config = config = config or VisionConfig()
        # VisionConfig guarantees source_hu_window whenever hu_windows is set.
        self.windows = (
            IntensityWindows(config.hu_windows, config.source_hu_window)  # type: ignore[arg-type]
            if config.hu_windows
            else None
        )
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=config.in_channels,
            img_size=config.img_size,
            patch_size=config.patch_size,
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=config.dropout,
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList(
            ViTBlock(
                config.hidden_size,
                config.mlp_dim,
                config.num_heads,
                dropout=config.dropout,
                qkv_bias=config.qkv_bias,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.blocks.apply(_init_vit_weights)
        # CT intensities are absolute (HU). A homogeneous patch embeds as c * sum(w) + b, and the
        # LayerNorms keep only its direction, which for a near-zero bias does not depend on the
        # intensity c: fatty and healthy liver would look alike. A bias of the same order as
        # c * sum(w) makes the direction, hence the token, depend on c from the first step.
        nn.init.normal_(self.patch_embedding.patch_embeddings.bias, std=0.5)
        if config.init_from:
            load_2d_checkpoint(self, read_init_source(config.init_from))

    @property
    def grid_size(self) -> Triple:
        """Token grid ``(d, h, w)`` of the configured crop; ``N = d * h * w`` tokens."""
        return self.config.grid_size

    @property
    def patch_size(self) -> Triple:
        """Patch ``(D, H, W)`` in voxels."""
        return self.config.patch_size

    @property
    def hidden_size(self) -> int:
        """Token width ``C``."""
        return self.config.hidden_size

    def position_embeddings(self, grid: Triple) -> torch.Tensor:
        """Position embeddings ``(1, N, C)`` for ``grid``, trilinearly resized when it differs."""
        pos = self.patch_embedding.position_embeddings
        if tuple(grid) == self.grid_size:
            return pos
        return _resize_grid_embedding(pos, self.grid_size, grid)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Encode a volume into patch tokens.

        Args:
            image: ``(B, 1, D, H, W)`` intensities, sides divisible by ``patch_size``.

        Returns:
            Tokens ``(B, N, C)`` after the final LayerNorm, ``N = d * h * w`` in row-major
            ``(d, h, w)`` order (the order :func:`fvlm.models.token_membership` uses).
        """
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"image must be (B, 1, D, H, W), got {tuple(image.shape)}")
        grid = grid_of(tuple(image.shape[2:]), self.patch_size)
        if self.windows is not None:
            image = self.windows(image)
        embed = self.patch_embedding
        x = embed.patch_embeddings(image).flatten(2).transpose(1, 2)
        x = embed.dropout(x + self.position_embeddings(grid))
        use_checkpoint = self.config.checkpoint_activations and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        return self.norm(x)


def _init_vit_weights(module: nn.Module) -> None:
    # timm/MAE initialisation: PyTorch's default Linear init is too wide for deep pre-norm stacks.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _resize_grid_embedding(pos: torch.Tensor, old: Triple, new: Triple) -> torch.Tensor:
    channels = pos.shape[-1]
    volume = pos.reshape(1, *old, channels).permute(0, 4, 1, 2, 3)
    volume = F.interpolate(volume, size=new, mode="trilinear", align_corners=False)
    return volume.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new), channels)


# --------------------------------------------------------------------------------------------------
# Inflation of 2D ViT / MAE checkpoints
# --------------------------------------------------------------------------------------------------


@dataclass
class CheckpointReport:
    """What :func:`load_2d_checkpoint` did, so a run can log and tests can assert it.

    Attributes:
        loaded: Model keys that received a checkpoint value (inflated or copied).
        skipped: Checkpoint keys that were not used, with the reason.
        missing: Model keys that kept their fresh initialisation.
    """

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


# timm / MAE block names -> ViTBlock names (same tensor layouts: MONAI's fused qkv splits
# its output features as (qkv, head, dim) exactly like timm's).
_BLOCK_RENAMES = (
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"blocks.\1.norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"blocks.\1.norm2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"blocks.\1.attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"blocks.\1.attn.out_proj.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), r"blocks.\1.mlp.linear1.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"blocks.\1.mlp.linear2.\2"),
    (re.compile(r"^norm\.(weight|bias)$"), r"norm.\1"),
    (re.compile(r"^patch_embed\.proj\.bias$"), "patch_embedding.patch_embeddings.bias"),
)
_PATCH_KERNEL = "patch_embedding.patch_embeddings.weight"
_POSITION = "patch_embedding.position_embeddings"


def inflate_patch_kernel(
    kernel_2d: torch.Tensor, patch_size: Triple, rgb: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Turn a 2D RGB patch kernel ``(C, 3, p, q)`` into a grey 3D kernel ``(C, 1, pD, pH, pW)``.

    The colour channels are averaged (``rgb="mean"``) or summed (``"sum"``: a grey image fed as
    three equal channels), the ``p x q`` plane is resized to the axial patch ``(pH, pW)`` when it
    differs, and the result is repeated over the ``pD`` slices divided by ``pD``. Each output
    filter's sum equals the reduced 2D filter's sum exactly, so the response to a constant volume
    equals the 2D response to a constant image: the pretrained features start on their usual scale.

    Args:
        kernel_2d: timm ``patch_embed.proj.weight``.
        patch_size: Target ``(pD, pH, pW)``.
        rgb: How to reduce the colour channels.

    Returns:
        The inflated kernel, same dtype.
    """
    if kernel_2d.ndim != 4:
        raise ValueError(f"2D patch kernel must be (C, in, p, q), got {tuple(kernel_2d.shape)}")
    if rgb not in ("mean", "sum"):
        raise ValueError(f"rgb must be 'mean' or 'sum', got {rgb!r}")
    depth, height, width = patch_size
    grey = kernel_2d.float().mean(1) if rgb == "mean" else kernel_2d.float().sum(1)  # (C, p, q)
    if grey.shape[-2:] != (height, width):
        target = grey.sum((-2, -1), keepdim=True)
        resized = F.interpolate(grey[:, None], size=(height, width), mode="bicubic")[:, 0]
        resized = resized * (grey[0].numel() / resized[0].numel())
        # Spread the (small) interpolation error uniformly so the filter sum stays exact.
        grey = resized + (target - resized.sum((-2, -1), keepdim=True)) / (height * width)
    kernel = grey[:, None, None].expand(-1, 1, depth, -1, -1) / depth
    return kernel.contiguous().to(kernel_2d.dtype)


def inflate_position_embedding(pos_2d: torch.Tensor, grid: Triple) -> torch.Tensor:
    """Map 2D position embeddings ``(1, [1 +] n*n, C)`` to a 3D grid ``(1, d*h*w, C)``.

    A leading CLS entry (``1 + n*n`` rows) is dropped. The ``n x n`` table is bicubically resized to
    the axial grid ``(h, w)`` and repeated over the ``d`` slabs: the 2D embedding only knows
    in-plane position, so slabs start equal and the (trainable) table learns depth from the data.
    """
    if pos_2d.ndim == 2:
        pos_2d = pos_2d[None]
    tokens, channels = pos_2d.shape[-2:]
    side = math.isqrt(tokens)
    if side * side != tokens:
        side = math.isqrt(tokens - 1)
        if side * side != tokens - 1:
            raise ValueError(f"pos_embed with {tokens} rows is neither n*n nor 1+n*n")
        pos_2d = pos_2d[:, 1:]
    depth, height, width = grid
    table = pos_2d.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    if (side, side) != (height, width):
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1)[:, None].expand(1, depth, height, width, channels)
    return table.reshape(1, depth * height * width, channels).to(pos_2d.dtype)


#: Endings that make ``init_from`` a file path rather than a timm model name.
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pkl")
#: Widths from which a randomly initialised tower is worth a warning (ViT-B, the paper's).
PAPER_WIDTH = 768


def read_init_source(init_from: str | Path) -> Path | dict[str, torch.Tensor]:
    """Where ``VisionConfig.init_from`` points: a local file, else a timm model's weights.

    An existing path (or a string that looks like one: a folder separator or a checkpoint suffix)
    is returned as a path for :func:`load_2d_checkpoint`. Anything else must be a timm model name
    with pretrained weights (``vit_base_patch16_224.mae``); ``timm.create_model(name,
    pretrained=True)`` fetches them through the Hugging Face hub, or reads timm's cache offline.

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: Neither a file nor a timm model name.
        RuntimeError: timm could not get the weights (offline and not cached); the message says
            how to save them to a local file on a machine with network access.
    """
    text = str(init_from)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if "/" in text or "\\" in text or text.endswith(_CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"vision init_from {text!r}: no such checkpoint file")
    import timm  # only named checkpoints need it

    if not timm.is_model(text):
        raise ValueError(
            f"vision init_from {text!r}: neither a checkpoint file nor a timm model name "
            "(e.g. vit_base_patch16_224.mae, the paper's MAE ViT-B)"
        )
    try:
        model = timm.create_model(text, pretrained=True)
    except Exception as err:  # hub, network and cache errors vary by version
        save = (
            'python -c "import timm, safetensors.torch as st; st.save_file(timm.create_model('
            f"'{text}', pretrained=True).state_dict(), '{text}.safetensors')\""
        )
        raise RuntimeError(
            f"vision init_from {text!r}: timm could not fetch the pretrained weights "
            f"({type(err).__name__}: {str(err)[:200]}). Offline, save them where the network is "
            f"reachable with `{save}` and set init_from to that file's path"
        ) from err
    return {k: v.detach() for k, v in model.state_dict().items()}


def warn_if_uninitialised(config: VisionConfig) -> bool:
    """Log a warning when a ViT-B-wide tower trains from random weights; return whether it did.

    The paper initialises its ViT-B from MAE ImageNet-1K weights (A.2); a run of that shape
    without ``init_from`` is almost always a forgotten option rather than a choice.
    """
    if config.hidden_size < PAPER_WIDTH or config.init_from:
        return False
    log.warning(
        "the %d-wide vision tower trains from random weights: the paper starts from MAE "
        "ImageNet-1K (vision init_from: vit_base_patch16_224.mae, or a local checkpoint file)",
        config.hidden_size,
    )
    return True


def _read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(source))
    else:
        # MAE's training checkpoints also pickle their argparse Namespace; allow just that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(source, map_location="cpu", weights_only=True)
    # MAE saves {"model": ...}, Lightning/other trainers {"state_dict": ...}; DDP adds "module.".
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_2d_checkpoint(
    model: VisionTransformer3D,
    source: str | Path | Mapping[str, torch.Tensor],
    rgb: Literal["mean", "sum"] = "mean",
) -> CheckpointReport:
    """Initialise a :class:`VisionTransformer3D` from a 2D timm-style ViT or MAE checkpoint.

    The paper starts from MAE ImageNet-1K ViT-B weights. Patch kernel and position embeddings are
    inflated (:func:`inflate_patch_kernel`, :func:`inflate_position_embedding`); transformer blocks
    and the final norm are copied where names and shapes correspond (MAE's fine-tuned ``fc_norm``
    stands in for ``norm`` when the latter is absent). Everything else (CLS token, MAE decoder,
    heads, blocks beyond the model's depth, shape mismatches) is skipped with a reason.

    Args:
        model: The encoder to initialise in place.
        source: Path to a ``.pth``/``.pt``/``.safetensors`` file or an in-memory state dict.
        rgb: Colour reduction of the patch kernel, see :func:`inflate_patch_kernel`.

    Returns:
        Which keys were loaded, skipped and left at their initialisation.
    """
    state = _read_state_dict(source)
    if "norm.weight" not in state and "fc_norm.weight" in state:
        state["norm.weight"] = state.pop("fc_norm.weight")
        state["norm.bias"] = state.pop("fc_norm.bias")
    own = model.state_dict()
    report = CheckpointReport()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "patch_embed.proj.weight":
            kernel = inflate_patch_kernel(value, model.patch_size, rgb)
            # K windows of one grey volume: each channel gets the grey filter / K, so a volume
            # that looks the same in every window still gets the pretrained response.
            channels = model.config.in_channels
            target, value = _PATCH_KERNEL, kernel.repeat(1, channels, 1, 1, 1) / channels
        elif key == "pos_embed":
            target, value = _POSITION, inflate_position_embedding(value, model.grid_size)
        else:
            target = next((p.sub(r, key) for p, r in _BLOCK_RENAMES if p.match(key)), None)
            if target is None:
                report.skipped[key] = "no counterpart in the 3D model"
                continue
        if target not in own:
            report.skipped[key] = f"model has no {target}"
        elif own[target].shape != value.shape:
            report.skipped[key] = (
                f"shape {tuple(value.shape)} does not fit {target} {tuple(own[target].shape)}"
            )
        else:
            new[target] = value.to(own[target].dtype)
            report.loaded.append(target)
    model.load_state_dict(new, strict=False)
    report.missing = [k for k in own if k not in new]
    log.info(
        "2D checkpoint: loaded %d tensors, skipped %d, %d left at init (%s)",
        len(report.loaded),
        len(report.skipped),
        len(report.missing),
        ", ".join(report.missing[:8]) + (" ..." if len(report.missing) > 8 else ""),
    )
    return report
