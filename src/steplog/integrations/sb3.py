"""Stable-Baselines3: an output format that writes SB3's logs through any steplog logger.

``model.set_logger(make_logger(logger))`` is the only change to a training script: every
``dump()`` of SB3's logger (once per rollout for on-policy algorithms, every ``log_interval``
episodes for off-policy ones) hands its values to the steplog logger, at SB3's step
(``num_timesteps``), and returns without waiting for any sink.

What becomes what:

- numbers (Python, numpy, one-element tensors and arrays): scalars;
- larger arrays and tensors: their summary statistics, ``key/min``, ``key/max``, ``key/mean``,
  ``key/std`` (where SB3's TensorBoard format draws a histogram);
- strings: run tags (the latest value of each key);
- ``Figure``: a PNG ``key_<step>.png`` in the upload lane (closed afterwards when SB3 asks);
- ``Image``: a PNG ``key_<step>.png`` in the upload lane;
- ``HParam``: run parameters (its ``hparam_dict``; ``metric_dict`` only names metrics logged
  elsewhere, for TensorBoard's HPARAMS tab);
- ``Video``: skipped, with one ``SteplogWarning``; ``None``: skipped (SB3's CSV leaves it empty).

SB3's ``exclude`` convention applies under the format name ``"steplog"``; keys excluded from
``"tensorboard"`` are skipped too (SB3 marks counters such as ``time/iterations`` that way,
because they duplicate the step), unless ``include_tensorboard_excluded=True``.
"""

from __future__ import annotations

import itertools
import numbers
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from stable_baselines3.common.logger import (
    Figure,
    HParam,
    HumanOutputFormat,
    Image,
    KVWriter,
    Video,
    make_output_format,
)
from stable_baselines3.common.logger import Logger as SB3Logger

from steplog.arguments import data_of, figure_of
from steplog.errors import SteplogWarning
from steplog.images import encode_png
from steplog.integrations.summaries import summary_statistics
from steplog.lifecycle import State
from steplog.loggers import Logger
from steplog.records import Artifact

__all__ = ["FORMAT", "SteplogOutputFormat", "make_logger"]

FORMAT = "steplog"
"""The format name that SB3's ``exclude`` argument uses for this output."""


class SteplogOutputFormat(KVWriter):
    """An SB3 ``KVWriter`` handing each ``dump()`` to ``logger``; what it logs is captured when
    ``write`` returns (SB3 clears its dicts right after, and may mutate the values).

    It never closes ``logger``: the caller owns it and closes it when training is over.
    """

    def __init__(self, logger: Logger, *, include_tensorboard_excluded: bool = False) -> None:
        if not isinstance(logger, Logger):
            raise TypeError(f"logger must be a steplog Logger, got {type(logger).__name__}")
        self.logger = logger
        self.include_tensorboard_excluded = bool(include_tensorboard_excluded)
        self._warned: set[str] = set()

    def write(
        self,
        key_values: dict[str, Any],
        key_excluded: dict[str, tuple[str, ...]],
        step: int = 0,
    ) -> None:
        """Log every value of this dump that is not excluded, at ``step``. Raises, logging
        nothing of this dump: ``TypeError`` for a value of a type it cannot store,
        ``ValueError`` for a key a sink can never store, and what ``log_metrics`` raises for a
        number it refuses. On a rank that does not log it only closes the figures SB3 asks
        to close."""
        if self.logger.state is State.INERT:
            for value in key_values.values():
                if isinstance(value, Figure):
                    _close(value)
            return
        metrics: dict[str, Any] = {}
        tags: dict[str, str] = {}
        params: dict[str, Any] = {}
        uploads: list[tuple[str, Any]] = []
        for key, value in list(key_values.items()):
            if self._excluded(key_excluded.get(key)):
                continue
            if isinstance(value, str):
                tags[key] = value
            elif value is None:
                continue
            elif isinstance(value, numbers.Number) or _is_single(value):
                metrics[key] = value
            elif _is_array(value):
                metrics.update(summary_statistics(key, value))
            elif isinstance(value, (Figure, Image)):
                uploads.append((key, value))
            elif isinstance(value, HParam):
                params.update(value.hparam_dict)
            elif isinstance(value, Video):
                self._warn_once("video", f"steplog does not store videos: {key!r} and every "
                                "later Video are skipped (exclude them from 'steplog' to "
                                "silence this)")
            else:
                raise TypeError(f"{key!r}: steplog cannot log a {type(value).__name__}; "
                                "record it with exclude='steplog' to keep it from this output")
        logger = self.logger
        # Every key checked, and every figure and image rendered, before anything is queued:
        # a bad one logs nothing of the dump.
        logger._check_names(itertools.chain(metrics, tags, params))
        settings = logger._param_records(params) + logger._tag_records(tags)
        artifacts = [a for key, value in uploads if (a := self._artifact(key, value, step))]
        for artifact in artifacts:
            logger._check_upload_name(artifact.name)
        if metrics:  # first: its values are checked at the call, and refused as a whole
            logger.log_metrics(metrics, step)
        if settings:
            logger._queue_settings(settings, "params and tags")
        for artifact in artifacts:
            logger._upload(artifact)

    def _excluded(self, excluded: Iterable[str] | str | None) -> bool:
        if excluded is None:
            return False
        if isinstance(excluded, str):
            excluded = (excluded,)
        return FORMAT in excluded or (
            not self.include_tensorboard_excluded and "tensorboard" in excluded
        )

    def _artifact(self, key: str, value: Figure | Image, step: int) -> Artifact | None:
        """The PNG upload of a figure (rendered now) or an image (encoded now); ``None`` for an
        image given by name, which is not stored."""
        if isinstance(value, Figure):
            artifact = figure_of(value.figure, f"{key}.png", step)
            _close(value)
            return artifact
        if isinstance(value.image, str):
            self._warn_once("image-name", f"{key!r}: an Image given by name (a Caffe2 blob) "
                            "is not stored; steplog stores image arrays and tensors")
            return None
        return data_of(encode_png(value.image, value.dataformats), f"{key}.png", ".png", step,
                       "image")

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, SteplogWarning, stacklevel=4)

    def close(self) -> None:
        """Nothing to release: the steplog logger belongs to the caller, who closes it."""


def _close(figure: Figure) -> None:
    """Close the matplotlib figure when SB3 asked for it (``Figure(..., close=True)``)."""
    if figure.close:
        import matplotlib.pyplot as plt

        plt.close(figure.figure)


def _is_single(value: object) -> bool:
    """A numpy or torch value holding exactly one number."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return bool(value.size == 1)
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1


def _is_array(value: object) -> bool:
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def make_logger(
    logger: Logger,
    formats: Iterable[str] = ("stdout",),
    folder: str | None = None,
    *,
    include_tensorboard_excluded: bool = False,
) -> SB3Logger:
    """An SB3 ``Logger`` writing through ``logger`` and SB3's own ``formats`` (``"stdout"``,
    ``"log"``, ``"csv"``, ``"json"``, ``"tensorboard"``; all but stdout write under ``folder``).

    Pass it to ``model.set_logger(...)``. Raises ``ValueError`` for a format that needs a folder
    when ``folder`` is ``None``, or for an unknown format.
    """
    if isinstance(formats, str):
        raise TypeError(f"formats must be a sequence of format names, got the str {formats!r}")
    if isinstance(formats, Mapping):
        raise TypeError("formats must be a sequence of format names, got a mapping")
    writer = SteplogOutputFormat(logger, include_tensorboard_excluded=include_tensorboard_excluded)
    outputs: list[KVWriter] = []
    for name in formats:
        if name == FORMAT:
            raise ValueError(f"{FORMAT!r} is always added; list only SB3's own formats")
        if name == "stdout":
            outputs.append(HumanOutputFormat(sys.stdout))
        elif folder is None:
            raise ValueError(f"SB3's {name!r} format writes files: pass folder=...")
        else:
            outputs.append(make_output_format(name, folder))
    outputs.append(writer)
    return SB3Logger(folder=folder, output_formats=outputs)
