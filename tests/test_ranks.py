"""The rank policy: which ranks of a distributed job log, and into which runs.

Unit tests resolve the policy from Options and the environment; the multi-process tests start
four ranks as torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a gloo
process group on loopback) logging at full speed into the session's MLflow server.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlflow_support import MlflowServer, free_port
from steplog import (
    ClearMLLogger,
    FileLogger,
    Logger,
    MLFlowLogger,
    Options,
    RetryPolicy,
    State,
)
from steplog.ranks import (
    LAUNCH_SKEW_S,
    InertLogger,
    job_identity,
    launch_floor_ms,
    plan,
    process_start_s,
)
from waiting import wait_until

WORKER = Path(__file__).with_name("rank_worker.py")
WORLD = 4
RECORDS = 600
"""Steps each logging rank logs per logger (three keys each)."""
KEYS = {"loss": 0.0, "acc": 0.25, "lr": 0.5}
"""Each key's value at step i on rank r: r * 1e6 + i + offset."""

TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No rank variables from the test process's own environment."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID",
                 "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
                 "STEPLOG_RANKS", "STEPLOG_GROUP"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def as_rank(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name, value in {**TORCHRUN, **env}.items():
        monkeypatch.setenv(name, value)


# -- resolving the policy -------------------------------------------------------------------------


def test_without_rank_variables_every_policy_logs_as_one_process(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for policy in ("zero", "all", "own"):
        p = plan(policy)
        assert (p.distributed, p.logs, p.splits, p.samples_system) == (False, True, False, True)


def test_the_default_policy_is_zero_and_only_rank_0_logs(clean_env: pytest.MonkeyPatch) -> None:
    as_rank(clean_env, RANK="0", LOCAL_RANK="0")
    assert plan(None).policy == "zero" and plan(None).logs
    as_rank(clean_env, RANK="3", LOCAL_RANK="3")
    assert plan(None).policy == "zero" and not plan(None).logs


def test_steplog_ranks_chooses_the_policy(clean_env: pytest.MonkeyPatch) -> None:
    as_rank(clean_env, STEPLOG_RANKS=" own ")
    p = plan(None)
    assert (p.policy, p.rank, p.local_rank, p.world_size, p.logs) == ("own", 1, 1, 4, True)


def test_an_explicit_option_wins_over_steplog_ranks(clean_env: pytest.MonkeyPatch) -> None:
    as_rank(clean_env, STEPLOG_RANKS="all")
    assert plan("zero").policy == "zero"
    lg = Logger(options=Options(ranks="zero"))
    assert lg.state is State.INERT


def test_an_unknown_option_is_refused_when_options_are_built() -> None:
    with pytest.raises(ValueError, match="ranks must be one of 'zero', 'all', 'own', got 'every'"):
        Options(ranks="every")  # type: ignore[arg-type]


def test_an_unknown_steplog_ranks_is_refused_when_a_logger_is_built(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    clean_env.setenv("STEPLOG_RANKS", "everyone")
    with pytest.raises(ValueError, match=r"\$STEPLOG_RANKS must be one of .* got 'everyone'"):
        FileLogger(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "one"}, r"\$RANK must be an integer, got 'one'"),
    ({"RANK": "-1"}, r"\$RANK must be >= 0"),
    ({"RANK": "4"}, r"\$RANK \(4\) must be below \$WORLD_SIZE \(4\)"),
    ({"WORLD_SIZE": "0"}, r"\$WORLD_SIZE must be >= 1"),
    ({"LOCAL_RANK": "x"}, r"\$LOCAL_RANK must be an integer"),
])
def test_malformed_rank_variables_are_refused_with_the_variable_named(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], message: str,
) -> None:
    as_rank(clean_env, **env)
    with pytest.raises(ValueError, match=message):
        Logger()


def test_rank_without_world_size_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"\$RANK is set but \$WORLD_SIZE is not"):
        plan(None)


def test_srun_without_torchrun_places_the_rank_by_slurms_variables() -> None:
    srun = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
            "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    p = plan(None, srun)
    assert (p.distributed, p.rank, p.local_rank, p.world_size, p.logs) == (True, 5, 1, 8, False)
    assert plan("own", srun).group == job_identity(srun)
    # torchrun inside an allocation: its variables win over srun's
    inside = {**srun, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert (plan(None, inside).rank, plan(None, inside).world_size) == (0, 2)
    with pytest.raises(ValueError, match=r"\$SLURM_PROCID \(8\) must be below \$SLURM_NTASKS"):
        plan(None, {**srun, "SLURM_PROCID": "8"})
    # a batch script's SLURM_PROCID without a task count is not one of several ranks
    assert not plan(None, {"SLURM_PROCID": "0"}).distributed


def test_a_process_lightnings_launcher_started_without_rank_is_placed_by_its_local_rank(
) -> None:
    child = {"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "12910"}
    p = plan(None, child)
    assert (p.distributed, p.rank, p.local_rank, p.world_size, p.logs) == (True, 1, 1, 2, False)
    assert plan(None, {**child, "LOCAL_RANK": "0"}).logs
    second_node = {**child, "NODE_RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}
    assert plan(None, {**second_node, "LOCAL_WORLD_SIZE": "2"}).rank == 2
    assert not plan(None, second_node).logs  # not rank 0, whatever its number
    with pytest.raises(ValueError, match=r"set \$RANK"):
        plan("own", {**second_node, "TORCHELASTIC_RUN_ID": "x"})
    # inside a one-task srun (an interactive `srun --pty`), whose variables every process
    # the launcher starts inherits, the launcher's variables place the process
    one_task = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
                "SLURM_JOB_ID": "77"}
    p = plan(None, {**one_task, **child})
    assert (p.distributed, p.rank, p.world_size, p.logs) == (True, 1, 2, False)
    assert not plan("all", one_task).distributed  # the launching process, before fit
    # LOCAL_RANK set for another reason (a GPU) in a one-process job: not one of several ranks
    assert not plan("own", {"LOCAL_RANK": "1", "WORLD_SIZE": "1"}).distributed
    assert not plan(None, {"LOCAL_RANK": "1"}).distributed


def test_the_launch_floor_is_this_process_start_less_the_allowed_skew() -> None:
    import psutil

    started = process_start_s()
    assert started is not None and abs(started - psutil.Process().create_time()) < 1.0
    floor = launch_floor_ms()
    assert floor is not None and abs(floor / 1000 - (started - LAUNCH_SKEW_S)) < 0.01


def test_all_and_own_need_an_identity_the_ranks_share(clean_env: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        clean_env.setenv(name, TORCHRUN[name])
    with pytest.raises(ValueError, match="set STEPLOG_GROUP"):
        plan("all")
    assert plan("zero").group is None
    clean_env.setenv("STEPLOG_GROUP", "job-7")
    assert plan("own").group == job_identity({"STEPLOG_GROUP": "job-7"})


def test_the_job_identity_is_the_same_on_every_rank_and_differs_between_launches() -> None:
    base = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "8",
            "TORCHELASTIC_RUN_ID": "abc"}
    same = {job_identity({**base, "RANK": str(r), "LOCAL_RANK": str(r % 4)}) for r in range(8)}
    assert len(same) == 1
    assert job_identity({**base, "TORCHELASTIC_RUN_ID": "abd"}) not in same
    assert job_identity({**base, "MASTER_PORT": "29501"}) not in same


def test_the_job_identity_ignores_torchelastic_restart_counts_which_differ_between_nodes() -> None:
    base = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2",
            "TORCHELASTIC_RUN_ID": "abc"}
    # After one node's worker failed: its agent counts a restart, the other's does not.
    assert (job_identity({**base, "RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"})
            == job_identity({**base, "RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}))


# -- what each rank gets ------------------------------------------------------------------------


def test_a_rank_that_does_not_log_gets_an_inert_logger_that_opens_nothing(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    as_rank(clean_env, STEPLOG_RUNS_DIR=str(tmp_path / "runs"))
    threads = threading.active_count()
    lg = MLFlowLogger("never", tracking_uri="http://127.0.0.1:9", logging_freq=2,
                      log_system_metrics=True)
    files = FileLogger(tmp_path / "out")
    assert isinstance(lg, MLFlowLogger) and isinstance(files, FileLogger)
    assert lg.state is State.INERT and lg.run_id is None and lg.run_dir is None
    assert (lg.experiment_name, lg.logging_freq) == ("never", 2)
    assert [lg.should_log(i) for i in range(4)] == [False, True, False, True]  # as on rank 0
    lg.log_scalar("loss", 1.0, 0)
    lg.log_metrics({"a": 1.0})
    lg.log_parameters({"lr": 0.1})
    lg.log_artifact(tmp_path / "missing.txt")  # not even checked
    flushed, closed = lg.flush(), lg.close()
    assert flushed and closed and closed.delivered == 0
    assert closed.inactive is not None and "rank 1 of 4" in closed.inactive
    assert flushed.inactive == closed.inactive
    assert lg.stats().enqueued == 0
    assert threading.active_count() == threads
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_every_public_method_of_an_inert_logger_answers_as_the_real_one_would(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    as_rank(clean_env, STEPLOG_RUNS_DIR=str(tmp_path / "runs"))
    real = Options()
    with FileLogger(tmp_path / "out") as lg:
        assert lg.options == real and lg.exit_timeout_s == real.exit_timeout_s
        assert lg.output_dir == str(tmp_path / "out")
        lg.log_tags({"a": "b"})
        lg.log_file(tmp_path / "missing", "files", move=True)
        lg.log_directory(tmp_path / "missing")
        lg.log_figure(object(), "fig", 3)
        lg.save_policy(object(), "policy", step=1, metadata={"k": 1})
        lg.save_agent(object())
        assert lg.flush(1.0) and lg.stats().delivered == 0
    assert lg.state is State.INERT and lg.close(status="FAILED")
    again = type(lg)(tmp_path / "out")  # the inert class called again, and a copy
    assert type(again) is type(lg) and type(copy.copy(lg)) is type(lg)
    blank = Logger.create("blank", logging_freq=3)
    assert blank.state is State.INERT and blank.should_log(2) and not blank.should_log(3)
    with pytest.raises(TypeError):
        MLFlowLogger()  # type: ignore[call-arg]  # a wrong call fails as on rank 0
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_an_inert_logger_keeps_a_subclasss_own_default_logging_freq(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    class EveryTenth(FileLogger):
        def __init__(self, output_dir: Path, logging_freq: int = 10) -> None:
            super().__init__(output_dir, logging_freq=logging_freq)

    as_rank(clean_env)
    lg = EveryTenth(tmp_path / "out")
    assert lg.state is State.INERT
    # As on rank 0, so collectives run under should_log stay in step across ranks.
    assert [i for i in range(21) if lg.should_log(i)] == [9, 19]


def test_an_inert_logger_of_a_subclass_whose_output_dir_defaults_to_none_is_built(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    class Defaulted(FileLogger):
        def __init__(self, output_dir: Path | None = None) -> None:
            super().__init__(output_dir or tmp_path / "out")

    as_rank(clean_env)
    lg = Defaulted()
    assert lg.state is State.INERT and lg.close()


def test_a_rank_policy_that_a_subclass_passes_on_itself_reaches_every_rank(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    class Positional(FileLogger):  # takes the options under another name
        def __init__(self, output_dir: Path, opts: Options) -> None:
            super().__init__(output_dir, options=opts)

    as_rank(clean_env)  # rank 1 of 4
    lg = Positional(tmp_path / "out", Options(ranks="all"))
    assert lg.state is State.OPEN and lg.close(10)
    assert (tmp_path / "out" / "rank1" / "run.json").exists()


def test_a_rank_policy_chosen_inside_a_subclasss_constructor_is_refused_on_rank_0(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    class BuildsItsOwn(FileLogger):  # the policy is unknown when the logger is made
        def __init__(self, output_dir: Path) -> None:
            super().__init__(output_dir, options=Options(ranks="all"))

    as_rank(clean_env, RANK="0", LOCAL_RANK="0")
    with pytest.raises(ValueError, match=r"pass options=Options\(ranks='all'\) to the "
                                         "constructor, or set STEPLOG_RANKS=all"):
        BuildsItsOwn(tmp_path / "out")


def test_a_world_size_that_is_not_a_number_is_refused_also_without_rank(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("WORLD_SIZE", "four")  # a launcher's typo: not "one process"
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE must be an integer, got 'four'"):
        Logger()
    assert not plan(None, {"SLURM_PROCID": "1", "SLURM_NTASKS": "01"}).distributed


def test_under_own_and_all_files_go_to_a_folder_per_rank(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    as_rank(clean_env, RANK="3", LOCAL_RANK="1")
    for policy in ("own", "all"):
        out = tmp_path / policy
        lg = FileLogger(out, options=Options(ranks=policy))
        lg.log_scalar("loss", 1.0, 0)
        assert lg.close()
        assert [p.name for p in out.iterdir()] == ["rank3"]


def test_under_own_each_rank_has_its_own_clearml_task_tagged_with_the_group(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    clean_env.setenv("CLEARML_OFFLINE_MODE", "1")
    clean_env.setenv("CLEARML_CACHE_DIR", str(tmp_path / "cache"))
    clean_env.setenv("HOME", str(tmp_path / "home"))
    as_rank(clean_env, RANK="2", LOCAL_RANK="2")
    lg = ClearMLLogger("steplog-tests", "run", tags=["ppo"], options=Options(ranks="own"))
    try:
        assert lg.task.name == "run rank2"
        group = plan("own").group
        assert set(lg.task.get_tags()) == {"ppo", f"steplog.group:{group}", "rank2"}
    finally:
        assert lg.close()


def test_all_with_clearml_is_refused_at_construction(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    as_rank(clean_env)
    with pytest.raises(ValueError, match="ClearML Tasks do not support"):
        ClearMLLogger("p", "t", offline=True, options=Options(ranks="all"))


def test_under_all_a_name_too_long_with_its_rank_prefix_is_refused_at_the_call(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer,
) -> None:
    as_rank(clean_env, RANK="0", LOCAL_RANK="0")
    lg = MLFlowLogger(f"ranks-long-{time.time_ns()}", tracking_uri=mlflow_server.url,
                      options=Options(ranks="all"))
    try:
        lg.log_scalar("x" * 244, 1.0, 0)  # rank0/ + 244 = 250 characters: allowed
        with pytest.raises(ValueError, match="has 251 characters"):
            lg.log_scalar("x" * 245, 1.0, 0)
    finally:
        assert lg.close(30)


@pytest.mark.parametrize("in_flight", [1, 4])
def test_under_all_every_metric_is_stored_with_its_rank_prefix_whatever_is_in_flight(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer, in_flight: int,
) -> None:
    as_rank(clean_env, RANK="0", LOCAL_RANK="0")
    lg = MLFlowLogger(f"ranks-in-flight-{time.time_ns()}", tracking_uri=mlflow_server.url,
                      max_in_flight=in_flight, options=Options(ranks="all"))
    for step in range(20):
        lg.log_metrics({"a": float(step), "b": -float(step)}, step)
    assert lg.close(30)
    metrics = mlflow_server.run(lg.run_id or "")["data"]["metrics"]
    assert sorted(m["key"] for m in metrics) == ["rank0/a", "rank0/b"]
    assert len(mlflow_server.metric_history(lg.run_id or "", "rank0/a")) == 20


def test_only_local_rank_0_samples_system_metrics(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer,
) -> None:
    def samplers() -> int:
        return sum(t.name == "steplog-system" for t in threading.enumerate())

    before = samplers()
    for local_rank, expected in (("1", 0), ("0", 1)):
        as_rank(clean_env, RANK=local_rank, LOCAL_RANK=local_rank)
        lg = MLFlowLogger(f"ranks-system-{time.time_ns()}", tracking_uri=mlflow_server.url,
                          log_system_metrics=True, options=Options(ranks="own"))
        try:
            assert samplers() - before == expected
        finally:
            assert lg.close(30)


def test_a_rank_whose_logger_starts_before_rank_0s_joins_the_shared_run_once_it_exists(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Both ranks in this process, rank 1 first, through the sink host (a sqlite store).
    clean_env.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loggers = {}
    for rank in (1, 0):
        as_rank(clean_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        loggers[rank] = MLFlowLogger("shared", tracking_uri=uri, run_name="early",
                                     options=Options(ranks="all"))
    for rank, lg in loggers.items():
        for i in range(5):
            lg.log_scalar("loss", rank * 10.0 + i, i)
    assert all(lg.close(120) for lg in loggers.values())
    assert loggers[0].run_id == loggers[1].run_id is not None

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for rank in (0, 1):
        history = client.get_metric_history(loggers[0].run_id, f"rank{rank}/loss")
        assert [(m.step, m.value) for m in history] == [(i, rank * 10.0 + i) for i in range(5)]
    run = client.get_run(loggers[0].run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["steplog.rank1.status"] == "FINISHED"


def test_under_all_a_second_stage_with_the_same_names_gets_a_shared_run_of_its_own(
    clean_env: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    clean_env.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs: dict[str, set[str | None]] = {"fit": set(), "test": set()}
    for stage in ("fit", "test"):  # each rank makes its loggers in the same order
        for rank in (0, 1):
            as_rank(clean_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
            lg = MLFlowLogger("stages", tracking_uri=uri, run_name="same",
                              options=Options(ranks="all"))
            lg.log_scalar(stage, 1.0, 0)
            assert lg.close(120)
            runs[stage].add(lg.run_id)
    assert len(runs["fit"]) == 1 and len(runs["test"]) == 1 and runs["fit"] != runs["test"]

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for stage, (run_id,) in runs.items():
        assert sorted(client.get_run(run_id).data.metrics) == [f"rank0/{stage}",
                                                                f"rank1/{stage}"]


def test_a_rank_slower_than_rank_0s_whole_run_still_joins_it_after_rank_0_ended_it(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer,
) -> None:
    experiment = f"ranks-slow-{time.time_ns()}"
    as_rank(clean_env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    # Rank 1 looks before rank 0 started, then backs off for 8 s: rank 0 creates, fills and
    # ends the shared run within that pause.
    slow = MLFlowLogger(experiment, tracking_uri=mlflow_server.url, run_name="r",
                        options=Options(ranks="all", drain_interval_s=0.01,
                                        retry=RetryPolicy(initial_s=8.0, max_s=8.0,
                                                          jitter_s=0.0)))
    for i in range(5):
        slow.log_scalar("loss", 10.0 + i, i)
    assert wait_until(lambda: slow.stats().retried > 0, timeout_s=30), "rank 1 never looked"
    looks = slow.stats().retried
    as_rank(clean_env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    first = MLFlowLogger(experiment, tracking_uri=mlflow_server.url, run_name="r",
                         options=Options(ranks="all"))
    first.log_scalar("loss", 0.0, 0)
    assert first.close(30)
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # Still in its pause: it has not looked again since before rank 0 started.
    assert slow.stats().retried == looks and slow.stats().delivered == 0
    result = slow.close(30)
    assert result, result
    assert slow.run_id == first.run_id
    history = client.get_metric_history(first.run_id, "rank1/loss")
    assert [(m.step, m.value) for m in history] == [(i, 10.0 + i) for i in range(5)]
    assert client.get_run(first.run_id).data.tags["steplog.rank1.status"] == "FINISHED"


def test_a_shared_run_an_earlier_launch_left_running_or_ended_is_not_joined(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer,
) -> None:
    # An earlier launch with the same identity crashed a day ago: its run is still RUNNING.
    from mlflow import MlflowClient

    from steplog.sinks.mlflow.common import RUN_TOKEN_TAG
    from steplog.sinks.mlflow.sink import shared_run_token

    experiment = f"ranks-stale-{time.time_ns()}"
    as_rank(clean_env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    client = MlflowClient(mlflow_server.url)
    token = {RUN_TOKEN_TAG: shared_run_token(str(plan("all").group), experiment, "r")}
    exp_id = client.create_experiment(experiment)
    stale = client.create_run(exp_id, run_name="r", start_time=int((time.time() - 86400) * 1000),
                              tags=token).info.run_id
    # Another, within the launch floor, ended before this process started.
    started = process_start_s()
    assert started is not None
    ended = client.create_run(exp_id, run_name="r", start_time=int((started - 100) * 1000),
                              tags=token).info.run_id
    client.set_terminated(ended, "FINISHED", end_time=int((started - 50) * 1000))
    loggers = {}
    for rank in (1, 0):  # rank 1 looks before rank 0 created this launch's run
        as_rank(clean_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        loggers[rank] = MLFlowLogger(experiment, tracking_uri=mlflow_server.url, run_name="r",
                                     options=Options(ranks="all"))
        if rank == 1:
            time.sleep(0.5)
    for lg in loggers.values():
        lg.log_scalar("loss", 1.0, 0)
    assert all(lg.close(60) for lg in loggers.values())
    assert loggers[1].run_id == loggers[0].run_id not in (stale, ended)
    assert client.get_run(stale).data.metrics == {} == client.get_run(ended).data.metrics


def test_when_rank_0_never_creates_the_shared_run_sync_delivers_every_rank_into_one_run(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    experiment = f"ranks-no-rank0-{time.time_ns()}"
    clean_env.setenv("STEPLOG_RUNS_DIR", str(tmp_path / "runs"))
    results = {}
    for rank in (1, 2):  # rank 0 died before its logger started
        as_rank(clean_env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="3")
        lg = MLFlowLogger(experiment, tracking_uri=mlflow_server.url, run_name="r",
                          options=Options(ranks="all", drain_interval_s=0.01))
        for i in range(5):
            lg.log_scalar("loss", rank * 10.0 + i, i)
        results[rank] = lg.close(3)
    for result in results.values():
        assert not result and result.undelivered == 5 and "steplog sync" in str(result.sync)
    for _ in range(2):  # a second sync of every rank stores nothing twice
        for rank in (1, 2):
            journals = tmp_path / "runs" / f"rank{rank}"
            sync = subprocess.run([sys.executable, "-m", "steplog.cli", "sync", str(journals)],
                                  capture_output=True, text=True, timeout=120)
            assert sync.returncode == 0, sync.stdout + sync.stderr
    (run,) = runs_of(mlflow_server, experiment)
    for rank in (1, 2):
        history = mlflow_server.metric_history(run["info"]["run_id"], f"rank{rank}/loss")
        assert [(m["step"], m["value"]) for m in history] == [(i, rank * 10.0 + i)
                                                              for i in range(5)]
    assert run["info"]["status"] == "FINISHED"  # ended by the sync that created it


def test_sync_of_a_rank_never_puts_its_records_into_a_later_launchs_shared_run(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from steplog import ranks
    from steplog.cli import main

    experiment = f"ranks-later-launch-{time.time_ns()}"
    clean_env.setenv("STEPLOG_RUNS_DIR", str(tmp_path / "runs"))
    as_rank(clean_env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    earlier = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from steplog import MLFlowLogger, Options
        lg = MLFlowLogger({experiment!r}, tracking_uri={mlflow_server.url!r}, run_name="r",
                          options=Options(ranks="all", drain_interval_s=0.01))
        for i in range(5):
            lg.log_scalar("loss", 10.0 + i, i)
        assert not lg.close(3)  # rank 0 of this launch died before its logger started
    """)], capture_output=True, text=True, timeout=120)
    assert earlier.returncode == 0, earlier.stderr
    (manifest,) = (tmp_path / "runs" / "rank1").rglob("run.json")
    (info,) = json.loads(manifest.read_text())["sinks"].values()
    clean_env.setattr(ranks, "LAUNCH_SKEW_S", 1.0)  # launches 1 s apart are told apart
    time.sleep(2.5)
    as_rank(clean_env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")  # a later launch, same identity
    later = MLFlowLogger(experiment, tracking_uri=mlflow_server.url, run_name="r",
                         options=Options(ranks="all", drain_interval_s=0.01))
    later.log_scalar("loss", 1.0, 0)
    assert later.close(60)
    assert main(["sync", str(tmp_path / "runs" / "rank1")]) == 0, capsys.readouterr()
    runs = {r["info"]["run_id"]: r for r in runs_of(mlflow_server, experiment)}
    assert set(runs) - {later.run_id}, "rank 1's records went into the later launch's run"
    assert mlflow_server.metric_history(later.run_id, "rank1/loss") == []
    (old,) = set(runs) - {later.run_id}
    assert [m["value"] for m in mlflow_server.metric_history(old, "rank1/loss")] == [
        10.0 + i for i in range(5)]
    assert int(runs[old]["info"]["start_time"]) == info["target"]["started_ms"]
    assert runs[old]["info"]["status"] == "FINISHED"


def test_a_shared_run_a_sync_created_but_could_not_end_is_ended_by_the_next_sync(
    clean_env: pytest.MonkeyPatch, mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    from fault_proxy import FaultProxy

    experiment = f"ranks-sync-end-{time.time_ns()}"
    clean_env.setenv("STEPLOG_RUNS_DIR", str(tmp_path / "runs"))
    as_rank(clean_env, RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    journals = tmp_path / "runs" / "rank1"

    def sync() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "steplog.cli", "sync", "--timeout", "2",
                               str(journals)], capture_output=True, text=True, timeout=120)

    with FaultProxy(mlflow_server.port, lifetime_s=120) as proxy:
        lg = MLFlowLogger(experiment, tracking_uri=proxy.url, run_name="r",
                          options=Options(ranks="all", drain_interval_s=0.01))
        for i in range(5):
            lg.log_scalar("loss", 10.0 + i, i)
        assert not lg.close(3)  # rank 0 died before its logger started
        proxy.set("reset", only=b"/runs/update")
        first = sync()  # creates the shared run, cannot end it
        assert first.returncode == 1 and "its run was not ended" in first.stdout, first.stdout
        (run,) = runs_of(mlflow_server, experiment)
        assert run["info"]["status"] == "RUNNING"
        proxy.set("pass")
        second = sync()
        assert second.returncode == 0, second.stdout + second.stderr
        assert "its run was ended" in second.stdout
    (run,) = runs_of(mlflow_server, experiment)
    assert run["info"]["status"] == "FINISHED"
    assert len(mlflow_server.metric_history(run["info"]["run_id"], "rank1/loss")) == 5


def test_a_shared_run_moved_by_sync_to_stays_one_run_for_every_rank() -> None:
    from steplog.sinks.mlflow import MLflowSink

    targets = []
    for rank in (1, 2):
        sink = MLflowSink("e", tracking_uri="http://127.0.0.1:9", run_name="r")
        sink.join_ranks("all", rank, 4, "group")
        targets.append(sink.target())
    assert targets[0]["run_token"] == targets[1]["run_token"]  # the shared run's token
    moved = [MLflowSink.redirected(t, "http://127.0.0.1:10") for t in targets]
    assert moved[0]["run_token"] == moved[1]["run_token"] != targets[0]["run_token"]
    elsewhere = MLflowSink.redirected(targets[0], "http://127.0.0.1:11")
    assert elsewhere["run_token"] != moved[0]["run_token"]


# -- four ranks, one MLflow server ---------------------------------------------------------------


class Launch:
    """Four rank processes of one job, started as torchrun starts them."""

    def __init__(self, server: MlflowServer, root: Path, mode: str, tag: str) -> None:
        self.tag = tag
        self.out = root / "out"
        self.runs = root / "runs"
        self.out.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("STEPLOG_RANKS", "STEPLOG_GROUP", "TORCHELASTIC_RUN_ID")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                   WORLD_SIZE=str(WORLD), STEPLOG_RUNS_DIR=str(self.runs))
        self.procs = []
        for rank in range(WORLD):
            with open(self.out / f"rank{rank}.err", "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), server.url, str(self.out), mode,
                     str(RECORDS), tag],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))

    def wait(self, ranks: range | list[int], timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        for rank in ranks:
            proc = self.procs[rank]
            try:
                rc = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            assert rc == 0, f"rank {rank}: {rc}\n{self.stderr(rank)}"

    def stderr(self, rank: int) -> str:
        return (self.out / f"rank{rank}.err").read_text()[-3000:]

    def report(self, rank: int) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.out / f"rank{rank}.json").read_text())
        return result

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def runs_of(server: MlflowServer, experiment: str) -> list[dict[str, Any]]:
    exp = server.api("experiments/get-by-name", experiment_name=experiment)["experiment"]
    found = server.api("runs/search", {"experiment_ids": [exp["experiment_id"]],
                                       "max_results": 100})
    runs: list[dict[str, Any]] = found.get("runs", [])
    return runs


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def assert_every_record_once_in_order(server: MlflowServer, run_id: str, rank: int,
                                      prefix: str = "") -> None:
    for key, offset in KEYS.items():
        history = server.metric_history(run_id, prefix + key)
        assert [m["step"] for m in history] == list(range(RECORDS)), (rank, key)
        assert [m["value"] for m in history] == [rank * 1e6 + i + offset
                                                 for i in range(RECORDS)], (rank, key)


@pytest.fixture(scope="module")
def policies(mlflow_server: MlflowServer,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launch]:
    """Four ranks that each logged under ``zero``, ``all`` and ``own`` in turn."""
    launch = Launch(mlflow_server, tmp_path_factory.mktemp("ranks"), "policies",
                    f"ranks-{os.getpid()}-{time.time_ns()}")
    try:
        launch.wait(range(WORLD))
        yield launch
    finally:
        launch.stop()


def test_zero_only_rank_0_logs_and_the_other_ranks_create_nothing(
    policies: Launch, mlflow_server: MlflowServer,
) -> None:
    tag = policies.tag
    (run,) = runs_of(mlflow_server, f"{tag}-zero")
    assert policies.report(0)["zero"]["ok"]
    assert_every_record_once_in_order(mlflow_server, run["info"]["run_id"], 0)
    for rank in range(1, WORLD):
        zero = policies.report(rank)["zero"]
        assert zero["type"] == "InertMLFlowLogger" and zero["state"] == "inert"
        assert zero["ok"] and zero["inactive"] and zero["threads_started"] == 0
        assert zero["run_id"] is None and zero["run_dir"] is None


def test_all_every_rank_logs_into_one_shared_run_under_its_rank_prefix(
    policies: Launch, mlflow_server: MlflowServer,
) -> None:
    tag = policies.tag
    (run,) = runs_of(mlflow_server, f"{tag}-all")
    run_id = run["info"]["run_id"]
    reports = [policies.report(rank)["all"] for rank in range(WORLD)]
    assert [(r["ok"], r["run_id"]) for r in reports] == [(True, run_id)] * WORLD, reports
    for rank in range(WORLD):
        assert_every_record_once_in_order(mlflow_server, run_id, rank, f"rank{rank}/")
    tags = tags_of(run)
    assert tags["steplog.ranks"] == "all" and tags["steplog.world_size"] == str(WORLD)
    assert {tags[f"steplog.rank{r}.status"] for r in range(WORLD)} == {"FINISHED"}
    assert run["info"]["status"] == "FINISHED"
    files = {f["path"] for f in mlflow_server.artifacts(run_id)}
    assert files == {f"rank{r}/note.txt" for r in range(WORLD)}
    dirs = [Path(r["run_dir"]) for r in reports]
    assert [d.parent.name for d in dirs] == [f"rank{r}" for r in range(WORLD)]


def test_own_each_rank_logs_its_own_run_found_by_the_group_tag(
    policies: Launch, mlflow_server: MlflowServer,
) -> None:
    tag = policies.tag
    runs = runs_of(mlflow_server, f"{tag}-own")
    groups = {tags_of(run)["steplog.group"] for run in runs}
    assert len(runs) == WORLD and len(groups) == 1
    by_rank = {int(tags_of(run)["steplog.rank"]): run for run in runs}
    assert sorted(by_rank) == list(range(WORLD))
    for rank, run in by_rank.items():
        assert run["info"]["run_name"] == f"{tag}-rank{rank}"
        assert run["info"]["status"] == "FINISHED"
        assert policies.report(rank)["own"]["run_id"] == run["info"]["run_id"]
        assert_every_record_once_in_order(mlflow_server, run["info"]["run_id"], rank)


@pytest.mark.parametrize("victim", [2, 0])
def test_kill_9_of_one_rank_loses_nothing_of_the_others_and_sync_delivers_its_own(
    mlflow_server: MlflowServer, tmp_path: Path, victim: int,
) -> None:
    # Rank 0 too, once it created the shared run: the others keep writing into it.
    tag = f"ranks-kill-{os.getpid()}-{time.time_ns()}"
    launch = Launch(mlflow_server, tmp_path, f"kill{victim}", tag)
    others = [rank for rank in range(WORLD) if rank != victim]
    try:
        deadline = time.monotonic() + 120
        while not (launch.out / "flushed").exists() and time.monotonic() < deadline:
            assert launch.procs[victim].poll() is None, launch.stderr(victim)
            time.sleep(0.05)
        os.killpg(launch.procs[victim].pid, signal.SIGKILL)
        launch.procs[victim].wait(10)
        (launch.out / "killed").write_text("")
        launch.wait(others)
        survivors = {rank: launch.report(rank) for rank in others}
    finally:
        launch.stop()
    assert all(r[p]["ok"] for r in survivors.values() for p in ("all", "own"))
    (shared,) = runs_of(mlflow_server, f"{tag}-all")
    own = {int(tags_of(r)["steplog.rank"]): r["info"]["run_id"]
           for r in runs_of(mlflow_server, f"{tag}-own")}
    for rank in others:
        assert_every_record_once_in_order(mlflow_server, shared["info"]["run_id"], rank,
                                          f"rank{rank}/")
        assert_every_record_once_in_order(mlflow_server, own[rank], rank)
        assert tags_of(shared)[f"steplog.rank{rank}.status"] == "FINISHED"
    # Only rank 0 ends the shared run: whatever the victim did when it is another rank.
    assert shared["info"]["status"] == ("RUNNING" if victim == 0 else "FINISHED")
    # The killed rank's journals (one per logger, under runs/rank<K>) hold what it did not
    # deliver.
    killed = json.loads((launch.out / f"rank{victim}.json").read_text())
    journals = launch.runs / f"rank{victim}"
    assert all(Path(d).parent == journals for d in killed.values())
    sync = subprocess.run([sys.executable, "-m", "steplog.cli", "sync", str(journals)],
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert_every_record_once_in_order(mlflow_server, shared["info"]["run_id"], victim,
                                      f"rank{victim}/")
    assert_every_record_once_in_order(mlflow_server, own[victim], victim)
    assert len(runs_of(mlflow_server, f"{tag}-all")) == 1


def test_an_inert_logger_answers_every_logging_call_a_logger_has() -> None:
    calls = {name for name in dir(Logger) if name.startswith(("log_", "save_"))}
    assert calls and calls <= set(vars(InertLogger))
