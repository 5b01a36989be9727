"""``steplog show`` and ``steplog plot`` read every kind of run back: a file run, a directory of
runs, a journal run directory, an MLflow run; plots have one panel per metric group."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlflow_support import MlflowServer, free_port
from steplog import FileLogger, MLFlowLogger, Options, RetryPolicy
from steplog.cli import main
from steplog.plot import plot_runs, smooth
from steplog.readback import find_runs

QUICK = RetryPolicy(initial_s=0.05, max_s=0.2, jitter_s=0.0, window_s=1.0)


def file_run(path: Path, scale: float = 1.0, steps: int = 50) -> Path:
    logger = FileLogger(path)
    logger.log_parameters({"lr": 0.1 * scale, "algo": "PPO"})
    for i in range(steps):
        logger.log_metrics({"loss/policy": scale / (i + 1), "loss/value": 2 * scale / (i + 1),
                            "return/mean": scale * i, "lr": 0.1}, i)
    assert logger.close(30)
    return path


def shown(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["show", *args]) == 0
    return capsys.readouterr().out


def test_show_gives_a_file_runs_status_parameters_and_count_last_min_max_per_metric(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = shown(capsys, str(file_run(tmp_path / "run")))
    assert "status: FINISHED" in out and "algo=PPO" in out and "lr=0.1" in out
    (row,) = [line.split() for line in out.splitlines() if "return/mean" in line]
    assert row == ["return/mean", "50", "49", "49", "0", "49"]  # count, step, last, min, max


def test_show_of_a_directory_of_runs_shows_each_of_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file_run(tmp_path / "demo" / "a")
    file_run(tmp_path / "demo" / "b", scale=2.0)
    out = shown(capsys, str(tmp_path / "demo"))
    assert f"file run {tmp_path / 'demo' / 'a'}" in out
    assert f"file run {tmp_path / 'demo' / 'b'}" in out
    assert "lr=0.2" in out


def test_show_of_a_journal_run_directory_says_what_each_sink_lacks_and_how_to_deliver_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = MLFlowLogger("show-journal", tracking_uri=f"http://127.0.0.1:{free_port()}",
                          options=Options(drain_interval_s=0.01, retry=QUICK,
                                          runs_dir=str(tmp_path / "runs")))
    logger.log_parameters({"lr": 0.1})
    for i in range(300):
        logger.log_scalar("loss", 1.0 / (i + 1), i)
    result = logger.close(3)
    assert not result and result.sync is not None
    run_dir = result.sync.split(" ", 2)[2]
    deadline = time.monotonic() + 30
    while "RUNNING" in (out := shown(capsys, run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the worker still holds the journal
    assert "journal run directory" in out and "status: closed with FINISHED" in out
    assert "lr=0.1" in out
    assert re.search(r"mlflow: http://127.0.0.1:\d+ run not created yet: stored up to frame 0; "
                     r"lacks 301 records", out)  # 300 points and the param
    assert "undelivered:\n    301 records for mlflow" in out
    assert f"deliver it with: steplog sync {run_dir}" in out
    (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["loss"]]
    assert row[1:3] == ["300", "299"]
    for cursor in Path(run_dir, "journal").glob("cursor*"):
        cursor.unlink()  # a sink the journal never registered lacks everything
    assert "lacks 301 records" in shown(capsys, run_dir)


def unreachable_logger(runs_dir: Path) -> MLFlowLogger:
    """A logger whose MLflow server never answers: every record stays in its journal."""
    return MLFlowLogger("show-journal", tracking_uri=f"http://127.0.0.1:{free_port()}",
                        options=Options(drain_interval_s=0.01, retry=QUICK,
                                        runs_dir=str(runs_dir)))


def test_show_of_a_running_loggers_journal_gives_its_records_and_what_each_sink_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = unreachable_logger(tmp_path / "runs")
    try:
        for i in range(300):
            logger.log_scalar("loss", 1.0 / (i + 1), i)
        (run_dir,) = (tmp_path / "runs").iterdir()
        deadline = time.monotonic() + 30
        while ("lacks 300 records" not in (out := shown(capsys, str(run_dir)))
               and time.monotonic() < deadline):
            time.sleep(0.1)  # the worker journals what it drains
        assert "status: RUNNING (its logger holds the journal" in out
        assert "undelivered:\n    300 records for mlflow" in out
        assert "deliver it with" not in out  # a sync is refused while the logger runs
        (row,) = [line.split() for line in out.splitlines() if line.split()[:1] == ["loss"]]
        assert row[1:3] == ["300", "299"]
    finally:
        logger.close(0.5)


def test_show_of_a_journal_run_changes_no_file_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = unreachable_logger(tmp_path / "runs")
    for i in range(50):
        logger.log_scalar("loss", float(i), i)
    result = logger.close(1)
    assert not result and result.sync is not None
    run_dir = Path(result.sync.split(" ", 2)[2])
    journal = run_dir / "journal"
    deadline = time.monotonic() + 30
    while "RUNNING" in shown(capsys, str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)  # the worker still holds the journal
    (segment,) = journal.glob("*.seg")
    with open(segment, "ab") as f:
        f.write(b"SLFR" + bytes(30))  # a frame a kill cut short
    (journal / "lock").unlink()

    def files() -> dict[str, tuple[bytes, int]]:
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in journal.iterdir()}

    before = files()
    out = shown(capsys, str(run_dir))
    assert "lacks 50 records" in out and "damaged" not in out
    assert files() == before


def test_show_of_a_journal_run_lists_the_damage_it_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = unreachable_logger(tmp_path / "runs")
    logger.log_scalar("loss", 1.0, 0)
    result = logger.close(1)
    assert result.sync is not None
    run_dir = Path(result.sync.split(" ", 2)[2])
    deadline = time.monotonic() + 30
    while "RUNNING" in shown(capsys, str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    (run_dir / "journal" / "cursor.mlflow").write_text("garbage\n")
    out = shown(capsys, str(run_dir))
    assert "damaged: " in out and "cursor.mlflow, byte 0: the cursor is not a sequence" in out


def test_show_of_an_mlflow_run_by_id_and_by_experiment_and_run_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger("show-mlflow", tracking_uri=uri, run_name="ppo-7")
    logger.log_parameters({"gamma": 0.99})
    for i in range(20):
        logger.log_scalar("return/mean", float(i), i)
    assert logger.close(60)
    run_id = logger.run_id  # type: ignore[attr-defined]
    by_name = shown(capsys, "show-mlflow/ppo-7", "--tracking-uri", uri)
    assert f"MLflow run {uri} run {run_id}" in by_name
    assert "status: FINISHED" in by_name and "gamma=0.99" in by_name
    (row,) = [line.split() for line in by_name.splitlines() if "return/mean" in line]
    assert row == ["return/mean", "20", "19", "19", "0", "19"]
    assert shown(capsys, run_id, "--tracking-uri", uri) == by_name


def test_show_finds_a_run_by_names_that_hold_slashes_and_refuses_an_ambiguous_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ids = {}
    for experiment, run_name, value in [("team/ppo", "seed/1", 1.0), ("team", "ppo/x", 2.0),
                                        ("team/ppo", "x", 3.0)]:
        logger = MLFlowLogger(experiment, tracking_uri=uri, run_name=run_name)
        logger.log_scalar("return", value, 0)
        assert logger.close(60)
        ids[experiment, run_name] = logger.run_id  # type: ignore[attr-defined]
    out = shown(capsys, "team/ppo/seed/1", "--tracking-uri", uri)
    assert f"run {ids['team/ppo', 'seed/1']}" in out
    assert main(["show", "team/ppo/x", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "'team/ppo/x' is ambiguous" in err
    assert ids["team", "ppo/x"] in err and ids["team/ppo", "x"] in err


def test_show_of_a_path_that_holds_no_run_fails_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a steplog run" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_show_of_an_mlflow_store_that_does_not_exist_fails_with_status_2_and_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "typo.db"
    assert main(["show", "exp/run", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert f"no MLflow store at sqlite:///{store}" in capsys.readouterr().err
    assert not store.exists()


@pytest.mark.parametrize(("content", "why"), [(b"", "holds no MLflow tables"),
                                              (b"not sqlite" * 100, "is not an sqlite database")])
def test_show_of_a_file_that_is_no_mlflow_store_fails_with_status_2_and_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, why: str
) -> None:
    store = tmp_path / "notes.db"
    store.write_bytes(content)
    assert main(["show", "exp/run", "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert why in capsys.readouterr().err
    assert store.read_bytes() == content and sorted(tmp_path.iterdir()) == [store]


def test_show_of_an_mlflow_server_that_does_not_answer_fails_with_status_1_within_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["show", "exp/run", "--tracking-uri", uri]) == 1
    assert time.monotonic() - started < 60  # MLflow's own retries alone take minutes
    err = capsys.readouterr().err
    assert err.startswith("steplog show: cannot read exp/run: MlflowException:"), err
    assert "Traceback" not in err


def test_show_of_a_run_id_a_server_does_not_have_fails_with_status_2(
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "0123456789abcdef0123456789abcdef", "--tracking-uri",
                 mlflow_server.url]) == 2
    assert "no MLflow run '0123456789abcdef0123456789abcdef'" in capsys.readouterr().err


def test_plot_draws_one_panel_per_metric_group_with_every_run_overlaid(tmp_path: Path) -> None:
    runs = find_runs(str(file_run(tmp_path / "a"))) + find_runs(str(file_run(tmp_path / "b", 2)))
    fig = plot_runs(runs, tmp_path / "p.png")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss", "lr", "return"]
    assert [len(ax.get_lines()) for ax in panels] == [4, 2, 2]  # runs x metrics of the group
    assert {t.get_text() for t in panels[0].get_legend().get_texts()} == {
        "a: loss/policy", "a: loss/value", "b: loss/policy", "b: loss/value"}


def test_plot_keeps_only_the_metrics_matching_the_pattern(tmp_path: Path) -> None:
    runs = find_runs(str(file_run(tmp_path / "a")))
    fig = plot_runs(runs, tmp_path / "p.png", pattern="loss/*", smooth_k=5)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["loss"]
    assert len(panels[0].get_lines()) == 4  # raw and smoothed, per metric


def test_plot_writes_a_png_that_is_not_blank(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    png = tmp_path / "curves.png"
    assert main(["plot", str(file_run(tmp_path / "a")), "-o", str(png), "--smooth", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    assert png.stat().st_size > 20_000
    pixels = matplotlib.image.imread(png)
    height, width = pixels.shape[:2]
    assert width >= 1200 and height >= 700  # two columns, two rows of panels
    ink = (pixels[:, :, :3].sum(axis=2) < 2.9).mean()  # pixels that are not white
    assert 0.01 < ink < 0.5


def test_plot_without_an_output_writes_an_image_and_prints_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(file_run(tmp_path / "a"))]) == 0
    path = Path(capsys.readouterr().out.strip())
    try:
        assert path.suffix == ".png" and path.stat().st_size > 10_000
    finally:
        path.unlink(missing_ok=True)


def test_plot_to_a_name_without_a_suffix_writes_and_prints_that_name_with_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(file_run(tmp_path / "a")), "-o", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert not (tmp_path / "curves").exists()


def test_plot_to_a_place_that_cannot_be_written_fails_with_status_1_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    output = tmp_path / "file" / "curves.png"  # a folder that is a file
    assert main(["plot", str(file_run(tmp_path / "a")), "-o", str(output)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"steplog plot: cannot write {output}: "), captured.err


def test_plot_of_metrics_that_match_nothing_fails_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(file_run(tmp_path / "a")), "--metrics", "nope/*"]) == 2
    assert "no metric to plot matches 'nope/*'" in capsys.readouterr().err


def test_only_the_plot_command_imports_matplotlib(tmp_path: Path) -> None:
    run = file_run(tmp_path / "a")
    proc = subprocess.run([sys.executable, "-c", f"""if True:
        import sys
        from steplog.cli import main
        assert main(["show", {str(run)!r}]) == 0
        assert "matplotlib" not in sys.modules
        assert main(["plot", {str(run)!r}, "-o", {str(tmp_path / "p.png")!r}]) == 0
        assert "matplotlib" in sys.modules
    """], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["show"], ["plot"], ["sync"]])
def test_help_is_plain_text_and_names_every_options_default(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text and ":class:" not in text
    options = text.split("options:", 1)[1]
    entries = [e for e in options.split("\n  -")[1:] if not e.startswith("h, --help")]
    assert all("(default" in " ".join(e.split()) for e in entries), entries


@pytest.mark.parametrize("damage", ["a line that is not JSON", "an empty run.json",
                                    "parameters that are a list"])
def test_show_of_a_damaged_run_file_fails_with_status_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str,
) -> None:
    run = file_run(tmp_path / "run", steps=3)
    if damage == "a line that is not JSON":
        damaged = run / "scalars.jsonl"
        damaged.write_bytes(damaged.read_bytes() + b"garbage\n")
    elif damage == "an empty run.json":
        damaged = run / "run.json"
        damaged.write_text("")
    else:
        damaged = run / "parameters.json"
        damaged.write_text("[1, 2]")
    assert main(["show", str(run)]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and str(damaged) in err and "Traceback" not in err


def test_show_and_plot_put_a_file_runs_points_in_step_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = FileLogger(tmp_path / "run")
    for step in (0, 20, 10, 30, 5):
        logger.log_scalar("x", float(step), step)
    assert logger.close(30)
    (run,) = find_runs(str(tmp_path / "run"))
    assert run.series["x"].steps == [0, 5, 10, 20, 30]
    assert run.series["x"].values == [0.0, 5.0, 10.0, 20.0, 30.0]
    (row,) = [line.split() for line in shown(capsys, str(tmp_path / "run")).splitlines()
              if line.split()[:1] == ["x"]]
    assert row[:4] == ["x", "5", "30", "30"]  # count, last step, last value


def test_a_file_run_continued_in_place_shows_as_running_until_it_closes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = file_run(tmp_path / "run", steps=3)
    logger = FileLogger(run, existing="append")
    logger.log_scalar("more", 1.0, 0)
    assert logger.flush(30)
    assert "status: RUNNING" in shown(capsys, str(run))
    assert logger.close(30)
    assert "status: FINISHED" in shown(capsys, str(run))


def test_smoothing_is_exact_after_a_huge_value_and_linear_in_the_points() -> None:
    assert smooth([1e17, 1.0, 1.0, 1.0, 1.0], 2)[2:] == [1.0, 1.0, 1.0]
    started = time.monotonic()
    assert smooth([1.0] * 200_000, 100_000)[-1] == 1.0
    assert time.monotonic() - started < 30  # a bound, not a timing: it took 1.9 s per 10^10


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path: Path) -> None:
    run = file_run(tmp_path / "a", steps=3)
    proc = subprocess.run([sys.executable, "-c", f"""if True:
        import sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        from steplog.cli import main
        sys.exit(main(["plot", {str(run)!r}, "-o", {str(tmp_path / "p.png")!r}]))
    """], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "pip install 'steplog[plot]'" in proc.stderr and "Traceback" not in proc.stderr


def test_smoothing_a_window_whose_sum_is_beyond_a_float_gives_its_mean() -> None:
    assert smooth([1e308, 1e308, 1.0, 1.0, 1.0], 2) == [1e308, 1e308, 5e307, 1.0, 1.0]


def write_lines(run: Path, *lines: str) -> Path:
    run.mkdir()
    (run / "scalars.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_a_point_whose_value_is_null_is_shown_as_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_lines(tmp_path / "run", '{"name": "x", "step": 0, "value": 1.0}',
                      '{"name": "x", "step": 1, "value": null}')
    (row,) = [line.split() for line in shown(capsys, str(run)).splitlines()
              if line.split()[:1] == ["x"]]
    assert row[:4] == ["x", "2", "1", "nan"]


@pytest.mark.parametrize("line", ['{"name": "x", "step": 1.5, "value": 1.0}',
                                  '{"name": 5, "step": 1, "value": 1.0}',
                                  '{"name": "x", "step": true, "value": 1.0}',
                                  '{"name": "x", "step": 1, "value": "1"}'],
                         ids=["float step", "number name", "bool step", "text value"])
def test_show_and_plot_of_a_line_with_wrongly_typed_fields_fail_with_status_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    run = write_lines(tmp_path / "run", line)
    for command in (["show", str(run)], ["plot", str(run), "-o", str(tmp_path / "p.png")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "not a point" in err and str(run / "scalars.jsonl") in err


def test_plot_to_a_format_matplotlib_cannot_write_fails_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = file_run(tmp_path / "a", steps=3)
    assert main(["plot", str(run), "-o", str(tmp_path / "p.v1")]) == 1
    assert "cannot draw" in capsys.readouterr().err


def test_plot_shows_names_starting_with_an_underscore_or_holding_dollars_as_they_are(
    tmp_path: Path
) -> None:
    logger = FileLogger(tmp_path / "run")
    for step in range(3):
        logger.log_metrics({"_loss": 1.0, "x/$\\badcmd$": 2.0}, step)
    assert logger.close(30)
    figure = plot_runs(find_runs(str(tmp_path / "run")), tmp_path / "p.png")
    shown_labels = sorted(t.get_text() for ax in figure.axes if ax.get_legend()
                          for t in ax.get_legend().get_texts())
    assert shown_labels == ["_loss", r"x/\$\badcmd\$"]  # drawn literally (the image was written)


def test_plot_of_more_metric_groups_than_one_image_holds_asks_for_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steplog.plot import MAX_PANELS

    logger = FileLogger(tmp_path / "run")
    logger.log_metrics({f"g{i}/x": 1.0 for i in range(MAX_PANELS + 1)}, 0)
    assert logger.close(30)
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "p.png")]) == 2
    assert "--metrics" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "p.png"),
                 "--metrics", "g1*/x"]) == 0


@pytest.mark.parametrize("uri_suffix", ["", "?timeout=20"])
def test_show_of_a_database_with_an_alembic_table_but_no_mlflow_store_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], uri_suffix: str
) -> None:
    import sqlite3

    store = tmp_path / "app.db"
    with sqlite3.connect(store) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num TEXT)")
    before = store.read_bytes()
    assert main(["show", "exp/run", "--tracking-uri", f"sqlite:///{store}{uri_suffix}"]) == 2
    assert "holds no MLflow tables" in capsys.readouterr().err
    assert store.read_bytes() == before and sorted(tmp_path.iterdir()) == [store]


def test_show_of_a_run_lists_a_kept_upload_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "runs" / "r1"
    (run / "uploads" / "1-mlflow").mkdir(parents=True)
    (run / "uploads" / "1-mlflow" / "upload.json").write_text("not json")
    out = shown(capsys, str(run))
    assert "a kept upload that cannot be read" in out and "upload.json" in out


def test_show_finds_a_run_by_a_name_holding_quotes_or_backslashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = ["it's", "back\\slash", 'say "hi"', "both ' and \"", "tr\\'ick"]
    ids = {}
    for name in names:
        logger = MLFlowLogger("exp", tracking_uri=uri, run_name=name)
        logger.log_scalar("x", 1.0, 0)
        assert logger.close(60)
        ids[name] = logger.run_id  # type: ignore[attr-defined]
    for name in names:
        assert f"run {ids[name]}" in shown(capsys, f"exp/{name}", "--tracking-uri", uri)


def test_show_of_a_directory_lists_a_run_directory_left_with_kept_uploads_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steplog.kept import Keeper
    from steplog.records import Artifact
    from steplog.sinks.file import FileSink

    file_run(tmp_path / "a", steps=3)
    Keeper(tmp_path).keep(FileSink(tmp_path / "out"), Artifact("note.txt", 0, data=b"x"),
                          "the disk was full")
    out = shown(capsys, str(tmp_path))
    assert "file run" in out and "upload note.txt -> file: the disk was full" in out
