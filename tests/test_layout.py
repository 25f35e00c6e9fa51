"""The house keeps its shape: one module per stage that says what it reads and writes, a runner that
names no stage and writes no report, layers that import only downwards and no import cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from compress import stages
from compress.graph import GRAPH, ORDER

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def imports():
    return grimp.build_graph("compress")


@pytest.mark.parametrize("name", ORDER)
def test_each_stage_is_its_own_documented_module(name):
    stage = stages.get(name)
    module = sys.modules[f"compress.stages.{name}"]
    assert stage.run.__module__ == module.__name__  # registered where it is defined
    doc = module.__doc__ or ""
    assert doc.startswith(f"Stage ``{name}``") and "Reads:" in doc and "Writes:" in doc
    assert stage.node is next(n for n in GRAPH if n.name == name)  # the graph is declared once


def test_runner_names_no_stage_and_no_report(imports):
    direct = imports.find_modules_directly_imported_by("compress.pipeline")
    assert "compress.stages" in direct
    assert not {m for m in direct if m.startswith("compress.stages.") or m == "compress.report"}
    assert not imports.find_modules_that_directly_import("compress.pipeline") & set(imports.find_descendants("compress.stages"))


def test_no_module_imports_another_in_a_circle(imports):
    """For every import a -> b inside compress, no chain leads from b back to a."""
    modules = sorted(m for m in imports.modules if m.startswith("compress"))
    circles = [(a, b) for a in modules for b in imports.find_modules_directly_imported_by(a)
               if b.startswith("compress") and imports.chain_exists(importer=b, imported=a)]
    assert not circles, circles[:5]


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")
def test_layer_contracts_hold_and_catch_an_upward_import(tmp_path):
    ok = subprocess.run([str(LINT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "0 broken" in ok.stdout
    # the same contracts on a copy whose training loop imports the runner: the layers contract breaks
    shutil.copytree(ROOT / "compress", tmp_path / "compress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    train = tmp_path / "compress" / "train.py"
    train.write_text(train.read_text() + "\nfrom compress.pipeline import run_pipeline  # noqa: E402,F401\n")
    bad = subprocess.run([str(LINT)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "compress.train -> compress.pipeline" in bad.stdout and "BROKEN" in bad.stdout
