"""What logging GPU values and checkpoints costs a CUDA training loop, side by side in one process.

1. **Step loop.** An MLP trained with Adam on random data on the GPU logs ``--scalars`` values
   per step, all CUDA tensors (the loss and per-layer gradient norms), in two sizes: ``small``
   (launch-bound: the CPU's kernel launches take longer than the GPU's work) and ``large``
   (GPU-bound). Contenders, alternating in a rotating order each round:

   * ``none``: no logging (the reference);
   * ``item``: ``float(t)`` of each value, then steplog's ``log_metrics`` of floats (the usual
     pattern; the first ``float`` waits for the GPU);
   * ``steplog``: ``log_metrics`` of the tensors (captured without waiting);
   * ``tensorboard``: ``SummaryWriter.add_scalar`` of each tensor (reads it on the caller).

   Printed: median ms per step over the rounds, and the overhead against ``none``.
2. **Per call**, the GPU idle: ``log_scalar`` of one CUDA tensor against ``float(t)``.
3. **Checkpoint** of a ``--mb`` MB CUDA policy: how long the call holds the training thread, and
   how long until a kernel queued right after the call has run (whether the training stream
   was held): ``save_policy`` against ``{k: v.cpu()}`` and ``torch.save(state_dict)``.

    python benchmarks/bench_cuda.py [--rounds 5] [--steps 300] [--scalars 4] [--mb 500]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import steplog

SIZES = {"small": (256, 64, 4, 1.0), "large": (4096, 2048, 4, 0.25)}
"""name: (width, batch, layers, share of ``--steps`` per round)."""


def make_model(width: int, layers: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).cuda()


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int,
              log: Callable[[dict[str, Any], int], None] | None, scalars: int) -> float:
    """Seconds per step of ``steps`` training steps, logging ``scalars`` CUDA values each."""
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if log is not None:
            values = {"loss": loss.detach()}
            for k in range(scalars - 1):
                values[f"grad_norm/{k}"] = layers[k % len(layers)].weight.grad.norm()
            log(values, i)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def step_loop(args: argparse.Namespace, root: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for size, (width, batch, layers, share) in SIZES.items():
        steps = max(20, int(args.steps * share))
        model = make_model(width, layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(batch, width, device="cuda")
        times: dict[str, list[float]] = {k: [] for k in ("none", "item", "steplog", "tensorboard")}
        run_steps(model, opt, x, 50, None, args.scalars)  # warm-up
        for r in range(args.rounds):
            item_logger = steplog.FileLogger(root / f"{size}-item-{r}")
            tensor_logger = steplog.FileLogger(root / f"{size}-steplog-{r}")
            writer = SummaryWriter(str(root / f"{size}-tb-{r}"))

            def item(values: dict[str, Any], i: int, lg: steplog.Logger = item_logger) -> None:
                lg.log_metrics({k: float(v) for k, v in values.items()}, i)

            def tensors(values: dict[str, Any], i: int,
                        lg: steplog.Logger = tensor_logger) -> None:
                lg.log_metrics(values, i)

            def tensorboard(values: dict[str, Any], i: int, w: Any = writer) -> None:
                for k, v in values.items():
                    w.add_scalar(k, v, i)

            contenders: list[tuple[str, Any]] = [
                ("none", None), ("item", item), ("steplog", tensors), ("tensorboard", tensorboard)]
            k = r % len(contenders)
            for key, fn in contenders[k:] + contenders[:k]:
                times[key].append(run_steps(model, opt, x, steps, fn, args.scalars))
            assert item_logger.close(120) and tensor_logger.close(120)
            writer.close()
        base = statistics.median(times["none"])
        print(f"step loop '{size}' (width {width}, batch {batch}, {layers} layers), "
              f"{args.scalars} CUDA scalars per step, {steps} steps x {args.rounds} rounds")
        print(f"{'contender':>12} {'ms/step':>9} {'overhead':>9}")
        for key, ts in times.items():
            t = statistics.median(ts)
            print(f"{key:>12} {t * 1e3:>9.3f} {(t / base - 1) * 100:>+8.1f}%")


def per_call(args: argparse.Namespace, root: Path) -> None:
    t = torch.ones((), device="cuda")
    n = 20_000
    logger = steplog.FileLogger(root / "per-call")
    results: dict[str, list[float]] = {"float(t)": [], "to(cpu, non_blocking)+event": [],
                                       "log_scalar(t)": [], "log_scalar(float)": []}
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        held = []
        for _ in range(n):
            event = torch.cuda.Event()
            held.append((t.to("cpu", non_blocking=True), event))
            event.record()
        results["to(cpu, non_blocking)+event"].append((time.perf_counter() - start) / n)
        torch.cuda.synchronize()
        del held
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            float(t)
        results["float(t)"].append((time.perf_counter() - start) / n)
        start = time.perf_counter()
        for i in range(n):
            logger.log_scalar("t", t, i)
        results["log_scalar(t)"].append((time.perf_counter() - start) / n)
        assert logger.flush(120)
        start = time.perf_counter()
        for i in range(n):
            logger.log_scalar("f", 1.0, i)
        results["log_scalar(float)"].append((time.perf_counter() - start) / n)
        assert logger.flush(120)
    assert logger.close(120)
    print(f"per call, GPU idle, {n} calls x {args.rounds} rounds (median)")
    for key, ts in results.items():
        print(f"{key:>28} {statistics.median(ts) * 1e6:>8.2f} us")


def checkpoint(args: argparse.Namespace, root: Path) -> None:
    width = int((args.mb * 1024 * 1024 / 4 / 8) ** 0.5)
    policy = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                   for _ in range(8)]).cuda()
    size = sum(v.numel() * v.element_size() for v in policy.state_dict().values())
    marker = torch.zeros((), device="cuda")
    call: dict[str, list[float]] = {}
    stream: dict[str, list[float]] = {}

    def measure(key: str, fn: Callable[[], None]) -> None:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        returned = time.perf_counter()
        marker.add_(1.0)  # the training stream's next kernel
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        call.setdefault(key, []).append(returned - start)
        stream.setdefault(key, []).append(time.perf_counter() - start)

    logger = steplog.FileLogger(root / "ckpt")
    for r in range(args.rounds):
        path = root / f"ckpt-{r}.pth"
        contenders = [
            ("{k: v.cpu()}", lambda: {k: v.cpu() for k, v in policy.state_dict().items()}),
            ("torch.save(state_dict)", lambda p=path: torch.save(policy.state_dict(), p)),
            ("save_policy" if r else "save_policy, first call",
             lambda: logger.save_policy(policy)),
        ]
        k = r % len(contenders)
        for key, fn in contenders[k:] + contenders[:k]:
            measure(key, fn)
        assert logger.flush(300)
        path.unlink(missing_ok=True)
    assert logger.close(300)
    print(f"checkpoint of a {size / 1e6:.0f} MB CUDA policy, {args.rounds} rounds (median; "
          "the first save_policy call allocates its pinned buffers)")
    print(f"{'contender':>26} {'call ms':>9} {'stream held ms':>15}")
    for key in call:
        print(f"{key:>26} {statistics.median(call[key]) * 1e3:>9.2f} "
              f"{statistics.median(stream[key]) * 1e3:>15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--scalars", type=int, default=4)
    parser.add_argument("--mb", type=int, default=500)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    root = Path(tempfile.mkdtemp(prefix="steplog-bench-cuda-"))
    try:
        step_loop(args, root)
        per_call(args, root)
        checkpoint(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
