"""Checkpoints: weights captured at the call into reusable host buffers, written as safe files.

``save_policy``/``save_agent`` hand their object to :func:`capture_weights` on the caller's
thread. A ``torch.nn.Module`` (its ``state_dict()``), a ``torch.optim.Optimizer`` (its
``state_dict()``), or a mapping/list of these, of tensors and of plain values (numbers, strings,
bools, ``None``, dtypes, devices) becomes a :class:`Snapshot`: the same tree with every tensor
copied into a host buffer. CPU tensors are copied at the call; CUDA tensors are copied with
non-blocking copies into pinned host memory followed by an event on the current stream, which
the worker waits on, so the training stream is never synchronised. Anything else is not
weights: the caller deep-copies it and the worker pickles it (see ``Logger.save_agent``).

The worker writes a snapshot with ``torch.save`` of plain tensors and containers, so
``torch.load(path, weights_only=True)`` reads it; a policy also gets a ``meta.json`` (class path,
``save_to_dict()`` when the object has one, step, user metadata, tensor count, bytes, sha256 of
the weights file). Once written, its buffers go back to the :class:`CheckpointMemory` pool of
that name, and the next snapshot of the same shapes reuses them instead of allocating (and
page-faulting) new memory.

:class:`CheckpointMemory` also bounds the bytes of snapshots waiting to be written: at the
bound, ``save_policy`` waits for room (``"wait"``) or first supersedes pending snapshots of
the same name that no sink has started on (``"supersede"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from steplog.capture import capture_object, capture_param
from steplog.errors import LoggerClosedError, PermanentError

__all__ = [
    "CheckpointMemory",
    "CheckpointPolicy",
    "ObjectSnapshot",
    "Snapshot",
    "SupersededError",
    "capture_checkpoint",
    "capture_weights",
    "load_policy",
]

CheckpointPolicy = Literal["wait", "supersede"]
_PLAIN = frozenset({int, float, bool, str, bytes, type(None)})
_KEYS = frozenset({str, int})
FORMAT = "steplog.checkpoint/1"


class SupersededError(PermanentError):
    """A pending snapshot was replaced by a later one of the same name before any sink
    started on it (the ``"supersede"`` checkpoint policy)."""


class _NotWeights(Exception):
    pass


class Snapshot:
    """A tree of host tensors captured at the call, and what ``meta.json`` says about it.

    States: pending (waiting for the worker), started (being written), written (or failed
    while written), superseded, dropped (never written). Its bytes count against the memory
    bound until it leaves pending/started, whichever way.
    """

    def __init__(self, name: str, nbytes: int, meta: dict[str, Any],
                 memory: CheckpointMemory) -> None:
        self.name = name
        self.nbytes = nbytes
        self.meta = meta
        self._tree: Any = None
        self._buffers: list[Any] = []
        self._events: list[Any] = []
        self._memory = memory
        self._lock = threading.Lock()
        self.state = "pending"

    def start(self) -> None:
        """Claim the snapshot for writing; raises :class:`SupersededError` if it was replaced."""
        with self._lock:
            if self.state == "superseded":
                raise SupersededError(
                    f"snapshot {self.name!r} was superseded by a later one of the same name "
                    "before any sink started on it (checkpoint policy 'supersede')"
                )
            if self.state != "pending":
                raise PermanentError(f"snapshot {self.name!r} is no longer held (an earlier "
                                     "attempt to write it failed)")
            self.state = "started"

    def supersede(self) -> bool:
        """Drop this snapshot if no sink started on it; True when dropped."""
        with self._lock:
            if self.state != "pending":
                return False
            self.state = "superseded"
        self._finish()
        return True

    def drop(self) -> None:
        """Free this snapshot unless it was written (a capture, a queueing or a write that
        never happened); safe to call in any state."""
        with self._lock:
            if self.state in ("written", "superseded", "dropped"):
                return
            self.state = "dropped"
        self._finish()

    def write(self, path: Path) -> dict[str, Any]:
        """Write the weights to ``path`` (``torch.save``, loadable with ``weights_only=True``)
        and return the metadata with the file's size and sha256. The buffers are returned to
        the pool afterwards, whatever happens."""
        torch = sys.modules["torch"]
        try:
            for event in self._events:
                event.synchronize()  # the copies of this snapshot only, not the device
            with open(path, "wb") as f:
                torch.save(self._tree, f)
        finally:
            with self._lock:
                self.state = "written"
            self._events = []  # every copy completed: the buffers may be reused
            self._finish()
        return self._described(path)

    def _described(self, path: Path) -> dict[str, Any]:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        meta = dict(self.meta)
        meta.update(file=path.name, file_bytes=path.stat().st_size, sha256=digest.hexdigest())
        return meta

    def _finish(self) -> None:
        buffers, self._buffers, self._tree = self._buffers, [], None
        if self._events:
            # Device copies into these buffers may still be in flight: never reuse them.
            buffers = []
        self._memory.release(self, buffers)


class ObjectSnapshot(Snapshot):
    """An object that is not weights: deep-copied at the call and serialised by the worker
    with ``torch.save`` (``pickle`` when torch was never imported). Loading it needs
    ``weights_only=False`` and the object's classes. Not counted against the memory bound."""

    def __init__(self, name: str, obj: object, meta: dict[str, Any],
                 memory: CheckpointMemory) -> None:
        super().__init__(name, 0, meta, memory)
        self._tree = obj

    def write(self, path: Path) -> dict[str, Any]:
        torch = sys.modules.get("torch")
        try:
            with open(path, "wb") as f:
                if torch is not None:
                    torch.save(self._tree, f)
                else:
                    pickle.dump(self._tree, f, protocol=pickle.HIGHEST_PROTOCOL)
        finally:
            with self._lock:
                self.state = "written"
            self._tree = None
        return self._described(path)


class CheckpointMemory:
    """Host buffers and the byte bound of one logger's pending snapshots.

    ``allocated_bytes``/``reused_bytes`` count buffer bytes newly allocated / taken from the
    pool; ``superseded`` counts snapshots dropped by the ``"supersede"`` policy.
    """

    def __init__(self, bound_bytes: int, policy: CheckpointPolicy) -> None:
        self.bound_bytes = bound_bytes
        self.policy = policy
        self.pending_bytes = 0
        self.allocated_bytes = 0
        self.reused_bytes = 0
        self.superseded = 0
        self._pending: dict[str, list[Snapshot]] = {}
        self._free: dict[str, list[Any]] = {}
        self._stopped = False
        self._room = threading.Condition()

    def admit(self, snapshot: Snapshot, deadline: float) -> bool:
        """Count ``snapshot`` as pending once there is room (superseding earlier ones of its
        name under ``"supersede"``); False when ``deadline`` (monotonic) passed first;
        :class:`~steplog.errors.LoggerClosedError` when the logger starts closing meanwhile. A
        snapshot larger than the bound is admitted when nothing else is pending."""
        if self.policy == "supersede":
            with self._room:
                full = self.pending_bytes + snapshot.nbytes > self.bound_bytes
                earlier = list(self._pending.get(snapshot.name, ())) if full else []
            for old in earlier:
                if old.supersede():
                    with self._room:
                        self.superseded += 1
        with self._room:
            while self.pending_bytes and self.pending_bytes + snapshot.nbytes > self.bound_bytes:
                if self._stopped:
                    raise LoggerClosedError("this logger is closing; the snapshot was not taken")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._room.wait(left)
            self.pending_bytes += snapshot.nbytes
            self._pending.setdefault(snapshot.name, []).append(snapshot)
            return True

    def count(self, *, allocated: int = 0, reused: int = 0) -> None:
        with self._room:
            self.allocated_bytes += allocated
            self.reused_bytes += reused

    def take_buffers(self, name: str) -> list[Any]:
        """The buffers of the last written snapshot of ``name`` (empty if none)."""
        with self._room:
            return self._free.pop(name, [])

    def release(self, snapshot: Snapshot, buffers: list[Any]) -> None:
        with self._room:
            pending = self._pending.get(snapshot.name, [])
            if snapshot in pending:
                pending.remove(snapshot)
                self.pending_bytes -= snapshot.nbytes
            if buffers and not self._stopped:
                self._free[snapshot.name] = buffers
            self._room.notify_all()

    def stop(self, timeout_s: float) -> None:
        """The logger closes: no snapshot is taken any more, so the buffers kept for reuse are
        freed now, those of snapshots written later are not kept, and a save waiting for room
        raises :class:`~steplog.errors.LoggerClosedError`."""
        with self._room:
            self._stopped = True
            self._free.clear()
            self._room.notify_all()  # a save waiting for room gives up


def capture_weights(obj: object, name: str, memory: CheckpointMemory, *, step: int | None,
                    metadata: Mapping[str, Any] | None, deadline: float) -> Snapshot | None:
    """A :class:`Snapshot` of ``obj``'s weights taken now, or ``None`` when ``obj`` is not
    weights (see the module docstring) or torch was never imported. Waits for room under the
    memory bound until ``deadline`` (monotonic), then raises ``TimeoutError``."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    sizes: list[int] = []
    seen: set[tuple[Any, ...]] = set()

    def size(t: Any) -> None:
        problem = _no_data(torch, t)
        if problem is not None:
            raise TypeError(f"snapshot {name!r} cannot be taken: it holds {problem}")
        key = _memory_key(torch, t)
        if key is not None:
            if key in seen:  # tied weights: one copy serves every name of them
                return
            seen.add(key)
        sizes.append(t.numel() * t.element_size())

    try:
        weights = _weights_of(torch, obj)
        _map_tree(torch, weights, size)
    except _NotWeights:
        return None
    meta = _meta(obj, name, step, metadata, tensors=len(sizes), bytes=sum(sizes),
                 torch=str(torch.__version__))
    save_to_dict = getattr(obj, "save_to_dict", None)
    if callable(save_to_dict):
        meta["save_to_dict"] = capture_param(save_to_dict())
    snapshot = Snapshot(name, sum(sizes), meta, memory)
    if not memory.admit(snapshot, deadline):
        raise TimeoutError(
            f"snapshot {name!r} ({sum(sizes):,} bytes) found no room: "
            f"{memory.pending_bytes:,} bytes of snapshots still wait to be written "
            f"(Options.checkpoint_memory_bytes = {memory.bound_bytes:,}); it was not saved"
        )
    copier = _Copier(torch, memory.take_buffers(name), memory)
    try:
        snapshot._tree = _map_tree(torch, weights, copier.copy)
        snapshot._buffers = copier.used
        for device in copier.devices:
            # After this device's copies, on the stream they were issued on.
            event = torch.cuda.Event(blocking=True)  # the worker sleeps, not spins
            event.record(torch.cuda.current_stream(device))
            snapshot._events.append(event)
    except BaseException:
        snapshot._buffers = copier.used
        snapshot._events = [None] if copier.devices else []  # never reuse these buffers
        snapshot.drop()
        raise
    return snapshot


def capture_checkpoint(obj: object, name: str, memory: CheckpointMemory, *,
                       step: int | None, metadata: Mapping[str, Any] | None,
                       deadline: float) -> Snapshot:
    """:func:`capture_weights` when ``obj`` is weights, else an :class:`ObjectSnapshot` (a
    deep copy; ``TypeError`` when it cannot be copied)."""
    snapshot = capture_weights(obj, name, memory, step=step, metadata=metadata,
                               deadline=deadline)
    if snapshot is not None:
        return snapshot
    meta = _meta(obj, name, step, metadata, pickled=True)
    return ObjectSnapshot(name, capture_object(obj), meta, memory)


def _meta(obj: object, name: str, step: int | None, metadata: Mapping[str, Any] | None,
          **fields: Any) -> dict[str, Any]:
    """What every ``meta.json`` says: format, name, step, the object's class, ``fields``, and
    the user's metadata."""
    cls = type(obj)
    meta: dict[str, Any] = {"format": FORMAT, "name": name, "step": step,
                            "class": f"{cls.__module__}.{cls.__qualname__}", **fields}
    if metadata is not None:
        meta["metadata"] = capture_param(dict(metadata))
    return meta


def _weights_of(torch: Any, obj: object) -> Any:
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, Mapping)) or type(obj) in (
        list, tuple
    ):
        return obj
    raise _NotWeights


def _map_tree(torch: Any, node: Any, leaf: Any) -> Any:
    """``node`` rebuilt with ``leaf(tensor)`` for each tensor (modules and optimizers by their
    state_dict); raises :class:`_NotWeights` for anything ``weights_only`` cannot load."""
    if isinstance(node, torch.Tensor):
        return leaf(node)
    if isinstance(node, (torch.nn.Module, torch.optim.Optimizer)):
        return _map_tree(torch, node.state_dict(), leaf)
    t = type(node)
    if isinstance(node, Mapping):
        if not all(type(k) in _KEYS for k in node):
            raise _NotWeights
        return {k: _map_tree(torch, v, leaf) for k, v in node.items()}
    if t is torch.Size:
        return node
    if t is list or t is tuple:
        items = [_map_tree(torch, v, leaf) for v in node]
        return items if t is list else tuple(items)
    if t in _PLAIN or t is torch.dtype or t is torch.device:
        return node
    raise _NotWeights  # subclasses of plain types (numpy scalars, enums) need unpickling


def _no_data(torch: Any, t: Any) -> str | None:
    """Why tensor ``t`` has no values to save, or ``None``."""
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
        return ("an uninitialized parameter or buffer (a lazy module before its first "
                "forward pass)")
    if t.device.type == "meta":
        return ("a tensor on the meta device, which has a shape but no values (a module built "
                "under torch.device('meta') and not materialized)")
    return None


def _memory_key(torch: Any, t: Any) -> tuple[Any, ...] | None:
    """Equal for two tensors that view the same memory the same way (weights tied under two
    names), so that the snapshot copies them once and saves them shared, as ``torch.save`` of
    the live state dict would; ``None`` for layouts where this is not told (sparse,
    quantized)."""
    if t.layout is not torch.strided or t.is_quantized:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


class _Copier:
    """Copies tensors into host buffers, reusing ``free`` ones of the same shape, dtype and
    pinning in traversal order; ``devices`` are the CUDA devices copied from."""

    def __init__(self, torch: Any, free: list[Any], memory: CheckpointMemory) -> None:
        self.torch = torch
        self.free = free
        self.memory = memory
        self.used: list[Any] = []
        self.devices: list[Any] = []
        self._copies: dict[tuple[Any, ...], Any] = {}

    def copy(self, t: Any) -> Any:
        src = t.detach()
        key = _memory_key(self.torch, src)
        if key is not None:
            done = self._copies.get(key)
            if done is not None:
                return done
        if src.is_sparse or src.is_quantized:
            out = src.to("cpu", copy=True)
        else:
            cuda = src.device.type == "cuda"
            k = len(self.used)
            buf = self.free[k] if k < len(self.free) else None
            if (buf is not None and buf.shape == src.shape and buf.dtype == src.dtype
                    and buf.is_pinned() == cuda):
                self.memory.count(reused=buf.numel() * buf.element_size())
            else:
                buf = self.torch.empty(src.shape, dtype=src.dtype, pin_memory=cuda)
                self.memory.count(allocated=buf.numel() * buf.element_size())
            if cuda:
                buf.copy_(src, non_blocking=True)
                if src.device not in self.devices:
                    self.devices.append(src.device)
            else:
                buf.copy_(src)
            out = buf
        self.used.append(out)
        if key is not None:
            self._copies[key] = out
        return out


def write_policy(snapshot: Snapshot, directory: Path) -> None:
    """``directory/model.pth`` and ``directory/meta.json`` for one policy snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = snapshot.write(directory / "model.pth")
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_policy(location: str | os.PathLike[str], module: Any = None, *,
                weights_only: bool = True, tracking_uri: str | None = None) -> Any:
    """The state_dict saved by ``save_policy`` at ``location``, loaded into ``module`` too when
    one is given (``module.load_state_dict``). Never unpickles unless ``weights_only=False``.

    ``location`` is one of: a ``model.pth`` file; a snapshot directory (holding
    ``model.pth``); a policy directory of a file run (its ``latest`` snapshot); an MLflow
    artifact URI (``runs:/<run id>/policy/step_3``, ``models:/<name>/<version>``,
    ``mlflow-artifacts:/...``; needs the mlflow package, with ``tracking_uri`` or
    ``MLFLOW_TRACKING_URI``); or ``clearml://<model id>`` (a ClearML model, via its server).
    """
    import torch

    text = os.fspath(location)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import tempfile

        from mlflow.artifacts import download_artifacts

        if text.startswith("models:/"):
            text = _model_version_uri(text, tracking_uri)
        with tempfile.TemporaryDirectory(prefix="steplog-load-") as tmp:
            local = download_artifacts(artifact_uri=text, dst_path=tmp,
                                       tracking_uri=tracking_uri)
            return load_policy(local, module, weights_only=weights_only)
    if text.startswith("clearml://"):
        from clearml import InputModel

        model_id = text[len("clearml://"):]
        local = InputModel(model_id=model_id).get_local_copy()
        if not local:
            raise FileNotFoundError(f"ClearML could not download the weights of model "
                                    f"{model_id}")
        return load_policy(local, module, weights_only=weights_only)
    path = Path(text)
    path = _model_file(path)
    state = torch.load(path, map_location="cpu", weights_only=weights_only)
    if module is not None:
        module.load_state_dict(state)
    return state


def _model_version_uri(uri: str, tracking_uri: str | None) -> str:
    """Where the artifacts of ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` are,
    asking ``MLFLOW_REGISTRY_URI``'s registry, else ``tracking_uri``'s."""
    from mlflow import MlflowClient

    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry)
    spec = uri[len("models:/"):].strip("/")
    if "@" in spec:
        name, alias = spec.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    else:
        name, _, version = spec.rpartition("/")
        if not name or not version.isdigit():
            raise ValueError(f"expected models:/<name>/<version> or models:/<name>@<alias>, "
                             f"got {uri!r}")
    return str(client.get_model_version_download_uri(name, version))


def _model_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / "model.pth").is_file():
        return path / "model.pth"
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "model.pth").is_file():
            return target / "model.pth"
    found = sorted((p.parent.name for p in path.glob("*/model.pth")),
                   key=lambda n: (len(n), n))
    hint = f"; snapshots there: {', '.join(found)}" if found else ""
    raise FileNotFoundError(f"no model.pth in {path} and no 'latest' snapshot{hint}")
