"""A Lightning ``Logger`` that writes through any steplog logger.

``Trainer(logger=SteplogLogger(...))`` is the only change: metrics and hyperparameters are
queued like any ``log_*`` call, every checkpoint that ``ModelCheckpoint`` saves is uploaded in
the upload lane while training goes on, and the run ends with the trainer's status. As with
Lightning's own loggers, only global rank 0 logs (``rank_zero_only``).

Checkpoints: at ``after_save_checkpoint`` each new or rewritten checkpoint file is hard-linked
into a hidden folder beside it, and that link is queued; Lightning may delete or replace its
file right after the call (top-k, ``last.ckpt``) and the upload still sends the bytes of the
call. Lightning (through fsspec) writes a checkpoint into the system's temporary directory and
moves it into place: a rename where the kernel allows one, which leaves the link alone;
otherwise (another file system or mount) the move rewrites the existing file in place, so there
(and where linking fails) the checkpoint is copied at the call instead. The link is removed
once every sink stored it. The run stores it as ``checkpoints/<file name>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from argparse import Namespace
from collections.abc import Mapping
from typing import Any, Literal

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.callbacks.model_checkpoint import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger as LightningLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from steplog.errors import LoggerClosedError, SteplogWarning
from steplog.lifecycle import State, terminated
from steplog.loggers import FileLogger, Logger
from steplog.records import Artifact, now_ms
from steplog.results import CloseResult
from steplog.sinks.base import RunStatus

__all__ = ["SteplogLogger"]

STATUSES: dict[str, RunStatus] = {
    "success": "FINISHED",
    "finished": "FINISHED",
    "failed": "FAILED",
    "aborted": "KILLED",
    "interrupted": "KILLED",
    "killed": "KILLED",
}
"""Lightning's ``finalize`` statuses and the run status each one ends the run with."""

_SEVERITY: tuple[RunStatus, ...] = ("FINISHED", "FAILED", "KILLED")
"""Run statuses from least to most severe: a run that several stages log into ends with the
most severe status any of them ended it with."""

def _stopped_exceptions() -> tuple[type[BaseException], ...]:
    """Ctrl-C, and the exception Lightning raises for a SIGTERM it handles itself (when
    another handler than the default was installed, as job wrappers do)."""
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # a Lightning without it
        return (KeyboardInterrupt,)
    return (KeyboardInterrupt, SIGTERMException)


_STOPPED = _stopped_exceptions()

_NOT_A_KEY = re.compile(r"[^a-zA-Z0-9_/. -]+")
"""What Lightning's MLflow logger removes from a metric name (MLflow refuses it)."""

_CALLBACK_SETTINGS = ("monitor", "mode", "save_last", "save_top_k", "save_weights_only")


class SteplogLogger(LightningLogger):
    """Log a Lightning run through ``logger`` (any steplog logger: file, MLflow, ClearML).

    Args:
        logger: where the records go. ``None``: a :class:`~steplog.FileLogger` in
            ``<log_dir>/steplog``, built on rank 0 when first needed.
        save_dir, name, version: Lightning's local layout, as for ``CSVLogger``: ``log_dir`` is
            ``save_dir/name/version_<version>`` (``version=None``: the next free number), and
            ``ModelCheckpoint`` saves into ``log_dir/checkpoints`` by default.
        prefix: put before every metric name, joined with ``"-"``.
        log_model: ``"all"`` (default): upload each checkpoint as it is saved; ``True``: upload
            the last and best checkpoints when training ends (each one as saved with
            ``save_top_k=-1``); ``False``: none.
        close_on_finalize: ``True`` (default): Lightning's ``finalize`` (end of ``fit``,
            ``validate``, ``test``) closes ``logger`` and ends its run with the trainer's status
            (a later stage logs on into the same file or MLflow run, through
            :meth:`~steplog.Logger.continued`, and ends it again);
            ``False``: it only flushes, and the caller closes ``logger`` (to reuse a given
            logger for a later ``trainer.test``, say).
        timeout_s: the deadline of that close or flush (``None``: ``Options.timeout_s``).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        logger: Logger | None = None,
        *,
        save_dir: str | os.PathLike[str] = "lightning_logs",
        name: str = "steplog",
        version: int | str | None = None,
        prefix: str = "",
        log_model: Literal[True, False, "all"] = "all",
        close_on_finalize: bool = True,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        if logger is not None and not isinstance(logger, Logger):
            raise TypeError(f"logger must be a steplog Logger, got {type(logger).__name__}")
        if log_model not in (True, False, "all"):
            raise ValueError(f"log_model must be True, False or 'all', got {log_model!r}")
        self._logger = logger
        self._save_dir = os.fspath(save_dir)
        self._name = name
        self._version = version
        self._prefix = prefix
        self._log_model = log_model
        self._close_on_finalize = close_on_finalize
        self._timeout_s = timeout_s
        self._renamed: dict[str, str] = {}
        self._uploaded: dict[str, float] = {}
        self._saved_at: dict[str, tuple[float, int]] = {}
        """Checkpoint file -> its modification time and the global step when it was saved."""
        self._warned_remote = False
        self._staging: dict[str, str] = {}
        self._renames: dict[str, bool] = {}
        self._links = itertools.count()
        self._checkpoint_callback: ModelCheckpoint | None = None
        self.result: CloseResult | None = None
        """The close result once ``finalize`` closed the logger: the last stage's, or the
        first falsy one when an earlier stage's records did not all arrive."""
        self._closed_status: RunStatus | None = None
        """The most severe status a stage's ``finalize`` ended the run with so far."""

    def __getstate__(self) -> dict[str, Any]:
        # Trainer(strategy="ddp_spawn") pickles its loggers into every process it starts.
        if self._logger is not None:
            raise TypeError(
                "steplog: a SteplogLogger that holds a steplog logger cannot be copied into "
                "other processes (Trainer(strategy='ddp_spawn') pickles its loggers): a logger's "
                "queue, threads and run belong to the process that built it; use "
                "strategy='ddp' (processes started by Lightning's launcher or torchrun), or "
                "SteplogLogger(logger=None), which builds its file logger where it logs")
        return self.__dict__.copy()

    # -- Lightning's layout ----------------------------------------------------------------
    @property
    @override
    def name(self) -> str:
        return self._name

    @property
    @override
    def version(self) -> int | str:
        if self._version is None:
            self._version = _next_version(os.path.join(self._save_dir, self._name))
        return self._version

    @property
    @override
    def save_dir(self) -> str:
        return self._save_dir

    @property
    @override
    def root_dir(self) -> str:
        return os.path.join(self._save_dir, self._name)

    @property
    @override
    def log_dir(self) -> str:
        version = self.version
        return os.path.join(self.root_dir, version if isinstance(version, str)
                            else f"version_{version}")

    @property
    @rank_zero_experiment
    def experiment(self) -> Logger:
        """The steplog logger (built now on rank 0 when none was given)."""
        if self._logger is None:
            self._logger = FileLogger(os.path.join(self.log_dir, "steplog"))
        return self._logger

    def _open_logger(self) -> Logger:
        """The steplog logger, for a record of the current stage. When ``finalize`` closed it
        at the end of an earlier stage, its run goes on through its
        :meth:`~steplog.Logger.continued` logger (file and MLflow runs); a logger whose run
        cannot go on raises ``LoggerClosedError`` saying what to do."""
        logger = self._logger or self.experiment
        if self.result is not None and logger.state is State.CLOSED:
            try:
                self._logger = logger.continued()
            except (NotImplementedError, RuntimeError) as exc:
                raise LoggerClosedError(
                    "steplog: SteplogLogger closed its steplog logger when the previous "
                    "trainer stage ended (close_on_finalize=True, the default), and this stage "
                    f"cannot log on into its run ({exc}); to log several stages "
                    "(trainer.validate or trainer.test after trainer.fit) into one run, build "
                    "SteplogLogger with close_on_finalize=False and close the steplog logger "
                    "yourself, or give each stage its own SteplogLogger") from exc
            return self._logger
        return logger

    # -- records ---------------------------------------------------------------------------
    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue every metric at ``step`` (a name MLflow would refuse loses its refused
        characters, with one warning, as with Lightning's MLflow logger; when two names become
        one, each value is logged under it)."""
        logger = self._open_logger()
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        for retry in (False, True):
            renamed, clashes = self._renamed_metrics(metrics)
            try:
                logger.log_metrics(renamed, step)
                break
            except ValueError:
                if retry or not self._rename(metrics):
                    raise
        for name, value in clashes:
            logger.log_scalar(name, value, step)

    def _renamed_metrics(self, metrics: Mapping[str, Any]
                         ) -> tuple[Mapping[str, Any], list[tuple[str, Any]]]:
        """``metrics`` under the names they are logged as, and the values whose names became
        the name of another one (logged as a point of their own)."""
        if not self._renamed:
            return metrics, []
        renamed: dict[str, Any] = {}
        clashes = []
        for k, v in metrics.items():
            new = self._renamed.get(k, k)
            if new in renamed:
                clashes.append((new, v))
            else:
                renamed[new] = v
        return renamed, clashes

    def _rename(self, metrics: Mapping[str, Any]) -> bool:
        """Give a name the logger refuses the name Lightning's MLflow logger gives it; whether
        one was renamed (a ValueError for another reason, say a value too large, is not about
        the names)."""
        renamed = False
        logger = self._logger
        for k in metrics:
            if k in self._renamed:
                continue
            if logger is not None:
                try:
                    logger._check_names([k])
                    continue  # stored as it is
                except (TypeError, ValueError):
                    pass
            new = _NOT_A_KEY.sub("", k)
            if new != k and new:
                warnings.warn(f"steplog: the metric name {k!r} is logged as {new!r} (only "
                              "letters, digits and '_ / . - ' and space are kept)",
                              SteplogWarning, stacklevel=3)
                self._renamed[k] = new
                renamed = True
        return renamed

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace | Any, *args: Any,
                        **kwargs: Any) -> None:
        """Queue the hyperparameters as run parameters: a ``Namespace`` or dataclass becomes a
        dict, and nested dicts are flattened with ``"/"`` (``{"opt": {"lr": 1}}`` ->
        ``opt/lr``), as Lightning's own loggers do."""
        given: Any = params
        if dataclasses.is_dataclass(given) and not isinstance(given, type):
            given = dataclasses.asdict(given)
        flat = _flatten_dict(_convert_params(given))
        if flat:
            self._open_logger().log_parameters(flat)

    # -- checkpoints -----------------------------------------------------------------------
    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        """Queue the checkpoint files saved since the last call (``log_model="all"``), or
        remember the callback to upload its best and last files at the end (``True``)."""
        path = getattr(checkpoint_callback, "_last_checkpoint_saved", "")
        step = getattr(checkpoint_callback, "_last_global_step_saved", None)
        if path and type(step) is int:
            with contextlib.suppress(OSError):
                self._saved_at[path] = (os.stat(path).st_mtime, step)
        if self._log_model == "all" or (self._log_model is True
                                        and checkpoint_callback.save_top_k == -1):
            self._upload_checkpoints(checkpoint_callback)
        elif self._log_model is True:
            self._checkpoint_callback = checkpoint_callback

    def _upload_checkpoints(self, callback: ModelCheckpoint) -> None:
        """Link each new checkpoint file now (the callback is a weak proxy and Lightning may
        remove the file after this call) and queue the link."""
        logger = self._open_logger()
        if logger.state is State.INERT:  # a rank that does not log under steplog's policy
            return
        dirpath = getattr(callback, "dirpath", None)
        if dirpath and not _is_local_file_protocol(dirpath):  # Lightning's own test of a path
            if not self._warned_remote:
                self._warned_remote = True
                warnings.warn(f"steplog: checkpoints saved under {dirpath} are not uploaded "
                              "(steplog uploads checkpoint files on this machine's disks; "
                              "these are already stored remotely)", SteplogWarning, stacklevel=3)
            return
        settings = {k: getattr(callback, k) for k in _CALLBACK_SETTINGS if hasattr(callback, k)}
        latest = getattr(callback, "_last_checkpoint_saved", "")
        for mtime, path, score in _new_checkpoints(callback, self._uploaded):
            staged = self._stage(path)
            file_name = os.path.basename(path)
            aliases = ["latest"] if path == latest else []
            if path == getattr(callback, "best_model_path", ""):
                aliases.append("best")
            saved = self._saved_at.get(path)
            metadata = {"original_filename": file_name, "checkpoint": settings,
                        "score": score.item() if hasattr(score, "item") else score}
            logger._upload(Artifact(
                name=f"checkpoints/{file_name}", timestamp=now_ms(), source=staged,
                kind="checkpoint", step=saved[1] if saved and saved[0] == mtime else None,
                metadata=metadata, aliases=aliases, move=True, cleanup=True))
            self._uploaded[path] = mtime

    def _stage(self, path: str) -> str:
        """A hard link to ``path`` in a hidden folder beside it, or a copy where a later save
        could change the linked file (see the module) or linking fails."""
        folder = os.path.dirname(os.path.abspath(path))
        staging = self._staging.get(folder)
        if staging is None:
            staging = self._staging[folder] = tempfile.mkdtemp(prefix=".steplog-uploads-",
                                                               dir=folder)
        dest = os.path.join(staging, f"{next(self._links)}-{os.path.basename(path)}")
        if self._renamed_into(folder):
            try:
                os.link(path, dest)
                return dest
            except OSError:  # no hard links on this file system
                pass
        shutil.copy2(path, dest)
        return dest

    def _renamed_into(self, folder: str) -> bool:
        """Whether a checkpoint saved into ``folder`` arrives by a rename, which leaves a link
        to the earlier file alone: Lightning (through fsspec) writes it into the system's
        temporary directory and moves it, a rename only where the kernel allows one (one file
        system, and one mount of it); otherwise the move copies into the existing file, in
        place. Tried once per folder with a real rename of an empty file."""
        renamed = self._renames.get(folder)
        if renamed is None:
            renamed = False
            try:
                fd, probe = tempfile.mkstemp(prefix=".steplog-rename-probe-")
                os.close(fd)
            except OSError:
                probe = None
            if probe is not None:
                target = os.path.join(folder, os.path.basename(probe))
                try:
                    os.rename(probe, target)
                    renamed = True
                    os.unlink(target)
                except OSError:  # EXDEV: another file system or mount
                    with contextlib.suppress(OSError):
                        os.unlink(probe)
            self._renames[folder] = renamed
        return renamed

    # -- the end ---------------------------------------------------------------------------
    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """End the run with the trainer's status (``success`` -> ``FINISHED``, ``failed`` ->
        ``FAILED``, or ``KILLED`` when a ``KeyboardInterrupt`` or a SIGTERM stopped the trainer,
        ``aborted``/``interrupted`` -> ``KILLED``), after uploading the last and
        best checkpoints with ``log_model=True``; or only flush (``close_on_finalize=False``).
        An undelivered record is reported in one warning, with the result in :attr:`result`."""
        if status not in STATUSES:
            raise ValueError(f"unknown Lightning status {status!r}; expected one of "
                             f"{', '.join(STATUSES)}")
        logger = self._logger
        if logger is None:
            return  # nothing was ever logged on this rank
        if self.result is not None and logger.state is State.CLOSED:
            return  # this stage logged nothing: an earlier stage's end closed the run
        if self._checkpoint_callback is not None:
            self._upload_checkpoints(self._checkpoint_callback)
            self._checkpoint_callback = None
        if not self._close_on_finalize:
            flushed = logger.flush(self._timeout_s)
            if not flushed:
                warnings.warn(f"steplog: not every record arrived at the end of this stage: "
                              f"{flushed!r}", SteplogWarning, stacklevel=2)
            for folder, staging in list(self._staging.items()):
                with contextlib.suppress(OSError):  # still holds a link: an upload is kept
                    os.rmdir(staging)  # every upload so far ended: its link is gone
                    del self._staging[folder]
            return
        end = STATUSES[status]
        if status == "failed" and (isinstance(sys.exc_info()[1], _STOPPED) or terminated()):
            end = "KILLED"  # Lightning reports a Ctrl-C or a SIGTERM as "failed"
        if self._closed_status is not None:  # a later stage of the same run: the worst wins
            end = max(end, self._closed_status, key=_SEVERITY.index)
        self._closed_status = end
        result = logger.close(self._timeout_s, end)
        if self.result is None or self.result:  # an earlier stage's falsy result stays
            self.result = result
        if not result:
            warnings.warn(f"steplog: not every record arrived: {result!r}", SteplogWarning,
                          stacklevel=2)
        if not result.timed_out:  # every upload ended: its link is gone, or kept elsewhere
            for staging in self._staging.values():
                shutil.rmtree(staging, ignore_errors=True)
            self._staging.clear()


def _new_checkpoints(callback: ModelCheckpoint,
                     uploaded: Mapping[str, float]) -> list[tuple[float, str, Any]]:
    """``callback``'s checkpoint files not uploaded since they were last written, oldest first,
    each with its modification time and score: its last, best and top-k files and the file it
    saved last (the one ``save_on_exception`` writes, say). A link (``save_last="link"``) is
    left out: it names one of the others, uploaded as itself."""
    scores: dict[str, Any] = {}
    current = getattr(callback, "current_score", None)
    for attr in ("_last_checkpoint_saved", "last_model_path"):
        path = getattr(callback, attr, "")
        if path:
            scores[path] = current
    best = getattr(callback, "best_model_path", "")
    if best:
        scores[best] = getattr(callback, "best_model_score", None)
    scores.update(getattr(callback, "best_k_models", None) or {})
    found = []
    for path, score in scores.items():
        try:
            st = os.lstat(path)
        except OSError:
            continue  # removed already (top-k), or never written
        if not stat.S_ISREG(st.st_mode):
            continue
        if path not in uploaded or uploaded[path] < st.st_mtime:
            found.append((st.st_mtime, path, score))
    found.sort(key=lambda f: (f[0], f[1]))
    return found


def _next_version(root: str) -> int:
    """The next free ``version_<n>`` under ``root`` (as Lightning's ``CSVLogger`` counts)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    versions = [int(n[8:]) for n in names
                if n.startswith("version_") and n[8:].isdigit()
                and os.path.isdir(os.path.join(root, n))]
    return max(versions, default=-1) + 1
