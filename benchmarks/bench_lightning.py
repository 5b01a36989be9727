"""A Lightning fit with each logger, side by side in one run: no logger, steplog's
``SteplogLogger`` (into the MLflow server, and into a file run), Lightning's ``MLFlowLogger``
(same server, real HTTP) and Lightning's ``CSVLogger``; and a Lightning logger that does
nothing, which shows what Lightning itself spends once any logger is attached.

Each fit trains a small MLP on the CPU (one thread) for ``epochs`` x ``steps`` steps, logging 4
metrics every ``log_every`` steps, and saves a checkpoint every epoch (top 1 and ``last.ckpt``);
the loggers that can upload checkpoints do (``log_model="all"``). Three figures per fit: the
whole fit, from building the logger to ``trainer.fit`` returning (so it includes the logger's
setup and its end: steplog's close waits until every record and checkpoint arrived); the
training loop alone; and the process's CPU time over the whole fit (every thread: the work a
logger adds, less sensitive than wall time to other processes on a busy machine). Beside
them, the logger's own work during the loop: the training thread's time in its calls and the
CPU time of the process's other threads (steplog's worker threads), as a share of the
baseline's loop ("own"): the machine's noise, which moves a whole loop by several percent
between fits here, barely moves it. A round runs
the baseline (no logger), the other contenders in a rotating order, and the baseline again;
ratios are paired with the round's baselines, and the baseline's second run against its first
is the spread to read them against. The server (sqlite, one worker) is pinned to CPU 0 and this
process to the others when there are two or more. Targets: steplog within 2% of no logging, and
faster than every alternative.

    python benchmarks/bench_lightning.py [--epochs 2] [--steps 150] [--log-every 1] [--rounds 5]

``measure(...)`` returns the figures, for ``bench_integrations.py``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mlflow_support import MlflowServer, pin_beside_server

BASELINE = "no logger"
NOOP = "Lightning, a no-op logger"
CONTENDERS = (
    BASELINE,
    NOOP,
    "steplog -> MLflow",
    "steplog -> file",
    "Lightning MLFlowLogger",
    "Lightning CSVLogger",
)


def _model() -> pl.LightningModule:
    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"lr": 1e-3, "arch": {"hidden": 512, "layers": 2}})
            self.net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                           torch.nn.Linear(512, 256))

        def training_step(self, batch: list[Any], batch_idx: int) -> Any:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log_dict({"loss": loss, "lr": 1e-3, "batch": float(batch_idx),
                           "err": loss.detach() * 0.5}, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return MLP()


class Fit(NamedTuple):
    """One fit's figures (seconds)."""

    wall: float
    """From building the logger to ``trainer.fit`` returning (setup and the logger's end)."""
    loop: float
    """The training loop alone (Lightning's ``on_train_start`` to ``on_train_end``)."""
    cpu: float
    """This process's CPU time (every thread) over ``wall``: the work each logger adds, less
    sensitive to other processes on a busy machine than wall time."""
    calls: float
    """Time the training thread spent inside the logger's methods during training (every
    call Lightning makes but ``finalize``)."""
    others: float
    """CPU time of every other thread of the process during the training loop (steplog's
    worker threads; not its child processes): with ``calls``, the logger's own work in the
    loop, a figure the machine's noise barely moves."""
    end: float
    """Time in the logger's ``finalize`` (steplog: the close, waiting for delivery)."""


def fit_once(contender: str, url: str, root: Path, epochs: int, steps: int,
             log_every: int) -> Fit:
    """One fit with ``contender``'s logger; raises if its logger did not deliver everything."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps * 32, 256, generator=g)
    data = DataLoader(TensorDataset(x, x.flip(1)), batch_size=32)
    model = _model()
    folder = root / uuid.uuid4().hex[:8]
    timer = LoopTimer()
    start, cpu = time.perf_counter(), time.process_time()
    logger = _logger(contender, url, folder)
    spent = {"calls": 0.0, "end": 0.0}
    if logger is not False:
        for method in ("log_metrics", "log_hyperparams", "log_graph", "save",
                       "after_save_checkpoint", "finalize"):
            setattr(logger, method, _timed(getattr(logger, method), spent,
                                           "end" if method == "finalize" else "calls"))
    trainer = pl.Trainer(
        max_epochs=epochs, logger=logger, log_every_n_steps=log_every,
        callbacks=[ModelCheckpoint(dirpath=folder / "ckpt", save_top_k=1, save_last=True,
                                   monitor="step", mode="max"), timer],
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, default_root_dir=folder)
    trainer.fit(model, data)
    fit = Fit(time.perf_counter() - start, timer.seconds, time.process_time() - cpu,
              spent["calls"], timer.others, spent["end"])
    result = getattr(logger, "result", True)
    if not result:
        raise RuntimeError(f"{contender}: not everything arrived: {result!r}")
    shutil.rmtree(folder, ignore_errors=True)
    return fit


class NoopLogger(Logger):
    """A Lightning logger that does nothing: what Lightning itself spends once a logger is
    attached (gathering and converting the metrics every ``log_every_n_steps``)."""

    @property
    def name(self) -> str:
        return "noop"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _timed(fn: Callable[..., Any], spent: dict[str, float], key: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    return timed


class LoopTimer(pl.Callback):
    """Times the training loop (``on_train_start`` to ``on_train_end``), and the CPU time
    the process's other threads spent meanwhile."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.others = 0.0
        self._start = 0.0
        self._others_start = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._others_start = _other_threads_cpu()

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start
        self.others = _other_threads_cpu() - self._others_start


def _other_threads_cpu() -> float:
    """CPU seconds used so far by every thread of this process, ended ones included, but the
    calling (training) thread."""
    return time.process_time() - time.thread_time()


def _logger(contender: str, url: str, folder: Path) -> Any:
    from steplog import Options
    from steplog.integrations.lightning import SteplogLogger
    from steplog.loggers import MLFlowLogger

    if contender == BASELINE:
        return False
    if contender == NOOP:
        return NoopLogger()
    if contender == "steplog -> MLflow":
        return SteplogLogger(MLFlowLogger(f"bench-pl-{uuid.uuid4().hex[:8]}", tracking_uri=url,
                                          options=Options(runs_dir=str(folder / "runs"))),
                             save_dir=folder)
    if contender == "steplog -> file":
        return SteplogLogger(save_dir=folder)
    if contender == "Lightning MLFlowLogger":
        from lightning.pytorch.loggers import MLFlowLogger as LightningMLflow

        return LightningMLflow(f"bench-pl-{uuid.uuid4().hex[:8]}", tracking_uri=url,
                               log_model="all", save_dir=str(folder))
    if contender == "Lightning CSVLogger":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(folder)
    raise ValueError(f"unknown contender {contender!r}")


def quiet() -> None:
    """Silence Lightning's and MLflow's log lines and every warning (their tips and notices
    would fill the output)."""
    for name in [*logging.root.manager.loggerDict, "lightning", "mlflow"]:
        if name.startswith(("lightning", "mlflow")):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def measure(*, epochs: int = 2, steps: int = 150, log_every: int = 1, rounds: int = 5,
            url: str | None = None, progress: Callable[[str], None] | None = None,
            ) -> dict[str, Any]:
    """Fit with every contender ``rounds`` times and return the figures.

    A round runs the baseline, the other contenders in a rotating order, and the baseline
    again; each contender's ratio is the median over rounds of its figure over the mean of its
    round's two baselines, and the spread is the median of ``|second baseline / first - 1|``.
    Returns ``{"fits": {contender: [Fit, ...]}, "median": {figure: {contender: median
    seconds}}, "ratio": {figure: {contender: median ratio}}, "spread": {figure: spread},
    "share": {contender: median of calls / the round's baseline loop}, "own": {contender:
    median of (calls + others) / the round's baseline loop}, "epochs": ...,
    "steps": ..., "log_every": ..., "rounds": ...}``; figures are ``Fit``'s fields (ratios and
    spreads for wall, loop and cpu).
    Without ``url`` an MLflow server is started (and stopped) here."""
    torch.set_num_threads(1)
    quiet()
    server = None
    if url is None:
        server_cpus, _ = pin_beside_server()
        server = MlflowServer(Path(tempfile.mkdtemp(prefix="steplog-bench-pl-")), cpus=server_cpus)
        server.start()
        url = server.url
    root = Path(tempfile.mkdtemp(prefix="steplog-bench-pl-runs-"))
    others = CONTENDERS[1:]
    fits: dict[str, list[Fit]] = {c: [] for c in CONTENDERS}
    pairs: list[tuple[Fit, Fit]] = []
    try:
        for c in (BASELINE, "steplog -> MLflow"):  # warm up: imports, first fit, first run
            fit_once(c, url, root, 1, steps // 4, log_every)
        for r in range(rounds):
            first = fit_once(BASELINE, url, root, epochs, steps, log_every)
            for c in others[r % len(others):] + others[:r % len(others)]:
                fits[c].append(fit_once(c, url, root, epochs, steps, log_every))
                if progress is not None:
                    f = fits[c][-1]
                    progress(f"round {r + 1}/{rounds}: {c}: fit {f.wall:.2f} s, loop "
                             f"{f.loop:.2f} s, CPU {f.cpu:.2f} s")
            second = fit_once(BASELINE, url, root, epochs, steps, log_every)
            fits[BASELINE] += [first, second]
            pairs.append((first, second))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if server is not None:
            server.stop()
    out: dict[str, Any] = {"fits": fits, "ratio": {}, "median": {}, "spread": {}, "share": {},
                           "epochs": epochs, "steps": steps, "log_every": log_every,
                           "rounds": rounds}
    for figure in ("wall", "loop", "cpu"):
        base = [(getattr(a, figure) + getattr(b, figure)) / 2 for a, b in pairs]
        out["median"][figure] = {c: statistics.median(getattr(f, figure) for f in fits[c])
                                 for c in CONTENDERS}
        out["ratio"][figure] = {c: statistics.median(getattr(f, figure) / b
                                                     for f, b in zip(fits[c], base, strict=True))
                                for c in others}
        out["ratio"][figure][BASELINE] = 1.0
        out["spread"][figure] = statistics.median(abs(getattr(b, figure) / getattr(a, figure) - 1)
                                                  for a, b in pairs)
    for figure in ("calls", "others", "end"):
        out["median"][figure] = {c: statistics.median(getattr(f, figure) for f in fits[c])
                                 for c in CONTENDERS}
    # The training thread's time in logger calls, as a share of the round's baseline loop.
    out["share"] = {c: statistics.median(f.calls / ((a.loop + b.loop) / 2)
                                         for f, (a, b) in zip(fits[c], pairs, strict=True))
                    for c in others}
    # The logger's own work in the loop: its calls and the other threads' CPU (its workers).
    out["own"] = {c: statistics.median((f.calls + f.others) / ((a.loop + b.loop) / 2)
                                       for f, (a, b) in zip(fits[c], pairs, strict=True))
                  for c in others}
    out["own"][BASELINE] = statistics.median((a.others + b.others) / (a.loop + b.loop)
                                             for a, b in pairs)
    return out


def report(figures: dict[str, Any]) -> str:
    """The figures as a table, with the targets."""
    steps = figures["epochs"] * figures["steps"]
    med, ratio, spread = figures["median"], figures["ratio"], figures["spread"]
    lines = [f"Lightning fit: {figures['epochs']} epochs x {figures['steps']} steps, 4 metrics "
             f"every {figures['log_every']} step(s), a checkpoint per epoch; medians of "
             f"{figures['rounds']} rounds (ratios: paired with each round's baseline)",
             f"{'contender':24} {'fit s':>7} {'ratio':>6} {'loop ms/step':>13} {'ratio':>6} "
             f"{'CPU s':>6} {'ratio':>6} {'in calls ms':>11} {'share':>6} "
             f"{'others ms':>9} {'own':>6} {'end s':>6}"]
    share = {BASELINE: 0.0, **figures["share"]}
    own = figures["own"]
    for c in CONTENDERS:
        lines.append(f"{c:24} {med['wall'][c]:7.2f} {ratio['wall'][c]:6.3f} "
                     f"{med['loop'][c] / steps * 1e3:13.3f} {ratio['loop'][c]:6.3f} "
                     f"{med['cpu'][c]:6.2f} {ratio['cpu'][c]:6.3f} "
                     f"{med['calls'][c] * 1e3:11.1f} {share[c] * 100:5.2f}% "
                     f"{med['others'][c] * 1e3:9.1f} {own[c] * 100:5.2f}% "
                     f"{med['end'][c]:6.2f}")
    lines.append(f"baseline vs itself: fit {spread['wall'] * 100:.1f}%, loop "
                 f"{spread['loop'] * 100:.1f}%, CPU {spread['cpu'] * 100:.1f}%")
    rivals = [c for c in CONTENDERS[2:] if "steplog" not in c]
    for ours in ("steplog -> MLflow", "steplog -> file"):
        faster = ", ".join(f"{ratio['wall'][c] / ratio['wall'][ours]:.2f}x {c}"
                           for c in rivals)
        lines.append(f"{ours}: vs no logger: fit {(ratio['wall'][ours] - 1) * 100:+.1f}%, loop "
                     f"{(ratio['loop'][ours] - 1) * 100:+.1f}%, CPU "
                     f"{(ratio['cpu'][ours] - 1) * 100:+.1f}% (a no-op logger: fit "
                     f"{(ratio['wall'][NOOP] - 1) * 100:+.1f}%, CPU "
                     f"{(ratio['cpu'][NOOP] - 1) * 100:+.1f}%), in its calls "
                     f"{share[ours] * 100:.2f}% of the loop, with its threads "
                     f"{own[ours] * 100:.2f}% (target <= 2%); fit faster than: "
                     f"{faster}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="steps per epoch")
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = measure(epochs=args.epochs, steps=args.steps, log_every=args.log_every,
                      rounds=args.rounds, progress=lambda line: print(line, flush=True))
    print()
    print(report(figures))


if __name__ == "__main__":
    main()
