"""Summary statistics of an array or tensor, as scalars a logger stores: what steplog logs where
TensorBoard would draw a histogram.

A torch tensor is reduced on its own device and the results stay 0-d tensors there, so a CUDA
tensor costs no host synchronisation (``log_metrics`` copies them without waiting); anything else
goes through numpy (imported only here, when such a value is logged).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["STATISTICS", "summary_statistics"]

STATISTICS = ("min", "max", "mean", "std")
"""The statistics logged for ``name``, as ``name/min``, ``name/max``, ``name/mean``,
``name/std`` (the population standard deviation)."""


def summary_statistics(name: str, values: Any) -> dict[str, Any]:
    """``{name/min, name/max, name/mean, name/std}`` of ``values`` as they are now (an array,
    a tensor, or a sequence of numbers). Raises ``ValueError`` when there are none and
    ``TypeError`` when they are not real numbers."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return _tensor_statistics(torch, name, values)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with every array library
        raise TypeError("summary statistics of a sequence need numpy") from None
    try:
        array = np.asarray(values)
    except Exception as exc:
        raise TypeError(f"{name}: expected an array of numbers, got {type(values).__name__}: "
                        f"{exc}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{name}: no values to summarise (empty array)")
    # Reduced in float64 without a float64 copy of the whole array (std needs one temporary).
    return {f"{name}/min": float(array.min()), f"{name}/max": float(array.max()),
            f"{name}/mean": float(array.mean(dtype=np.float64)),
            f"{name}/std": float(array.std(dtype=np.float64))}


def _tensor_statistics(torch: Any, name: str, tensor: Any) -> dict[str, Any]:
    if tensor.is_complex():
        raise TypeError(f"{name}: expected real numbers, got a complex tensor")
    if tensor.numel() == 0:
        raise ValueError(f"{name}: no values to summarise (empty tensor)")
    t = tensor.detach()
    if t.device.type == "cpu" or not t.is_floating_point():
        t = t.double() if t.device.type == "cpu" else t.float()
    low, high = torch.aminmax(t)
    return {f"{name}/min": low, f"{name}/max": high, f"{name}/mean": t.mean(),
            f"{name}/std": t.std(correction=0)}
