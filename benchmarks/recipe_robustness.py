"""How well a recipe holds on image sets it was not chosen on: one table over a zoo of image folders.

For each set (a folder with train/, val/ and test/, one folder per class in each, such as those
``make_zoo.py`` writes) the recipe runs twice on the same budget, each as a pipeline run of its own
under ``ARTIFACTS/<set>-kd`` and ``ARTIFACTS/<set>-scratch``:

- ``kd``: the recipe as a user runs it (``compress pipeline RECIPE --dataset imagefolder:SET``);
- ``scratch``: the same student without a teacher (``--set distill.method=scratch``), stopped after
  its FP32 export (``stages=[teacher,distill,export]``, no edge formats): only its accuracy is compared.

Every accuracy is the ONNX file's, measured with onnxruntime on the whole test split. A killed
benchmark resumes where it stopped (each pipeline run resumes, finished runs are skipped), and a
finished one prints its table again in seconds. The wall time is the sum of the stages' own
measured seconds (skipped stages keep the time they took when they ran), so a rerun prints the
figure of the run that did the work.

    .venv/bin/python benchmarks/recipe_robustness.py ZOO [--recipe pipelines/photos.yaml]
        [--sets photos64,tiny24] [--artifacts artifacts/robustness] [--set seed=1 ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SERIES = {
    "kd": [],
    "scratch": ["--set", "distill.method=scratch", "--set", "stages=[teacher,distill,export]",
                "--set", "export.edge_formats=[]"],
}


def find_sets(zoo: Path, only: list[str] | None) -> list[Path]:
    sets = sorted(p for p in zoo.iterdir() if (p / "train").is_dir() and (p / "test").is_dir())
    if only:
        by_name = {p.name: p for p in sets}
        missing = [n for n in only if n not in by_name]
        if missing:
            raise SystemExit(f"no set {', '.join(missing)} in {zoo} (found: {', '.join(by_name) or 'none'})")
        sets = [by_name[n] for n in only]
    if not sets:
        raise SystemExit(f"{zoo} holds no image set with train/ and test/ folders; "
                         "write one with python ../shared/datasets/make_zoo.py OUT")
    return sets


def run_one(compress: str, recipe: Path, data: Path, name: str, artifacts: Path, extra: list[str],
            series: str, log_dir: Path) -> tuple[int, float]:
    cmd = [compress, "-q", "pipeline", str(recipe), "--dataset", f"imagefolder:{data}", "--name", name,
           "--artifacts", str(artifacts), *extra, *SERIES[series]]
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t0


def read_run(run_dir: Path) -> dict:
    """The figures of a finished run: ONNX accuracies from the export stage, seconds from every stage."""
    out: dict = {"seconds": 0.0}
    for stage in ("teacher", "distill", "prune", "quantize", "export", "bench"):
        f = run_dir / stage / "metrics.json"
        if f.is_file():
            m = json.loads(f.read_text())
            out["seconds"] += float(m.get("stage_seconds", 0.0))
            if stage == "distill":
                out["derived"] = m.get("derived")
    export = run_dir / "export" / "metrics.json"
    if export.is_file():
        m = json.loads(export.read_text())
        for role, key in (("teacher", "teacher"), ("student", "student"), ("student_int8", "int8")):
            if role in m:
                out[key] = m[role]["onnx_accuracy"]
    return out


def row_for(set_name: str, kd: dict, scratch: dict) -> dict:
    row = {"set": set_name, "teacher": kd.get("teacher"), "kd": kd.get("student"), "scratch": scratch.get("student"),
           "int8": kd.get("int8"), "seconds": kd.get("seconds", 0.0) + scratch.get("seconds", 0.0)}
    row["teacher_minus_int8"] = (row["teacher"] - row["int8"]) if None not in (row["teacher"], row["int8"]) else None
    row["kd_minus_scratch"] = (row["kd"] - row["scratch"]) if None not in (row["kd"], row["scratch"]) else None
    return row


def table(rows: list[dict], recipe: Path, extra: list[str]) -> str:
    def f(v, pts=False):
        if v is None:
            return "—"
        return f"{100 * v:+.1f} pt" if pts else f"{v:.4f}"

    lines = [f"recipe {recipe}" + (f" ({' '.join(extra)})" if extra else "") + "; accuracy on the whole test split, onnxruntime",
             "",
             "| set | teacher | KD student | scratch | INT8 (QAT) | teacher − INT8 | KD − scratch | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {f(r['teacher'])} | {f(r['kd'])} | {f(r['scratch'])} | {f(r['int8'])} | "
                     f"{f(r['teacher_minus_int8'], True)} | {f(r['kd_minus_scratch'], True)} | {r['seconds']:.0f} s |")
    done = [r for r in rows if r["teacher_minus_int8"] is not None]
    if done:
        gaps = [r["teacher_minus_int8"] for r in done]
        lines += ["", f"teacher − INT8 within 3 pt on {sum(g <= 0.03 for g in gaps)} of {len(done)} sets, "
                      f"within 5 pt on {sum(g <= 0.05 for g in gaps)}; KD ≥ scratch on "
                      f"{sum(r['kd_minus_scratch'] is not None and r['kd_minus_scratch'] >= 0 for r in rows)} "
                      f"of {len(rows)}; total wall time {sum(r['seconds'] for r in rows):.0f} s"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoo", type=Path, help="a folder of image sets (make_zoo.py's OUT)")
    ap.add_argument("--recipe", type=Path, default=Path("pipelines/photos.yaml"))
    ap.add_argument("--sets", default="", help="comma-separated set names (default: every set in ZOO)")
    ap.add_argument("--series", default="kd,scratch", help="kd, scratch or both")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts/robustness"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every run (repeatable), e.g. seed=1")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    if not args.zoo.is_dir():
        print(f"zoo folder not found: {args.zoo}", file=sys.stderr)
        return 2
    series = [s for s in args.series.split(",") if s]
    if not series or any(s not in SERIES for s in series):
        print(f"--series takes {', '.join(SERIES)}", file=sys.stderr)
        return 2
    compress = str(Path(sys.executable).with_name("compress"))
    extra = [x for o in args.overrides for x in ("--set", o)]
    suffix = "".join(f"-{o.replace('=', '').replace('.', '_')}" for o in args.overrides)
    rows, failed = [], []
    for data in find_sets(args.zoo, [s for s in args.sets.split(",") if s] or None):
        runs = {}
        for s in series:
            name = f"{data.name}-{s}{suffix}"
            rc, wall = run_one(compress, args.recipe, data.resolve(), name, args.artifacts, extra, s,
                               args.artifacts / "logs")
            if rc != 0:
                failed.append(f"{name} (exit {rc}; see {args.artifacts / 'logs' / (name + '.log')})")
            runs[s] = read_run(args.artifacts / name)
            print(f"{name}: exit {rc} in {wall:.0f} s", file=sys.stderr, flush=True)
        rows.append(row_for(data.name, runs.get("kd", {}), runs.get("scratch", {})))
    print(table(rows, args.recipe, extra))
    if args.json:
        args.json.write_text(json.dumps({"recipe": str(args.recipe), "overrides": args.overrides, "rows": rows},
                                        indent=2))
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
