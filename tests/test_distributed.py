"""Training on several processes through torchrun (gloo on CPU): the data-parallel loop matches one
process, and a 2-process pipeline distills, resumes after a kill and skips what it finished."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.e2e
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _env() -> dict:
    # one thread per process: two processes share the machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_processes_train_as_one(tmp_path):
    """KD on in-memory data and on data served by seeded keys: two processes with half the batch
    each end with the weights of one process with the whole batch (up to float summation order),
    and with the same weights as each other."""
    script = ROOT / "tests" / "ddp_fit.py"
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, str(script), str(tmp_path / "two")], env=_env(), capture_output=True,
                         text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    for kind in ("memory", "keyed"):
        alone = torch.load(tmp_path / "one" / f"rank0-{kind}.pt")
        rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}-{kind}.pt") for r in (0, 1))
        for k, v in alone.items():
            assert torch.equal(rank0[k], rank1[k]), (kind, k)
            assert torch.allclose(rank0[k], v, atol=1e-6, rtol=1e-5), (kind, k, (rank0[k] - v).abs().max())
        # each process validates its share of the split; the summed counts give one process's figure
        accs = [json.loads((tmp_path / d / f"rank{r}-{kind}.json").read_text()) for d, r in (("one", 0), ("two", 0), ("two", 1))]
        assert accs[0] == accs[1] == accs[2] and len(accs[0]) == 2, accs
        # the checkpoint rank 0 wrote holds both epochs
        assert torch.load(tmp_path / "two" / f"work-{kind}" / "last.pt", weights_only=True)["epoch"] == 2


def _pipeline(recipe: Path, artifacts: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, "-m", "compress", "pipeline", str(recipe), "--artifacts", str(artifacts)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _finish(p: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def test_two_process_pipeline_resumes_after_a_kill_and_skips_what_is_done(tiny_recipe, tmp_path):
    recipe = tiny_recipe(stages=["teacher", "distill"], distill={"epochs": 4})
    code, out, err = _finish(_pipeline(recipe, tmp_path / "whole"))
    assert code == 0, err[-3000:]
    run = tmp_path / "whole" / "tiny"
    whole = json.loads((run / "distill" / "metrics.json").read_text())
    assert whole["processes"] == 2 and len(whole["history"]) == 4
    assert out.count("run tiny:") == 1  # rank 0 alone prints the report
    assert not list(run.glob(".tmp-*"))
    # the teacher-output cache: each process stores its share of every epoch
    stored = sorted(p.name for p in (tmp_path / "whole" / ".cache" / "teacher_logits").glob("*/epoch*.safetensors"))
    assert stored == [f"epoch{e:05d}.rank{r}of2.safetensors" for e in range(4) for r in range(2)], stored

    # killed (every process) once distillation has written its first epoch, then rerun
    p = _pipeline(recipe, tmp_path / "killed")
    deadline = time.time() + 240
    while not list((tmp_path / "killed" / "tiny" / ".work").glob("distill-*/last.pt")):
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in _children(p.pid) + [p.pid]:  # torchrun starts each worker in a session of its own
        os.kill(pid, signal.SIGKILL)
    p.wait()
    # rank 1's scratch folder of the killed stage lies in the run folder, and the rerun clears it
    assert list((tmp_path / "killed" / "tiny").glob(".tmp-distill-rank1-*"))
    code, _, err = _finish(_pipeline(recipe, tmp_path / "killed"))
    assert code == 0, err[-3000:]
    assert not list((tmp_path / "killed" / "tiny").glob(".tmp-*"))
    log = (tmp_path / "killed" / "tiny" / "run.log").read_text()
    # rank 0 found the teacher done and every process skipped it; distillation resumed
    assert "resuming after epoch" in log and "[teacher] unchanged, skipped" in log
    resumed = json.loads((tmp_path / "killed" / "tiny" / "distill" / "metrics.json").read_text())
    assert resumed["resumed_from_epoch"] >= 1
    assert [r["val_acc"] for r in resumed["history"]] == [r["val_acc"] for r in whole["history"]]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    same = (tmp_path / "killed" / "tiny" / "distill" / "model.safetensors").read_bytes()
    assert same == (run / "distill" / "model.safetensors").read_bytes()



def test_only_the_pipeline_runs_under_torchrun(tmp_path):
    env = {**_env(), "WORLD_SIZE": "2", "RANK": "0"}
    r = subprocess.run([sys.executable, "-m", "compress", "compare", "pipelines/methods.yaml"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("compress: error: only 'compress pipeline' runs under torchrun; "
                                "run 'compress compare' as one process")


def test_make_checks_the_recipe_for_its_processes_before_torchrun(tmp_path):
    """``make pipeline NPROC=3`` with a batch of 64, a recipe that does not exist and an NPROC that is
    not a number: one line from make each (the CLI's own words for the recipe), exit code 2, no worker
    started (torchrun's elastic agent would print its tracebacks), nothing written."""
    venv = Path(sys.executable).parent.parent
    art = tmp_path / "art"
    cases = {("MODEL=smoke", "NPROC=3"): "compress: error: data.batch_size 64 does not split evenly over 3 processes "
                                         "(stages teacher, distill, prune, quantize train on it); use a multiple of 3 "
                                         "(--set data.batch_size=63) or another number of processes.  Stop.",
             ("MODEL=nope",): "no recipe pipelines/nope.yaml; recipes: ",
             ("MODEL=smoke", "NPROC=two"): "NPROC must be a whole number of processes, 1 or more (got 'two').  Stop."}
    for args, expected in cases.items():
        r = subprocess.run(["make", "-s", "-o", f"{venv}/.installed", "pipeline", *args, f"VENV={venv}",
                            f"ARGS=--artifacts {art}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        (line,) = r.stderr.splitlines()
        assert line.startswith("Makefile:") and " *** " in line and expected in line, (args, line)
    assert not art.exists()


def test_a_recipe_checked_for_its_processes(tmp_path, monkeypatch, capsys):
    """``--check`` validates for --processes N, or for torchrun's count, and writes nothing."""
    from compress import cli

    def check(*extra):
        monkeypatch.setattr(sys, "argv", ["compress", "pipeline", "pipelines/smoke.yaml", "--check",
                                          "--artifacts", str(tmp_path / "art"), *extra])
        with pytest.raises(SystemExit) as e:
            cli.main()
            raise SystemExit(0)
        return e.value.code, capsys.readouterr()

    monkeypatch.chdir(ROOT)
    code, out = check("--processes", "4")
    assert code == 0 and "valid" in out.out and "4 processes" in out.out, out
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, out = check()
    assert code == 2 and "does not split evenly over 3 processes" in out.err, out
    assert not (tmp_path / "art").exists()


def test_sync_bn_under_torchrun_on_the_cpu(monkeypatch):
    """torch has SyncBatchNorm for CUDA only: with several processes on the CPU, ``compute.sync_bn: true``
    is refused in one line that says what to set, ``auto`` leaves each process normalizing its own share
    (whatever the batch) and the fingerprint says nothing of it; on CUDA ``auto`` turns it on below
    ``sync_bn_below``. One process has nothing to synchronize."""
    from compress import dist
    from compress.errors import CompressError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    try:
        dist.configure(sync_bn=True, mixed_precision="off")
        assert dist.hardware_plan(cpu, 4).sync_bn is False  # one process
        monkeypatch.setattr(dist, "active", lambda: True)
        monkeypatch.setattr(dist, "world", lambda: 2)
        with pytest.raises(CompressError) as refused:
            dist.hardware_plan(cpu, 4)
        assert str(refused.value) == ("compute.sync_bn: torch runs SyncBatchNorm on CUDA only; on CPU set it to "
                                      "auto or false (each process then normalizes its own share of the batch)")
        with pytest.raises(CompressError, match="SyncBatchNorm on CUDA only"):
            dist.effective("cpu", 4)  # a stage's fingerprint: before the stage starts
        assert dist.hardware_plan(cuda, 64).sync_bn is True
        dist.configure(sync_bn="auto", sync_bn_below=32, mixed_precision="off")
        assert dist.hardware_plan(cpu, 4).sync_bn is False
        assert dist.effective("cpu", 4) == {"world": 2}
        assert [dist.hardware_plan(cuda, b).sync_bn for b in (4, 31, 32)] == [True, True, False]
        assert dist.effective("cuda", 4)["sync_bn"] is True
        dist.configure(sync_bn=False, mixed_precision="off")
        assert dist.hardware_plan(cpu, 4).sync_bn is False and dist.hardware_plan(cuda, 4).sync_bn is False
    finally:
        dist.configure()
