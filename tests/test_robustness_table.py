"""benchmarks/recipe_robustness.py reads each run's ONNX accuracies and stage seconds and builds its rows
and table from them (the runs themselves are pipeline runs, tested elsewhere)."""

import importlib.util
import json

from tests.conftest import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location("recipe_robustness", ROOT / "benchmarks" / "recipe_robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder, export, seconds):
    for stage, s in seconds.items():
        (folder / stage).mkdir(parents=True)
        m = {"stage_seconds": s}
        if stage == "export":
            m.update({role: {"onnx_accuracy": acc} for role, acc in export.items()})
        (folder / stage / "metrics.json").write_text(json.dumps(m))


def test_rows_and_table_come_from_the_runs(tmp_path):
    bench = _bench()
    _run(tmp_path / "kd", {"teacher": 0.9, "student": 0.85, "student_int8": 0.86},
         {"teacher": 100.0, "distill": 50.0, "quantize": 20.0, "export": 5.0})
    _run(tmp_path / "scratch", {"teacher": 0.9, "student": 0.80}, {"teacher": 0.5, "distill": 40.0, "export": 2.0})
    row = bench.row_for("set", bench.read_run(tmp_path / "kd"), bench.read_run(tmp_path / "scratch"))
    assert row["teacher"] == 0.9 and row["kd"] == 0.85 and row["scratch"] == 0.80 and row["int8"] == 0.86
    assert abs(row["teacher_minus_int8"] - 0.04) < 1e-12 and abs(row["kd_minus_scratch"] - 0.05) < 1e-12
    assert row["seconds"] == 217.5
    text = bench.table([row], ROOT / "pipelines" / "photos.yaml", [])
    assert "| set | 0.9000 | 0.8500 | 0.8000 | 0.8600 | +4.0 pt | +5.0 pt | 218 s |" in text
    assert "within 3 pt on 0 of 1 sets, within 5 pt on 1; KD ≥ scratch on 1 of 1" in text
    # a run that did not finish leaves its cells empty, not zero
    missing = bench.row_for("gone", bench.read_run(tmp_path / "absent"), {})
    assert missing["teacher"] is None and missing["teacher_minus_int8"] is None
