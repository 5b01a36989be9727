"""steplog.SummaryWriter: TensorBoard's writer API over a steplog logger, checked against
torch's own SummaryWriter (signatures, the default run directory, a whole CleanRL-style script)."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.utils.tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clearml_support import OfflineSession
from mlflow_support import MlflowServer
from steplog import (
    ClearMLLogger,
    CloseResult,
    FileLogger,
    FlushResult,
    LoggerClosedError,
    MLFlowLogger,
    Options,
    State,
    SummaryWriter,
)

pytestmark = pytest.mark.timeout(180)

HERE = Path(__file__).parent
FAST = Options(drain_interval_s=0.01)
TORCH_IMPORT = "from torch.utils.tensorboard import SummaryWriter"
STEPLOG_IMPORT = "from steplog import SummaryWriter"

SUPPORTED = ["__init__", "add_scalar", "add_scalars", "add_text", "add_hparams", "add_figure",
             "add_image", "add_images", "add_histogram", "flush", "close", "get_logdir",
             "__enter__", "__exit__"]
UNSUPPORTED = ["add_image_with_boxes", "add_video", "add_audio", "add_graph",
               "add_onnx_graph", "add_embedding", "add_pr_curve", "add_pr_curve_raw",
               "add_mesh", "add_tensor", "add_histogram_raw", "add_custom_scalars",
               "add_custom_scalars_marginchart", "add_custom_scalars_multilinechart"]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    path = run / "scalars.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["name"], []).append((rec["step"], rec["value"]))
    return out


@pytest.fixture
def writer(tmp_path: Path) -> Any:
    w = SummaryWriter(tmp_path / "run")
    yield w
    w.close()


# -- the API is torch's ---------------------------------------------------------------------

def test_every_torch_summarywriter_method_exists_and_the_supported_ones_take_torchs_arguments(
) -> None:
    theirs = torch.utils.tensorboard.SummaryWriter
    public = {n for n, _ in inspect.getmembers(theirs, inspect.isfunction) if not n.startswith("_")}
    assert public <= set(dir(SummaryWriter))
    assert public == {n for n in SUPPORTED + UNSUPPORTED if not n.startswith("_")}
    for name in SUPPORTED:
        ours = inspect.signature(getattr(SummaryWriter, name)).parameters
        expected = inspect.signature(getattr(theirs, name)).parameters
        head = list(ours.values())[: len(expected)]
        assert [p.name for p in head] == list(expected), name
        assert [p.default for p in head] == [p.default for p in expected.values()], name
        extra = list(ours.values())[len(expected):]  # steplog's own, never required
        assert all(p.default is not p.empty for p in extra), name


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_an_unsupported_method_raises_naming_itself_and_what_to_use(writer: Any,
                                                                     name: str) -> None:
    with pytest.raises(NotImplementedError, match=f"does not support {name}; "):
        getattr(writer, name)("tag", 1)


def test_no_log_dir_gives_tensorboards_runs_date_hostname_comment_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    theirs = torch.utils.tensorboard.SummaryWriter(comment="-lr0.1")
    theirs.close()
    ours = SummaryWriter(comment="-lr0.1")
    ours.add_scalar("x", 1.0, 0)
    assert ours.close(30)
    pattern = (r"runs/[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_"
               + re.escape(socket.gethostname()) + re.escape("-lr0.1"))
    assert re.fullmatch(pattern, theirs.get_logdir())
    logdir = ours.get_logdir()
    assert logdir is not None and re.fullmatch(pattern, logdir)
    assert scalars(tmp_path / logdir) == {"x": [(0, 1.0)]}


def test_importing_steplog_imports_no_torch_tensorboard_sb3_numpy_or_matplotlib() -> None:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import steplog"],
                         capture_output=True, text=True, timeout=60, check=True)
    imported = {line.split("|")[-1].strip().split(".")[0]
                for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "steplog" in imported
    assert not imported & {"torch", "tensorboard", "stable_baselines3", "numpy", "matplotlib",
                           "mlflow", "lightning"}


# -- each method ----------------------------------------------------------------------------

def test_add_scalar_stores_numbers_tensors_and_numpy_values_at_their_steps(
    writer: Any, tmp_path: Path
) -> None:
    writer.add_scalar("loss", 0.5, 1)
    writer.add_scalar("loss", torch.tensor(0.25, requires_grad=True) * 1, 2)
    writer.add_scalar("loss", np.float32(0.125), np.int64(3))
    writer.add_scalar("count", 7)
    writer.add_scalar("count", 8)
    assert writer.close(30)
    assert scalars(tmp_path / "run") == {"loss": [(1, 0.5), (2, 0.25), (3, 0.125)],
                                         "count": [(0, 7.0), (1, 8.0)]}


def test_add_scalar_with_a_walltime_or_a_non_number_raises_at_the_call(writer: Any) -> None:
    with pytest.raises(ValueError, match="walltime is not supported"):
        writer.add_scalar("x", 1.0, 0, walltime=123.0)
    with pytest.raises(TypeError, match="expected a real number"):
        writer.add_scalar("x", "blob_name", 0)
    with pytest.raises(TypeError, match="global_step must be a number"):
        writer.add_scalar("x", 1.0, [0])


def test_add_scalars_stores_each_key_under_the_main_tag(writer: Any, tmp_path: Path) -> None:
    writer.add_scalars("run", {"sin": 0.0, "cos": 1.0}, 4)
    with pytest.raises(TypeError, match="must be a mapping"):
        writer.add_scalars("run", [1.0], 4)
    assert writer.close(30)
    assert scalars(tmp_path / "run") == {"run/sin": [(4, 0.0)], "run/cos": [(4, 1.0)]}


def test_add_text_stores_a_markdown_file_per_step(writer: Any, tmp_path: Path) -> None:
    writer.add_text("notes", "# hello", 3)
    writer.add_text("config", "|a|b|")
    with pytest.raises(TypeError, match="text must be a str"):
        writer.add_text("notes", 42, 4)
    assert writer.close(30)
    assert (tmp_path / "run" / "notes_3.md").read_text() == "# hello"
    assert (tmp_path / "run" / "config.md").read_text() == "|a|b|"


def test_add_text_without_a_step_never_replaces_an_earlier_text(writer: Any,
                                                                tmp_path: Path) -> None:
    writer.add_text("note", "first")
    with pytest.raises(TypeError, match="text must be a str"):
        writer.add_text("note", 42)
    writer.add_text("note", "second")
    writer.add_text("note", "third")
    assert writer.close(30)
    run = tmp_path / "run"
    assert [(run / f).read_text() for f in ("note.md", "note-2.md", "note-3.md")] == [
        "first", "second", "third"]


def test_add_text_never_replaces_a_text_of_another_tag_or_step(writer: Any,
                                                                tmp_path: Path) -> None:
    writer.add_text("note", "note, first")
    writer.add_text("note", "note, second")
    writer.add_text("note-2", "note-2")
    writer.add_text("note", "note at 2", 2)
    writer.add_text("note_2", "note_2")
    writer.add_text("note", "note at 2, again", 2)
    assert writer.close(30)
    run = tmp_path / "run"
    assert {p.name: p.read_text() for p in run.glob("*.md")} == {
        "note.md": "note, first", "note-2.md": "note, second", "note-2-2.md": "note-2",
        "note_2.md": "note at 2", "note_2-2.md": "note_2", "note-2_2.md": "note at 2, again"}


def test_add_text_of_two_writers_on_one_logger_keeps_both(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run")
    first, second = SummaryWriter(logger=logger), SummaryWriter(logger=logger)
    first.add_text("note", "from the first")
    second.add_text("note", "from the second")
    assert logger.close(30)
    run = tmp_path / "run"
    assert [(run / f).read_text() for f in ("note.md", "note-2.md")] == [
        "from the first", "from the second"]


def test_add_text_takes_a_str_subclass_as_tensorboard_does(writer: Any, tmp_path: Path) -> None:
    writer.add_text("note", np.str_("numpy text"), 1)
    assert writer.close(30)
    assert (tmp_path / "run" / "note_1.md").read_text() == "numpy text"


def test_a_real_global_step_is_truncated_to_an_int_as_tensorboard_does(
    writer: Any, tmp_path: Path
) -> None:
    writer.add_scalar("a", 1.0, 3.0)
    writer.add_scalar("a", 2.0, np.float64(4))
    writer.add_scalar("a", 3.0, torch.tensor(5.7))
    writer.add_scalars("b", {"c": 1.0}, 6.0)
    writer.add_histogram("h", [1.0, 3.0], np.float32(7))
    writer.add_text("t", "text", 8.0)
    with pytest.raises(TypeError, match="global_step must be a number"):
        writer.add_scalar("a", 4.0, "9")
    with pytest.raises(TypeError, match="global_step must be a number"):
        writer.add_scalar("a", 4.0, float("nan"))
    assert writer.close(30)
    run = tmp_path / "run"
    got = scalars(run)
    assert got["a"] == [(3, 1.0), (4, 2.0), (5, 3.0)]
    assert got["b/c"] == [(6, 1.0)]
    assert {step for step, _ in got["h/mean"]} == {7}
    assert (run / "t_8.md").read_text() == "text"


def test_figures_and_images_logged_twice_at_one_step_are_both_kept(writer: Any,
                                                                  tmp_path: Path) -> None:
    for shade in (0, 200):
        figure, ax = plt.subplots()
        ax.plot([0, shade])
        writer.add_figure("fig", figure)
        writer.add_figure("pair", [plt.figure(), plt.figure()], 3)
        writer.add_image("img", np.full((2, 2), shade, dtype=np.uint8), 1, dataformats="HW")
    assert writer.close(30)
    run = tmp_path / "run"
    names = {str(p.relative_to(run)) for p in run.rglob("*.png")}
    assert names == {"fig.png", "fig-2.png", "pair/0_3.png", "pair/1_3.png", "pair/0-2_3.png",
                     "pair/1-2_3.png", "img_1.png", "img-2_1.png"}
    shades = [round(float(matplotlib.image.imread(run / f).max()) * 255)
              for f in ("img_1.png", "img-2_1.png")]
    assert shades == [0, 200]


def test_add_hparams_stores_parameters_and_the_metrics_as_scalars(writer: Any,
                                                                  tmp_path: Path) -> None:
    writer.add_hparams({"lr": 0.1, "layers": 2, "opt": "adam", "decay": torch.tensor(0.5)},
                       {"hparam/return": 200.0}, run_name="sweep-3", global_step=9)
    with pytest.raises(TypeError, match="must be mappings"):
        writer.add_hparams([("lr", 0.1)], {})
    assert writer.close(30)
    run = tmp_path / "run"
    assert json.loads((run / "parameters.json").read_text()) == {
        "lr": 0.1, "layers": 2, "opt": "adam", "decay": 0.5}
    assert scalars(run) == {"sweep-3/hparam/return": [(9, 200.0)]}


def test_add_hparams_metrics_never_join_the_runs_own_series_of_the_same_key(
    writer: Any, tmp_path: Path
) -> None:
    for step in (0, 100, 200):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.add_hparams({"lr": 0.1}, {"loss": 0.004})  # TensorBoard: a sub-run of its own
    assert writer.close(30)
    assert scalars(tmp_path / "run") == {"loss": [(0, 1.0), (100, 1 / 101), (200, 1 / 201)],
                                         "hparams/loss": [(0, 0.004)]}


def test_add_hparams_without_metrics_ignores_the_step(writer: Any, tmp_path: Path) -> None:
    writer.add_hparams({"lr": 0.1}, {}, global_step="final")
    assert writer.close(30)
    assert json.loads((tmp_path / "run" / "parameters.json").read_text()) == {"lr": 0.1}


def test_add_hparams_with_a_bad_parameter_or_metric_queues_nothing(writer: Any,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="schedule"):
        writer.add_hparams({"schedule": {(0, 10): 0.1}}, {"hparam/return": 200.0})
    with pytest.raises(TypeError, match="hparam/return"):
        writer.add_hparams({"lr": 0.1}, {"hparam/return": "high"})
    assert writer.close(30)
    run = tmp_path / "run"
    assert not (run / "parameters.json").exists()
    assert scalars(run) == {}


def test_add_figure_renders_now_and_closes_the_figure_unless_told_not_to(
    writer: Any, tmp_path: Path
) -> None:
    one, ax = plt.subplots()
    ax.plot([0, 1])
    keep, _ = plt.subplots()
    pair = [plt.figure(), plt.figure()]
    writer.add_figure("curve", one, 5)
    writer.add_figure("kept", keep, close=False)
    writer.add_figure("pair", pair, 6)
    assert not plt.fignum_exists(one.number) and plt.fignum_exists(keep.number)
    assert not any(plt.fignum_exists(f.number) for f in pair)
    plt.close(keep)
    assert writer.close(30)
    run = tmp_path / "run"
    for name in ("curve_5.png", "kept.png", "pair/0_6.png", "pair/1_6.png"):
        assert (run / name).read_bytes().startswith(b"\x89PNG"), name


def test_add_image_stores_a_png_of_the_pixels_at_the_call(writer: Any, tmp_path: Path) -> None:
    chw = torch.zeros(3, 2, 4)
    chw[0, 1, 3] = 1.0  # red at row 1, column 3; floats are in [0, 1]
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    writer.add_image("frame", chw, 1)
    writer.add_image("grey", grey, 1, dataformats="HW")
    chw.zero_()
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        writer.add_image("bad", torch.zeros(2, 4, 4), 1)
    with pytest.raises(ValueError, match="dataformats"):
        writer.add_image("bad", grey, 1, dataformats="XY")
    assert writer.close(30)
    rgb = np.round(matplotlib.image.imread(tmp_path / "run" / "frame_1.png") * 255)
    expected = np.zeros((2, 4, 3))
    expected[1, 3] = (255, 0, 0)
    assert (rgb == expected).all()
    stored = np.round(matplotlib.image.imread(tmp_path / "run" / "grey_1.png") * 255)
    assert (stored == grey).all()


def test_add_histogram_stores_summary_statistics_of_the_values_at_the_call(
    writer: Any, tmp_path: Path
) -> None:
    values = torch.tensor([1.0, 2.0, 4.0, 9.0])
    writer.add_histogram("weights", values, 2)
    writer.add_histogram("counts", [1, 1, 4], 2, bins="auto")
    values.fill_(0.0)
    with pytest.raises(ValueError, match="no values"):
        writer.add_histogram("empty", np.array([]), 2)
    with pytest.raises(TypeError, match="complex"):
        writer.add_histogram("z", torch.ones(2, dtype=torch.complex64), 2)
    assert writer.close(30)
    got = scalars(tmp_path / "run")
    data = np.array([1.0, 2.0, 4.0, 9.0])
    assert got["weights/min"] == [(2, 1.0)] and got["weights/max"] == [(2, 9.0)]
    assert got["weights/mean"] == [(2, 4.0)]
    assert math.isclose(got["weights/std"][0][1], float(data.std()))
    assert got["counts/mean"] == [(2, 2.0)] and got["counts/min"] == [(2, 1.0)]
    assert len(got) == 8


# -- flush, close, with ---------------------------------------------------------------------

def test_flush_and_close_return_truthy_results_and_a_closed_writer_refuses_more(
    tmp_path: Path,
) -> None:
    w = SummaryWriter(tmp_path / "run")
    w.add_scalar("x", 1.0, 0)
    flushed = w.flush()
    assert isinstance(flushed, FlushResult) and flushed
    assert scalars(tmp_path / "run") == {"x": [(0, 1.0)]}
    closed = w.close(timeout=30)
    assert isinstance(closed, CloseResult) and closed
    with pytest.raises(LoggerClosedError):
        w.add_scalar("x", 2.0, 1)


def test_with_closes_the_writers_run_and_marks_it_failed_after_an_exception(
    tmp_path: Path,
) -> None:
    with SummaryWriter(tmp_path / "ok") as w:
        w.add_scalar("x", 1.0, 0)
    assert w.logger.state is State.CLOSED
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["status"] == "FINISHED"
    with pytest.raises(RuntimeError), SummaryWriter(tmp_path / "bad") as w:
        raise RuntimeError("boom")
    assert json.loads((tmp_path / "bad" / "run.json").read_text())["status"] == "FAILED"


def test_bad_constructor_arguments_raise_at_the_call(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="purge_step is not supported"):
        SummaryWriter(tmp_path / "run", purge_step=10)
    with pytest.raises(TypeError, match="steplog Logger"):
        SummaryWriter(logger=object())  # type: ignore[arg-type]


# -- through another logger ------------------------------------------------------------------

def test_with_an_mlflow_logger_values_reach_the_server_and_the_logger_stays_open(
    mlflow_server: MlflowServer,
) -> None:
    logger = MLFlowLogger(f"writer-{uuid.uuid4().hex[:8]}", tracking_uri=mlflow_server.url,
                          options=FAST)
    with SummaryWriter(logger=logger) as w:
        for step in range(100):
            w.add_scalar("charts/return", float(step), step)
        w.add_hparams({"lr": 0.01}, {"final": 99.0})
        w.add_text("notes", "hello", 1)
    assert w.get_logdir() is None
    assert logger.state is State.OPEN
    logger.log_scalar("after", 1.0, 0)
    assert logger.close(60)
    run_id = str(logger.run_id)
    points = mlflow_server.metric_history(run_id, "charts/return")
    assert sorted((p["step"], p["value"]) for p in points) == [(s, float(s)) for s in range(100)]
    data = mlflow_server.run(run_id)["data"]
    assert {p["key"]: p["value"] for p in data["params"]} == {"lr": "0.01"}
    assert {m["key"] for m in data["metrics"]} == {"charts/return", "hparams/final", "after"}
    assert [a["path"] for a in mlflow_server.artifacts(run_id)] == ["notes_1.md"]


def test_with_a_clearml_offline_logger_scalars_land_in_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    logger = ClearMLLogger("steplog-tests", "summary-writer")
    w = SummaryWriter(logger=logger)
    for step in range(10):
        w.add_scalar("charts/return", float(step), step)
    assert w.close(30)
    assert logger.close(60)
    assert logger.offline_session is not None
    session = OfflineSession.read(logger.offline_session)
    assert session.series("charts", "return") == [(s, float(s)) for s in range(10)]


# -- a CleanRL-style script, unchanged but for its import line --------------------------------

def run_script(source: str, cwd: Path) -> Path:
    cwd.mkdir()
    script = cwd / "train.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (cwd / "runs").iterdir()
    return run


def tensorboard_scalars(run: Path) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """Every scalar of a TensorBoard run directory under steplog's names (add_scalars writes
    ``<main>/<key>`` into the sub-run ``<main>_<key>``), and the hyperparameters text."""
    out: dict[str, list[tuple[int, float]]] = {}
    text = ""
    for events in run.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        sub = events.parent.relative_to(run).as_posix()
        for tag in acc.Tags()["scalars"]:
            name = tag if sub == "." else f"{tag}/{sub[len(tag) + 1:]}"
            out[name] = [(e.step, e.value) for e in acc.Scalars(tag)]
        if "hyperparameters/text_summary" in acc.Tags()["tensors"]:
            (event,) = acc.Tensors("hyperparameters/text_summary")
            text = event.tensor_proto.string_val[0].decode()
    return out, text


def test_a_cleanrl_style_script_changed_only_in_its_import_stores_what_tensorboard_stores(
    tmp_path: Path,
) -> None:
    original = (HERE / "cleanrl_style_script.py").read_text()
    switched = original.replace(TORCH_IMPORT, STEPLOG_IMPORT)
    changed = [(a, b) for a, b in zip(original.splitlines(), switched.splitlines(), strict=True)
               if a != b]
    assert changed == [(TORCH_IMPORT, STEPLOG_IMPORT)]

    theirs, their_text = tensorboard_scalars(run_script(original, tmp_path / "torch"))
    run = run_script(switched, tmp_path / "steplog")
    ours = scalars(run)
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"
    assert set(ours) == set(theirs) == {
        "charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/policy_loss",
        "returns/first", "returns/last"}
    for name, points in ours.items():
        assert [s for s, _ in points] == [s for s, _ in theirs[name]], name
        if name != "charts/SPS":  # the only value that depends on the clock
            for (_, a), (_, b) in zip(points, theirs[name], strict=True):
                assert math.isclose(a, b, rel_tol=1e-6), (name, a, b)  # TensorBoard: float32
    assert (run / "hyperparameters.md").read_text() == their_text
    assert their_text.startswith("|param|value|")


def test_a_file_logger_passed_in_is_flushed_by_close_and_left_to_its_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    logger = FileLogger(tmp_path / "run", options=FAST)
    w = SummaryWriter("ignored", logger=logger)
    w.add_scalar("x", 3.0, 0)
    assert w.close(30)
    assert w.get_logdir() == "ignored" and not (tmp_path / "ignored").exists()
    assert scalars(tmp_path / "run") == {"x": [(0, 3.0)]}
    assert logger.state is State.OPEN
    assert logger.close(30)


def test_on_a_rank_that_does_not_log_the_writer_records_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STEPLOG_RANKS", "STEPLOG_GROUP", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    with SummaryWriter(tmp_path / "run") as w:
        w.add_scalar("x", 1.0, 0)
        w.add_text("notes", "hello", 0)
        w.add_image("frame", np.zeros((3, 2, 2)), 0)
        w.add_histogram("h", [1.0, 2.0], 0)
        assert w.logger.state is State.INERT
    assert not (tmp_path / "run").exists()
