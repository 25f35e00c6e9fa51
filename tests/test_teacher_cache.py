"""The teacher-output cache: the same losses as the live teacher (but for float16 rounding), a run that
fills it and one that reads it train bit-identically without a teacher forward, resume, damaged files
and foreign batches never trusted, methods that need more than logits never cached, keys that change
with the batch plan."""

import dataclasses
import logging

import pytest
import torch
from torch import nn

from compress.config import validate_recipe
from compress.context import RunContext
from compress.data import ImageDataset
from compress.distill import build_method
from compress.distill import losses as L
from compress.distill.cache import TeacherLogitCache, decode, encode
from compress.errors import ConfigError
from compress.models import create_model, save_checkpoint
from compress.train import TrainConfig, fit

CLASSES = 4


def tiny_cnn(seed: int, width: int = 8) -> nn.Module:
    """No dropout: the student draws nothing from the random streams the augmentation draws from."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES))


def tiny_data(seed: int = 0, n: int = 40) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randn(n, 3, 12, 12, generator=g), torch.arange(n) % CLASSES, augment=True)


class CountingTeacher(nn.Module):
    """A teacher that counts its forward passes, or refuses them (``fail``)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.net, self.calls, self.fail = tiny_cnn(99, width=16).eval(), 0, fail

    def forward(self, x):
        if self.fail:
            raise AssertionError("the teacher ran although its logits were cached")
        self.calls += 1
        return self.net(x)


@pytest.fixture
def warnings():
    """Warning lines of the ``compress`` loggers (which may not propagate to pytest's caplog)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logger = logging.getLogger("compress")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def train(work, cache_dir=None, *, teacher=None, data=None, epochs=2, method="kd", topk=None, mixup=0.0):
    """A short KD run; returns (student weights, the cache or None, the teacher)."""
    teacher = teacher or CountingTeacher()
    data = data or tiny_data()
    student = tiny_cnn(1)
    obj = build_method(method).bind(student, [teacher], image_size=12)
    cache = None
    if cache_dir is not None:
        cache = TeacherLogitCache(cache_dir, topk=topk)
        obj.use_teacher_cache([cache])
    cfg = TrainConfig(epochs=epochs, lr=0.05, warmup_epochs=0, mixup=mixup)
    fit(student, data, data, cfg, obj, work, seed=0, batch_size=16)
    return {k: v.clone() for k, v in student.state_dict().items()}, cache, teacher


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_cached_losses_equal_the_live_teachers(tmp_path, method):
    teacher, student = CountingTeacher(), tiny_cnn(1).eval()
    x, y = torch.randn(16, 3, 12, 12), torch.arange(16) % CLASSES
    live = build_method(method).bind(student, [teacher], image_size=12)
    cached = build_method(method).bind(student, [teacher], image_size=12)
    cached.use_teacher_cache([TeacherLogitCache(tmp_path / "entry")])
    for obj in (live, cached):
        obj.set_epoch(0, 1)
    live_loss, cold_loss = live(student, x, y)[0], cached(student, x, y)[0]
    assert cold_loss.item() == pytest.approx(live_loss.item(), rel=2e-3)
    # exactly the loss of the teacher's logits rounded to float16
    with torch.no_grad():
        t = teacher(x).half().float()
        s = student(x)
    if method == "kd":
        expected = L.kd_loss(s, y, t, live.alpha, live.temperature)
    else:
        tckd, nckd = L.dkd_terms(s, y, t, live.p.temperature)
        expected = torch.nn.functional.cross_entropy(s, y) + live.ramp * (
            live.p.temperature ** 2 * (live.p.alpha * tckd + live.p.beta * nckd))
    assert torch.equal(cold_loss, expected)
    cached.release()  # stores epoch 0; a second objective reads it back without the teacher
    warm = build_method(method).bind(student, [CountingTeacher(fail=True)], image_size=12)
    warm.use_teacher_cache([TeacherLogitCache(tmp_path / "entry")])
    warm.set_epoch(0, 1)
    assert torch.equal(warm(student, x, y)[0], cold_loss)


def test_topk_keeps_the_k_largest_and_the_mean_of_the_rest():
    t = torch.tensor([[4.0, -1.0, 2.5, 0.0, 3.0, -2.0]])
    out = decode(encode(t, 2), 6, torch.device("cpu"))
    assert out[0, 0] == 4.0 and out[0, 4] == 3.0
    rest = torch.tensor([-1.0, 2.5, 0.0, -2.0]).mean().half().float()
    assert torch.equal(out[0, [1, 2, 3, 5]], rest.expand(4))
    assert torch.equal(decode(encode(t, 6), 6, torch.device("cpu")), t.half().float())  # k >= classes: all of them


@pytest.mark.parametrize("topk,mixup", [(None, 0.4), (2, 0.0)])
def test_warm_run_is_bit_identical_to_the_cold_run_and_skips_the_teacher(tmp_path, topk, mixup):
    cold, cache, teacher = train(tmp_path / "a", tmp_path / "entry", topk=topk, mixup=mixup)
    steps = cache.stats["steps_computed"]
    assert steps == teacher.calls == 4 and cache.stats["steps_read"] == 0  # 2 epochs of 40 // 16 batches
    assert sorted(p.name for p in (tmp_path / "entry").glob("*.safetensors")) == [
        "epoch00000.rank0of1.safetensors", "epoch00001.rank0of1.safetensors"]
    warm, cache, _ = train(tmp_path / "b", tmp_path / "entry", teacher=CountingTeacher(fail=True), topk=topk,
                           mixup=mixup)
    assert same(cold, warm)
    assert cache.stats == {"steps_read": steps, "steps_computed": 0, "fell_back": False}
    live, _, _ = train(tmp_path / "c", mixup=mixup)  # without the cache: the float32 logits
    assert not same(cold, live)


def test_resume_reuses_stored_epochs_and_stores_the_rest(tmp_path):
    class Stop(Exception):
        pass

    teacher, data = CountingTeacher(), tiny_data()

    def run(epochs, on_epoch_end=None, teach=teacher, work="a"):
        s = tiny_cnn(1)
        obj = build_method("kd").bind(s, [teach], image_size=12)
        cache = TeacherLogitCache(tmp_path / "entry")
        obj.use_teacher_cache([cache])
        cfg = TrainConfig(epochs=epochs, lr=0.05, warmup_epochs=0)
        fit(s, data, data, cfg, obj, tmp_path / work, seed=0, batch_size=16, on_epoch_end=on_epoch_end)
        return {k: v.clone() for k, v in s.state_dict().items()}, cache

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):  # killed after epoch 2 of 3 was checkpointed
        run(3, stop)
    assert teacher.calls == 4 and len(list((tmp_path / "entry").glob("*.safetensors"))) == 2
    resumed, cache = run(3)  # resumes at epoch 3: epochs 1-2 are not trained again, epoch 3 is stored
    assert teacher.calls == 6 and cache.stats["steps_computed"] == 2
    assert (tmp_path / "entry" / "epoch00002.rank0of1.safetensors").is_file()
    fresh, cache = run(3, teach=CountingTeacher(fail=True), work="b")  # every epoch read
    assert same(resumed, fresh) and cache.stats["steps_read"] == 6


def test_an_interrupted_epoch_is_stored_as_far_as_it_got(tmp_path):
    class Flaky(CountingTeacher):
        def forward(self, x):
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):  # the second step of epoch 2
        train(tmp_path / "a", tmp_path / "entry", teacher=Flaky())
    full, _, _ = train(tmp_path / "b", tmp_path / "entry2")
    teacher = CountingTeacher()
    again, cache, _ = train(tmp_path / "c", tmp_path / "entry", teacher=teacher)
    assert cache.stats == {"steps_read": 3, "steps_computed": 1, "fell_back": False} and teacher.calls == 1
    assert same(full, again)


def test_damaged_files_are_reported_and_computed_again(tmp_path, warnings):
    cold, _, _ = train(tmp_path / "a", tmp_path / "entry")
    first, second = sorted((tmp_path / "entry").glob("*.safetensors"))
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray(second.read_bytes())
    flipped[-3] ^= 0x01  # one bit of the logits
    second.write_bytes(bytes(flipped))
    teacher = CountingTeacher()
    again, cache, _ = train(tmp_path / "b", tmp_path / "entry", teacher=teacher)
    assert same(cold, again) and teacher.calls == 4 and cache.stats["steps_read"] == 0
    damaged = [w for w in warnings if "is damaged" in w]
    assert len(damaged) == 2 and "unreadable" in damaged[0] and "SHA-256" in damaged[1]
    _, cache, _ = train(tmp_path / "c", tmp_path / "entry", teacher=CountingTeacher(fail=True))  # rewritten whole
    assert cache.stats["steps_read"] == 4


def test_a_batch_other_than_the_stored_one_falls_back_to_the_live_teacher(tmp_path, warnings):
    train(tmp_path / "a", tmp_path / "entry")
    other = tiny_data(seed=5)  # other images under the same entry: a key that missed a change
    expected, _, _ = train(tmp_path / "b", tmp_path / "fresh", data=other)
    stored = {p.name: p.read_bytes() for p in (tmp_path / "entry").glob("*.safetensors")}
    teacher = CountingTeacher()
    got, cache, _ = train(tmp_path / "c", tmp_path / "entry", data=other, teacher=teacher)
    assert same(expected, got) and teacher.calls == 4  # trained on the right targets
    assert cache.stats == {"steps_read": 0, "steps_computed": 4, "fell_back": True}
    assert sum("is not the one stored" in w for w in warnings) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "entry").glob("*.safetensors")} == stored  # left alone


def _ctx(tmp_path, method="kd", **overrides) -> RunContext:
    raw = {"name": "x", "seed": 0, "data": {"dataset": "digits", "image_size": 16, "batch_size": 64},
           "teacher": {"model": "mobilenetv3_small_050"},
           "distill": {"student": "mobilenetv2_035", "method": method}}
    for section, values in overrides.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    cfg = validate_recipe(raw)
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    teacher = ctx.stage_dir("teacher") / "model.safetensors"
    if not teacher.is_file():
        torch.manual_seed(0)
        save_checkpoint(create_model("mobilenetv3_small_050", 10), teacher, {"model": "mobilenetv3_small_050"})
    return ctx


@pytest.mark.parametrize("method,why", [("fitnets", "needs more of the teacher than its logits"),
                                        ("scratch", "has no teacher")])
def test_feature_and_teacherless_methods_never_use_the_cache(tmp_path, method, why):
    from compress.stages.distill import attach_teacher_cache, load_teachers

    ctx = _ctx(tmp_path, method)
    student = create_model("mobilenetv2_035", 10)
    obj = build_method(method).bind(student, load_teachers(ctx, create_model("mobilenetv3_small_050", 10)),
                                    image_size=16)
    caches, reason = attach_teacher_cache(ctx, obj)
    assert caches == [] and why in reason
    assert not (ctx.cache_dir / "teacher_logits").exists()
    if method == "fitnets":
        with pytest.raises(ValueError, match="needs more of its teachers than their logits"):
            obj.use_teacher_cache([TeacherLogitCache(tmp_path / "entry")])
    off = _ctx(tmp_path, "kd", distill={"teacher_cache": False})
    kd = build_method("kd").bind(student, load_teachers(off, create_model("mobilenetv3_small_050", 10)), image_size=16)
    assert attach_teacher_cache(off, kd) == ([], "off in the recipe (distill.teacher_cache: false)")


def test_key_changes_with_seed_batch_size_teacher_and_topk_not_with_student_or_method(tmp_path):
    from compress.distill.cache import entry_key
    from compress.stages.common import teacher_cache_identity

    def key(**overrides):
        ctx = _ctx(tmp_path, **overrides)
        return entry_key(teacher_cache_identity(ctx, ctx.stage_dir("teacher") / "model.safetensors",
                                                ctx.cfg.distill, ctx.cfg.seed))

    base = key()
    assert key(seed=1) != base
    assert key(data={"batch_size": 32}) != base
    assert key(distill={"teacher_cache_topk": 3}) != base
    assert key(distill={"mixup": 0.2}) != base
    assert key(data={"augment": False}) != base
    assert key(distill={"student": "mobilenetv2_050", "method": "dkd", "epochs": 3, "lr": 0.1}) == base
    torch.manual_seed(1)  # another teacher at the same path
    save_checkpoint(create_model("mobilenetv3_small_050", 10), tmp_path / "run" / "teacher" / "model.safetensors",
                    {"model": "mobilenetv3_small_050"})
    assert key() != base


def test_topk_must_be_positive():
    with pytest.raises(ConfigError, match="distill.teacher_cache_topk"):
        validate_recipe({"name": "x", "distill": {"teacher_cache_topk": 0}})


def test_pipeline_runs_share_the_teachers_logits_across_students_and_methods(tmp_path):
    from compress.pipeline import run_pipeline

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(create_model("mobilenetv3_small_050", 10), teacher, {"model": "mobilenetv3_small_050"})

    def run(name, **distill):
        raw = {"name": name, "seed": 0, "stages": ["teacher", "distill"],  # 1077 training images: 2 batches
               "data": {"dataset": "digits", "image_size": 8, "batch_size": 512},
               "teacher": {"model": "mobilenetv3_small_050", "checkpoint": str(teacher)},
               "distill": {"student": "mobilenetv2_035", "epochs": 1, "lr": 0.01, **distill}}
        ctx = run_pipeline(validate_recipe(raw), artifacts=tmp_path / "art")
        return ctx.results["distill"].metrics["teacher_cache"]

    first = run("kd")["entries"]
    assert len(first) == 1 and first[0]["steps_computed"] == 2 and first[0]["steps_read"] == 0
    second = run("dkd", student="mobilenetv2_050", method="dkd")["entries"]  # another student and method
    assert second == [{**first[0], "steps_read": 2, "steps_computed": 0}]
    assert run("fitnets", method="fitnets") == {"not_used": "fitnets needs more of the teacher than its logits"}
    assert [p.name for p in (tmp_path / "art" / ".cache" / "teacher_logits").iterdir()] == [first[0]["key"]]


def test_prune_and_qat_read_the_entry_distillation_stored(tmp_path):
    """Prune's first fine-tuning step and QAT train with the recipe's seed and batch plan, as distill
    does: they read its stored logits; prune's later steps (seeds of their own) store entries of
    their own; with the cache off they use the live teacher and their fingerprints change."""
    from compress.pipeline import fingerprint, run_pipeline
    from compress.stages import get

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(create_model("mobilenetv3_small_050", 10), teacher, {"model": "mobilenetv3_small_050"})
    raw = {"name": "kdq", "seed": 0, "stages": ["teacher", "distill", "prune", "quantize"],
           "data": {"dataset": "digits", "image_size": 16, "batch_size": 512},  # 2 batches an epoch
           "teacher": {"model": "mobilenetv3_small_050", "checkpoint": str(teacher)},
           "distill": {"student": "mobilenetv2_035", "epochs": 2, "lr": 0.01},
           "prune": {"iterative_steps": 2, "epochs": 1, "final_epochs": 1, "macs_target": 0.6},
           "quantize": {"epochs": 2}}
    ctx = run_pipeline(validate_recipe(raw), artifacts=tmp_path / "art")
    distilled = ctx.results["distill"].metrics["teacher_cache"]["entries"][0]
    assert (distilled["steps_computed"], distilled["steps_read"]) == (4, 0)
    step1, step2 = (s["teacher_cache"] for s in ctx.results["prune"].metrics["steps"])
    assert step1 == {**distilled, "steps_read": 2, "steps_computed": 0}
    assert step2["key"] != distilled["key"] and (step2["steps_read"], step2["steps_computed"]) == (0, 4)
    assert ctx.results["quantize"].metrics["teacher_cache"] == {**distilled, "steps_read": 4, "steps_computed": 0}

    off = validate_recipe({**raw, "distill": {**raw["distill"], "teacher_cache": False}})
    live = run_pipeline(off, artifacts=tmp_path / "art")
    assert all("teacher_cache" not in s for s in live.results["prune"].metrics["steps"])
    assert live.results["quantize"].metrics["teacher_cache"] is None
    # the switch itself enters their fingerprints (not only through distill's, upstream)
    flipped = dataclasses.replace(ctx, cfg=off)
    for stage in ("prune", "quantize"):
        assert fingerprint(ctx, get(stage)) == ctx.results[stage].fingerprint
        assert fingerprint(flipped, get(stage)) != ctx.results[stage].fingerprint
