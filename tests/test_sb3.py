"""Stable-Baselines3 through steplog: ``model.set_logger(make_logger(...))`` with the real SB3.

The reference is SB3's own output of the same seeded run: its CSV (every key, one row per dump)
and its TensorBoard events (the keys SB3 shows there).
"""

from __future__ import annotations

import csv
import json
import math
import uuid
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Figure, HParam, Image, Video
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlflow_support import MlflowServer
from steplog import FileLogger, MLFlowLogger, Options, SteplogWarning
from steplog.integrations.sb3 import SteplogOutputFormat, make_logger

pytestmark = pytest.mark.timeout(180)

FAST = Options(drain_interval_s=0.01)
STEPS = 2048
TB_EXCLUDED = {"time/iterations", "time/time_elapsed", "time/total_timesteps", "train/n_updates"}
"""The keys SB3's PPO records with ``exclude="tensorboard"``."""


def train_ppo(logger: Any, folder: Path, formats: tuple[str, ...], **kwargs: Any) -> None:
    torch.set_num_threads(1)
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=128, batch_size=64, n_epochs=2, seed=7,
                device="cpu", verbose=0)
    model.set_logger(make_logger(logger, formats, str(folder), **kwargs))
    model.learn(STEPS)


def csv_points(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """SB3's CSV as ``{key: [(num_timesteps, value), ...]}``, empty cells left out."""
    points: dict[str, list[tuple[int, float]]] = {}
    with open(folder / "progress.csv", newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["time/total_timesteps"])
            for key, cell in row.items():
                points.setdefault(key, [])
                if cell != "":
                    points[key].append((step, float(cell)))
    return points


def tensorboard_keys(folder: Path) -> set[str]:
    (events,) = folder.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def mlflow_points(server: MlflowServer, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = server.run(run_id)["data"].get("metrics", [])
    return {m["key"]: sorted((int(p["step"]), p["value"])
                             for p in server.metric_history(run_id, m["key"]))
            for m in keys}


def assert_same_points(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> None:
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs, strict=True):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (a, b)  # CSV prints float32s


def test_ppo_on_cartpole_logs_through_mlflow_what_sb3s_tensorboard_format_shows(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    logger = MLFlowLogger(f"sb3-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url,
                          options=FAST)
    train_ppo(logger, tmp_path, ("csv", "tensorboard"))
    assert logger.close(60)
    ours = mlflow_points(mlflow_server, str(logger.run_id))
    reference = csv_points(tmp_path)
    assert set(ours) == tensorboard_keys(tmp_path) == set(reference) - TB_EXCLUDED
    assert len(reference["time/fps"]) == STEPS // 128
    for key, points in ours.items():
        assert_same_points(points, reference[key])


def test_ppo_with_tensorboard_excluded_keys_included_logs_every_csv_key_and_point(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    logger = MLFlowLogger(f"sb3-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url,
                          options=FAST)
    train_ppo(logger, tmp_path, ("csv",), include_tensorboard_excluded=True)
    assert logger.close(60)
    ours = mlflow_points(mlflow_server, str(logger.run_id))
    reference = csv_points(tmp_path)
    assert set(ours) == set(reference)
    for key, points in ours.items():
        assert_same_points(points, reference[key])


# -- one dump, read back from a file run ---------------------------------------------------

def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "scalars.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["name"], []).append((rec["step"], rec["value"]))
    return out


def file_run(tmp_path: Path, **kwargs: Any) -> tuple[FileLogger, Any, Path]:
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    return logger, make_logger(logger, formats=(), **kwargs), run


def test_keys_excluded_from_steplog_or_tensorboard_are_skipped(tmp_path: Path) -> None:
    logger, sb3, run = file_run(tmp_path)
    sb3.record("kept", 1.0)
    sb3.record("kept/excluded_elsewhere", 2.0, exclude=("stdout", "csv"))
    sb3.record("not/for_steplog", 3.0, exclude="steplog")
    sb3.record("not/for_tensorboard", 4.0, exclude="tensorboard")
    sb3.dump(step=10)
    assert logger.close(30)
    assert scalars(run) == {"kept": [(10, 1.0)], "kept/excluded_elsewhere": [(10, 2.0)]}


def test_tensorboard_excluded_keys_are_kept_when_asked_but_steplog_excluded_ones_never(
    tmp_path: Path,
) -> None:
    logger, sb3, run = file_run(tmp_path, include_tensorboard_excluded=True)
    sb3.record("not/for_steplog", 3.0, exclude=("tensorboard", "steplog"))
    sb3.record("not/for_tensorboard", 4.0, exclude="tensorboard")
    sb3.dump(step=10)
    assert logger.close(30)
    assert scalars(run) == {"not/for_tensorboard": [(10, 4.0)]}


def test_values_changed_after_the_dump_do_not_change_what_is_logged(tmp_path: Path) -> None:
    logger, sb3, run = file_run(tmp_path)
    array = np.array([1.0, 2.0, 3.0])
    tensor = torch.tensor([5.0])
    hparams = {"lr": 0.1}
    sb3.record("array", array)
    sb3.record("tensor", tensor)
    sb3.record("hparams", HParam(hparams, {"array/mean": 0}))
    sb3.dump(step=3)
    array[:] = 100.0
    tensor[0] = 100.0
    hparams["lr"] = 100.0
    assert logger.close(30)
    assert scalars(run) == {
        "array/min": [(3, 1.0)], "array/max": [(3, 3.0)], "array/mean": [(3, 2.0)],
        "array/std": [(3, float(np.std([1.0, 2.0, 3.0])))], "tensor": [(3, 5.0)],
    }
    assert json.loads((run / "parameters.json").read_text()) == {"lr": 0.1}


def test_the_dicts_sb3_passes_may_be_mutated_and_cleared_after_write(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run", options=FAST)
    writer = SteplogOutputFormat(logger)
    values: dict[str, Any] = {"a": 1.0, "b": np.float32(2.5)}
    excluded: dict[str, tuple[str, ...]] = {"a": ("",), "b": ("",)}
    writer.write(values, excluded, 4)
    values["a"] = 99.0
    values["c"] = 7.0
    values.clear()
    excluded.clear()
    assert logger.close(30)
    assert scalars(tmp_path / "run") == {"a": [(4, 1.0)], "b": [(4, 2.5)]}


def test_strings_become_run_tags(tmp_path: Path) -> None:
    logger, sb3, run = file_run(tmp_path)
    sb3.record("env/id", "CartPole-v1")
    sb3.dump(step=1)
    assert logger.close(30)
    assert json.loads((run / "tags.json").read_text()) == {"env/id": "CartPole-v1"}


def test_figures_and_images_are_stored_as_pngs_at_sb3s_step(tmp_path: Path) -> None:
    logger, sb3, run = file_run(tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[1, 2] = (255, 128, 0)
    sb3.record("eval/curve", Figure(fig, close=True), exclude=("stdout", "log", "csv"))
    sb3.record("eval/frame", Image(pixels, "HWC"), exclude=("stdout", "log", "csv"))
    sb3.dump(step=64)
    pixels[:] = 0
    assert not plt.fignum_exists(fig.number)
    assert logger.close(30)
    assert (run / "eval" / "curve_64.png").read_bytes().startswith(b"\x89PNG")
    stored = matplotlib.image.imread(run / "eval" / "frame_64.png")
    assert (np.round(stored * 255).astype(np.uint8) == np.array(
        [[[255, 128, 0] if (r, c) == (1, 2) else [0, 0, 0] for c in range(6)]
         for r in range(4)], dtype=np.uint8)).all()


def test_videos_are_skipped_with_one_warning(tmp_path: Path) -> None:
    logger, sb3, run = file_run(tmp_path)
    frames = torch.zeros(1, 2, 3, 8, 8)
    with pytest.warns(SteplogWarning, match="does not store videos") as caught:
        for step in range(2):
            sb3.record("video", Video(frames, fps=10))
            sb3.record("x", float(step))
            sb3.dump(step=step)
    assert len([w for w in caught if issubclass(w.category, SteplogWarning)]) == 1
    assert logger.close(30)
    assert scalars(run) == {"x": [(0, 0.0), (1, 1.0)]}


def test_a_value_of_an_unknown_type_raises_at_the_dump_and_logs_nothing_of_it(
    tmp_path: Path,
) -> None:
    logger, sb3, run = file_run(tmp_path)
    sb3.record("ok", 1.0)
    sb3.record("weird", {"a": 1})
    with pytest.raises(TypeError, match=r"'weird'.*exclude='steplog'"):
        sb3.dump(step=1)
    assert logger.close(30)
    assert not (run / "scalars.jsonl").exists() or scalars(run) == {}


@pytest.mark.parametrize("key, value, error", [
    ("hparams", HParam({"schedule": {(0, 10): 0.1}}, {"train/loss": 0}), TypeError),  # a tuple key
    ("config/env", "Cart\udc80Pole", ValueError),  # text UTF-8 cannot encode
], ids=["hparam-that-cannot-be-captured", "tag-that-cannot-be-encoded"])
def test_a_param_or_tag_that_cannot_be_stored_raises_at_the_dump_and_logs_nothing_of_it(
    tmp_path: Path, key: str, value: Any, error: type[Exception],
) -> None:
    logger, sb3, run = file_run(tmp_path)
    sb3.record("rollout/rew", 1.5)
    sb3.record(key, value)
    with pytest.raises(error):
        sb3.dump(step=1)
    assert logger.close(30)
    assert not (run / "scalars.jsonl").exists() or scalars(run) == {}


def test_a_key_the_sink_refuses_raises_at_the_dump_and_logs_nothing_of_it(
    mlflow_server: MlflowServer,
) -> None:
    logger = MLFlowLogger(f"sb3-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url,
                          options=FAST)
    sb3 = make_logger(logger, formats=())
    sb3.record("train/loss", 0.5)
    sb3.record("config/env", "CartPole-v1")
    sb3.record("hparams", HParam({"lr": 0.001}, {"train/loss": 0}))
    sb3.record("eval/success%", "high")  # MLflow refuses '%' in a key: a tag that can never land
    with pytest.raises(ValueError, match="success%"):
        sb3.dump(step=1)
    sb3 = make_logger(logger, formats=())  # SB3 keeps the values of a dump that raised
    sb3.record("train/loss", 0.25)
    sb3.dump(step=2)
    assert logger.close(60)
    data = mlflow_server.run(str(logger.run_id))["data"]
    assert mlflow_points(mlflow_server, str(logger.run_id)) == {"train/loss": [(2, 0.25)]}
    assert "params" not in data
    assert not [t for t in data["tags"] if not t["key"].startswith(("mlflow.", "steplog."))]


@pytest.mark.parametrize("key, value", [
    ("img", Image(np.zeros((4, 4, 2), dtype=np.uint8), "HWC")),  # two channels: no PNG
    ("../fig", Figure(plt.figure(), close=True)),  # a name that would leave the run
    ("previous/img", Image(np.zeros((4, 4, 3), dtype=np.uint8), "HWC")),  # a folder of the run
], ids=["image-that-cannot-be-encoded", "figure-outside-the-run", "image-in-a-folder-of-the-run"])
def test_an_upload_that_cannot_be_stored_raises_at_the_dump_and_logs_nothing_of_it(
    tmp_path: Path, key: str, value: Any,
) -> None:
    logger, sb3, run = file_run(tmp_path)
    sb3.record("loss", 1.5)
    sb3.record("note", "hello")
    sb3.record(key, value)
    with pytest.raises(ValueError):
        sb3.dump(step=10)
    sb3 = make_logger(logger, formats=())  # SB3 keeps the values of a dump that raised
    sb3.record("loss", 0.7)
    sb3.dump(step=20)
    assert logger.close(30)
    assert scalars(run) == {"loss": [(20, 0.7)]}
    assert not (run / "tags.json").exists()


def test_a_rank_that_does_not_log_dumps_nothing_and_closes_the_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(var, value)
    logger = FileLogger(tmp_path / "run")
    sb3 = make_logger(logger, formats=())
    figure = plt.figure()
    sb3.record("loss", 1.0)
    sb3.record("fig", Figure(figure, close=True))
    sb3.record("img", Image(np.zeros((4, 4, 3), dtype=np.uint8), "HWC"))
    sb3.dump(step=1)
    assert logger.close(10)
    assert not (tmp_path / "run").exists()
    assert not plt.fignum_exists(figure.number)


def test_make_logger_refuses_bad_arguments_at_the_call(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(TypeError, match="sequence of format names"):
        make_logger(logger, "stdout")
    with pytest.raises(ValueError, match="writes files: pass folder"):
        make_logger(logger, ("csv",))
    with pytest.raises(ValueError, match="always added"):
        make_logger(logger, ("steplog",))
    with pytest.raises(TypeError, match="steplog Logger"):
        make_logger(object(), ())  # type: ignore[arg-type]
    assert logger.close(30)


def test_stdout_stays_sb3s_own_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = FileLogger(tmp_path / "run")
    sb3 = make_logger(logger)
    sb3.record("train/loss", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sb3.dump(step=1)
    assert "| train/" in capsys.readouterr().out
    assert logger.close(30)
