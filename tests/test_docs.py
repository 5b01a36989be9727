"""The docs cannot drift from the code: every Python block of README.md and docs/ runs."""

from __future__ import annotations

import builtins
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import steplog

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: d.name)
def test_every_python_block_of_the_docs_runs(doc: Path, tmp_path: Path) -> None:
    # The blocks of one page run in order in one folder: a later block may read what an
    # earlier one wrote, as a reader following the page would.
    # ClearML keeps its offline sessions under CLEARML_CACHE_DIR: here, not in the real home.
    # MLFLOW_TRACKING_URI is left out too: the blocks use the embedded store, never a server.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLEARML_", "TRAINS_")) and k != "MLFLOW_TRACKING_URI"}
    env["CLEARML_CACHE_DIR"] = str(tmp_path / "clearml-cache")
    for k, code in enumerate(python_blocks(doc)):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=240, env=env)
        assert proc.returncode == 0, f"{doc.name} block {k + 1}:\n{code}\n{proc.stderr[-3000:]}"
        assert "steplog: at exit" not in proc.stderr, proc.stderr


def test_no_python_block_of_the_docs_needs_a_server() -> None:
    for doc in DOCS:
        for code in python_blocks(doc):
            assert not re.search(r"https?://", code), f"{doc.name}: a block names a server:\n{code}"
            if "ClearMLLogger(" in code or "ClearMLSink(" in code:
                assert "CLEARML_OFFLINE_MODE" in code or "offline=True" in code, code


def test_the_docs_have_python_blocks_to_run() -> None:
    assert len(python_blocks(ROOT / "README.md")) >= 1
    assert len(python_blocks(ROOT / "docs" / "index.md")) >= 3
    for page in ("migrating", "configuration", "files", "mlflow", "clearml", "checkpoints"):
        assert python_blocks(ROOT / "docs" / f"{page}.md"), f"docs/{page}.md has no example"


def test_every_page_of_the_site_is_in_its_nav() -> None:
    # mkdocs --strict refuses a page left out of the nav; this says so without building.
    nav = set(re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(),
                         re.MULTILINE))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == nav, f"docs/ only: {sorted(pages - nav)}; nav only: {sorted(nav - pages)}"


def test_every_class_name_the_docs_use_is_importable_from_steplog() -> None:
    for name in steplog.__all__:
        assert getattr(steplog, name) is not None
    text = "".join(d.read_text(encoding="utf-8") for d in DOCS)
    documented = set(re.findall(r"`(?:steplog\.)?([A-Z][a-z]+[A-Z][A-Za-z]*)", text))
    not_ours = {"SummaryWriter", "DataFrame", "MlflowClient", "OutputModel", "DataLoader", "NaN"}
    missing = {n for n in documented - not_ours
               if not hasattr(steplog, n) and not hasattr(builtins, n)}
    assert not missing, f"documented but not importable from steplog: {sorted(missing)}"
