"""Interrupted and concurrent runs: Ctrl-C ends with one line and the same command resumes; a run
killed (SIGKILL) at random points and rerun ends with the metrics of an uninterrupted run; two
processes on one run folder, or on one teacher cache entry, never interleave; a damaged stage folder
is recomputed, not trusted.

Every run here is the tiniest recipe (16-pixel digits, one teacher epoch, two student epochs so an
interrupted student resumes from its checkpoint, ONNX export without the edge formats) in a
subprocess with one thread, so that runs are bit-identical to each other (the training loop is
seeded per epoch) and runs side by side do not fight for the cores. ``COMPRESS_KILLS=10`` raises the
number of kills (CI does), ``COMPRESS_KILL_SEED`` changes where they land."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT, write_tiny_recipe

pytestmark = pytest.mark.e2e

KILLS = int(os.environ.get("COMPRESS_KILLS", "2"))
KILL_SEED = int(os.environ.get("COMPRESS_KILL_SEED", "0"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STAGES = ["teacher", "distill", "export"]
INTERRUPTED = "compress: interrupted; rerun the same command to resume"
# what differs between equal runs: timings, and how a result was reached (from the teacher cache,
# resumed from a checkpoint, with the teacher's logits read from the teacher-output cache)
VOLATILE = ("seconds", "latency", "_ms", "throughput", "memory")
HOW = {"source", "cached", "resumed_from_epoch", "teacher_cache"}


def tiny(folder: Path, name: str = "tiny", stages: list[str] = STAGES) -> Path:
    return write_tiny_recipe(folder, name, stages=stages, distill={"epochs": 2}, export={"edge_formats": []})


def _sigint_default() -> None:
    # a shell starts background jobs with SIGINT ignored and children inherit that; Python then never
    # raises KeyboardInterrupt, so the run gets the disposition a terminal's foreground command has
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """``compress pipeline`` in its own process group, its output in files that can be read while
    it runs."""

    started_here: list[Run] = []

    def __init__(self, recipe: Path, art: Path, *extra: str, log: Path):
        self.log = log
        self.err = open(log, "w")  # noqa: SIM115 - closed in wait()
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "compress", "pipeline", str(recipe), "--artifacts",
                                      str(art), *extra], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=self.err, start_new_session=True, preexec_fn=_sigint_default)
        Run.started_here.append(self)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self.err.close()


@pytest.fixture(autouse=True)
def no_run_outlives_its_test():
    yield
    while Run.started_here:
        r = Run.started_here.pop()
        if r.proc.poll() is None:  # a test that failed while it ran
            r.signal(signal.SIGKILL)
        r.wait()


def run(recipe: Path, art: Path, *extra: str, log: Path) -> tuple[int, str]:
    r = Run(recipe, art, *extra, log=log)
    rc = r.wait()
    return rc, r.stderr


def wait_for(what, *runs: Run, timeout: float = 120, every: float = 0.05):
    """Until ``what()`` holds, while each of ``runs`` is still running."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if what():
            return
        for r in runs:
            assert r.proc.poll() is None, f"run ended ({r.proc.returncode}) before {what.__name__}: {r.stderr}"
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what.__name__}")


def results(obj):
    """A stage's metrics without timings and without how they were reached."""
    if isinstance(obj, dict):
        return {k: results(v) for k, v in obj.items() if k not in HOW and not any(w in k for w in VOLATILE)}
    if isinstance(obj, list):
        return [results(v) for v in obj]
    return obj


def outcome(run_dir: Path, stages: list[str] = STAGES) -> dict:
    """Each stage's fingerprint and results; every stage folder must hold what its stage.json lists."""
    from compress.fsio import damage

    out = {}
    for stage in stages:
        record = json.loads((run_dir / stage / "stage.json").read_text())
        assert damage(run_dir / stage, record["files"]) is None, stage
        metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        out[stage] = {"fingerprint": record["fingerprint"], "results": results(metrics)}
    assert not list(run_dir.glob(".tmp-*")), list(run_dir.iterdir())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: its outcome, how long it took and when it started writing."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = tiny(tmp)
    r = Run(recipe, tmp / "art", log=tmp / "stderr")
    assert r.wait() == 0, r.stderr
    seconds = time.time() - r.started
    first = (tmp / "art" / "tiny" / "run.log").read_text().split(" INFO ", 1)[0].split(" DEBUG ", 1)[0]
    writes_from = datetime.strptime(first, "%Y-%m-%d %H:%M:%S,%f").timestamp() - r.started
    return {"outcome": outcome(tmp / "art" / "tiny"), "seconds": seconds,
            "writes_from": min(max(0.0, writes_from), seconds), "recipe": recipe, "art": tmp / "art"}


def test_ctrl_c_ends_with_one_line_and_the_same_command_resumes(reference, tmp_path):
    """Ctrl-C in the student's second epoch: exit 130 with one line, the unfinished stage not in
    place. Meanwhile the teacher's weights are altered: the rerun says so, trains the teacher again,
    resumes the student from its first epoch's checkpoint and ends with the uninterrupted run's
    results."""
    recipe, art = tiny(tmp_path), tmp_path / "art"
    r = Run(recipe, art, log=tmp_path / "stderr")

    def student_epoch_1_saved():
        return any((art / "tiny" / ".work").glob("distill-*/last.pt"))

    wait_for(student_epoch_1_saved, r)
    r.signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group
    assert r.wait() == 130, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == INTERRUPTED, r.stderr
    run_dir = art / "tiny"
    assert (run_dir / "teacher" / "stage.json").is_file()
    assert not (run_dir / "distill").exists() and not list(run_dir.glob(".tmp-*"))

    # meanwhile the teacher's weights are altered in place (the cache entry's file too: they are one
    # file): the rerun says so in one line for each, trains the teacher again, resumes the student
    with open(run_dir / "teacher" / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    linked = (run_dir / "teacher" / "model.safetensors").stat().st_nlink > 1  # not where links fail
    rc, err = run(recipe, art, log=tmp_path / "stderr2")
    assert rc == 0, err
    damaged = [line for line in err.splitlines() if "damaged" in line]
    assert len(damaged) == 1 + linked, err
    assert damaged[0].startswith("[teacher] stage folder damaged: model.safetensors was altered (sha256 "), err
    if linked:
        assert damaged[1].startswith("[teacher] cached mobilenetv3_small_050 in "), err
        assert "is damaged (model.safetensors was altered" in damaged[1] and damaged[1].endswith("; training it again")
    assert "resuming after epoch 1/2" in err
    assert outcome(run_dir) == reference["outcome"]


def test_force_reruns_every_stage_to_the_same_files_and_leaves_nothing_behind(reference, tmp_path):
    """``--force`` on a finished run: every stage runs again, the teacher trained rather than taken from
    the cache and the student from its first epoch though a checkpoint of an earlier try lies where
    the stage keeps its work; the fingerprints, results and files are the first run's, and no work,
    temporary or replaced folder is left."""
    art = tmp_path / "art"
    shutil.copytree(reference["art"], art, symlinks=True)
    run_dir = art / "tiny"
    records = {s: json.loads((run_dir / s / "stage.json").read_text()) for s in STAGES}
    stale = run_dir / ".work" / f"distill-{records['distill']['fingerprint'][:16]}"
    stale.mkdir(parents=True)
    (stale / "last.pt").write_bytes(b"an earlier try's checkpoint")
    rc, err = run(reference["recipe"], art, "--force", log=tmp_path / "stderr")
    assert rc == 0, err
    for s in STAGES:
        assert f"[{s}] running" in err and f"[{s}] done in " in err, s
    assert "unchanged, skipped" not in err and "reusing cached" not in err, err
    assert "teacher mobilenetv3_small_050 epoch 1/1" in err
    assert "last.pt" not in err and "resuming" not in err, err  # the stale checkpoint was never read
    assert outcome(run_dir) == reference["outcome"]
    for s in STAGES:  # the same files, byte for byte, but for the stage's timings
        again = json.loads((run_dir / s / "stage.json").read_text())["files"]
        assert {f: h for f, h in again.items() if f != "metrics.json"} == \
            {f: h for f, h in records[s]["files"].items() if f != "metrics.json"}, s
    left = [p for p in art.rglob("*") if p.name.startswith(".tmp") or p.name.endswith((".old", ".tmp"))]
    assert not left, left
    assert not (run_dir / ".work").exists() or not any((run_dir / ".work").iterdir())


def test_killed_at_random_points_reruns_to_the_uninterrupted_result(reference, tmp_path):
    """SIGKILL at random points of the pipeline, each kill followed by a rerun of the same command,
    itself killed at the next random point; after the last kill a rerun finishes with the
    uninterrupted run's results. Each run is killed after a time drawn (with a fixed seed) within the
    uninterrupted run's duration, from its first write to its end. A run that finishes before its kill
    must equal the uninterrupted one; the next kills go on from nothing. When no kill has landed inside
    a stage, one more run is killed in the student's training, after its first epoch's checkpoint."""
    recipe, art = tiny(tmp_path), tmp_path / "art"
    rng = random.Random(KILL_SEED)
    finished, hit = 0, []

    def landed(r: Run, rc: int) -> bool:
        if rc == -signal.SIGKILL:
            hit.append(next((line for line in reversed(r.stderr.splitlines()) if line.startswith("[")), "start-up"))
            return True
        assert rc == 0, r.stderr
        return False

    for i in range(KILLS):
        r = Run(recipe, art, log=tmp_path / f"stderr{i}")
        try:
            rc = r.wait(timeout=rng.uniform(reference["writes_from"], reference["seconds"]))
        except subprocess.TimeoutExpired:
            r.signal(signal.SIGKILL)
            rc = r.wait()
        if landed(r, rc):
            continue
        # done before its kill: check it, go on from nothing
        assert outcome(art / "tiny") == reference["outcome"], f"run {i} after earlier kills"
        finished += 1
        shutil.rmtree(art)
    if all(h == "start-up" for h in hit):
        r = Run(recipe, art, log=tmp_path / "stderr-in-training")

        def student_epoch_1_saved():
            return any((art / "tiny" / ".work").glob("distill-*/last.pt"))

        wait_for(student_epoch_1_saved, r)
        r.signal(signal.SIGKILL)
        assert landed(r, r.wait()), "the run finished although it was killed in the student's training"
    rc, err = run(recipe, art, log=tmp_path / "stderr-final")
    assert rc == 0, err
    assert outcome(art / "tiny") == reference["outcome"]
    print(f"{KILLS} kills (seed {KILL_SEED}); {finished} runs finished before their kill; the others were "
          "killed after: " + "; ".join(hit))


@contextmanager
def holding(lock: Path):
    """Hold ``lock`` as another process would, so that runs started meanwhile must wait for it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def test_concurrent_runs_wait_for_each_other_and_share_the_teacher_cache(reference, tmp_path):
    """Three runs at once on one artifacts folder, two of them of one name, while the teacher cache
    entry they all need is held: of the two of one name, one waits for the other's run; the two
    others wait for the entry. When it is free, one of them trains the teacher while the other waits
    and then reuses it; the run that waited for its name's run skips every stage after it. A run of
    that name that may not wait (lock_timeout 0) refuses at once. Results: the uninterrupted run's."""
    from compress.config import load_recipe
    from compress.context import RunContext
    from compress.errors import CompressError
    from compress.models import resolve_name
    from compress.pipeline import run_pipeline
    from compress.stages.teacher import cache_key

    stages = ["teacher", "distill"]
    art = tmp_path / "art"
    first, second = tiny(tmp_path, "first", stages), tiny(tmp_path, "second", stages)
    cfg = load_recipe(first, [])
    key = cache_key(RunContext(cfg=cfg, run_dir=art / "first", cache_dir=art / ".cache"), resolve_name(cfg.teacher.model))
    entry = f"waiting for teacher cache entry {key[:12]} (mobilenetv3_small_050) held by pid {os.getpid()}"
    with holding(art / ".cache" / "teachers" / f"{key}.lock"):
        a, b = Run(first, art, log=tmp_path / "a"), Run(first, art, log=tmp_path / "b")
        c = Run(second, art, log=tmp_path / "c")

        def all_wait():
            waits = [f"waiting for run first held by pid {other.proc.pid}" in r.stderr for r, other in ((a, b), (b, a))]
            return sum(waits) == 1 and entry in c.stderr and entry in (b if waits[0] else a).stderr

        wait_for(all_wait, a, b, c)
        holder = b if "waiting for run first" in a.stderr else a
        with pytest.raises(CompressError, match=rf"^run first is held by pid {holder.proc.pid}; wait for it, "
                                                "or run under another --name$"):
            run_pipeline(cfg, artifacts=art, lock_timeout=0)
    for r in (a, b, c):
        assert r.wait() == 0, r.stderr
    waited = a if holder is b else b
    trained = [r for r in (holder, c) if "teacher mobilenetv3_small_050 epoch 1/1" in r.stderr]
    assert len(trained) == 1, (holder.stderr, c.stderr)
    reused = c if trained[0] is holder else holder
    assert "[teacher] reusing cached mobilenetv3_small_050" in reused.stderr, reused.stderr
    assert all(f"[{s}] unchanged, skipped" in waited.stderr for s in stages), waited.stderr
    assert "running" not in waited.stderr and "epoch" not in waited.stderr, waited.stderr
    for name in ("first", "second"):
        assert outcome(art / name, stages) == {s: reference["outcome"][s] for s in stages}, name


def test_a_stage_folder_is_trusted_only_as_written(tmp_path):
    """What the runner reads before it skips a stage: the fingerprint, then each file's size and hash."""
    from compress.fsio import manifest
    from compress.pipeline import _reusable

    out = tmp_path / "stage"
    (out / "sub").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "sub" / "model.onnx").write_bytes(b"onnx" * 100)
    record = {"fingerprint": "f", "files": manifest(out)}
    (out / "stage.json").write_text(json.dumps(record))
    assert set(record["files"]) == {"metrics.json", "sub/model.onnx"}
    assert _reusable(out, "f") == (True, None)
    assert _reusable(out, "g") == (False, None)  # changed: recomputed without a word
    (out / "sub" / "model.onnx").write_bytes(b"xnno" * 100)
    assert _reusable(out, "f")[1].startswith("stage folder damaged: sub/model.onnx was altered (sha256 ")
    (out / "sub" / "model.onnx").write_bytes(b"")
    assert _reusable(out, "f") == (False, "stage folder damaged: sub/model.onnx has 0 bytes, 400 were written")
    (out / "stage.json").write_text(json.dumps({"fingerprint": "f"}))
    assert _reusable(out, "f") == (False, "stage.json records no file hashes (written by an older compress)")
    (out / "stage.json").write_text('{"fingerprint": "f", "fil')
    assert _reusable(out, "f") == (False, "stage.json cannot be read")
    (out / "stage.json").unlink()
    assert _reusable(out, "f") == (False, "stage folder has no stage.json")
    assert _reusable(tmp_path / "absent", "f") == (False, None)


def test_lock_waits_then_refuses_after_its_timeout(tmp_path):
    from compress.errors import CompressError
    from compress.fsio import locked

    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, time\n"
                               f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "f.write('4242\\n'); f.flush(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(CompressError, match=r"^run x is still held by pid 4242 after 0.3 s$"):
            with locked(lock, "run x", timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
        with pytest.raises(CompressError, match=r"^run x is held by pid 4242$"):
            with locked(lock, "run x", timeout=0):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(lock, "run x", timeout=0):  # a killed holder frees it
        with locked(lock, "run x", timeout=0):  # re-entrant in one process
            assert lock.read_text() == f"{os.getpid()}\n"
