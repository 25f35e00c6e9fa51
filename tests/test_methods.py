"""The methods wired to real models: feature taps, adapters that stay out of the student, one short
training run per method, and the pipeline stages for assistants, extra teachers and peers."""

import json

import pytest
import torch

from compress.config import TrainConfig, load_recipe
from compress.data import ImageDataset
from compress.distill import METHODS, build_method
from compress.distill import losses as L
from compress.distill.taps import EMBEDDING, Taps, feature_points, match_points
from compress.models import create_model
from compress.train import fit

SIZE = 32


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return create_model("resnet18", 10).eval(), create_model("mobilenetv2_050", 10)


def _batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.arange(n) % 10


def test_feature_points_find_stages_by_stride():
    t = feature_points(create_model("resnet18", 10), SIZE)
    assert [(p.name, p.channels, p.reduction) for p in t] == [
        ("act1", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)]
    s = feature_points(create_model("shufflenet_v2_x0_5", 10), SIZE)  # torchvision: no feature_info
    assert [(p.name, p.reduction) for p in s] == [("conv1", 2), ("stage2", 8), ("stage3", 16), ("conv5", 32)]
    pairs = match_points(t, s)  # stem left out; strides only the teacher has are skipped
    assert [(a.name, b.name) for a, b in pairs] == [("layer2", "stage2"), ("layer3", "stage3"), ("layer4", "conv5")]


@pytest.mark.parametrize("method", ["fitnets", "at", "rkd", "sp"])
def test_feature_method_loss_is_ce_plus_its_formula(pair, method):
    teacher, student = pair
    x, y = _batch()
    obj = build_method(method).bind(student, [teacher], image_size=SIZE)
    student.eval()  # fixed BatchNorm statistics: the two forward passes below see the same network
    obj.eval()
    loss, logits = obj(student, x, y)
    # the same features read independently, with hooks of this test's own
    if method in ("rkd",):
        names_s, names_t, emb = [], [], True
    elif method == "at":
        names_t, names_s = [p[0] for p in obj.pairs], [p[1] for p in obj.pairs]
        emb = False
    else:
        names_t, names_s, emb = [obj.t_layer], [obj.s_layer], False
    ts, tt = Taps(student, names_s, embedding=emb), Taps(teacher, names_t, embedding=emb)
    with torch.no_grad():
        s = student(x)
        teacher(x)
    ce = torch.nn.functional.cross_entropy(s, y)
    p = obj.p
    if method == "fitnets":
        a, ft = L.match_spatial(obj.regressor(ts[obj.s_layer]), tt[obj.t_layer])
        expected = ce + p.beta * ((a - ft) ** 2).mean()
    elif method == "at":
        expected = ce + p.beta / 2 * L.at_loss([ts[n] for n in names_s], [tt[n] for n in names_t])
    elif method == "rkd":
        es, et = ts[EMBEDDING], tt[EMBEDDING]
        expected = ce + p.distance_weight * L.rkd_distance_loss(es, et) + p.angle_weight * L.rkd_angle_loss(es, et)
    else:
        expected = ce + p.gamma * L.sp_loss(ts[obj.s_layer], tt[obj.t_layer])
    ts.remove(), tt.remove()
    assert torch.allclose(logits, s)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() > ce.item()  # the knowledge term is there
    obj.release()
    assert not student._forward_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())


def test_fitnets_regressor_maps_channels_and_stays_out_of_the_student(pair):
    teacher, student = pair
    keys = set(student.state_dict())
    obj = build_method("fitnets").bind(student, [teacher], image_size=SIZE)
    assert (obj.t_layer, obj.s_layer) == ("layer3", "blocks.4")  # the middle of the shared strides 4..32
    assert obj.regressor[0].in_channels == 48 and obj.regressor[0].out_channels == 256
    assert set(student.state_dict()) == keys
    assert sum(p.numel() for p in obj.parameters()) > 0
    obj.release()
    explicit = build_method("fitnets", {"layer": "layer2:blocks.2"}).bind(student, [teacher], image_size=SIZE)
    assert explicit.regressor[0].in_channels == 16 and explicit.regressor[0].out_channels == 128
    explicit.release()
    with pytest.raises(Exception, match="no layer named 'nope'"):
        build_method("fitnets", {"layer": "nope:blocks.2"}).bind(student, [teacher], image_size=SIZE)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_without_nan(tmp_path, method):
    torch.manual_seed(0)
    images, labels = torch.randn(48, 3, 16, 16), torch.arange(48) % 4
    ds = ImageDataset(images, labels)
    student = create_model("mobilenetv2_035", 4)
    teachers = {"none": [], "one": [create_model("resnet18", 4)],
                "many": [create_model("resnet18", 4), create_model("mobilenetv3_small_050", 4)]}[METHODS[method].teachers]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    obj = build_method(method).bind(student, teachers, image_size=16, train_ds=ds, student_name="mobilenetv2_035",
                                    make_model=lambda n, k: create_model(n, 4))
    cfg = TrainConfig(epochs=1, lr=0.01, warmup_epochs=0)
    result = fit(student, ds, ds, cfg, obj, tmp_path, seed=0, batch_size=16, desc=method)
    assert len(result.history) == 1
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert set(student.state_dict()) == set(before)
    if method == "dml":
        assert len(obj.candidates()) == 1
        saved = torch.load(tmp_path / "last.pt", weights_only=True)
        assert any(k.startswith("peers.0.") for k in saved["objective"])  # peers resume with the student


def test_recipe_method_key_and_params_errors(tiny_recipe):
    cfg = load_recipe(tiny_recipe(distill={"method": "ta"}))
    assert cfg.stages[:3] == ["teacher", "assistant", "distill"]
    with pytest.raises(Exception, match=r"distill: params.beta: .*method dkd"):
        load_recipe(tiny_recipe(distill={"method": "dkd", "params": {"beta": -2}}))
    with pytest.raises(Exception, match="unknown distillation method 'hint'"):
        load_recipe(tiny_recipe(distill={"method": "hint"}))
    with pytest.raises(Exception, match=r"distill: params.teachers: unknown model 'resnet999'"):
        load_recipe(tiny_recipe(distill={"method": "multi_teacher", "params": {"teachers": ["resnet999"]}}))
    with pytest.raises(Exception, match="weights needs 2 values"):
        load_recipe(tiny_recipe(distill={"method": "multi_teacher", "params": {"weights": [1.0]}}))
    with pytest.raises(Exception, match="stage 'assistant' runs only"):
        load_recipe(tiny_recipe(stages=["teacher", "assistant", "distill"]))


@pytest.mark.e2e
def test_methods_command_lists_every_method(cli):
    r = cli("methods")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == list(METHODS)
    assert "teacher + assistant" in r.stdout and "Zhao et al." in r.stdout


@pytest.mark.e2e
def test_pipeline_runs_assistant_extra_teachers_and_peers(cli, tiny_recipe, tmp_path):
    art = tmp_path / "art"
    stages = ["teacher", "distill"]
    ta = tiny_recipe("ta", stages=stages, distill={"method": "ta", "params": {"assistant": "mobilenetv2_050"}})
    r = cli("pipeline", ta, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    assistant = json.loads((art / "ta" / "assistant" / "metrics.json").read_text())
    distill = json.loads((art / "ta" / "distill" / "metrics.json").read_text())
    assert assistant["model"] == "mobilenetv2_050" and distill["assistant"] == "mobilenetv2_050"
    assert (art / "ta" / "assistant" / "model.safetensors").is_file()
    r = cli("pipeline", ta, "--artifacts", art)
    assert "[assistant] unchanged, skipped" in r.stderr and "[distill] unchanged, skipped" in r.stderr

    mt = tiny_recipe("mt", stages=stages, distill={"method": "multi_teacher", "params": {"teachers": ["mobilenetv2_050"]}})
    r = cli("pipeline", mt, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    teacher = json.loads((art / "mt" / "teacher" / "metrics.json").read_text())
    assert list(teacher["extra_teachers"]) == ["mobilenetv2_050"]
    assert (art / "mt" / "teacher" / "teachers" / "mobilenetv2_050" / "model.safetensors").is_file()
    assert "reusing cached mobilenetv3_small_050" in r.stderr  # the pipeline's teacher came from the cache

    dml = tiny_recipe("dml", stages=stages, distill={"method": "dml", "params": {"peers": ["mobilenetv2_050"]}})
    r = cli("pipeline", dml, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    m = json.loads((art / "dml" / "distill" / "metrics.json").read_text())
    assert [p["model"] for p in m["peers"]] == ["mobilenetv2_035", "mobilenetv2_050"]
    best = max(range(2), key=lambda i: (m["peers"][i]["val_accuracy"], -i))
    assert m["chosen_peer"] == best and m["model"] == m["peers"][best]["model"]


@pytest.mark.e2e
def test_compare_writes_one_table_and_skips_on_rerun(cli, tiny_recipe, tmp_path):
    art = tmp_path / "art"
    recipe = tiny_recipe("cmp", compare={"methods": ["scratch", "kd", "at"]})
    r = cli("compare", recipe, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    result = json.loads((art / "cmp" / "compare.json").read_text())
    assert [row["method"] for row in result["rows"]] == ["scratch", "kd", "at"]
    report = (art / "cmp" / "report.md").read_text()
    assert "| `scratch` |" in report.splitlines()[6] and "s / epoch" in report
    for row in result["rows"]:  # each row is its own run's distill stage
        run = json.loads((art / "cmp" / row["method"] / "distill" / "metrics.json").read_text())
        assert row["accuracy"] == run["test_accuracy"] and row["seconds_per_epoch"] == run["seconds_per_epoch"] > 0
        assert (art / "cmp" / row["method"] / "report.md").is_file()
    r = cli("compare", recipe, "--artifacts", art)
    assert r.stderr.count("[distill] unchanged, skipped") == 3
    bad = tiny_recipe("bad", compare={"methods": ["kd", "nope"]})
    r = cli("compare", bad, "--artifacts", art)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "compare.methods: unknown distillation method 'nope'" in r.stderr
    r = cli("compare", tiny_recipe("none"), "--artifacts", art)
    assert r.returncode == 2 and "has no compare section" in r.stderr


def test_a_run_reports_the_temperature_its_method_used(tiny_recipe, tmp_path):
    """dkd computes with its own params.temperature: metrics, model.json and report.md say so, the
    eq. (1) value it ignores is named in a warning and stays out of the stage's fingerprint."""
    from conftest import run_cli

    recipe = tiny_recipe(stages=["teacher", "distill"], distill={"method": "dkd", "temperature": 7.0,
                                                                  "params": {"temperature": 2.0}})
    art = tmp_path / "art"
    r = run_cli("pipeline", recipe, "--artifacts", art)
    assert r.returncode == 0, r.stderr
    assert ("distill.temperature not used: method dkd does not compute with it "
            "(it reads distill.params.temperature)") in r.stderr
    metrics = json.loads((art / "tiny" / "distill" / "metrics.json").read_text())
    assert metrics["temperature"] == 2.0 and metrics["alpha"] == 1.0  # dkd's TCKD weight, params.alpha
    assert metrics["in_effect"] == {"distill.params.alpha": 1.0, "distill.params.temperature": 2.0}
    assert json.loads((art / "tiny" / "distill" / "model.json").read_text())["temperature"] == 2.0
    report = (art / "tiny" / "report.md").read_text()
    assert "method `dkd`, α = 1 (params.alpha), T = 2 (params.temperature)" in report
    assert "T = 7" not in report
    # the stage's fingerprint reads the section without the value dkd ignores, and with the one it reads
    from types import SimpleNamespace

    from compress.stages import get

    def section(*overrides):
        return get("distill").config(SimpleNamespace(cfg=load_recipe(recipe, list(overrides))))

    assert section("distill.temperature=5") == section()
    assert section("distill.params.temperature=3") != section()
