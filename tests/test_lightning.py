"""SteplogLogger: a real Lightning Trainer fits a tiny model on the CPU into a file run and into
the session's MLflow server; metrics, hyperparameters, the run status and every checkpoint
(also those Lightning deleted or replaced right after saving) arrive."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
import warnings
from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mlflow_support import MlflowServer
from steplog import Logger, Options, State, SteplogWarning
from steplog.integrations.lightning import SteplogLogger
from steplog.loggers import MLFlowLogger
from test_mlflow_sink import download

pytestmark = pytest.mark.timeout(180)

EPOCHS = 3
STEPS_PER_EPOCH = 4
FAST = Options(drain_interval_s=0.01)


@dataclasses.dataclass
class Schedule:
    warmup: int = 2
    decay: float = 0.5


class TinyModel(pl.LightningModule):
    def __init__(self, lr: float = 0.05, arch: dict[str, Any] | None = None,
                 schedule: Schedule | None = None, extra: Namespace | None = None,
                 fail_at_epoch: int = -1, fail_at_step: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_at_epoch == self.current_epoch or (
                self.hparams.fail_at_step == self.global_step):
            raise RuntimeError("training diverged (test)")
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RecordingCheckpoint(ModelCheckpoint):
    """Lightning's checkpoint callback, keeping the bytes of each file as it was saved (the
    loggers were told about it inside the save; Lightning may delete it right after)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: dict[str, bytes] = {}
        self.order: list[str] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved[Path(filepath).name] = Path(filepath).read_bytes()
        self.order.append(Path(filepath).name)


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS_PER_EPOCH * 8, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)


def fit(logger: SteplogLogger, tmp_path: Path, *, then_test: bool = False,
        checkpoint: dict[str, Any] | None = None, **model_kwargs: Any) -> RecordingCheckpoint:
    # Every epoch is the new best (monitor "step", max): the previous top-1 file is deleted
    # right after the save, and last.ckpt is replaced each epoch.
    settings: dict[str, Any] = {"monitor": "step", "mode": "max", "save_top_k": 1,
                                "save_last": True, **(checkpoint or {})}
    ckpt = RecordingCheckpoint(dirpath=tmp_path / "ckpts", **settings)
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=logger, callbacks=[ckpt],
                         log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=tmp_path)
    train, val = loaders()
    model = TinyModel(**model_kwargs)
    trainer.fit(model, train, val)
    if then_test:
        trainer.test(model, val)
    return ckpt


HPARAMS: dict[str, Any] = {
    "lr": 0.05,
    "arch": {"hidden": [8, 8], "act": {"name": "relu"}},
    "schedule": Schedule(),
    "extra": Namespace(seed=7),
}
FLAT_HPARAMS = {
    "lr": 0.05, "arch/hidden": [8, 8], "arch/act/name": "relu", "schedule/warmup": 2,
    "schedule/decay": 0.5, "extra/seed": 7, "fail_at_epoch": -1,
    "fail_at_step": -1,
}


def test_a_fit_into_a_file_run_stores_metrics_hyperparameters_status_and_checkpoints(
    tmp_path: Path,
) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", name="tiny")
    ckpt = fit(logger, tmp_path, **HPARAMS)

    assert logger.result and logger.experiment.state is State.CLOSED
    run = Path(logger.log_dir) / "steplog"
    assert run == tmp_path / "logs" / "tiny" / "version_0" / "steplog"
    points = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    train = [p["step"] for p in points if p["name"] == "train_loss"]
    assert train == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert len([p for p in points if p["name"] == "val_loss"]) == EPOCHS
    assert json.loads((run / "parameters.json").read_text()) == FLAT_HPARAMS
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"

    # Lightning deleted the older top-1 files and replaced last.ckpt: the run has the bytes
    # of every file as it was saved.
    on_disk = {p.name for p in (tmp_path / "ckpts").glob("*.ckpt")}
    assert len(ckpt.saved) == EPOCHS + 1 and on_disk < set(ckpt.saved)
    assert ckpt.order.count("last.ckpt") == EPOCHS
    for name, data in ckpt.saved.items():
        assert (run / "checkpoints" / name).read_bytes() == data, name
    entries = [json.loads(line) for line in (run / "artifacts.jsonl").read_text().splitlines()]
    assert [e["name"] for e in entries] == [f"checkpoints/{n}" for n in ckpt.order]
    assert {e["kind"] for e in entries} == {"checkpoint"}
    # The hidden links are gone once uploaded.
    assert not list((tmp_path / "ckpts").glob(".steplog-uploads-*"))


def test_a_fit_into_mlflow_ends_the_run_finished_with_every_checkpoint(
    mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    steplog_logger = MLFlowLogger(f"lightning-{uuid.uuid4().hex[:8]}",
                                  tracking_uri=mlflow_server.url, options=FAST)
    logger = SteplogLogger(steplog_logger, save_dir=tmp_path / "logs")
    ckpt = fit(logger, tmp_path, **HPARAMS)

    assert logger.result, logger.result
    run_id = steplog_logger.run_id or ""
    run = mlflow_server.run(run_id)
    assert run["info"]["status"] == "FINISHED"
    steps = [m["step"] for m in mlflow_server.metric_history(run_id, "train_loss")]
    assert steps == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert len(mlflow_server.metric_history(run_id, "val_loss")) == EPOCHS
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert set(params) == set(FLAT_HPARAMS)
    assert params["arch/act/name"] == "relu" and params["schedule/warmup"] == "2"
    stored = {a["path"] for a in mlflow_server.artifacts(run_id)}
    assert stored == {f"checkpoints/{n}" for n in ckpt.saved}
    for name, data in ckpt.saved.items():
        assert download(mlflow_server, run, f"checkpoints/{name}") == data, name


def test_checkpoints_saved_to_a_remote_dirpath_are_not_uploaded_and_one_warning_says_so(
    tmp_path: Path,
) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", name="tiny")
    ckpt = ModelCheckpoint(dirpath=f"memory://steplog-test-{uuid.uuid4().hex[:8]}/ckpts",
                           monitor="step", mode="max", save_top_k=1, save_last=True)
    trainer = pl.Trainer(max_epochs=EPOCHS, logger=logger, callbacks=[ckpt],
                         log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         default_root_dir=tmp_path)
    with pytest.warns(SteplogWarning, match="memory://.*are not uploaded") as caught:
        trainer.fit(TinyModel(), *loaders())

    assert len([w for w in caught if issubclass(w.category, SteplogWarning)]) == 1
    assert logger.result
    run = Path(logger.log_dir) / "steplog"
    assert (run / "scalars.jsonl").exists() and not (run / "artifacts.jsonl").exists()


def test_log_model_true_uploads_the_last_and_best_checkpoints_at_the_end(
    tmp_path: Path,
) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", log_model=True)
    ckpt = fit(logger, tmp_path)
    run = Path(logger.log_dir) / "steplog"
    final = {p.name for p in (tmp_path / "ckpts").glob("*.ckpt")}
    assert final == {"last.ckpt", Path(ckpt.best_model_path).name}
    assert {p.name for p in (run / "checkpoints").iterdir()} == final
    for name in final:
        assert (run / "checkpoints" / name).read_bytes() == ckpt.saved[name]


def stored_checkpoints(logger: SteplogLogger) -> list[dict[str, Any]]:
    """The manifest entries of the checkpoints in the logger's file run, in upload order."""
    manifest = Path(logger.log_dir) / "steplog" / "artifacts.jsonl"
    return [e for e in map(json.loads, manifest.read_text().splitlines())
            if e["kind"] == "checkpoint"]


def global_step(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["global_step"])


def test_each_checkpoint_is_stored_with_the_step_it_was_saved_at_and_one_is_latest(
    tmp_path: Path,
) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", log_model=True)
    fit(logger, tmp_path, checkpoint={"save_top_k": 2, "mode": "min"})  # the oldest stay best
    run = Path(logger.log_dir) / "steplog"
    entries = stored_checkpoints(logger)
    assert len(entries) == 3  # the two best and last.ckpt
    for entry in entries:
        assert entry["step"] == global_step(run / entry["name"]), entry
    assert [e["name"] for e in entries if "latest" in e["aliases"]] == ["checkpoints/last.ckpt"]
    assert len([e for e in entries if "best" in e["aliases"]]) == 1


def test_the_checkpoint_saved_when_a_fit_fails_is_uploaded(tmp_path: Path) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs")
    with pytest.raises(RuntimeError, match="diverged"):
        fit(logger, tmp_path, fail_at_step=STEPS_PER_EPOCH + 2,  # mid-epoch: a save of its own
            checkpoint={"save_on_exception": True, "save_last": False})
    assert logger.result
    run = Path(logger.log_dir) / "steplog"
    on_disk = {p.name for p in (tmp_path / "ckpts").glob("*.ckpt")}
    stored = {Path(e["name"]).name for e in stored_checkpoints(logger)}
    assert f"epoch=1-step={STEPS_PER_EPOCH + 2}.ckpt" in on_disk  # the exception's checkpoint
    assert on_disk <= stored
    for name in on_disk:
        assert (run / "checkpoints" / name).read_bytes() == (tmp_path / "ckpts" / name).read_bytes()


def test_a_last_checkpoint_that_lightning_keeps_as_a_link_is_not_stored_again(
    tmp_path: Path,
) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs")
    ckpt = fit(logger, tmp_path, checkpoint={"save_last": "link", "save_top_k": -1})
    assert (tmp_path / "ckpts" / "last.ckpt").is_symlink()
    run = Path(logger.log_dir) / "steplog"
    entries = stored_checkpoints(logger)
    assert "checkpoints/last.ckpt" not in [e["name"] for e in entries]
    assert sorted(Path(e["name"]).name for e in entries) == sorted(ckpt.saved)
    for entry in entries:
        assert entry["step"] == global_step(run / entry["name"]), entry


def test_a_failed_fit_ends_the_run_failed(tmp_path: Path) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs")
    with pytest.raises(RuntimeError, match="diverged"):
        fit(logger, tmp_path, fail_at_epoch=1)
    assert logger.result
    run = Path(logger.log_dir) / "steplog"
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"
    points = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    assert len([p for p in points if p["name"] == "train_loss"]) == STEPS_PER_EPOCH


def test_close_on_finalize_false_keeps_the_logger_open_for_the_next_stage(
    tmp_path: Path,
) -> None:
    steplog_logger = Logger.create("file", output_dir=tmp_path / "run", options=FAST)
    logger = SteplogLogger(steplog_logger, save_dir=tmp_path / "logs", close_on_finalize=False,
                           log_model=False)
    fit(logger, tmp_path)
    assert steplog_logger.state is State.OPEN
    assert not (tmp_path / "run" / "checkpoints").exists()
    steplog_logger.log_scalar("after_fit", 1.0, 0)
    assert steplog_logger.close(10)


def test_close_on_finalize_false_uploads_checkpoints_and_leaves_no_staging_folder(
    tmp_path: Path,
) -> None:
    steplog_logger = Logger.create("file", output_dir=tmp_path / "run", options=FAST)
    logger = SteplogLogger(steplog_logger, save_dir=tmp_path / "logs", close_on_finalize=False,
                           log_model="all")
    fit(logger, tmp_path)
    assert steplog_logger.state is State.OPEN
    assert not list((tmp_path / "ckpts").glob(".steplog-uploads-*"))
    assert list((tmp_path / "run" / "checkpoints").rglob("*.ckpt"))
    assert steplog_logger.close(10)


def test_fit_then_test_log_into_one_file_run_by_default(tmp_path: Path) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", log_model=False)
    fit(logger, tmp_path, then_test=True)
    assert logger.result and logger.experiment.state is State.CLOSED
    run = Path(logger.log_dir) / "steplog"
    points = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    names = [p["name"] for p in points]
    assert names.count("train_loss") == EPOCHS * STEPS_PER_EPOCH
    assert names.count("test_loss") == 1 and names.index("test_loss") > names.index("val_loss")
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"
    assert not (run / "previous").exists()  # one run, not a new one per stage


def test_a_later_stage_never_hides_an_earlier_stages_failure(tmp_path: Path) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", log_model=False)
    with pytest.raises(RuntimeError, match="diverged"):
        fit(logger, tmp_path, fail_at_epoch=1)
    trainer = pl.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.test(TinyModel(), loaders()[1])
    assert logger.result
    run = Path(logger.log_dir) / "steplog"
    points = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    assert [p["name"] for p in points].count("test_loss") == 1
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"


def test_a_stage_that_logs_nothing_leaves_the_closed_run_as_it_was(tmp_path: Path) -> None:
    logger = SteplogLogger(save_dir=tmp_path / "logs", log_model=False)
    fit(logger, tmp_path)
    closed = logger.result
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.finalize("failed")
    assert logger.result is closed and closed
    run = Path(logger.log_dir) / "steplog"
    assert json.loads((run / "run.json").read_text())["status"] == "FINISHED"


def test_fit_then_test_log_into_one_given_mlflow_run(
    mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    steplog_logger = MLFlowLogger(f"lightning-{uuid.uuid4().hex[:8]}",
                                  tracking_uri=mlflow_server.url, options=FAST)
    logger = SteplogLogger(steplog_logger, save_dir=tmp_path / "logs", log_model=False)
    fit(logger, tmp_path, then_test=True)

    assert logger.result, logger.result
    assert logger.experiment is not steplog_logger  # the test stage's logger, on the same run
    run_id = steplog_logger.run_id or ""
    assert isinstance(logger.experiment, MLFlowLogger) and logger.experiment.run_id == run_id
    assert len(mlflow_server.metric_history(run_id, "train_loss")) == EPOCHS * STEPS_PER_EPOCH
    assert len(mlflow_server.metric_history(run_id, "test_loss")) == 1
    assert mlflow_server.run(run_id)["info"]["status"] == "FINISHED"


def test_fit_then_test_log_into_one_given_file_run(tmp_path: Path) -> None:
    logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run", options=FAST),
                           save_dir=tmp_path / "logs", log_model=False)
    fit(logger, tmp_path, then_test=True)
    assert logger.result
    points = [json.loads(line)
              for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert [p["name"] for p in points].count("test_loss") == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "FINISHED"


def test_a_stage_after_finalize_closed_a_run_that_cannot_go_on_says_how_to_log_several_stages(
    tmp_path: Path,
) -> None:
    from sinks_for_tests import ListSink
    from steplog.errors import LoggerClosedError

    logger = SteplogLogger(Logger(sinks=[ListSink()]), save_dir=tmp_path / "logs",
                           log_model=False)
    fit(logger, tmp_path)
    assert logger.result
    with pytest.raises(LoggerClosedError, match="close_on_finalize=False"):
        logger.log_hyperparams({"lr": 0.1})
    with pytest.raises(LoggerClosedError, match="close_on_finalize=False"):
        logger.log_metrics({"test_loss": 0.5}, 0)


def test_finalize_maps_lightning_statuses_and_refuses_unknown_ones(tmp_path: Path) -> None:
    logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                           save_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown Lightning status"):
        logger.finalize("exploded")
    logger.finalize("interrupted")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "KILLED"


def test_a_fit_stopped_by_ctrl_c_ends_the_run_killed(tmp_path: Path) -> None:
    # Lightning calls finalize("failed") from inside its KeyboardInterrupt handler.
    logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                           save_dir=tmp_path)
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        logger.finalize("failed")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "KILLED"


def test_a_fit_stopped_by_sigterm_ends_the_run_killed(tmp_path: Path) -> None:
    child = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from test_lightning import TinyModel, loaders
from steplog import Logger
from steplog.integrations.lightning import SteplogLogger

class Terminate(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

logger = SteplogLogger(Logger.create("file", output_dir={str(tmp_path / "run")!r}),
                       save_dir={str(tmp_path)!r}, log_model=False)
trainer = pl.Trainer(max_epochs=3, logger=logger, callbacks=[Terminate()],
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(TinyModel(), *loaders())
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "KILLED"


def test_other_ranks_log_nothing_and_build_no_logger(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = SteplogLogger(save_dir=tmp_path)
    logger.log_metrics({"x": 1.0}, 0)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    assert logger._logger is None and not (tmp_path / "steplog").exists()


def test_a_name_mlflow_refuses_is_logged_without_its_refused_characters(
    mlflow_server: MlflowServer,
) -> None:
    steplog_logger = MLFlowLogger(f"lightning-{uuid.uuid4().hex[:8]}",
                                  tracking_uri=mlflow_server.url, options=FAST)
    logger = SteplogLogger(steplog_logger, prefix="fit")
    with pytest.warns(UserWarning, match="logged as 'fit-acc1'"):
        logger.log_metrics({"acc@1": 0.5}, 3)
    logger.log_metrics({"acc@1": 0.75}, 4)
    logger.finalize("success")
    history = mlflow_server.metric_history(steplog_logger.run_id or "", "fit-acc1")
    assert [(m["step"], m["value"]) for m in history] == [(3, 0.5), (4, 0.75)]


def test_two_names_that_become_one_key_log_both_values(mlflow_server: MlflowServer) -> None:
    steplog_logger = MLFlowLogger(f"lightning-{uuid.uuid4().hex[:8]}",
                                  tracking_uri=mlflow_server.url, options=FAST)
    logger = SteplogLogger(steplog_logger)
    with pytest.warns(UserWarning, match="logged as 'acc1'"):
        logger.log_metrics({"acc@1": 0.9, "acc#1": 0.1}, 3)
    logger.log_metrics({"acc@1": 0.8, "acc#1": 0.2}, 4)
    logger.finalize("success")
    assert logger.result
    history = mlflow_server.metric_history(steplog_logger.run_id or "", "acc1")
    assert sorted((m["step"], m["value"]) for m in history) == [
        (3, 0.1), (3, 0.9), (4, 0.2), (4, 0.8)]


def test_importing_steplog_does_not_import_lightning() -> None:
    code = ("import sys, steplog\n"
            "assert 'lightning' not in sys.modules and 'anyio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_fit_stopped_by_lightnings_own_sigterm_handling_ends_the_run_killed(
    tmp_path: Path,
) -> None:
    # A job wrapper installed its SIGTERM handler first: Lightning raises SIGTERMException.
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                           save_dir=tmp_path)
    try:
        raise SIGTERMException
    except SIGTERMException:
        logger.finalize("failed")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "KILLED"


def test_a_value_error_that_is_not_about_a_name_renames_nothing(tmp_path: Path) -> None:
    logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                           save_dir=tmp_path)
    with pytest.raises(ValueError, match="too large for a float"):
        logger.log_metrics({"acc@1": 0.5, "count": 10**400}, 0)
    logger.log_metrics({"acc@1": 0.75}, 1)  # a file run stores this name as it is
    logger.finalize("success")
    lines = (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()
    assert [(json.loads(x)["name"], json.loads(x)["step"]) for x in lines] == [("acc@1", 1)]


def test_a_steplog_logger_holding_a_logger_cannot_go_to_spawned_processes(
    tmp_path: Path,
) -> None:
    import pickle

    given = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                          save_dir=tmp_path)
    with pytest.raises(TypeError, match="ddp_spawn"):
        pickle.dumps(given)
    given.finalize("success")
    lazy = pickle.loads(pickle.dumps(SteplogLogger(save_dir=tmp_path / "lazy")))
    assert lazy.save_dir == str(tmp_path / "lazy")


def test_a_checkpoint_rewritten_in_place_after_the_call_is_stored_as_it_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fsspec writes a checkpoint into the temporary directory and moves it into place: across
    # file systems the move rewrites the existing file, the same inode.
    import os
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a temporary directory on another file system than the test's")
    other = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    try:
        ckpt = RecordingCheckpoint(dirpath=tmp_path / "ckpts", filename="model",
                                   every_n_train_steps=1)
        logger = SteplogLogger(Logger.create("file", output_dir=tmp_path / "run"),
                               save_dir=tmp_path)
        trainer = pl.Trainer(max_steps=3, logger=logger, callbacks=[ckpt],
                             limit_val_batches=0, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1,
                             default_root_dir=tmp_path)
        trainer.fit(TinyModel(), loaders()[0])
        stored = tmp_path / "run" / "checkpoints" / "model.ckpt"
        saved = stored.read_bytes()
        assert saved == ckpt.saved["model.ckpt"]  # the last save's bytes
        trainer.save_checkpoint(tmp_path / "ckpts" / "model.ckpt", weights_only=True)
        assert (tmp_path / "ckpts" / "model.ckpt").read_bytes() != saved
        assert stored.read_bytes() == saved  # the closed run's checkpoint did not change
    finally:
        import shutil

        shutil.rmtree(other, ignore_errors=True)
