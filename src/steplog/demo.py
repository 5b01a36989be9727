"""``steplog demo``: REINFORCE on gymnasium's ``CartPole-v1`` in torch on the CPU, logged through
steplog into a demo directory.

Every run gets its own file run ``<dir>/<run>/`` and its own MLflow run (named ``<run>``) in the
embedded store ``<dir>/mlflow.db`` (artifacts under ``<dir>/mlruns/``); the journal, when one
is kept, goes to ``<dir>/steplog-runs/``. Each update logs its scalars and each episode its
return, at the number of environment steps taken so far; the policy is saved every
``save_every`` updates. SIGINT and SIGTERM end the run ``KILLED`` after delivering everything
logged before them; the command then exits 130 or 143.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["DemoConfig", "run_demo"]

EXPERIMENT = "steplog-demo"
SEED_EXPERIMENT = "steplog-demo-seed-pattern"
"""Where the short stretch logged with the seed's synchronous pattern goes."""


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings (the ``steplog demo`` options)."""

    dir: Path
    updates: int = 100
    episodes: int = 4
    """Episodes collected per update."""
    lr: float = 1e-2
    gamma: float = 0.99
    save_every: int = 25
    seed: int | None = None
    """torch's and the environment's seed; ``None``: a new one per run (logged as a
    parameter)."""
    seed_pattern_updates: int = 5
    """Updates timed with one ``mlflow.log_metric`` call per scalar after the run (0: none)."""
    progress: bool = True


class _Stopped(Exception):
    """SIGTERM, raised in the main thread like ``KeyboardInterrupt`` is for SIGINT."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_noted() -> Iterator[list[int]]:
    """SIGINT and SIGTERM appended to the yielded list instead of raised: the loop stops
    between calls, so no signal interrupts a store's transaction half-way (an interrupted
    SQLAlchemy session can keep the sqlite write lock that ending the run then waits for)."""
    noted: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, frame: noted.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield noted
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


@dataclass
class _Timing:
    """Wall time of whole updates (collecting episodes, the gradient step, logging) and of the
    logging calls in them."""

    updates: int = 0
    loop_s: float = 0.0
    logging_s: float = 0.0
    per_update_s: list[float] = field(default_factory=list)

    def tail(self, n: int) -> float:
        """Mean time of the last ``n`` updates (s)."""
        last = self.per_update_s[-n:]
        return sum(last) / len(last) if last else 0.0


def _new_run_dir(root: Path) -> Path:
    """A new directory under ``root`` named after the time, claimed by creating it: two demos
    started in the same second into the same directory get one each."""
    base = time.strftime("%Y%m%d-%H%M%S")
    name, n = base, 1
    while True:
        try:
            (root / name).mkdir()
            return root / name
        except FileExistsError:
            n += 1
            name = f"{base}-{n}"


class _Trainer:
    """The policy, its optimiser and the environment: one update at a time. Episodes are played
    with a NumPy copy of the policy (no autograd per environment step); the update recomputes
    the log-probabilities of all its steps in one batched forward pass."""

    def __init__(self, cfg: DemoConfig) -> None:
        import gymnasium as gym
        import numpy as np
        import torch

        self.torch, self.np = torch, np
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = gym.make("CartPole-v1")
        self.env.reset(seed=cfg.seed)
        self.policy = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(),
                                          torch.nn.Linear(64, 2))
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.env_steps = 0

    def _episode(self, weights: list[Any]) -> tuple[list[Any], list[int], int]:
        np = self.np
        w1, b1, w2, b2 = weights
        obs, _ = self.env.reset()
        observations: list[Any] = []
        actions: list[int] = []
        done = False
        while not done:
            logits = np.tanh(obs @ w1 + b1) @ w2 + b2
            p1 = 1.0 / (1.0 + np.exp(logits[0] - logits[1]))  # softmax of two logits
            action = int(self.rng.random() < p1)
            observations.append(obs)
            actions.append(action)
            obs, _, terminated, truncated, _ = self.env.step(action)
            done = terminated or truncated
        return observations, actions, len(actions)  # CartPole: reward 1 per step

    def update(self, on_episode: Any) -> dict[str, Any]:
        """Play ``cfg.episodes`` episodes (``on_episode(return, env_steps)`` after each), take
        one REINFORCE step, and return the update's scalars."""
        torch, np = self.torch, self.np
        weights = [t.detach().numpy().astype(np.float64).T if t.dim() == 2 else
                   t.detach().numpy().astype(np.float64) for t in self.policy.parameters()]
        observations: list[Any] = []
        actions: list[int] = []
        targets: list[Any] = []
        returns: list[int] = []
        for _ in range(self.cfg.episodes):
            obs, acts, ret = self._episode(weights)
            self.env_steps += ret
            on_episode(ret, self.env_steps)
            targets.append(_return_to_go(ret, self.cfg.gamma))
            observations += obs
            actions += acts
            returns.append(ret)
        logits = self.policy(torch.as_tensor(np.array(observations), dtype=torch.float32))
        log_probs = torch.log_softmax(logits, dim=1)
        taken = log_probs.gather(1, torch.as_tensor(actions).unsqueeze(1)).squeeze(1)
        togo = np.concatenate(targets)  # normalised over the whole batch: the baseline
        target = torch.as_tensor((togo - togo.mean()) / (togo.std() + 1e-8),
                                 dtype=torch.float32)
        loss = -(taken * target).sum() / self.cfg.episodes
        entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
        self.opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 10.0)
        self.opt.step()
        # Tensors go to steplog as they are: captured at the call, nothing waits on a sink.
        return {"loss/policy": loss.detach(), "return/mean": sum(returns) / len(returns),
                "policy/entropy": entropy.detach(), "grad/norm": grad_norm}


def _return_to_go(steps: int, gamma: float) -> Any:
    """The discounted return from each step of a CartPole episode (reward 1 per step) to its
    end: 1 + gamma + ... + gamma**(n-1) for the n steps left, in closed form (no powers that
    underflow and no division by them)."""
    import numpy as np

    left = np.arange(steps, 0, -1, dtype=np.float64)
    return left if gamma == 1.0 else (1.0 - gamma ** left) / (1.0 - gamma)


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="REINFORCE CartPole-v1", unit="update", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def run_demo(cfg: DemoConfig) -> int:
    """Train, log, and print what was logged and the commands that open it. Returns the exit
    status: 0 when everything arrived, 1 when not, 130 after SIGINT, 143 after SIGTERM."""
    import importlib.util

    missing = [m for m in ("torch", "gymnasium", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"steplog demo needs torch, gymnasium and mlflow ({', '.join(missing)} missing): "
              "pip install 'steplog[demo,torch,mlflow]'", file=sys.stderr)
        return 2
    from steplog import FileSink, Logger, Options
    from steplog.sinks.mlflow import MLflowSink

    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=int.from_bytes(os.urandom(4), "little") >> 1)
    root = cfg.dir.absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        run_dir = _new_run_dir(root)
    except OSError as exc:
        print(f"steplog demo: cannot use {cfg.dir} as the demo directory: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    run_name = run_dir.name
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    home = Path.cwd()
    code = 0
    interrupted: str | None = None
    timing = _Timing()
    counts = {"updates": 0, "episodes": 0, "checkpoints": 0, "scalars": 0}
    names: set[str] = set()
    logger: Logger | None = None
    bar = None
    params = {"algo": "REINFORCE", "env": "CartPole-v1", "lr": cfg.lr, "gamma": cfg.gamma,
              "updates": cfg.updates, "episodes_per_update": cfg.episodes, "hidden": [64],
              "seed": cfg.seed, "save_every": cfg.save_every}
    with _sigterm_raises():
        try:
            # MLflow puts a new experiment's artifacts in ./mlruns: under the demo directory.
            os.chdir(root)
            mlflow_sink = MLflowSink(EXPERIMENT, tracking_uri=tracking_uri, run_name=run_name,
                                     tags={"source": "steplog demo"})
            logger = Logger(sinks=[FileSink(run_dir, existing="error"), mlflow_sink],
                            options=Options(runs_dir=str(root / "steplog-runs")))
            trainer = _Trainer(cfg)
            logger.log_parameters(params)
            bar = _progress(cfg.updates, cfg.progress)
            log_scalar, log_metrics = logger.log_scalar, logger.log_metrics

            def on_episode(ret: float, env_steps: int) -> None:
                t = time.perf_counter()
                log_scalar("return/episode", ret, env_steps)
                timing.logging_s += time.perf_counter() - t
                counts["episodes"] += 1
                counts["scalars"] += 1

            for update in range(1, cfg.updates + 1):
                start = time.perf_counter()
                scalars = trainer.update(on_episode)
                t = time.perf_counter()
                log_metrics(scalars, trainer.env_steps)
                counts["scalars"] += len(scalars)
                if update % cfg.save_every == 0 or update == cfg.updates:
                    logger.save_policy(trainer.policy, name="policy", step=update)
                    counts["checkpoints"] += 1
                end = time.perf_counter()
                timing.logging_s += end - t
                timing.loop_s += end - start
                timing.per_update_s.append(end - start)
                timing.updates = counts["updates"] = update
                names.update(scalars)
                if bar is not None:
                    bar.set_postfix(ret=f"{float(scalars['return/mean']):.0f}", refresh=False)
                    bar.update()
        except KeyboardInterrupt:
            interrupted, code = "SIGINT", 130
        except _Stopped:
            interrupted, code = "SIGTERM", 143
        finally:
            if bar is not None:
                bar.close()
            os.chdir(home)
        if logger is None:
            print(f"steplog demo: stopped by {interrupted} before the run started",
                  file=sys.stderr)
            return code
        # A second signal while delivering is ignored: close has its own deadline.
        ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if interrupted:
                print(f"steplog demo: {interrupted}: delivering what was logged, then ending "
                      "the run KILLED", file=sys.stderr)
            result = logger.close(60, status="KILLED" if interrupted else "FINISHED")
        finally:
            for s, handler in ignored.items():
                signal.signal(s, handler)
    stats = logger.stats()
    print(f"\nrun {run_name}: {counts['updates']} updates, {counts['episodes']} episodes; "
          f"{stats.delivered:,} records delivered "
          f"to both sinks, closed {'KILLED' if interrupted else 'FINISHED'}, "
          f"everything arrived: {bool(result)}")
    if counts["episodes"]:
        names.add("return/episode")
    saved = counts["checkpoints"]
    print(f"logged: {counts['scalars']:,} scalars of {', '.join(sorted(names)) or 'none'}; "
          f"{len(params)} parameters; {saved} policy checkpoint{'' if saved == 1 else 's'} "
          f"(one every {cfg.save_every} updates and after the last"
          + (f"; model.pth under {run_dir}/policy/)" if saved else ")"))
    if not result:
        print(f"not delivered: {result.undelivered} ({result.losses})")
    if timing.updates:
        seed: _Timing | None = None
        if not interrupted and cfg.seed_pattern_updates > 0:
            with _signals_noted() as noted:
                try:
                    os.chdir(root)  # the experiment's artifacts under the demo directory too
                    seed = _seed_pattern(cfg, trainer, tracking_uri, run_name, noted)
                finally:
                    os.chdir(home)
            if noted:
                interrupted, code = (("SIGINT", 130) if noted[0] == signal.SIGINT
                                     else ("SIGTERM", 143))
            if interrupted:
                print(f"steplog demo: {interrupted}: the comparison with the seed's pattern "
                      "stopped", file=sys.stderr)
        _print_timing(timing, seed)
    rel = shlex.quote(str(cfg.dir))
    steplog = _command("steplog")
    print("\nopen the results:")
    print(f"  {steplog} show {rel}")
    print(f"  {steplog} plot {rel}")
    print(f"  {_command('mlflow')} ui --backend-store-uri {tracking_uri}")
    if code == 0 and not result:
        code = 1
    return code


def _command(name: str) -> str:
    """How to run the console script ``name`` of this interpreter's environment: its bare name
    when the shell finds that one, else its path (``.venv/bin/steplog`` after ``make demo``)."""
    beside = Path(sys.executable).parent / name
    if not beside.is_file():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == beside.resolve():
        return name
    with contextlib.suppress(ValueError):
        return shlex.quote(str(beside.relative_to(Path.cwd())))
    return shlex.quote(str(beside))


def _print_timing(timing: _Timing, seed: _Timing | None) -> None:
    """The step loop's time per update with steplog, and with the seed's synchronous pattern
    on a short stretch after it (``seed``, when it ran)."""
    n = timing.updates

    def row(label: str, whole_s: float, logging_s: float | None, note: str = "") -> None:
        calls = "" if logging_s is None else f"{logging_s * 1e3:10.3f} ms"
        print(f"{label:32}{whole_s * 1e3:9.2f} ms  {calls:13}{note}".rstrip())

    print(f"\n{'step loop, per update':32}{'whole update':>12}  {'logging calls':>13}")
    row(f"steplog ({n} updates)", timing.loop_s / n, timing.logging_s / n)
    if seed is None or not seed.updates:
        return
    k = min(seed.updates, n)
    row(f"  its last {k} updates", timing.tail(k), None)
    row("mlflow.log_metric per scalar", seed.loop_s / seed.updates,
        seed.logging_s / seed.updates,
        f"  ({seed.updates} more updates, the seed's synchronous pattern, same store)")
    ours = timing.logging_s / n
    theirs = seed.logging_s / seed.updates
    print(f"logging costs the loop {ours * 1e3:.3f} ms per update with steplog, "
          f"{theirs * 1e3:.1f} ms with one mlflow.log_metric call per scalar "
          f"({theirs / ours:,.0f}x)")


def _seed_pattern(cfg: DemoConfig, trainer: _Trainer, tracking_uri: str,
                  run_name: str, stop: list[int]) -> _Timing | None:
    """A short stretch of the same loop logging as the seed's MLFlowLogger does: one
    synchronous ``mlflow.log_metric`` call per scalar, into the same store. Stops after the
    update during which ``stop`` became non-empty and ends the run KILLED."""
    try:
        import mlflow
    except ImportError:
        return None
    timing = _Timing()
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(SEED_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id,
                          run_name=f"{run_name}-seed-pattern"):

        def on_episode(ret: float, env_steps: int) -> None:
            t = time.perf_counter()
            mlflow.log_metric("return/episode", ret, step=env_steps)
            timing.logging_s += time.perf_counter() - t

        for _ in range(cfg.seed_pattern_updates):
            if stop:
                break
            start = time.perf_counter()
            scalars = trainer.update(on_episode)
            t = time.perf_counter()
            for name, value in scalars.items():
                mlflow.log_metric(name, float(value), step=trainer.env_steps)
            end = time.perf_counter()
            timing.logging_s += end - t
            timing.loop_s += end - start
            timing.updates += 1
        if stop:
            mlflow.end_run("KILLED")  # ended here: leaving the block would end it FINISHED
    return timing
