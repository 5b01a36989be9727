"""Guarantee 5 and 6: values are captured at the call, and bad values fail there."""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from steplog import FileLogger, Logger, Options
from steplog.capture import capture_param, capture_step, capture_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.5, 1.5),
        (3, 3.0),
        (True, 1.0),
        (np.float32(0.25), 0.25),
        (np.int64(7), 7.0),
        (np.array(2.5), 2.5),
        (Fraction(1, 4), 0.25),
        (torch.tensor(0.75), 0.75),
        (torch.tensor([4.0]), 4.0),
        (torch.tensor(3, dtype=torch.int32), 3.0),
    ],
)
def test_numeric_values_are_captured_as_floats(value: object, expected: float) -> None:
    got = capture_value(value)
    assert type(got) is float
    assert got == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinities_are_valid_values(value: float) -> None:
    got = capture_value(value)
    assert isinstance(got, float)
    assert (math.isnan(got) and math.isnan(value)) or got == value


@pytest.mark.parametrize(
    "value",
    ["1.0", None, [1.0], {"a": 1}, 1 + 2j, np.array([1.0, 2.0]), np.array("x"),
     torch.zeros(2), torch.tensor(1 + 1j), object()],
)
def test_non_numeric_values_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        capture_value(value)


def test_log_scalar_rejects_a_string_at_the_call_site() -> None:
    logger = Logger()
    with pytest.raises(TypeError, match="real number"):
        logger.log_scalar("loss", "0.5")  # type: ignore[arg-type]


def test_log_metrics_rejects_a_bad_value_without_queueing_the_others(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    with pytest.raises(TypeError):
        logger.log_metrics({"a": 1.0, "b": "x"})  # type: ignore[dict-item]
    assert logger.close(10)
    assert (tmp_path / "scalars.jsonl").read_text() == ""


def test_a_cpu_tensor_mutated_after_the_call_keeps_the_logged_value(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    t = torch.tensor(1.0)
    logger.log_scalar("x", t, 0)
    t.add_(100.0)
    logger.log_metrics({"y": t}, 1)
    t.add_(100.0)
    assert logger.close(10)
    import pandas as pd

    df = pd.read_json(tmp_path / "scalars.jsonl", lines=True)
    assert df["value"].tolist() == [1.0, 101.0]


def test_parameters_are_snapshotted_at_the_call(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    layers = [64, 64]
    logger.log_parameters({"layers": layers, "lr": np.float64(3e-4), "obj": object})
    layers.append(128)
    assert logger.close(10)
    import json

    params = json.loads((tmp_path / "parameters.json").read_text())
    assert params["layers"] == [64, 64]
    assert params["lr"] == 3e-4
    assert params["obj"] == str(object)


def test_a_param_that_cannot_be_captured_raises_naming_it_and_queues_nothing() -> None:
    from sinks_for_tests import ListSink
    from steplog import Logger

    sink = ListSink()
    logger = Logger(sinks=[sink])
    with pytest.raises(TypeError, match=r"params 'schedule': .*keys"):
        logger.log_parameters({"lr": 0.1, "schedule": {(0, 10): 0.1}})
    assert logger.close(10) and sink.records == []


def test_a_param_int_beyond_64_bits_is_journaled_as_its_text_and_the_rest_as_it_is(
    tmp_path,
) -> None:
    from sinks_for_tests import DownSink
    from steplog import Options
    from steplog.frames import decode_batch
    from steplog.journal import Journal
    from steplog.records import Param

    class JournaledDownSink(DownSink):
        remote = True

        def replayable(self) -> bool:
            return True

    params = {"rng": {"entropy": 2**127, "spawn_key": [-(2**70), 7]}, "config": {"lr": 0.1}}
    logger = Logger(sinks=[JournaledDownSink()], options=Options(runs_dir=str(tmp_path)))
    logger.log_parameters(params)
    assert not logger.close(2)
    (journal_dir,) = tmp_path.rglob("journal")
    with Journal.open(journal_dir) as journal:
        journaled = {r.name: r.value for _, payload in journal.read()
                     for r in decode_batch(payload) if type(r) is Param}
    assert journaled == {"rng": {"entropy": str(2**127), "spawn_key": [str(-(2**70)), 7]},
                         "config": {"lr": 0.1}}


def test_a_param_int_beyond_64_bits_reaches_a_live_sink_as_the_journal_holds_it() -> None:
    from sinks_for_tests import ListSink

    sink = ListSink()
    logger = Logger(sinks=[sink])
    logger.log_parameters({"rng": {"entropy": 2**70}})
    assert logger.close(10)
    assert [(r.name, r.value) for r in sink.records] == [("rng", {"entropy": str(2**70)})]


def test_upload_metadata_with_an_int_beyond_64_bits_is_stored_as_its_text(tmp_path) -> None:
    from mlflow import MlflowClient

    from steplog import MLFlowLogger

    source = tmp_path / "a.txt"
    source.write_text("a")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    logger = MLFlowLogger("meta", tracking_uri=uri, options=Options(
        runs_dir=str(tmp_path / "runs")))
    logger.log_artifact(source, metadata={"seed": 2**70})
    assert logger.close(60)
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(logger.run_id or "")] == ["a.txt"]


def test_params_keep_the_ints_msgpack_holds_as_numbers() -> None:
    assert capture_param([-(2**63), 2**64 - 1, True, 2**64]) == [-(2**63), 2**64 - 1, True,
                                                                  str(2**64)]


def test_log_metrics_snapshots_a_mapping_whose_copy_shares_its_maps(tmp_path) -> None:
    from collections import ChainMap

    base = {"loss": 1.0}
    logger = FileLogger(tmp_path)
    logger.log_metrics(ChainMap({"acc": 0.5}, base), 0)
    base["loss"] = 999.0
    assert logger.close(10)
    import json

    rows = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
    assert {r["name"]: r["value"] for r in rows} == {"acc": 0.5, "loss": 1.0}


def test_capture_param_turns_arrays_and_tensors_into_lists() -> None:
    assert capture_param({"a": np.arange(3), "b": torch.tensor([1, 2])}) == {
        "a": [0, 1, 2],
        "b": [1, 2],
    }


@pytest.mark.parametrize("step", [3, np.int32(3), torch.tensor(3)])
def test_integer_like_steps_are_accepted(step: object) -> None:
    assert capture_step(step) == 3


@pytest.mark.parametrize("step", ["3", 3.5, True, np.bool_(True), torch.tensor(3.0),
                                  torch.tensor(True)])
def test_non_integer_steps_raise_type_error(step: object) -> None:
    with pytest.raises(TypeError):
        capture_step(step)


def test_a_step_in_a_tensor_off_the_cpu_is_refused_rather_than_waited_for() -> None:
    # "meta" stands in for a GPU here: any device but the CPU would make .item() wait.
    with pytest.raises(TypeError, match="tensor on meta: reading it would make this call wait"):
        capture_step(torch.tensor(3, device="meta"))


def test_logging_floats_does_not_import_torch_or_numpy(tmp_path) -> None:
    code = (
        "import sys, steplog\n"
        f"lg = steplog.FileLogger({str(tmp_path)!r})\n"
        "lg.log_scalar('a', 1.0); lg.log_metrics({'b': 2}); lg.log_parameters({'c': 1})\n"
        "assert lg.close(10)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'mlflow', 'clearml') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_is_captured_without_synchronising_and_resolved_later(tmp_path) -> None:
    logger = FileLogger(tmp_path)
    t = torch.tensor(2.0, device="cuda")
    logger.log_scalar("gpu", t, 0)
    t.add_(5.0)  # mutation after the call must not change what is logged
    assert logger.close(30)
    import pandas as pd

    assert pd.read_json(tmp_path / "scalars.jsonl", lines=True)["value"].tolist() == [2.0]
