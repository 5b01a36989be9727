"""The ``steplog`` command: parses the arguments and dispatches to the module of each subcommand
(:mod:`steplog.demo`, :mod:`steplog.show`, :mod:`steplog.plot`, :mod:`steplog.syncing`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from steplog.readback import RunData

__all__ = ["main"]

_DESCRIPTION = """\
Experiment logging off the training step loop: the steplog command.
'steplog COMMAND --help' describes each command and its options."""

_DEMO = """\
Train REINFORCE on gymnasium's CartPole-v1 (torch, CPU; 10-20 s on 2 free cores) and log every
update's scalars and every episode's return through steplog: into a file run DIR/<run>/ and
an MLflow run of experiment 'steplog-demo' in the embedded store DIR/mlflow.db. The policy is
saved every --save-every updates. Every demo run gets its own <run> (the start time); runs
never mix. Ctrl-C or SIGTERM stops training, delivers everything logged so far, ends the run
KILLED and exits with 130 or 143. At the end it prints what was logged, the step-loop time
next to the same loop logging with one synchronous mlflow.log_metric call per scalar, and the
commands that open the results."""

_SHOW = """\
Print a run's status, its parameters, a count / last / min / max line per metric, and what
its sinks still lack. RUN is a file run directory, a journal run directory (holding run.json
and journal/), a directory of such runs (a demo directory: every run in it), or, with
--tracking-uri (or $MLFLOW_TRACKING_URI for a RUN that is not a path), an MLflow run id or
EXPERIMENT/RUN_NAME."""

_PLOT = """\
Draw the learning curves of one or more runs into a PNG image: one panel per metric group
(the part of a name before its first '/'), every run overlaid. RUN is anything 'steplog show'
accepts. The path of the image is printed."""

_SYNC = """\
Deliver what loggers kept on disk under PATH (one run directory, or every one under it): the
journaled records a sink did not store, and the uploads that failed after their retries.
Running it again stores nothing twice; a run its logger or an earlier sync delivered whole (and
removed) is reported as having nothing left to deliver. With --to URI, what an MLflow run lacks
goes to a new run at that tracking URI instead (the same one on every later sync). Exit status:
0 when nothing is left, 1 when something is still kept, 2 for a PATH that never held a run."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text or action.default is \
                argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return text + (" (default: none)" if action.default is None else
                       " (default: %(default)s)")


def _demo(args: argparse.Namespace) -> int:
    from steplog.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(
        dir=Path(args.dir), updates=args.updates, episodes=args.episodes, lr=args.lr,
        gamma=args.gamma, save_every=args.save_every, seed=args.seed,
        seed_pattern_updates=args.seed_pattern_updates, progress=not args.no_progress))


def _read_runs(command: str, specs: Sequence[str], tracking_uri: str | None,
               again: bool = True) -> list[RunData] | int:
    """The runs ``specs`` name, or the exit status after saying why they cannot be read: 2 for
    a run that is not there, 1 for one that cannot be read (a damaged file, a store that does
    not answer). A run removed while it was read (delivered whole) is looked up once more."""
    from steplog.readback import DamagedFileError, NoSuchRunError, find_runs

    try:
        return [run for spec in specs for run in find_runs(spec, tracking_uri)]
    except DamagedFileError as exc:
        print(f"steplog {command}: cannot read {exc}", file=sys.stderr)
        return 1
    except NoSuchRunError as exc:
        print(f"steplog {command}: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        if again:
            return _read_runs(command, specs, tracking_uri, again=False)
        print(f"steplog {command}: cannot read {exc.filename or exc}: no such file (removed "
              "while it was read, or a link to nothing)", file=sys.stderr)
        return 2
    except Exception as exc:  # a damaged run.json or journal; a store's error
        print(f"steplog {command}: cannot read {' '.join(specs)}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


def _show(args: argparse.Namespace) -> int:
    from steplog.show import print_run

    runs = _read_runs("show", [args.run], args.tracking_uri)
    if isinstance(runs, int):
        return runs
    for i, run in enumerate(runs):
        if i:
            print()
        print_run(run, sys.stdout)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from steplog.plot import NothingToPlotError, plot_runs

    runs = _read_runs("plot", args.runs, args.tracking_uri)
    if isinstance(runs, int):
        return runs
    output = Path(args.output) if args.output else Path(tempfile.gettempdir()) / (
        f"steplog-plot-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.png")
    if not output.suffix:
        output = output.with_name(output.name + ".png")  # as matplotlib names it
    try:
        plot_runs(runs, output, pattern=args.metrics, smooth_k=args.smooth)
    except NothingToPlotError as exc:
        print(f"steplog plot: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"steplog plot: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"steplog plot: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # e.g. an output name whose format matplotlib does not know
        print(f"steplog plot: cannot draw {output}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    print(output)
    return 0


def _sync(args: argparse.Namespace) -> int:
    from steplog.syncing import sync_path

    return sync_path(Path(args.path), timeout_s=args.timeout, to=args.to)


def _parsed(kind: type[int] | type[float], text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def _positive(text: str) -> int:
    value = int(_parsed(int, text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _natural(text: str) -> int:
    value = int(_parsed(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(_parsed(int, text))
    if not 0 <= value < 2**64:  # what torch, NumPy and gymnasium all accept
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**64), got {value}")
    return value


def _positive_number(text: str) -> float:
    value = _parsed(float, text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _discount(text: str) -> float:
    value = _parsed(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steplog", description=_DESCRIPTION,
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=text, formatter_class=_Formatter)

    demo = command("demo", "train a small policy, logging through steplog", _DEMO)
    demo.add_argument("--dir", default=os.environ.get("STEPLOG_DEMO_DIR", "steplog-demo"),
                      help="the demo directory; $STEPLOG_DEMO_DIR sets the default")
    demo.add_argument("--updates", type=_positive, default=100, help="policy updates")
    demo.add_argument("--episodes", type=_positive, default=4, help="episodes per update")
    demo.add_argument("--lr", type=_positive_number, default=1e-2, help="Adam learning rate")
    demo.add_argument("--gamma", type=_discount, default=0.99, help="discount factor")
    demo.add_argument("--save-every", type=_positive, default=25,
                      help="save the policy every this many updates (and after the last)")
    demo.add_argument("--seed", type=_seed, help="torch and environment seed (default: a new "
                      "one per run, logged as a parameter)")
    demo.add_argument("--seed-pattern-updates", type=_natural, default=5,
                      help="updates timed afterwards with one mlflow.log_metric call per "
                           "scalar (0: skip the comparison)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    show = command("show", "a run's status, parameters, metrics, and what is undelivered",
                   _SHOW)
    show.add_argument("run", metavar="RUN", help="a run directory, a directory of runs, or "
                      "an MLflow run id or EXPERIMENT/RUN_NAME")
    show.add_argument("--tracking-uri", help="read RUN from this MLflow tracking URI "
                      "(default: $MLFLOW_TRACKING_URI for a RUN that is not a path)")
    show.set_defaults(func=_show)

    plot = command("plot", "learning curves of one or more runs, into a PNG file", _PLOT)
    plot.add_argument("runs", metavar="RUN", nargs="+", help="as for 'steplog show'")
    plot.add_argument("-o", "--output", metavar="FILE.png",
                      help="the image to write: a PNG, or the format its suffix names "
                           "(.svg, .pdf, .jpg) (default: a new .png in the temporary "
                           "directory)")
    plot.add_argument("--metrics", metavar="PATTERN",
                      help="only metrics whose name matches this glob, e.g. 'return/*' "
                           "(default: all)")
    plot.add_argument("--smooth", metavar="K", type=_positive, default=1,
                      help="draw the trailing mean of K points over the faint raw curve "
                           "(default: 1, the raw curve only)")
    plot.add_argument("--tracking-uri", help="read RUNs from this MLflow tracking URI "
                      "(default: $MLFLOW_TRACKING_URI for a RUN that is not a path)")
    plot.set_defaults(func=_plot)

    sync = command("sync", "deliver what loggers kept on disk after a crash or an outage",
                   _SYNC)
    sync.add_argument("path", metavar="PATH", nargs="?",
                      default=os.environ.get("STEPLOG_RUNS_DIR", "steplog-runs"),
                      help="a run directory or a directory of them (default: $STEPLOG_RUNS_DIR, "
                           "else steplog-runs)")
    sync.add_argument("--timeout", type=_positive_number, default=60.0,
                      help="seconds one write is retried before the rest stays kept")
    sync.add_argument("--to", metavar="URI",
                      help="deliver what each MLflow run lacks into a new run at this tracking "
                           "URI (same experiment, run name, tags and status)")
    sync.set_defaults(func=_sync)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        # A sync stopped here resumes where its cursors are with the next one.
        print("steplog: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (steplog show RUN | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
