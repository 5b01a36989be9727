"""The file sink: incremental, pandas-readable, artifacts kept inside the run directory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steplog import FileLogger, FileSink, Logger, Options, RetryPolicy, SteplogWarning
from steplog.records import Batch, Param, Scalar, Scalars
from steplog.sinks.file import read_series

FAST = Options(drain_interval_s=0.005)


def test_scalars_are_json_lines_that_pandas_reads(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.log_scalar("loss/train", 0.5, 10)
    logger.log_metrics({"nan": math.nan, "inf": math.inf, "-inf": -math.inf}, 11)
    assert logger.close(10)
    df = pd.read_json(tmp_path / "scalars.jsonl", lines=True, precise_float=True)
    assert list(df.columns) == ["name", "value", "step", "timestamp"]
    assert df["name"].tolist() == ["loss/train", "nan", "inf", "-inf"]
    assert df["value"].iloc[0] == 0.5 and math.isnan(df["value"].iloc[1])
    assert df["value"].iloc[2] == math.inf and df["value"].iloc[3] == -math.inf
    assert df["step"].tolist() == [10, 11, 11, 11]


def test_scalars_are_on_disk_after_flush_without_close(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    for i in range(10):
        logger.log_scalar("x", float(i))
    assert logger.flush(10)
    assert len((tmp_path / "scalars.jsonl").read_text().splitlines()) == 10
    logger.close(10)


def test_parameters_merge_into_one_json_file(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.log_parameters({"lr": 0.1, "algo": "PPO"})
    logger.log_parameters({"seed": 3})
    logger.log_tags({"stage": "dev"})
    assert logger.close(10)
    assert json.loads((tmp_path / "parameters.json").read_text()) == {
        "algo": "PPO", "lr": 0.1, "seed": 3}
    assert json.loads((tmp_path / "tags.json").read_text()) == {"stage": "dev"}


def test_a_second_logger_with_existing_append_continues_the_run_and_merges(tmp_path) -> None:
    first = FileLogger(tmp_path, options=FAST)
    first.log_scalar("x", 1.0)
    first.log_parameters({"a": 1})
    first.close(10)
    second = FileLogger(tmp_path, options=FAST, existing="append")
    second.log_scalar("x", 2.0)
    second.log_parameters({"b": 2})
    second.close(10)
    assert pd.read_json(tmp_path / "scalars.jsonl", lines=True)["value"].tolist() == [1.0, 2.0]
    assert json.loads((tmp_path / "parameters.json").read_text()) == {"a": 1, "b": 2}


def test_log_file_copies_into_a_named_folder_and_can_move(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_text("keep")
    (src / "move.txt").write_text("move")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(src / "keep.txt", name="notes")
    logger.log_file(src / "move.txt", name="notes", move=True)
    assert logger.close(10)
    assert (run / "notes" / "keep.txt").read_text() == "keep"
    assert (run / "notes" / "move.txt").read_text() == "move"
    assert (src / "keep.txt").exists() and not (src / "move.txt").exists()


def test_log_artifact_stores_the_file_and_a_manifest_entry(tmp_path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("a,b\n1,2\n")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_artifact(f, name="tables/data.csv", type="dataset", step=5,
                        metadata={"rows": 1}, aliases=["latest"])
    assert logger.close(10)
    assert (run / "tables" / "data.csv").read_text() == "a,b\n1,2\n"
    entry = json.loads((run / "artifacts.jsonl").read_text())
    assert entry["name"] == "tables/data.csv" and entry["kind"] == "dataset"
    assert entry["step"] == 5 and entry["metadata"] == {"rows": 1}
    assert entry["aliases"] == ["latest"]


@pytest.mark.parametrize("name", ["scalars.jsonl", "run.json", "parameters.json", "tags.json",
                                  "artifacts.jsonl", "scalars.json", "previous/x.txt",
                                  "previous\\x.txt"])
def test_an_upload_named_like_a_file_of_the_run_is_refused_at_the_call(tmp_path, name) -> None:
    f = tmp_path / "x.txt"
    f.write_text("x")
    logger = FileLogger(tmp_path / "run", options=FAST)
    logger.log_scalar("loss", 1.0, 0)
    with pytest.raises(ValueError, match="keeps its own"):
        logger.log_artifact(f, name=name)
    with pytest.raises(ValueError, match="keeps its own"):
        logger.log_text("x", name)
    assert logger.close(10)
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "scalars.jsonl").open()] == [0]


def test_log_artifact_refuses_aliases_that_are_a_str_and_metadata_that_is_no_mapping(
    tmp_path,
) -> None:
    f = tmp_path / "x.txt"
    f.write_text("x")
    logger = FileLogger(tmp_path / "run", options=FAST)
    with pytest.raises(TypeError, match="aliases must be a list of str"):
        logger.log_artifact(f, aliases="best")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="aliases must be a list of str"):
        logger.log_artifact(f, aliases=["best", 1])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="aliases must be a list of str"):
        logger.log_artifact(f, aliases={"best": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="metadata must be a mapping"):
        logger.log_artifact(f, metadata=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="type must be a str"):
        logger.log_artifact(f, type=[])  # type: ignore[arg-type]
    assert logger.close(10)
    assert not (tmp_path / "run" / "artifacts.jsonl").exists()


def test_a_directory_logged_again_under_its_name_replaces_the_earlier_one(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "x").write_text("first")
    (first / "y").write_text("first")
    (second / "x").write_text("second")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_directory(first, "d")
    logger.log_directory(second, "d")
    assert logger.close(10)
    assert sorted(p.name for p in (run / "d").iterdir()) == ["x"]
    assert (run / "d" / "x").read_text() == "second"


def test_a_file_and_a_directory_under_one_name_replace_each_other(tmp_path) -> None:
    folder, f = tmp_path / "folder", tmp_path / "f.txt"
    folder.mkdir()
    (folder / "inside").write_text("folder")
    f.write_text("file")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_directory(folder, "a")
    logger.log_artifact(f, name="a")  # a file where a folder was
    logger.log_artifact(f, name="b")
    logger.log_directory(folder, "b")  # a folder where a file was
    assert logger.close(10)
    assert (run / "a").read_text() == "file"
    assert (run / "b" / "inside").read_text() == "folder"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_file_cannot_take_the_place_of_a_folder_of_other_uploads(tmp_path) -> None:
    f = tmp_path / "b.txt"
    f.write_text("b")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(f, "notes")  # stored as notes/b.txt
    logger.log_artifact(f, name="notes")
    result = logger.close(10)
    assert not result and "holds other uploads" in result.losses[0].reason
    assert (run / "notes" / "b.txt").read_text() == "b"


def test_a_folder_logged_into_a_folder_of_other_uploads_is_added_to_it(tmp_path) -> None:
    f, folder = tmp_path / "b.txt", tmp_path / "more"
    f.write_text("b")
    folder.mkdir()
    (folder / "c.txt").write_text("c")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(f, "notes")
    logger.log_directory(folder, "notes")
    assert logger.close(10)
    assert sorted(p.name for p in (run / "notes").iterdir()) == ["b.txt", "c.txt"]


def test_an_upload_with_a_long_name_is_stored(tmp_path) -> None:
    name = "n" * 250  # most file systems allow 255 bytes
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_text("long", name + ".txt"[: 255 - len(name)])
    logger.log_text("longer", name + ".txt"[: 255 - len(name)])  # and replaced
    assert logger.close(10)
    assert [p.read_text() for p in run.glob("n*")] == ["longer"]


def test_an_upload_named_like_the_sinks_temporary_files_is_refused_and_others_survive(
    tmp_path,
) -> None:
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    for name in ("sub/.steplog-abc.tmp", "sub\\.steplog-abc.tmp"):
        with pytest.raises(ValueError, match="temporary files"):
            logger.log_text("x", name)
    logger.log_text("mine", "tags.json.tmp")
    logger.log_tags({"k": "v"})
    assert logger.close(10)
    assert (run / "tags.json.tmp").read_text() == "mine"
    assert json.loads((run / "tags.json").read_text()) == {"k": "v"}


def test_a_folder_of_saved_policies_is_not_replaced_by_an_upload_of_its_name(tmp_path) -> None:
    f = tmp_path / "pol.txt"
    f.write_text("not a policy")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.save_policy(torch.nn.Linear(2, 2), name="pol")
    logger.save_policy(torch.nn.Linear(2, 2), name="pol")
    logger.log_artifact(f, name="pol")
    result = logger.close(10)
    assert not result and "holds other uploads" in result.losses[0].reason
    assert sorted(p.name for p in (run / "pol").iterdir() if p.name.startswith("step_")) == [
        "step_0", "step_1"]


def test_a_folder_with_a_file_named_latest_is_replaced_like_any_other(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, shard in ((first, "old.bin"), (second, "new.bin")):
        folder.mkdir()
        (folder / "latest").write_text(shard)
        (folder / shard).write_text(shard)
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_directory(first, "ckpt")
    logger.log_directory(second, "ckpt")
    assert logger.close(10)
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["latest", "new.bin"]


def test_moving_a_link_to_a_folder_stores_the_folder_and_removes_the_link(tmp_path) -> None:
    folder, link = tmp_path / "folder", tmp_path / "link"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    link.symlink_to(folder)
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(link, "d", move=True)
    assert logger.close(10)
    assert (run / "d" / "link" / "a.txt").read_text() == "a"
    assert not link.is_symlink() and (folder / "a.txt").exists()  # the link went, not its target


def test_moving_a_link_to_a_file_stores_the_file_and_removes_the_link(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"w")
    link = tmp_path / "latest.bin"
    link.symlink_to("weights.bin")  # relative, as `ln -s` makes it
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(link, "d", move=True)
    assert logger.close(10)
    stored = run / "d" / "latest.bin"
    assert not stored.is_symlink() and stored.read_bytes() == b"w"
    assert not link.is_symlink() and (tmp_path / "weights.bin").exists()


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Marks files immutable (``chattr +i``: not even root may remove them), undone after."""
    marked: list[Path] = []

    def mark(path: Path) -> None:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("chattr +i does not work here")
        marked.append(path)

    yield mark
    for path in marked:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_an_upload_in_place_is_stored_even_when_the_old_one_cannot_be_removed(
    tmp_path, immutable,
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / "x").write_text(folder.name)
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_directory(first, "d")
    assert logger.flush(10)
    immutable(run / "d" / "x")  # the old folder can never be removed whole
    logger.log_directory(second, "d")
    assert logger.close(10)
    assert (run / "d" / "x").read_text() == "second"
    names = [json.loads(line)["name"] for line in (run / "artifacts.jsonl").open()]
    assert names == ["d", "d"]


def test_log_directory_copies_a_tree(tmp_path) -> None:
    d = tmp_path / "cfg"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.yaml").write_text("a: 1")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_directory(d, path="configs")
    assert logger.close(10)
    assert (run / "configs" / "sub" / "a.yaml").read_text() == "a: 1"


def test_log_figure_renders_at_the_call_so_the_figure_may_change_after(tmp_path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    logger = FileLogger(tmp_path, options=FAST)
    logger.log_figure(fig, "curves/loss", iteration=3)
    plt.close(fig)
    assert logger.close(10)
    png = (tmp_path / "curves" / "loss_3.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_save_policy_stores_the_weights_as_they_were_at_the_call(tmp_path) -> None:
    policy = torch.nn.Linear(3, 2)
    with torch.no_grad():
        policy.weight.fill_(1.0)
    logger = FileLogger(tmp_path, options=FAST)
    logger.save_policy(policy)
    with torch.no_grad():
        policy.weight.fill_(7.0)  # training goes on right after the call
    logger.save_agent({"type": "ppo"}, name="agent.pth")
    assert logger.close(10)
    saved = torch.load(tmp_path / "policy" / "model.pth", weights_only=True)
    assert torch.equal(saved["weight"], torch.ones(2, 3))
    assert torch.load(tmp_path / "agent.pth", weights_only=True) == {"type": "ppo"}


def test_close_writes_the_run_status(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    logger.close(10)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "FINISHED"


def test_a_second_run_in_a_used_directory_moves_the_earlier_run_aside(tmp_path) -> None:
    first = FileLogger(tmp_path, options=FAST)
    first.log_scalar("x", 1.0)
    first.log_parameters({"a": 1})
    src = tmp_path / "notes.txt"
    src.write_text("first run's notes")
    first.log_artifact(src, name="docs/notes.txt")
    assert first.close(10)
    with pytest.warns(SteplogWarning, match="moved it to"):
        second = FileLogger(tmp_path, options=FAST)
    second.log_scalar("x", 2.0)
    assert second.close(10)
    assert pd.read_json(tmp_path / "scalars.jsonl", lines=True)["value"].tolist() == [2.0]
    (previous,) = (tmp_path / "previous").iterdir()
    assert pd.read_json(previous / "scalars.jsonl", lines=True)["value"].tolist() == [1.0]
    assert json.loads((previous / "parameters.json").read_text()) == {"a": 1}
    assert (previous / "docs" / "notes.txt").read_text() == "first run's notes"
    assert not (tmp_path / "docs").exists() and not (tmp_path / "parameters.json").exists()
    assert src.exists()  # not part of the run: left where it was


def test_existing_error_refuses_a_used_directory(tmp_path) -> None:
    first = FileLogger(tmp_path, options=FAST)
    first.log_scalar("x", 1.0)
    first.close(10)
    with pytest.raises(FileExistsError, match="already holds a run"):
        FileLogger(tmp_path, existing="error")


def test_close_leaves_the_seed_scalars_json_beside_the_incremental_file(tmp_path) -> None:
    logger = FileLogger(tmp_path, options=FAST)
    for i in range(3):
        logger.log_metrics({"loss": 1.0 / (i + 1), "reward": float(i)}, i * 10)
    logger.log_scalar("odd", math.nan, 0)
    assert logger.close(10)
    series = json.loads((tmp_path / "scalars.json").read_text())
    assert series["loss"] == [[0, 1.0], [10, 0.5], [20, 1.0 / 3]]
    assert series["reward"] == [[0, 0.0], [10, 1.0], [20, 2.0]]
    assert math.isnan(series["odd"][0][1])


def test_a_batch_split_after_a_refusal_never_duplicates_a_line(tmp_path) -> None:
    (tmp_path / "parameters.json" / "x").mkdir(parents=True)  # it can never be written here
    logger = FileLogger(tmp_path, options=Options(drain_interval_s=0.5), existing="append")
    logger.log_metrics({f"m{k}": float(k) for k in range(10)}, 0)
    logger.log_parameters({"lr": 0.1})  # the same batch as the metrics
    with pytest.warns(SteplogWarning, match="rejected param 'lr'"):
        result = logger.close(10)
    assert not result and result.rejected == 1 and result.undelivered == 1
    rows = pd.read_json(tmp_path / "scalars.jsonl", lines=True)
    assert sorted(rows["name"]) == sorted(f"m{k}" for k in range(10))  # each exactly once


def test_a_write_retried_after_a_full_disk_never_duplicates_a_line(small_fs) -> None:
    run = small_fs / "run"
    retry = RetryPolicy(initial_s=0.05, max_s=0.1, jitter_s=0.0)
    logger = FileLogger(run, options=Options(drain_interval_s=0.5, retry=retry))
    assert logger.flush(10)  # the run's files are open
    filler = small_fs / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        for _ in range(64):
            f.write(b"\0" * 4096)
    os.truncate(filler, filler.stat().st_size - 4096)  # one page left: the scalars fit
    logger.log_metrics({f"m{k}": float(k) for k in range(10)}, 0)
    logger.log_parameters({"lr": 0.1})  # ...the rewritten parameters.json does not
    with pytest.warns(SteplogWarning, match="No space left"):
        time.sleep(1.0)  # the batch fails and is retried
    assert logger.stats().retried >= 1
    filler.unlink()  # space again
    assert logger.close(10)
    rows = pd.read_json(run / "scalars.jsonl", lines=True)
    assert sorted(rows["name"]) == sorted(f"m{k}" for k in range(10))  # each exactly once
    assert json.loads((run / "parameters.json").read_text()) == {"lr": 0.1}


def test_scalars_that_do_not_fit_a_full_disk_are_written_once_when_space_returns(
    small_fs,
) -> None:
    run = small_fs / "run"
    retry = RetryPolicy(initial_s=0.05, max_s=0.1, jitter_s=0.0)
    logger = FileLogger(run, options=Options(drain_interval_s=0.01, retry=retry))
    assert logger.flush(10)
    filler = small_fs / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        for _ in range(64):
            f.write(b"\0" * 4096)  # until the file system is full
    for i in range(50):
        logger.log_scalar("loss", float(i), i)
    with pytest.warns(SteplogWarning, match="No space left"):
        time.sleep(0.6)  # the scalars themselves fail to be written, and are retried
    filler.unlink()
    assert logger.close(10)
    assert pd.read_json(run / "scalars.jsonl", lines=True)["step"].tolist() == list(range(50))


@pytest.mark.filterwarnings("ignore::steplog.SteplogWarning")
def test_a_directory_with_a_dangling_link_is_rejected_at_once(tmp_path) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    (src / "ok.txt").write_text("x")
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    logger = FileLogger(tmp_path / "run", options=FAST)
    logger.log_directory(src, "tree")
    start = time.monotonic()
    result = logger.close(3)
    assert time.monotonic() - start < 1.5
    assert not result and result.rejected == 1 and result.losses


def test_a_file_removed_before_the_worker_copied_it_is_rejected_at_once(tmp_path) -> None:
    src = tmp_path / "gone.txt"
    src.write_text("x")
    logger = FileLogger(tmp_path / "run", options=Options(drain_interval_s=1.0))
    logger.log_artifact(src)
    src.unlink()  # before the worker got to it
    start = time.monotonic()
    with pytest.warns(SteplogWarning, match="No such file"):
        result = logger.close()
    assert time.monotonic() - start < 2.0
    assert not result and result.rejected == 1
    assert result.losses[0].record == "artifact 'gone.txt'"


def test_moving_a_file_to_several_sinks_copies_it_to_each_then_removes_it(tmp_path) -> None:
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"weights")
    a, b = tmp_path / "a", tmp_path / "b"
    logger = Logger(sinks=[FileSink(a), FileSink(b)], options=FAST)
    logger.log_file(src, name="files", move=True)
    assert logger.close(10)
    assert (a / "files" / "ckpt.bin").read_bytes() == (b / "files" / "ckpt.bin").read_bytes()
    assert not src.exists()


def test_appending_after_a_crash_drops_the_torn_last_line_first(tmp_path) -> None:
    first = FileLogger(tmp_path, options=FAST)
    for i in range(3):
        first.log_scalar("loss", float(i), i)
    assert first.close(10)
    with open(tmp_path / "scalars.jsonl", "ab") as f:
        f.write(b'{"name":"loss","val')  # what a kill -9 in the middle of a write leaves
    second = FileLogger(tmp_path, options=FAST, existing="append")
    second.log_scalar("loss", 3.0, 3)
    assert second.close(10)
    assert pd.read_json(tmp_path / "scalars.jsonl", lines=True)["step"].tolist() == [0, 1, 2, 3]
    assert [s for s, _ in json.loads((tmp_path / "scalars.json").read_text())["loss"]] == [
        0, 1, 2, 3]


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(), min_size=1, max_size=40), auto=st.booleans())
def test_every_value_round_trips_nan_and_infinities_included(tmp_path_factory, values, auto
                                                             ) -> None:
    out = tmp_path_factory.mktemp("run")
    logger = FileLogger(out, options=FAST)
    for i, v in enumerate(values):
        logger.log_scalar("v", v, None if auto else i)
    assert logger.close(10)
    got = read_series(out / "scalars.jsonl")["v"]
    assert [s for s, _ in got] == list(range(len(values)))
    assert [repr(v) for _, v in got] == [repr(v) for v in values]  # NaN == NaN, -0.0 kept


def test_a_batch_of_blocks_records_and_settings_is_written_in_order(tmp_path) -> None:
    sink = FileSink(tmp_path)
    sink.open()
    rows = [("a", 1.0, 0), ("b", math.nan, 1), ("a", math.inf, 2)]
    sink.write(Batch([Scalars(rows, 5, finite=False), Param("lr", 0.1, 6), Scalar("c", 2.0, 3, 7),
                      Scalars(rows[:1], 8, finite=True)]))
    sink.close("FINISHED")
    lines = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert [(r["name"], r["step"], r["timestamp"]) for r in lines] == [
        ("a", 0, 5), ("b", 1, 5), ("a", 2, 5), ("c", 3, 7), ("a", 0, 8)]
    assert math.isnan(lines[1]["value"]) and lines[2]["value"] == math.inf
    assert json.loads((tmp_path / "parameters.json").read_text()) == {"lr": 0.1}


def test_an_upload_listed_while_the_disk_fills_leaves_no_torn_manifest_line(small_fs) -> None:
    run = small_fs / "run"
    retry = RetryPolicy(initial_s=0.05, max_s=0.1, jitter_s=0.0)
    logger = FileLogger(run, options=Options(drain_interval_s=0.01, retry=retry))
    for i in range(200):  # until the manifest's last page has room for part of a line only
        logger.log_text("", f"t{i:03d}")
        assert logger.flush(10)
        if 4096 - 110 < (run / "artifacts.jsonl").stat().st_size % 4096 < 4096 - 40:
            break
    filler = small_fs / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        for _ in range(64):
            f.write(b"\0" * 4096)
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
        for _ in range(4096):
            f.write(b"\0")  # the last bytes too
    logger.log_text("", "victim")
    with pytest.warns(SteplogWarning, match="No space left"):
        assert not logger.flush(1)
    filler.unlink()
    assert logger.close(10)
    lines = (run / "artifacts.jsonl").read_bytes().splitlines()
    names = [json.loads(line)["name"] for line in lines]  # every line whole
    assert names[-1] == "victim.txt" and names.count("victim.txt") == 1


def test_moving_a_run_aside_moves_uploads_inside_a_listed_folder_with_it(tmp_path) -> None:
    (tmp_path / "f.txt").write_text("f")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "g.txt").write_text("g")
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    logger.log_file(tmp_path / "f.txt", "notes")  # notes/f.txt
    logger.log_directory(tmp_path / "d", "notes")  # into notes/, beside it
    assert logger.close(10)
    with pytest.warns(SteplogWarning, match="held an earlier run"):
        again = FileLogger(run, options=FAST, existing="aside")
    assert again.close(10)
    (earlier,) = (run / "previous").iterdir()
    assert sorted(p.name for p in (earlier / "notes").iterdir()) == ["f.txt", "g.txt"]
    assert not (run / "notes").exists()


def test_continuing_a_run_keeps_every_whole_line_before_a_long_torn_tail(tmp_path) -> None:
    run = tmp_path / "run"
    logger = FileLogger(run, options=FAST)
    for i in range(1000):
        logger.log_scalar("x", float(i), i)
    assert logger.close(10)
    with open(run / "scalars.jsonl", "ab") as f:
        f.write(b"\0" * (3 << 19))  # 1.5 MiB of zeros: what a power loss can leave
    logger = FileLogger(run, options=FAST, existing="append")
    logger.log_scalar("x", 1000.0, 1000)
    assert logger.close(10)
    rows = pd.read_json(run / "scalars.jsonl", lines=True)
    assert rows["step"].tolist() == list(range(1001))
