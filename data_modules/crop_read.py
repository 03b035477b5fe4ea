"""Reading one crop of a cached volume: only its bytes, in the cache's dtype, padding left undone.

A training crop (96 x 256 x 384 voxels in the paper) is read once per sample, and the loader's
CPU budget per sample is a few milliseconds if a GPU is to be kept busy. So the crop leaves the
reader exactly as stored (float16 image, uint8 anatomy map): the float32 conversion and the zero
padding where the crop overruns the volume are done on the device, on the whole batch at once
(:func:`fvlm.data_modules.collate.finish_crops`). The reader only writes the crop's voxels that lie
inside the volume and reports that window (the *extent*); the rest of the crop is left undefined.

A ``.npy`` memory map of the cache is read with explicit ``preadv`` calls of the crop's rows,
one per slice (or one for the whole crop when it spans whole slices), with kernel readahead off
(``POSIX_FADV_RANDOM``): the bytes read are those of the 4 KiB pages the crop's rows span, and
no page is mapped into the process. Any other array (in memory, a view) is sliced instead.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Sequence

import numpy as np

from fvlm.crop import crop_pad_width
from fvlm.preprocess.cache import CacheError

__all__ = ["read_crop_window"]

_SCRATCH = threading.local()


def read_crop_window(
    array: np.ndarray,
    start: Sequence[int],
    crop_size: Sequence[int],
    flip: Sequence[int] = (),
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The crop of a 3D ``array`` at ``start``, in ``array``'s dtype, padding not written.

    Args:
        array: ``(D, H, W)`` volume, e.g. a cache memory map (``np.load(..., mmap_mode="r")``).
        start: Crop start ``(3,)`` (negative where the crop pads before the volume).
        crop_size: Crop ``(d, h, w)``.
        flip: Spatial axes ``0..2`` mirrored (as :func:`fvlm.crop.crop_array` mirrors them).
        out: ``crop_size`` array of ``array``'s dtype to write into (e.g. a row of a batch);
            a new one by default.

    Returns:
        ``(crop, extent)``: the ``crop_size`` array whose window ``extent`` (``(3, 2)`` int64,
        half-open ``[lo, hi)`` per axis, already mirrored on flipped axes) holds the volume's
        voxels exactly as :func:`fvlm.crop.crop_array` would place them; outside it the values
        are undefined (:func:`~fvlm.data_modules.collate.finish_crops` zeroes them).
    """
    if np.ndim(array) != 3:
        raise ValueError(f"array must be 3D (D, H, W), got shape {np.shape(array)}")
    crop = tuple(int(c) for c in crop_size)
    source, target, _ = crop_pad_width(array.shape, start, crop)
    extent = np.array([[t.start, t.stop] for t in target], dtype=np.int64)
    if out is None:
        out = np.empty(crop, dtype=array.dtype)
    elif out.shape != crop or out.dtype != array.dtype:
        raise ValueError(f"out must be {crop} {array.dtype}, got {out.shape} {out.dtype}")
    if any(s.stop <= s.start for s in source):
        return out, extent
    flip = tuple(int(a) for a in flip)
    for axis in flip:  # mirror the window: voxel i of the crop goes to crop - 1 - i
        extent[axis] = crop[axis] - extent[axis, ::-1]
    window = out[tuple(slice(int(lo), int(hi)) for lo, hi in extent)]
    if _readable_file(array):
        rows = _read_rows(array, source)  # (d, h, W): the crop's rows, whole
        values = rows[..., source[2]]
    else:
        values = array[source]
    window[...] = np.flip(values, axis=flip) if flip else values
    return out, extent


def _readable_file(array: np.ndarray) -> bool:
    """A whole, C-ordered ``.npy`` memory map whose bytes can be read from its file directly."""
    return (
        hasattr(os, "preadv")
        and isinstance(array, np.memmap)
        and isinstance(array.base, mmap.mmap)  # not a view: offset and shape are the file's
        and array.filename is not None
        and array.flags.c_contiguous
    )


def _read_rows(array: np.memmap, source: tuple[slice, ...]) -> np.ndarray:
    """Rows ``source[1]`` of slices ``source[0]``, whole width, read from the file.

    The result is scratch memory (see :func:`_staging`): valid until this thread's next read.

    Rows narrower than a page cannot be read in part at page granularity anyway, so reading them
    whole costs no extra storage reads and keeps one read per slice.
    """
    depth, height, width = array.shape
    z, y = source[0], source[1]
    item = array.dtype.itemsize
    rows = _staging((z.stop - z.start, y.stop - y.start, width), array.dtype)
    buffer = memoryview(rows).cast("B")
    slice_bytes, span = height * width * item, (y.stop - y.start) * width * item
    first = array.offset + (z.start * height + y.start) * width * item
    path = str(array.filename)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):  # no readahead: read the crop's pages, not their next
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if span == slice_bytes:  # whole slices: one contiguous run of the file
            _read_into(fd, buffer, first, path)
        else:
            for k in range(rows.shape[0]):
                _read_into(fd, buffer[k * span : (k + 1) * span], first + k * slice_bytes, path)
    finally:
        os.close(fd)
    return rows


def _staging(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A scratch array of ``shape``, reused by this thread's later reads.

    A fresh one per read would cost the kernel a page fault and a zeroed page for every 4 KiB
    of it, on every sample: about as much as the read itself.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _SCRATCH.buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes].view(dtype).reshape(shape)


def _read_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fill ``buffer`` from byte ``offset`` of the open file, however the reads are split."""
    while buffer.nbytes:
        count = os.preadv(fd, [buffer], offset)
        if count == 0:
            raise CacheError(f"{path}: file ends at byte {offset}, inside the crop (truncated?)")
        buffer, offset = buffer[count:], offset + count
