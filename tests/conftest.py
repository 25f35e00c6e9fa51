import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from compress.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "Chromium is not installed (Debian package chromium; .ci/run installs it)"
# every student of the registry and the lightest teacher: what pruning, QAT and export must handle
EDGE_MODELS = sorted(n for n, s in REGISTRY.items() if s.role == "student") + ["resnet18"]

# under pytest-xdist (make test) every worker is one more process on the same cores: one thread each
# (two threads in each of two workers on two cores made the suite twice as slow)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if _WORKERS > 1 else max(1, min(2, torch.get_num_threads())))


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    # one thread: on a shared 2-core machine, torch's threads in several processes fight for the cores
    # (a sweep took 300 s with every thread and 26 s with one)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def cli():
    return run_cli


def write_tiny_recipe(folder: Path, name: str = "tiny", **sections) -> Path:
    """A recipe small enough for a test: 16 px digits, two light models, one epoch each, ONNX files
    only (the ORT-format and OpenVINO files are the export stage's own tests, and test_stages' full run)."""
    import yaml

    raw = {
        "name": name,
        "seed": 0,
        "stages": ["teacher", "distill", "export", "bench"],
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 64},
        "teacher": {"model": "mobilenetv3_small_050", "epochs": 1, "lr": 0.01},
        "distill": {"student": "mobilenetv2_035", "epochs": 1, "lr": 0.01},
        "export": {"edge_formats": []},
        "bench": {"runs": 5, "warmup": 1, "image_sizes": [16], "threads": [1]},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_recipe(tmp_path):
    return lambda name="tiny", **sections: write_tiny_recipe(tmp_path, name, **sections)


def done_stages(folder: Path, recipe: dict, models: dict[str, str]):
    """A run context of ``recipe`` (16-pixel digits, 1 % of them for testing, unless it says otherwise)
    whose stages in ``models`` (stage: model name) are done: each a seeded, untrained checkpoint of its
    model with the metrics later stages read. What a stage's own test runs it on, without training."""
    from compress.config import validate_recipe
    from compress.context import RunContext, StageResult
    from compress.models import create_model, save_checkpoint
    from compress.stages.common import MODEL_FILE, model_meta

    raw = {"name": "t", "data": {"dataset": "digits", "image_size": 16, "test_fraction": 0.01}, **recipe}
    raw.setdefault("teacher", {}).setdefault("model", models.get("teacher", "mobilenetv2_035"))
    raw.setdefault("distill", {}).setdefault("student", models.get("distill", "mobilenetv2_035"))
    ctx = RunContext(cfg=validate_recipe(raw), run_dir=folder / "run", cache_dir=folder / "cache")
    for seed, (stage, name) in enumerate(models.items()):
        torch.manual_seed(seed)
        save_checkpoint(create_model(name, ctx.data.num_classes).eval(), ctx.stage_dir(stage) / MODEL_FILE,
                        model_meta(ctx, name, stage))
        ctx.results[stage] = StageResult(stage, ctx.stage_dir(stage), f"{stage}-fingerprint", {
            "model": name, "teacher": models.get("teacher", name), "distillation_factor": 1.0, "method": "kd",
            "alpha": 0.9, "temperature": 4.0, "test_accuracy": 0.1})
    return ctx


def render(page: Path) -> dict:
    """Load ``page`` in headless Chromium; the page's own script records its decoded images and rows."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                             capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", out.stdout)
    assert body, out.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
    return {"images": int(attrs.get("images", -1)), "decoded": int(attrs.get("decoded", -1)),
            "rows": int(attrs.get("table-rows", -1)), "dom": out.stdout}


# the files whose tests take longest, longest first: make test's workers take whole files in collection
# order, so these start first and the short files fill in at the end (a long file picked up last leaves
# the other worker idle while it runs)
LONG_FILES = ["test_int8_gate.py", "test_cli.py", "test_interrupts.py", "test_stages.py", "test_methods.py",
              "test_tune.py", "test_distributed.py", "test_reports.py", "test_sweep.py", "test_teacher_cache.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept
