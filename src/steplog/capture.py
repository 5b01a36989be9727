"""Call-time capture: turn what training code passes into values that cannot change later.

Everything here runs on the caller's thread, so it must be cheap and must never force a GPU
synchronisation. ``torch`` and ``numpy`` are looked up in ``sys.modules`` only: if the caller
never imported them, no value can be one of their types and steplog never imports them.
"""

from __future__ import annotations

import copy
import numbers
import os
import sys
import threading
from typing import Any, SupportsFloat

import msgspec

__all__ = [
    "STEP_MAX",
    "STEP_MIN",
    "PendingValue",
    "capture_object",
    "capture_param",
    "capture_step",
    "capture_value",
]


class _PinnedSlots:
    """Pinned host slots for scalars copied off a GPU, each with its own event, per device and
    dtype, reused once the worker has read them.

    Slots are allocated by the worker, a chunk at a time, and kept: the caller only takes a free
    one, so a capture never allocates pinned memory (an allocation may wait for the device).
    """

    CHUNK = 1024
    LOW = CHUNK // 4
    """The worker adds a chunk when fewer slots than this are free."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, Any], list[tuple[Any, Any]]] = {}
        self._grow_lock = threading.Lock()
        self.allocated: dict[tuple[Any, Any], int] = {}
        """Slots allocated so far, per ``(device, dtype)``."""

    def take(self, device: Any, dtype: Any) -> tuple[Any, Any] | None:
        """A free ``(0-d pinned tensor, event)`` for ``dtype`` values from ``device``, or
        ``None`` when there is none yet."""
        free = self._free.get((device, dtype))
        try:
            return free.pop() if free is not None else None  # atomic under the GIL
        except IndexError:
            return None

    def give(self, key: tuple[Any, Any], slot: tuple[Any, Any]) -> None:
        self._free[key].append(slot)

    def replenish(self, torch: Any, key: tuple[Any, Any]) -> None:
        """Worker only: add a chunk of slots for ``key`` when few are free."""
        free = self._free.get(key)
        if free is not None and len(free) >= self.LOW:
            return
        with self._grow_lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.LOW:
                ring = torch.empty(self.CHUNK, dtype=key[1], pin_memory=True)
                free[:0] = [(ring[i], torch.cuda.Event(blocking=True))
                            for i in range(self.CHUNK)]
                self.allocated[key] = self.allocated.get(key, 0) + self.CHUNK


_SLOTS = _PinnedSlots()

_SIDE: dict[Any, Any] = {}
"""A stream per device on which the worker reads values copied on the device: a read on the
default stream would wait for all the training work queued before it."""

_FORKED = False
"""True in a child forked from the process that captured values: their CUDA state is not its."""


def _forked() -> None:
    global _FORKED
    _FORKED = True


os.register_at_fork(after_in_child=_forked)

_STREAMS: dict[tuple[int, int, int], Any] = {}
"""Stream objects by ``(stream id, device index, device type)``: building one costs more than
the copy it orders."""


def _current_stream(torch: Any, device: Any) -> Any:
    """The current stream of ``device``, as a cached ``torch.cuda.Stream``."""
    current = getattr(torch._C, "_cuda_getCurrentStream", None)
    if current is None:  # a torch without it: the public call
        return torch.cuda.current_stream(device)
    key = current(device.index)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= 64:  # a caller that makes a new stream per step
            _STREAMS.clear()
        stream = _STREAMS[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1],
                                                   device_type=key[2])
    return stream


class PendingValue:
    """A scalar still on an accelerator: its copy to host memory was queued at the call.

    ``resolve()`` (worker only) waits for that copy, not for the whole device, and returns the
    float. The caller's thread never waits.
    """

    __slots__ = ("_event", "_host", "_key")

    def __init__(self, tensor: Any) -> None:
        torch = sys.modules["torch"]
        src = tensor.detach()
        if src.dim():
            src = src.reshape(())
        device = src.device
        self._key: tuple[Any, Any] | None = None
        if device.type == "cuda":
            # A non-blocking copy into a pinned slot and an event after it, both on the current
            # stream of the tensor's device (where the kernels that computed it were queued):
            # the worker waits on the event, so the training thread never synchronises.
            stream = _current_stream(torch, device)
            slot = _SLOTS.take(device, src.dtype)
            if slot is not None:
                self._key = (device, src.dtype)
                self._host, self._event = slot
                self._host.copy_(src, non_blocking=True)
            else:  # no free slot yet: a copy on the device, read (and slots added) by the worker
                self._host = src.clone()
                self._event = torch.cuda.Event(blocking=True)
            self._event.record(stream)
        else:
            # Other devices: snapshot on the device (asynchronous there); read on the worker.
            self._host = src.clone()
            self._event = None

    def resolve(self) -> float:
        """The captured value as a float; blocks the calling (worker) thread until it is copied."""
        event = self._event
        if event is None:
            return float(self._host.item())
        event.synchronize()
        torch = sys.modules["torch"]
        key = self._key
        if key is not None:
            value = float(self._host.item())
            self._key = None
            _SLOTS.give(key, (self._host, event))
        else:  # a copy on the device: read it on a side stream, not behind the training work
            device = self._host.device
            side = _SIDE.get(device)
            if side is None:
                side = _SIDE[device] = torch.cuda.Stream(device=device)
            with torch.cuda.stream(side):
                value = float(self._host.item())
            key = (device, self._host.dtype)
        _SLOTS.replenish(torch, key)
        return value

    def __del__(self) -> None:
        # A value never read (its record was dropped): its slot is reused only once its copy
        # is known to be done; otherwise it is left to the garbage collector.
        key = self._key
        if _FORKED:  # this process did not capture it
            return
        try:
            done = key is not None and self._event.query()
        except Exception:  # CUDA already torn down (interpreter exit)
            return
        if done:
            self._key = None
            _SLOTS.give(key, (self._host, self._event))  # type: ignore[arg-type]


def _real_dtype(kind: str) -> bool:
    return kind in "biuf"


def capture_value(value: object) -> float | PendingValue:
    """Return ``value`` as a float fixed at this instant, or raise ``TypeError``.

    Accepts Python ints, floats and bools, ``numbers.Real``, NumPy scalars and 0-d/1-element
    arrays of a real dtype, and 1-element torch tensors of a real dtype. A CPU tensor is read now;
    a tensor on an accelerator becomes a :class:`PendingValue` (no host synchronisation). NaN and
    infinities are valid values.
    """
    t = type(value)
    if t is float:
        return value  # type: ignore[return-value]
    if t is int or t is bool:
        return _to_float(value)  # type: ignore[arg-type]
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"a logged tensor must hold exactly one element, got shape "
                            f"{tuple(value.shape)}")
        if value.is_complex():
            raise TypeError("a complex tensor is not a real number")
        if value.device.type == "cpu":
            return float(value.item())
        return PendingValue(value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        if value.size != 1 or not _real_dtype(value.dtype.kind):
            raise TypeError(f"expected a real number, got a numpy value of dtype {value.dtype} "
                            f"and shape {getattr(value, 'shape', ())}")
        return float(value.item())
    if isinstance(value, numbers.Integral):
        return _to_float(int(value))
    if isinstance(value, numbers.Real):
        return _to_float(value)  # a Fraction or Decimal may be too large as well
    raise TypeError(f"expected a real number (int, float, numpy or torch scalar), got "
                    f"{t.__name__}: {_short(value)}")


STEP_MIN = -(2**63)
STEP_MAX = 2**63 - 1
"""Steps are signed 64-bit integers, as MLflow and ClearML store them."""


def _to_float(value: SupportsFloat) -> float:
    """``float(value)``, ``ValueError`` for a value too large for one."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{_short(value)} is too large for a float (at most about 1.8e308)"
                         ) from None


def capture_step(step: object) -> int:
    """Return ``step`` as an int, or raise ``TypeError`` (floats, bools and tensors on a device
    other than the CPU are refused) or ``ValueError`` (outside the signed 64-bit range every
    backend stores)."""
    if type(step) is int:
        value = step
    elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
        np = sys.modules.get("numpy")
        torch = sys.modules.get("torch")
        if np is not None and isinstance(step, np.integer):
            value = int(step)
        elif (torch is not None and isinstance(step, torch.Tensor) and step.numel() == 1
                and not step.is_floating_point() and not step.is_complex()
                and step.dtype is not torch.bool):
            if step.device.type != "cpu":
                raise TypeError(f"iteration is a tensor on {step.device}: reading it would make "
                                "this call wait for the device; pass int(step) or a CPU tensor")
            value = int(step.item())
        else:
            raise TypeError(f"iteration must be an int or None, got {type(step).__name__}: "
                            f"{_short(step)}")
    else:
        value = int(step)
    if not STEP_MIN <= value <= STEP_MAX:
        raise ValueError(f"iteration {_short(value)} does not fit a signed 64-bit integer "
                         f"({STEP_MIN} to {STEP_MAX})")
    return value


def _param_hook(obj: Any) -> Any:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    return str(obj)


def capture_param(value: object) -> Any:
    """Return a deep, JSON-compatible snapshot of a parameter value.

    Strings, numbers, bools, None, lists, tuples and dicts are kept (copied); NumPy and torch
    values become lists or numbers; what msgspec converts itself becomes what it makes of it
    (bytes: base64 text, an enum: its value, a dataclass: a dict of its fields, a datetime:
    ISO 8601 text); any other object is recorded as ``str(value)``, and an int beyond 64 bits
    as its decimal text (msgpack, which carries records to sink hosts and the journal, holds
    no such int, and a replayed param must read as the live one did). ``TypeError`` for a dict
    key that is neither text nor a number.
    """
    return _within_64_bits(msgspec.to_builtins(value, enc_hook=_param_hook, str_keys=True))


_PARAM_INT_MIN, _PARAM_INT_MAX = -(2**63), 2**64 - 1
"""The ints a journal frame (msgpack) holds as numbers."""


def _within_64_bits(value: Any) -> Any:
    """``value`` (built of dicts, lists and scalars) with each int beyond 64 bits, which
    msgpack cannot hold, as its decimal text."""
    kind = type(value)
    if kind is int:
        return value if _PARAM_INT_MIN <= value <= _PARAM_INT_MAX else str(value)
    if kind is list:
        return [_within_64_bits(v) for v in value]
    if kind is dict:
        return {k: _within_64_bits(v) for k, v in value.items()}
    return value


def capture_object(obj: object) -> Any:
    """Return a snapshot of ``obj`` that later mutations of ``obj`` do not reach.

    Modules and containers are deep-copied; tensors on an accelerator are copied there
    (asynchronously), so the caller does not wait for the device. Serialisation happens later,
    on the worker.
    """
    try:
        return copy.deepcopy(obj)
    except Exception as exc:
        raise TypeError(f"cannot snapshot {type(obj).__name__} for saving: {exc}") from exc


def _short(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."
