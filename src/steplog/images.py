"""Images as PNG bytes, encoded at the call: arrays and tensors the way TensorBoard reads them.

An image is a 2-D (``HW``) or 3-D (``HWC``, ``CHW``, ...) array with 1, 3 or 4 channels (grey,
RGB, RGBA). As in TensorBoard's ``add_image``, ``uint8`` values are taken as they are and any
other dtype is taken to be in ``[0, 1]``: it is scaled by 255, clipped and rounded to the
nearest level (TensorBoard truncates; the two differ by at most one level). The PNG is written
with the standard library (``zlib``); numpy is needed, and is imported only when an image is
logged.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import Any

__all__ = ["encode_png"]

_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}
"""PNG colour type per channel count: greyscale, truecolour, truecolour with alpha."""


def encode_png(image: Any, dataformats: str = "HWC") -> bytes:
    """The PNG encoding of ``image`` as it is now (a torch tensor is copied to the host).

    ``dataformats`` names the axes: ``"HW"``/``"WH"``, or a permutation of ``"CHW"``. Raises
    ``ValueError`` for a shape that does not match it or a channel count other than 1, 3 or 4, and
    ``TypeError`` for a value that is not an array of real numbers.
    """
    pixels = _hwc_uint8(image, dataformats)
    height, width, channels = pixels.shape
    np = sys.modules["numpy"]
    rows = np.zeros((height, width * channels + 1), dtype=np.uint8)  # filter byte 0 per row
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", header),
        _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)),
        _chunk(b"IEND", b""),
    ))  # fmt: skip


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_GRID_COLUMNS = 8
"""Images per row of a batch's grid (as TensorBoard draws one)."""


def _grid(batch: Any) -> Any:
    """A ``(N, C, H, W)`` batch as one ``(C, rows * H, columns * W)`` image: the images in
    rows of up to :data:`_GRID_COLUMNS`, the rest of the last row black; one channel becomes
    three, as TensorBoard draws a batch."""
    import numpy as np

    n, channels, height, width = batch.shape
    if n == 0:
        raise ValueError(f"an image batch must not be empty, got shape {batch.shape} "
                         "read as NCHW")
    if channels == 1:
        batch = np.repeat(batch, 3, axis=1)
        channels = 3
    columns = min(n, _GRID_COLUMNS)
    rows = -(-n // columns)
    canvas = np.zeros((channels, rows * height, columns * width), dtype=batch.dtype)
    for i in range(n):
        row, column = divmod(i, columns)
        canvas[:, row * height:(row + 1) * height, column * width:(column + 1) * width] = batch[i]
    return canvas


def _hwc_uint8(image: Any, dataformats: str) -> Any:
    """``image`` as a ``(height, width, channels)`` uint8 array."""
    if not isinstance(dataformats, str):
        raise TypeError(f"dataformats must be a str, got {type(dataformats).__name__}")
    fmt = dataformats.upper()
    if sorted(fmt) not in (["H", "W"], ["C", "H", "W"], ["C", "H", "N", "W"]):
        raise ValueError(f"dataformats must be HW, WH, a permutation of CHW, or of NCHW (a "
                         f"batch, drawn as a grid), got {dataformats!r}")
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with every array library
        raise TypeError("logging an image needs numpy") from None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32,
                                                             torch.float64):
            image = image.float()  # bfloat16, float8: dtypes numpy lacks
        image = image.numpy()
    try:
        array = np.asarray(image)
    except Exception as exc:
        raise TypeError(f"an image must be an array of numbers, got {type(image).__name__}: "
                        f"{exc}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"an image must hold real numbers, got dtype {array.dtype}")
    if array.ndim != len(fmt):
        raise ValueError(f"an image of dataformats {dataformats!r} has {len(fmt)} dimensions, "
                         f"got shape {array.shape}")
    if len(fmt) == 4:
        array = _grid(array.transpose([fmt.index(axis) for axis in "NCHW"]))
        fmt = "CHW"
    if len(fmt) == 2:
        array = array[..., None]
        fmt += "C"
    array = array.transpose([fmt.index(axis) for axis in "HWC"])
    if array.shape[2] not in _COLOUR_TYPES:
        raise ValueError(f"an image has 1, 3 or 4 channels, got {array.shape[2]} "
                         f"(shape {array.shape} read as HWC)")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"an image must not be empty, got shape {array.shape} read as HWC")
    if array.dtype != np.uint8:
        scaled = np.nan_to_num(array.astype(np.float32) * 255.0, nan=0.0)
        # Rounded, not truncated: a float16 k/255 lies just below k/255 and would lose a level.
        array = np.rint(np.clip(scaled, 0, 255)).astype(np.uint8)
    return np.ascontiguousarray(array)
