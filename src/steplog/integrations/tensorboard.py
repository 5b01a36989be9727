"""``steplog.SummaryWriter``: TensorBoard's writer API over a steplog logger.

A script written for ``torch.utils.tensorboard.SummaryWriter`` switches by changing its import
line: the methods it uses keep their signatures, and each call only captures the value and
queues it (``add_scalar`` costs what ``log_scalar`` costs). With no ``logger`` the writer keeps a
file run under ``log_dir`` (:class:`~steplog.FileLogger`); with one it writes through it (MLflow,
ClearML, several sinks). Methods TensorBoard has and steplog cannot honour raise
``NotImplementedError`` naming what to use instead. Nothing here imports torch or tensorboard.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn

from steplog.arguments import artifact_file_name
from steplog.capture import capture_step
from steplog.errors import SteplogWarning
from steplog.integrations.summaries import summary_statistics
from steplog.logger import exit_status
from steplog.loggers import FileLogger, Logger
from steplog.results import CloseResult, FlushResult
from steplog.sinks.base import RunStatus

__all__ = ["SummaryWriter", "default_log_dir"]


def default_log_dir(comment: str = "") -> str:
    """TensorBoard's default: ``runs/<Mon><DD>_<HH>-<MM>-<SS>_<hostname><comment>``."""
    import socket
    from datetime import datetime

    current_time = datetime.now().strftime("%b%d_%H-%M-%S")
    return os.path.join("runs", current_time + "_" + socket.gethostname() + comment)


class _Claimed:
    """The files a logger's writers have stored texts, figures and images as (one each), and
    for each (base, extension, step) the suffix its next name is looked for from."""

    __slots__ = ("files", "next")

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.next: dict[tuple[str, str, int | None], int] = {}


_claimed: weakref.WeakKeyDictionary[Logger, _Claimed] = weakref.WeakKeyDictionary()
_claimed_lock = threading.Lock()


def _claim_name(logger: Logger, base: str, ext: str, step: int | None) -> tuple[str, str]:
    """The ``name`` to queue a text, figure or image as so that its file is one that no
    earlier such record of any writer on ``logger`` used: ``<base><ext>``
    (``<base>_<step><ext>`` with a step) when free, else ``<base>-2<ext>``, ``<base>-3<ext>``,
    ... (``<base>-2_<step><ext>``, ...), and that file, now claimed (TensorBoard keeps every
    such event: none replaces an earlier one); raises as the logger does for a name that is
    not a relative path."""
    with _claimed_lock:
        claimed = _claimed.setdefault(logger, _Claimed())
        key = (base, ext, step)
        n = claimed.next.get(key, 1)  # a tag logged again and again: no scan from 1
        while True:
            name = f"{base}{ext}" if n == 1 else f"{base}-{n}{ext}"
            file = artifact_file_name(name, ext, step)
            if file not in claimed.files:
                break
            n += 1
        claimed.files.add(file)
        claimed.next[key] = n + 1
        return name, file


def _release_name(logger: Logger, file: str) -> None:
    """Give back a file name :func:`_claim_name` claimed for a record that was not queued (a
    later record of its tag takes the next suffix)."""
    with _claimed_lock:
        claimed = _claimed.get(logger)
        if claimed is not None:
            claimed.files.discard(file)


def _queue_named(logger: Logger, base: str, ext: str, step: int | None,
                 queue: Callable[[str], None]) -> None:
    """``queue(name)`` with a name claimed by :func:`_claim_name`, given back if it raises."""
    name, file = _claim_name(logger, base, ext, step)
    try:
        queue(name)
    except BaseException:
        _release_name(logger, file)
        raise


def _step(global_step: Any) -> int | None:
    """``global_step`` as steplog's step: an int as it is, any other real number (a float, a
    NumPy scalar, a one-element tensor) truncated to an int as TensorBoard's writer does."""
    if global_step is None or type(global_step) is int:
        return global_step
    try:
        return capture_step(global_step)
    except TypeError:
        pass
    try:
        if isinstance(global_step, (str, bytes, bool)):
            raise TypeError("not a number")
        whole = int(global_step)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # a tensor of several
        raise TypeError(f"global_step must be a number, got {type(global_step).__name__}: "
                        f"{global_step!r}") from exc
    return capture_step(whole)


def _no_walltime() -> NoReturn:
    raise ValueError("walltime is not supported: steplog stamps each value itself (when its "
                     "worker takes it, within the drain interval of the call)")


def _unsupported(name: str, instead: str) -> Callable[..., NoReturn]:
    def method(self: SummaryWriter, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"steplog.SummaryWriter does not support {name}; {instead}")

    method.__name__ = name
    method.__doc__ = f"Not supported: raises ``NotImplementedError`` ({instead})."
    return method


class SummaryWriter:
    """TensorBoard's ``SummaryWriter`` signature, writing through a steplog logger.

    Args:
        log_dir: the file run's directory when ``logger`` is ``None``; ``None`` (or empty) means
            TensorBoard's default, ``runs/<date>_<hostname><comment>``. With a ``logger`` it is
            only what :meth:`get_logdir` returns.
        comment: appended to the default ``log_dir`` (ignored when ``log_dir`` is given).
        purge_step: not supported (``ValueError`` unless ``None``).
        max_queue: accepted for compatibility; the queue and its bound are the logger's
            (:class:`~steplog.Options`).
        flush_secs: accepted for compatibility; the logger's worker delivers continuously.
        filename_suffix: accepted for compatibility; a file run's file names are fixed.
        logger: a steplog logger to write through. It stays yours: :meth:`close` flushes it
            and you close it. Without one, the writer's own :class:`~steplog.FileLogger` is
            closed by :meth:`close`.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        comment: str = "",
        purge_step: int | None = None,
        max_queue: int = 10,
        flush_secs: float = 120,
        filename_suffix: str = "",
        *,
        logger: Logger | None = None,
    ) -> None:
        if purge_step is not None:
            raise ValueError("purge_step is not supported: steplog does not rewrite a run's "
                             "history (a resumed run logs its steps again)")
        if not isinstance(comment, str):
            raise TypeError(f"comment must be a str, got {type(comment).__name__}")
        if logger is None:
            self.log_dir: str | None = os.fspath(log_dir) if log_dir else default_log_dir(comment)
            logger = FileLogger(self.log_dir)
            self._owned = True
        elif isinstance(logger, Logger):
            self.log_dir = os.fspath(log_dir) if log_dir else None
            self._owned = False
        else:
            raise TypeError(f"logger must be a steplog Logger, got {type(logger).__name__}")
        self.logger = logger
        self._log_scalar = logger.log_scalar
        self._log_metrics = logger.log_metrics

    def get_logdir(self) -> str | None:
        """The file run's directory (with a ``logger``: the ``log_dir`` given, or ``None``)."""
        return self.log_dir

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        new_style: bool = False,
        double_precision: bool = False,
    ) -> None:
        """Queue one point of ``tag`` (``global_step=None``: the number of earlier points of
        ``tag``). ``new_style`` and ``double_precision`` choose TensorBoard encodings and have
        no effect; values are stored as doubles."""
        if walltime is not None:
            _no_walltime()
        if global_step is not None and type(global_step) is not int:
            global_step = _step(global_step)
        self._log_scalar(tag, scalar_value, global_step)

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: Mapping[str, Any],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Queue one point per key as ``<main_tag>/<key>``, all at ``global_step``."""
        if walltime is not None:
            _no_walltime()
        if not isinstance(tag_scalar_dict, Mapping):
            raise TypeError(f"tag_scalar_dict must be a mapping, got "
                            f"{type(tag_scalar_dict).__name__}")
        self._log_metrics({f"{main_tag}/{k}": v for k, v in tag_scalar_dict.items()},
                          _step(global_step))

    def add_text(
        self,
        tag: str,
        text_string: str,
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Queue ``text_string`` as the file ``<tag>_<global_step>.md`` (without a step:
        ``<tag>.md``) in the upload lane; TensorBoard renders text as Markdown too. As
        TensorBoard keeps every text event, no text replaces an earlier one of any writer on
        the same logger: a file name already used gets ``-2``, ``-3``, ... after the tag
        (``<tag>-2.md``, ``<tag>-2_<global_step>.md``)."""
        if walltime is not None:
            _no_walltime()
        if not isinstance(text_string, str):
            raise TypeError(f"text must be a str, got {type(text_string).__name__}")
        step = _step(global_step)
        _queue_named(self.logger, tag, ".md", step,
                     lambda name: self.logger.log_text(text_string, name, step))

    def add_hparams(
        self,
        hparam_dict: Mapping[str, Any],
        metric_dict: Mapping[str, Any],
        hparam_domain_discrete: Mapping[str, Sequence[Any]] | None = None,
        run_name: str | None = None,
        global_step: int | None = None,
    ) -> None:
        """Queue ``hparam_dict`` as run parameters and ``metric_dict`` as scalars
        ``<run_name>/<key>`` (``run_name=None``: ``hparams``) at ``global_step``, in this
        writer's run. TensorBoard writes the metrics into a sub-run named ``run_name``, apart
        from the run's own series; here there is one run, so they are named apart instead
        (``hparam_domain_discrete``, for TensorBoard's display only, has no effect). A
        parameter logged again with another value is refused by MLflow (the close result says
        so). A key or value either mapping cannot store raises ``TypeError``/``ValueError`` and
        queues nothing of the call."""
        if not isinstance(hparam_dict, Mapping) or not isinstance(metric_dict, Mapping):
            raise TypeError("hparam_dict and metric_dict must be mappings")
        if hparam_domain_discrete is not None and not isinstance(hparam_domain_discrete, Mapping):
            raise TypeError("hparam_domain_discrete must be a mapping of name to values")
        if run_name is not None and not isinstance(run_name, str):
            raise TypeError(f"run_name must be a str, got {type(run_name).__name__}")
        params = self.logger._param_records(hparam_dict)  # checked before anything is queued
        if metric_dict:
            prefix = run_name or "hparams"
            self._log_metrics({f"{prefix}/{k}" if isinstance(k, str) else k: v
                               for k, v in metric_dict.items()}, _step(global_step))
        self.logger._queue_settings(params, "params")

    def add_figure(
        self,
        tag: str,
        figure: Any,
        global_step: int | None = None,
        close: bool = True,
        walltime: float | None = None,
    ) -> None:
        """Render a matplotlib figure to PNG now and queue it as ``<tag>_<global_step>.png``;
        a list of figures as ``<tag>/<i>_<global_step>.png``. ``close=True`` closes them
        afterwards, as TensorBoard does. No figure replaces an earlier one: a file name already
        used gets ``-2``, ``-3``, ... (as :meth:`add_text`)."""
        if walltime is not None:
            _no_walltime()
        step = _step(global_step)
        figures = list(figure) if isinstance(figure, (list, tuple)) else None
        for base, fig in ([(tag, figure)] if figures is None else
                          [(f"{tag}/{i}", fig) for i, fig in enumerate(figures)]):
            _queue_named(self.logger, base, ".png", step,
                         functools.partial(self._log_figure, fig, step=step))
        if close:
            import matplotlib.pyplot as plt

            for fig in figures if figures is not None else [figure]:
                plt.close(fig)

    def _log_figure(self, fig: Any, name: str, step: int | None) -> None:
        self.logger.log_figure(fig, name, step)

    def add_image(
        self,
        tag: str,
        img_tensor: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        dataformats: str = "CHW",
    ) -> None:
        """Encode an image (uint8, or floats in ``[0, 1]``) to PNG now and queue it as
        ``<tag>_<global_step>.png``; no image replaces an earlier one (as :meth:`add_figure`).
        A batch (``dataformats`` a permutation of ``"NCHW"``) is drawn as one grid, eight
        images a row, as TensorBoard draws it."""
        if walltime is not None:
            _no_walltime()
        step = _step(global_step)
        _queue_named(self.logger, tag, ".png", step, lambda name: self.logger.log_image(
            img_tensor, name, step, dataformats=dataformats))

    def add_images(
        self,
        tag: str,
        img_tensor: Any,
        global_step: int | None = None,
        walltime: float | None = None,
        dataformats: str = "NCHW",
    ) -> None:
        """A batch of images as one PNG grid, as :meth:`add_image` draws it."""
        self.add_image(tag, img_tensor, global_step, walltime, dataformats)

    def add_histogram(
        self,
        tag: str,
        values: Any,
        global_step: int | None = None,
        bins: str | int | Sequence[float] = "tensorflow",
        walltime: float | None = None,
        max_bins: int | None = None,
    ) -> None:
        """Queue the summary statistics of ``values`` as they are now: ``<tag>/min``,
        ``<tag>/max``, ``<tag>/mean``, ``<tag>/std`` at ``global_step`` (no buckets are
        stored, so ``bins`` and ``max_bins`` have no effect). A CUDA tensor is reduced on its
        device without a host synchronisation. ``ValueError`` for no values."""
        if walltime is not None:
            _no_walltime()
        self._log_metrics(summary_statistics(tag, values), _step(global_step))

    add_image_with_boxes = _unsupported(
        "add_image_with_boxes", "draw the boxes on the image and use add_image")
    add_video = _unsupported("add_video", "save the video to a file and log it with "
                             "writer.logger.log_artifact(path)")
    add_audio = _unsupported("add_audio", "save the audio to a file and log it with "
                             "writer.logger.log_artifact(path)")
    add_graph = _unsupported("add_graph", "steplog stores no model graphs (save_policy stores "
                             "the weights)")
    add_onnx_graph = _unsupported("add_onnx_graph", "log the ONNX file with "
                                  "writer.logger.log_artifact(path)")
    add_embedding = _unsupported("add_embedding", "save the embedding to a file and log it "
                                 "with writer.logger.log_artifact(path)")
    add_pr_curve = _unsupported("add_pr_curve", "log the curve as a figure with add_figure")
    add_pr_curve_raw = _unsupported("add_pr_curve_raw", "log the curve as a figure with "
                                    "add_figure")
    add_mesh = _unsupported("add_mesh", "save the mesh to a file and log it with "
                            "writer.logger.log_artifact(path)")
    add_tensor = _unsupported("add_tensor", "log its summary statistics with add_histogram")
    add_histogram_raw = _unsupported("add_histogram_raw", "pass the values to add_histogram")
    add_custom_scalars = _unsupported("add_custom_scalars", "custom layouts are a "
                                      "TensorBoard display setting")
    add_custom_scalars_marginchart = _unsupported(
        "add_custom_scalars_marginchart", "custom layouts are a TensorBoard display setting")
    add_custom_scalars_multilinechart = _unsupported(
        "add_custom_scalars_multilinechart", "custom layouts are a TensorBoard display setting")

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until everything queued before this call is stored, or ``timeout`` seconds
        passed (``None``: the logger's ``Options.timeout_s``); truthy only when it all was."""
        return self.logger.flush(timeout)

    def close(
        self, timeout: float | None = None, status: RunStatus = "FINISHED"
    ) -> CloseResult | FlushResult:
        """Close the writer's own file logger (deliver, end the run with ``status``), or flush
        a logger that was passed in (its owner closes it); truthy only when everything was
        stored. After closing its own logger, ``add_*`` raise ``LoggerClosedError``."""
        if self._owned:
            return self.logger.close(timeout, status)
        return self.logger.flush(timeout)

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        result = self.close(status=exit_status(exc_type, exc_val))
        if isinstance(result, CloseResult):
            self.logger._report_unclean(result, "leaving a SummaryWriter's with block")
        elif not result:
            warnings.warn(f"steplog: leaving a SummaryWriter's with block, not every record "
                          f"arrived: {result!r}", SteplogWarning, stacklevel=2)
