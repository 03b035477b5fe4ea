"""Several HU windows of one CT volume as input channels of the vision encoder.

One window cannot show everything a radiologist reads: the lung window that keeps emphysema
(-950 vs -850 HU) visible squeezes soft tissue into a few percent of the range (fatty liver, 25 vs
110 HU) and clips stones and calcifications (~900 HU) to the value of bone. Radiologists switch
windows; a network can see them side by side. The cache stores one wide window mapped to [0, 1]
(preprocessing's ``hu_window``); this module maps it back to HU and re-windows it into ``K``
channels on the fly, so the cache stays one channel and the windows are a model choice saved in
its checkpoint. It has no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["IntensityWindows", "check_source_window", "check_windows"]

Window = tuple[float, float]


def check_windows(windows: Sequence[Sequence[float]], source: Sequence[float]) -> list[Window]:
    """Validate ``(low, high)`` HU windows against the cache's window and return them as tuples.

    A window outside the cached range would give a constant channel (the cache clipped those
    values away), which is always a configuration mistake, so it is an error.
    """
    src = tuple(float(v) for v in source)
    if len(src) != 2 or src[0] >= src[1]:
        raise ValueError(f"source HU window must be (low, high) with low < high, got {source!r}")
    if not windows:
        raise ValueError("need at least one HU window")
    out: list[Window] = []
    for window in windows:
        low, high = (float(v) for v in window)
        if low >= high:
            raise ValueError(f"HU window {tuple(window)} must have low < high")
        if high <= src[0] or low >= src[1]:
            raise ValueError(
                f"HU window {tuple(window)} lies outside the cached window {src}: its channel "
                "would be constant (preprocess with a wider hu_window)"
            )
        out.append((low, high))
    return out


def check_source_window(
    source: Sequence[float] | None, cache_window: Sequence[float] | None, cache: object
) -> None:
    """Fail when a model's ``source_hu_window`` is not the window ``cache`` was preprocessed with.

    A mismatch would not crash anything: every channel would just be shifted and scaled wrongly.
    """
    if source is None or cache_window is None:
        return
    if tuple(float(v) for v in source) != tuple(float(v) for v in cache_window):
        raise ValueError(
            f"the model re-windows intensities cached over {tuple(source)} HU, but {cache} was "
            f"preprocessed with hu_window {tuple(cache_window)}: set vision.source_hu_window to "
            "match (or preprocess again)"
        )


class IntensityWindows(nn.Module):
    """``(B, 1, D, H, W)`` cached intensities in [0, 1] -> ``(B, K, D, H, W)`` windowed channels."""

    def __init__(self, windows: Sequence[Sequence[float]], source: Sequence[float]) -> None:
        """Set the windows.

        Args:
            windows: ``K`` HU windows ``(low, high)``; channel ``k`` is ``clip((HU - low) /
                (high - low), 0, 1)``.
            source: The HU window the cache mapped to [0, 1] (preprocessing ``hu_window``).
        """
        super().__init__()
        self.windows = check_windows(windows, source)
        self.source = (float(source[0]), float(source[1]))
        low = torch.tensor([w[0] for w in self.windows])
        width = torch.tensor([w[1] - w[0] for w in self.windows])
        # channel = clip(x * scale + shift, 0, 1): one fused affine map per channel.
        src_low, src_width = self.source[0], self.source[1] - self.source[0]
        self.register_buffer("scale", (src_width / width).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer(
            "shift", ((src_low - low) / width).view(1, -1, 1, 1, 1), persistent=False
        )

    @property
    def num_channels(self) -> int:
        """``K``, the encoder's input channels."""
        return len(self.windows)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Re-window a single-channel volume (any float dtype; the output keeps it)."""
        if image.ndim != 5 or image.shape[1] != 1:
            raise ValueError(f"image must be (B, 1, D, H, W), got {tuple(image.shape)}")
        scale = self.scale.to(image.dtype)
        shift = self.shift.to(image.dtype)
        # One fused multiply-add into a fresh tensor, clamped in place: the channels are the
        # largest activation of a small encoder, so no temporaries (~8x faster on CPU than
        # multiply, add and clamp as three tensors).
        return torch.addcmul(shift, image, scale).clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        """Show the windows in ``print(model)``."""
        return f"windows={self.windows}, source={self.source}"
