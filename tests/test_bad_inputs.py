"""Bad input as a user meets it: every case prints one line on stderr and exits with code 2, with no
traceback, and leaves the artifacts as they were (no stage folder created or changed). Images of
unusual modes are not bad input: they load.

The command line runs in this process (``compress.cli.main`` with ``sys.argv`` set; warnings and log
records reach stderr as in a fresh process), so the catalogue costs seconds; ``test_entry_point``
runs a few cases through ``python -m compress`` to show the real entry point says the same."""

from __future__ import annotations

import errno
import logging
import os
import pickle
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, write_tiny_recipe

STUDENT, TEACHER = "mobilenetv2_035", "mobilenetv3_small_050"  # write_tiny_recipe's models


class Payload:
    """Pickles as a call of ``os.system``: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- the inputs, made once --------------------------------------------------------------------------


def _images(folder: Path, classes=("cat", "dog"), per_class=4, size=12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    return folder


def _with_bad(folder: Path, name: str, data: bytes) -> Path:
    _images(folder)
    (folder / "dog" / name).write_bytes(data)
    return folder


def _safetensors_pair(folder: Path, model, name: str, weights: bytes | None = None) -> Path:
    """A compress checkpoint (model.safetensors + model.json) for ``name``; ``weights``: other bytes
    in place of the model's."""
    from compress.models import save_checkpoint

    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    save_checkpoint(model, path, {"model": name, "num_classes": 10, "image_size": 16})
    if weights is not None:
        path.write_bytes(weights)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from compress.models import create_model

    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    torch.manual_seed(0)
    teacher, student = create_model(TEACHER, 10), create_model(STUDENT, 10)
    ns = SimpleNamespace(dir=d, marker=d / "code-ran", noise=noise)
    ns.recipe = write_tiny_recipe(d, stages=["teacher", "distill"])
    (d / "syntax.yaml").write_text("name: x\ndata: {dataset: digits\nteacher:\n  epochs: 1\n")
    (d / "list.yaml").write_text("- teacher\n- distill\n")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00name: x\x00" + noise[:64])
    ns.unknown_key = write_tiny_recipe(d, "unknown", distill={"alphx": 0.5})
    ns.syntax, ns.listed, ns.binary = d / "syntax.yaml", d / "list.yaml", d / "binary.yaml"

    # checkpoints
    ns.random_pt = d / "random.pt"
    ns.random_pt.write_bytes(noise)
    ns.random_st = d / "random.safetensors"
    ns.random_st.write_bytes(noise)
    ns.empty_pt = d / "empty.pt"
    ns.empty_pt.write_bytes(b"")
    ns.wrong_arch = d / "student-weights.pt"
    torch.save(student.state_dict(), ns.wrong_arch)
    ns.evil_pt = d / "evil.pt"
    torch.save({"features.0.weight": torch.zeros(1), "x": Payload(ns.marker)}, ns.evil_pt)
    ns.evil_pickle = d / "evil.pkl"
    with open(ns.evil_pickle, "wb") as f:
        pickle.dump({"x": Payload(ns.marker)}, f, protocol=4)
    ns.whole_model = d / "whole-model.pt"
    torch.save(teacher, ns.whole_model)

    cifar = d / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    with open(cifar / "data_batch_1", "wb") as f:  # a planted dataset file
        pickle.dump({"data": Payload(ns.marker), "labels": [0]}, f, protocol=2)
    ns.cifar_root = d / "cifar"

    # checkpoints for compress export
    ns.export_random = _safetensors_pair(d / "exp-random", student, STUDENT, weights=noise)
    ns.export_wrong = _safetensors_pair(d / "exp-wrong", teacher, STUDENT)  # the json names another model
    ns.export_evil = _safetensors_pair(d / "exp-evil", student, STUDENT, weights=ns.evil_pt.read_bytes())

    # ONNX files
    ns.onnx_random = d / "random.onnx"
    ns.onnx_random.write_bytes(noise)
    ns.onnx_empty = d / "empty.onnx"
    ns.onnx_empty.write_bytes(b"")
    ns.onnx_png = d / "picture.onnx"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(ns.onnx_png, format="PNG")
    ns.onnx_tokens = d / "tokens.onnx"  # a valid model whose input is 2-D int64, not images
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["ids"], ["out"], to=TensorProto.FLOAT)], "tokens",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ns.onnx_tokens)
    ns.onnx_image = d / "image.onnx"  # images of a fixed 16×16 only
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
                               helper.make_node("Flatten", ["pooled"], ["logits"])], "image",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ns.onnx_image)
    ns.a_file = d / "a-file"
    ns.a_file.write_text("not a folder\n")

    # image folders
    png = (d / "png.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(png)
    jpg = (d / "jpg.jpg")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(jpg, quality=90)
    (d / "empty-folder").mkdir()
    _images(d / "one-class", classes=("cat",))
    (d / "no-images" / "cat").mkdir(parents=True)
    (d / "no-images" / "dog").mkdir()
    (d / "no-images" / "dog" / "notes.txt").write_text("no images here\n")
    ns.corrupt = _with_bad(d / "corrupt", "corrupt.png", noise)
    ns.truncated_png = _with_bad(d / "trunc-png", "truncated.png", png.read_bytes()[: png.stat().st_size // 2])
    ns.truncated_jpg = _with_bad(d / "trunc-jpg", "truncated.jpg", jpg.read_bytes()[: jpg.stat().st_size // 2])
    ns.zero_byte = _with_bad(d / "zero", "zero.jpg", b"")
    ns.text_jpg = _with_bad(d / "text", "notes.jpg", b"just some text, not a JPEG\n")
    return ns


# -- running the command line in this process ------------------------------------------------------


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(args, capfd) -> SimpleNamespace:
    """``compress ARGS`` in this process: exit code and what reached stdout and stderr. Warnings are
    shown as a fresh interpreter shows them (pytest's own capture set aside) and library loggers
    without handlers print through logging's last resort, as they would for a user."""
    from compress import cli

    capfd.readouterr()
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []
    argv, sys.argv = sys.argv, ["compress", *map(str, args)]
    code: object = 0
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _show_on_stderr
            try:
                cli.main()
            except SystemExit as e:
                code = e.code if e.code is not None else 0
            except BaseException:  # what a user would see as a traceback
                traceback.print_exc()
                code = "uncaught exception"
    finally:
        sys.argv, root.handlers = argv, handlers
    out, err = capfd.readouterr()
    return SimpleNamespace(code=code, out=out, err=err)


def one_line(r, needle: str) -> str:
    assert "Traceback" not in r.err, r.err
    assert r.code == 2, (r.code, r.err)
    assert r.err.endswith("\n"), f"the error line does not end the line: {r.err[-80:]!r}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("compress: error: "), lines[0]
    assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (and ``root`` itself) with its modification time and size."""
    if not root.exists():
        return {}
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0) for p in paths}


def earlier_run(art: Path) -> Path:
    """An artifacts folder holding a finished teacher stage of run ``tiny`` and its log, dated an hour
    ago, so that any write into it shows."""
    stage = art / "tiny" / "teacher"
    stage.mkdir(parents=True)
    (stage / "metrics.json").write_text('{"test_accuracy": 0.5}\n')
    (stage / "stage.json").write_text('{"stage": "teacher", "fingerprint": "0"}\n')
    (art / "tiny" / "run.log").write_text("an earlier run\n")
    past = os.stat(art).st_mtime - 3600
    for p in [art, *art.rglob("*")]:
        os.utime(p, (past, past))
    return art


# -- the catalogue ---------------------------------------------------------------------------------

P = "pipeline"


def _pipe(*extra):
    return lambda i, art: [P, i.recipe, "--artifacts", art, *extra]


def _teacher_ckpt(attr):
    return lambda i, art: [P, i.recipe, "--artifacts", art, "--set", f"teacher.checkpoint={getattr(i, attr)}"]


def _folder(attr):
    def args(i, art):
        path = getattr(i, attr) if hasattr(i, attr) else i.dir / attr
        return [P, i.recipe, "--artifacts", art, "--dataset", f"imagefolder:{path}", "--set", "data.workers=0"]
    return args


CASES = [
    # recipes and overrides
    ("recipe-missing", lambda i, art: [P, i.dir / "absent.yaml", "--artifacts", art], "recipe not found"),
    ("recipe-yaml-syntax", lambda i, art: [P, i.syntax, "--artifacts", art], "is not valid YAML (line"),
    ("recipe-not-a-mapping", lambda i, art: [P, i.listed, "--artifacts", art], "must be a mapping of sections"),
    ("recipe-binary", lambda i, art: [P, i.binary, "--artifacts", art], "is not a UTF-8 text file"),
    ("recipe-unknown-key", lambda i, art: [P, i.unknown_key, "--artifacts", art], "distill.alphx: unknown key"),
    ("set-unknown-key", _pipe("--set", "distill.alphx=1"), "distill.alphx: unknown key"),
    ("set-unknown-section", _pipe("--set", "polish.level=3"), "polish: unknown key"),
    ("set-wrong-type", _pipe("--set", "distill.epochs=many"), "distill.epochs: Input should be a valid integer"),
    ("set-out-of-range", _pipe("--set", "distill.alpha=3"), "distill.alpha: Input should be less than or equal"),
    ("set-unknown-stage", _pipe("--set", "stages=[teacher,polish]"), "unknown stage 'polish'"),
    ("set-no-stage", _pipe("--set", "stages=[]"), "stages: no stage to run; name at least one of teacher"),
    ("set-moved-key", _pipe("--set", "quantize.ptq_baseline=false"),
     "quantize: ptq_baseline is set in the export section now (export.ptq_baseline)"),
    ("processes-batch-does-not-split", _pipe("--check", "--processes", "3"),
     "data.batch_size 64 does not split evenly over 3 processes"),
    ("processes-sync-bn-on-cpu", _pipe("--check", "--processes", "2", "--set", "compute.sync_bn=true",
                                        "--set", "teacher.device=cpu", "--set", "distill.device=cpu"),
     "compute.sync_bn: torch runs SyncBatchNorm on CUDA only, and stages teacher, distill train on the CPU here"),
    ("set-no-equals", _pipe("--set", "distill.alpha"), "must look like section.key=value"),
    ("set-empty-key", _pipe("--set", "=3"), "has an empty key"),
    ("set-through-a-value", _pipe("--set", "seed.x=1"), "seed is not a section"),
    ("unknown-option", _pipe("--nope"), "No such option: --nope"),
    ("unknown-dataset", _pipe("--dataset", "mnist"), "must be digits, cifar10, cifar100 or imagefolder:PATH"),
    # model names
    ("unknown-student", _pipe("--student", "mobilenet_v9"), "unknown model 'mobilenet_v9'"),
    ("unknown-teacher", _pipe("--teacher", "resnet9000"), "unknown model 'resnet9000'"),
    # checkpoints
    ("checkpoint-missing", lambda i, art: [P, i.recipe, "--artifacts", art, "--set",
                                           f"teacher.checkpoint={i.dir / 'absent.pt'}"], "not found"),
    ("checkpoint-random-bytes", _teacher_ckpt("random_pt"), "neither a safetensors file nor a torch file"),
    ("checkpoint-random-safetensors", _teacher_ckpt("random_st"), "neither a safetensors file nor a torch file"),
    ("checkpoint-empty", _teacher_ckpt("empty_pt"), "the file is empty"),
    ("checkpoint-a-folder", lambda i, art: [P, i.recipe, "--artifacts", art, "--set", f"teacher.checkpoint={i.dir}"],
     "is a folder, not a weights file"),
    ("checkpoint-wrong-architecture", _teacher_ckpt("wrong_arch"), f"does not fit {TEACHER}"),
    ("checkpoint-pickle-with-code", _teacher_ckpt("evil_pt"), "carries code or objects (posix.system)"),
    ("checkpoint-plain-pickle-with-code", _teacher_ckpt("evil_pickle"), "carries code or objects (posix.system)"),
    ("checkpoint-whole-model", _teacher_ckpt("whole_model"), "carries code or objects (timm."),
    ("pretrained-random-bytes", lambda i, art: [P, i.recipe, "--artifacts", art, "--set",
                                                f"distill.pretrained={i.random_pt}"],
     "/random.pt cannot be read: it is neither a safetensors file nor a torch file or pickle"),
    # datasets
    ("dataset-cifar-pickle-with-code", _pipe("--dataset", "cifar10", "--set", "data.root=CIFAR"),
     "carries code or objects (posix.system)"),
    ("dataset-missing", _folder("absent-folder"), "image folder not found"),
    ("dataset-empty", _folder("empty-folder"), "needs at least two class folders, found 0"),
    ("dataset-one-class", _folder("one-class"), "needs at least two class folders, found 1"),
    ("dataset-no-images", _folder("no-images"), "holds no images"),
    ("dataset-corrupt-image", _folder("corrupt"), "corrupt.png (not an image Pillow can read)"),
    ("dataset-truncated-png", _folder("truncated_png"), "truncated.png (truncated)"),
    ("dataset-truncated-jpeg", _folder("truncated_jpg"), "truncated.jpg (truncated)"),
    ("dataset-zero-byte-image", _folder("zero_byte"), "zero.jpg (empty file)"),
    ("dataset-text-named-jpg", _folder("text_jpg"), "notes.jpg (not an image Pillow can read)"),
    # output paths
    ("artifacts-is-a-file", lambda i, art: [P, i.recipe, "--artifacts", i.a_file], "is a file, not a folder"),
    ("artifacts-below-a-file", lambda i, art: [P, i.recipe, "--artifacts", i.a_file / "runs"],
     "is a file, not a folder"),
    # compress export
    ("export-missing", lambda i, art: ["export", i.dir / "absent.safetensors", "--out", art / "m.onnx"], "not found"),
    ("export-random-bytes", lambda i, art: ["export", i.export_random, "--out", art / "m.onnx"],
     "neither a safetensors file nor a torch file"),
    ("export-not-a-model", lambda i, art: ["export", i.recipe, "--out", art / "m.onnx"],
     "checkpoint metadata not found"),
    ("export-wrong-architecture", lambda i, art: ["export", i.export_wrong, "--out", art / "m.onnx"],
     "does not fit"),
    ("export-pickle-with-code", lambda i, art: ["export", i.export_evil, "--out", art / "m.onnx"],
     "carries code or objects (posix.system)"),
    ("export-out-is-a-folder", lambda i, art: ["export", i.export_wrong, "--out", art], "is a folder"),
    ("export-out-below-a-file", lambda i, art: ["export", i.export_wrong, "--out", i.a_file / "m.onnx"],
     "is a file, not a folder"),
    # compress bench
    ("bench-missing", lambda i, art: ["bench", i.dir / "absent.onnx", "--out", art / "b"], "ONNX file not found"),
    ("bench-random-bytes", lambda i, art: ["bench", i.onnx_random, "--out", art / "b"], "not a readable ONNX file"),
    ("bench-empty-file", lambda i, art: ["bench", i.onnx_empty, "--out", art / "b"], "not a readable ONNX file"),
    ("bench-not-a-model", lambda i, art: ["bench", i.onnx_png, "--out", art / "b"], "not a readable ONNX file"),
    ("bench-a-folder", lambda i, art: ["bench", i.dir, "--out", art / "b"], "is a folder"),
    ("bench-out-is-a-file", lambda i, art: ["bench", i.onnx_random, "--out", i.a_file], "is a file, not a folder"),
    ("bench-nothing-measurable", lambda i, art: ["bench", i.onnx_tokens, "--out", art / "b"],
     "tokens.onnx takes a 2-D input; latency is measured on N×C×H×W images"),
    ("bench-no-cell-measurable", lambda i, art: ["bench", i.onnx_image, "--size", "32", "--out", art / "b"],
     "nothing could be measured: image (onnxruntime): fixed input 16×16"),
]


@pytest.mark.parametrize("case, args, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, args, needle, inputs, tmp_path, capfd):
    art = earlier_run(tmp_path / "art")
    watched = [art, inputs.a_file]
    before = [snapshot(w) for w in watched]
    r = run_main([str(a).replace("=CIFAR", f"={inputs.cifar_root}") for a in args(inputs, art)], capfd)
    one_line(r, needle)
    assert [snapshot(w) for w in watched] == before, case
    assert not inputs.marker.exists(), "the pickle's code ran"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into a folder whatever its permissions; "
                           "test_a_folder_that_refuses_writes covers it")
def test_unwritable_artifacts_folder(inputs, tmp_path, capfd):
    art = earlier_run(tmp_path / "art")
    before = snapshot(art)
    os.chmod(art, 0o500)
    try:
        r = run_main([P, inputs.recipe, "--artifacts", art], capfd)
        one_line(r, "no permission to write in")
        os.chmod(art / "tiny", 0o500)
        os.chmod(art, 0o700)
        one_line(run_main([P, inputs.recipe, "--artifacts", art], capfd), "no permission to write in")
    finally:
        os.chmod(art, 0o700)
        os.chmod(art / "tiny", 0o700)
    assert snapshot(art) == before


def _refuse_writes(monkeypatch, under: Path, err: int, when=lambda p: True) -> None:
    """Make every file or folder creation and every open for writing below ``under`` (where ``when``
    holds for the path) fail with ``err``, as a full disk or a folder without permission does."""
    import builtins
    import io

    under = str(under)

    def refused(path) -> bool:
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return False
        return p.startswith(under) and when(p)

    def fail(path):
        raise OSError(err, os.strerror(err), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and refused(file):
            fail(file)
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if refused(path):
            fail(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def _no_half_written(art: Path, before: dict) -> None:
    """The stage folders are as they were and no unfinished folder or file is left anywhere."""
    def stages(snap):  # RUN/STAGE and what it holds (the run's log and hidden working files aside)
        return {k: v for k, v in snap.items() if len(Path(k).parts) >= 2 and not k.endswith("run.log")
                and not any(part.startswith(".") for part in Path(k).parts)}
    after = snapshot(art)
    assert stages(after) == stages(before)
    leftovers = [k for k in after if any(part.startswith(".tmp-") or (part.startswith(".") and part.endswith(".tmp"))
                                         for part in Path(k).parts)]
    assert not leftovers, leftovers


def test_a_folder_that_refuses_writes(inputs, tmp_path, capfd, monkeypatch):
    """Root-proof stand-in for a folder without write permission: every write below it fails with
    EACCES (the permission check passes, as it does for root on a read-only mount)."""
    art = earlier_run(tmp_path / "art")
    before = snapshot(art)
    _refuse_writes(monkeypatch, art, errno.EACCES)
    r = run_main(["-q", P, inputs.recipe, "--artifacts", art, "--set", "stages=[teacher]", "--set", "teacher.epochs=0",
                  "--force"], capfd)
    monkeypatch.undo()
    line = one_line(r, "permission denied")
    assert str(art) in line
    assert snapshot(art) == before


@pytest.mark.parametrize("writer", ["safetensors", "json"])
def test_full_disk(writer, inputs, tmp_path, capfd, monkeypatch):
    """The disk fills while the teacher stage writes its folder: the model (safetensors reports it as
    its own error type, "... (os error 28)") or its JSON record. One line; the stage's folder is neither
    created nor half-written."""
    art = earlier_run(tmp_path / "art")
    before = snapshot(art)
    if writer == "safetensors":
        import safetensors
        import safetensors.torch

        def full(*a, **k):  # what safetensors raised when a real (tmpfs) disk filled up
            raise safetensors.SafetensorError("Error while serializing: I/O error: "
                                              "No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:
        _refuse_writes(monkeypatch, art, errno.ENOSPC, when=lambda p: ".json" in os.path.basename(p))
    # -q: the run has started, and its progress lines are not what this test is about
    r = run_main(["-q", P, inputs.recipe, "--artifacts", art, "--set", "stages=[teacher]", "--set",
                  "teacher.epochs=0", "--force"], capfd)
    monkeypatch.undo()
    line = one_line(r, "the disk is full: free some space and rerun")
    assert "model.json" in line or "model.safetensors" in line, line
    _no_half_written(art, before)


def test_entry_point(inputs, tmp_path):
    """The same one line from ``python -m compress`` (the three run side by side): a pickle carrying
    code (nothing runs, no warning of torch's leaks), an artifacts path that is a file, and a
    truncated image."""
    art = earlier_run(tmp_path / "art")
    before = snapshot(art)
    runs = {
        "pickle with code": ([P, inputs.recipe, "--artifacts", art, "--set", f"teacher.checkpoint={inputs.evil_pt}"],
                             "carries code or objects (posix.system), refused for safety"),
        "artifacts is a file": ([P, inputs.recipe, "--artifacts", inputs.a_file], "is a file, not a folder"),
        "truncated image": ([P, inputs.recipe, "--artifacts", art, "--dataset", f"imagefolder:{inputs.truncated_png}"],
                            "truncated.png (truncated)"),
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {k: subprocess.Popen([sys.executable, "-m", "compress", *map(str, args)], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (args, _) in runs.items()}
    for key, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        one_line(SimpleNamespace(code=proc.returncode, out=out, err=err), runs[key][1])
    assert snapshot(art) == before
    assert not inputs.marker.exists()


# -- images that are not bad input ----------------------------------------------------------------


def _modes(folder: Path) -> dict[str, np.ndarray]:
    """One image per unusual mode, PNG and JPEG, with the RGB picture each should decode to."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:20, 0:24]
    rgb = np.stack([x * 10, y * 12, (x + y) * 5], axis=-1).astype(np.uint8)
    gray = rgb.mean(axis=-1).astype(np.uint8)
    im = Image.fromarray(rgb)
    want = {}
    Image.fromarray(gray).save(folder / "gray.png")
    want["gray.png"] = np.repeat(gray[..., None], 3, axis=-1)
    Image.fromarray(gray).save(folder / "gray.jpg", quality=95)
    want["gray.jpg"] = want["gray.png"]
    sixteen = (gray.astype(np.uint16) * 257)  # the same picture in 16 bits
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    want["sixteen.png"] = want["gray.png"]
    dark = (gray.astype(np.uint16) // 2)  # a dark 16-bit picture: values all below 256, still 16-bit
    Image.fromarray(dark).save(folder / "dark-sixteen.png")
    want["dark-sixteen.png"] = np.zeros_like(want["gray.png"])
    pal = im.quantize(64)
    pal.save(folder / "palette.png")
    want["palette.png"] = np.asarray(pal.convert("RGB"))
    pal.save(folder / "palette-transparent.png", transparency=0)
    want["palette-transparent.png"] = want["palette.png"]
    im.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    want["cmyk.jpg"] = rgb
    im.convert("RGBA").save(folder / "rgba.png")
    want["rgba.png"] = rgb
    return want


def test_unusual_image_modes_decode_to_the_right_rgb(tmp_path):
    from compress.data import open_rgb

    for name, expected in _modes(tmp_path).items():
        got = np.asarray(open_rgb(tmp_path / name))
        assert got.shape == (20, 24, 3) and got.dtype == np.uint8, name
        tolerance = 6 if name.endswith(".jpg") else 1
        assert np.abs(got.astype(int) - expected.astype(int)).mean() <= tolerance, name


def test_a_dataset_of_unusual_modes_loads(tmp_path):
    from compress.config import DataConfig
    from compress.data import load_data

    for c in ("a", "b"):
        _modes(tmp_path / "imgs" / c)
    d = load_data(DataConfig(dataset=f"imagefolder:{tmp_path / 'imgs'}", image_size=16, workers=0,
                             val_fraction=0.2, test_fraction=0.2), scan_cache=tmp_path / "scans")
    assert d.skipped_images == [] and d.class_names == ["a", "b"]
    for part in (d.train, d.val, d.test):
        d_eval = [part[i][0] for i in range(len(part))]
        x = torch.stack(d_eval)
        assert x.shape[1:] == (3, 16, 16) and torch.isfinite(x).all()
        assert x.abs().max() < 3  # normalized 8-bit values: (v - mean) / std stays within about ±2.7
    assert len(list((tmp_path / "scans").iterdir())) == 1  # a clean scan is remembered
