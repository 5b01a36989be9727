"""``steplog show``: a run's status, parameters, a count / last / min / max line per metric, and
what its sinks still lack."""

from __future__ import annotations

import json
import math
from typing import TextIO

from steplog.readback import RunData

__all__ = ["print_run"]


def print_run(run: RunData, out: TextIO) -> None:
    """Print ``run`` as ``steplog show`` does."""
    print(f"{run.kind} {run.where}", file=out)
    print(f"  status: {run.status}", file=out)
    for note in run.notes:
        print(f"  {note}", file=out)
    if run.params:
        print("  parameters: " + ", ".join(
            f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in sorted(run.params.items())), file=out)
    if run.series:
        width = max(max(len(n) for n in run.series), len("metric"))
        print(f"  {'metric':{width}}  {'count':>7}  {'last step':>10}  {'last':>11}  "
              f"{'min':>11}  {'max':>11}", file=out)
        for name, s in sorted(run.series.items()):
            finite = [v for v in s.values if not math.isnan(v)] or [math.nan]
            print(f"  {name:{width}}  {len(s.values):7d}  {s.steps[-1]:10d}  "
                  f"{s.values[-1]:11.5g}  {min(finite):11.5g}  {max(finite):11.5g}", file=out)
    else:
        print("  no metrics", file=out)
    if run.sinks:
        print("  sinks:", file=out)
        for line in run.sinks:
            print(f"    {line}", file=out)
    if run.undelivered:
        print("  undelivered:", file=out)
        for line in run.undelivered:
            print(f"    {line}", file=out)
        if run.sync:
            print(f"  deliver it with: {run.sync}", file=out)
    elif run.kind == "journal run directory":
        print("  undelivered: nothing", file=out)
