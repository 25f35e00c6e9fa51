"""The pipeline's stages: teacher → distill → export → bench. Each reads earlier stages' folders and
writes its own; they share nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from compress import metrics as M
from compress.bench import file_size, latency, onnx_accuracy
from compress.distill import build_loss
from compress.errors import CompressError
from compress.export import export_onnx, parity
from compress.fsio import link_or_copy, read_json, replace_dir, sha256_file, write_json
from compress.models import create_model, load_checkpoint, load_weights, resolve_name, save_checkpoint
from compress.pipeline import RunContext, Stage, fingerprint, log, register_stage
from compress.train import fit, predict, seed_everything

MODEL_FILE = "model.safetensors"


def _model_meta(name: str, ctx: RunContext, role: str) -> dict:
    d = ctx.data
    return {"model": resolve_name(name), "role": role, "num_classes": d.num_classes, "image_size": d.image_size,
            "mean": list(d.mean), "std": list(d.std), "class_names": d.class_names, "dataset": d.name}


def _evaluate(model: torch.nn.Module, ctx: RunContext) -> dict:
    logits, targets = predict(model, ctx.data.test)
    return {"test_accuracy": M.accuracy(logits, targets), "params": M.count_params(model),
            "macs": M.count_macs(model, ctx.data.image_size)}


# -- teacher -----------------------------------------------------------------------------------


def _teacher_identity(ctx: RunContext) -> dict:
    ckpt = ctx.cfg.teacher.checkpoint
    if not ckpt:
        return {}
    path = Path(ckpt).expanduser()
    if not path.is_file():
        raise CompressError(f"teacher checkpoint not found: {path}")
    return {"checkpoint_sha256": sha256_file(path)}


def run_teacher(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.teacher, ctx.data
    name = resolve_name(cfg.model)
    meta = _model_meta(name, ctx, "teacher")
    info: dict = {"model": name}
    if cfg.checkpoint:
        model = load_weights(create_model(name, data.num_classes), Path(cfg.checkpoint).expanduser())
        save_checkpoint(model, out / MODEL_FILE, meta)
        info["source"] = f"checkpoint {cfg.checkpoint}"
    else:
        cache = ctx.cache_dir / "teachers" / fingerprint(ctx, STAGES_BY_NAME["teacher"])
        if not ctx.force and (cache / "metrics.json").is_file():
            log(f"[teacher] reusing cached {name} from {cache}")
            for f in (MODEL_FILE, "model.json"):
                link_or_copy(cache / f, out / f)
            cached = read_json(cache / "metrics.json")
            return {**cached, "source": f"cache {cache}", "cached": True}
        seed_everything(ctx.cfg.seed)
        model = create_model(name, data.num_classes, pretrained=cfg.pretrained)
        info["source"] = "timm pretrained, fine-tuned" if cfg.pretrained else "trained from scratch"
        loss = build_loss("kd", alpha=0.0, label_smoothing=cfg.label_smoothing)
        result = fit(model, data.train, data.val, cfg, loss, work, seed=ctx.cfg.seed,
                     batch_size=ctx.cfg.data.batch_size, desc=f"teacher {name}")
        info["history"] = result.history
        info["train_seconds"] = round(result.seconds, 2)
        save_checkpoint(model, out / MODEL_FILE, meta)
    info.update(_evaluate(model, ctx))
    if not cfg.checkpoint:
        _store_cache(out, info, ctx.cache_dir / "teachers" / fingerprint(ctx, STAGES_BY_NAME["teacher"]))
    return {**info, "cached": False}


def _store_cache(out: Path, info: dict, cache: Path) -> None:
    tmp = cache.with_name(f".{cache.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in (MODEL_FILE, "model.json"):
        link_or_copy(out / f, tmp / f)
    write_json(tmp / "metrics.json", info)
    replace_dir(tmp, cache)


def load_stage_model(ctx: RunContext, stage: str) -> torch.nn.Module:
    model, _ = load_checkpoint(ctx.stage_dir(stage) / MODEL_FILE)
    return model


# -- distill -----------------------------------------------------------------------------------


def run_distill(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.distill, ctx.data
    name = resolve_name(cfg.student)
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    student = create_model(name, data.num_classes)
    loss = build_loss(cfg.loss, alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    result = fit(student, data.train, data.val, cfg, loss, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, teacher=teacher, desc=f"distill {name}")
    meta = {**_model_meta(name, ctx, "student"), "teacher": ctx.results["teacher"].metrics["model"],
            "loss": cfg.loss, "alpha": cfg.alpha, "temperature": cfg.temperature}
    save_checkpoint(student, out / MODEL_FILE, meta)
    s_logits, targets = predict(student, data.test)
    t_logits, _ = predict(teacher, data.test)
    review = M.review_metrics(t_logits, s_logits, targets, M.count_params(teacher), M.count_params(student))
    return {
        "model": name,
        "teacher": ctx.results["teacher"].metrics["model"],
        "loss": cfg.loss,
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        **review,
        "test_accuracy": review["accuracy"],
        "params": M.count_params(student),
        "macs": M.count_macs(student, data.image_size),
        "history": result.history,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_seconds": round(result.seconds, 2),
        "seconds_per_epoch": round(result.seconds / max(1, cfg.epochs - result.resumed_from_epoch), 3),
    }


# -- export ------------------------------------------------------------------------------------

EXPORTS = {"student": ("distill", "model_fp32.onnx"), "teacher": ("teacher", "teacher_fp32.onnx")}


def run_export(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.export, ctx.data
    distill = ctx.results["distill"].metrics
    result: dict = {}
    for role, (stage, filename) in EXPORTS.items():
        model, meta = load_checkpoint(ctx.stage_dir(stage) / MODEL_FILE)
        path = out / filename
        export_onnx(model, path, data.image_size, opset=cfg.opset)
        check = parity(model, path, data.test, cfg.max_abs_logit_diff, cfg.min_argmax_agreement)
        props = {
            "compress.role": role,
            "compress.input_size": [1, 3, data.image_size, data.image_size],
            "compress.input_layout": "NCHW, RGB, float32, (x/255 - mean) / std" if not data.name == "digits"
            else "NCHW, float32, (x/16 - mean) / std of the digits' 0..16 gray levels, gray copied to 3 channels",
            "compress.mean": list(data.mean),
            "compress.std": list(data.std),
            "compress.class_names": data.class_names,
            "compress.model": meta["model"],
            "compress.teacher": distill["teacher"],
            "compress.student": distill["model"],
            "compress.dataset": data.name,
            "compress.accuracy": round(check["onnx_accuracy"], 6),
            "compress.distillation_factor": round(distill["distillation_factor"], 4),
            "compress.precision": "fp32",
        }
        _rewrite_metadata(path, props)
        log(f"[export] {filename}: max |Δlogit| {check['max_abs_logit_diff']:.2e}, agreement "
            f"{check['argmax_agreement']:.2%}, onnx accuracy {check['onnx_accuracy']:.4f}")
        result[role] = {"file": filename, "size_bytes": path.stat().st_size, "opset": cfg.opset, "parity": check}
    return result


def _rewrite_metadata(path: Path, props: dict) -> None:
    import onnx

    from compress.export import set_metadata
    from compress.fsio import atomic_path

    proto = onnx.load(str(path))
    set_metadata(proto, props)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


# -- bench -------------------------------------------------------------------------------------


def run_bench(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.bench, ctx.data
    sizes = cfg.image_sizes or sorted({data.image_size, 224})
    export_dir = ctx.stage_dir("export")
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"models": {}}
    for role, (stage, filename) in EXPORTS.items():
        path = export_dir / filename
        model, meta = load_checkpoint(ctx.stage_dir(stage) / MODEL_FILE)
        row: dict = {
            "model": meta["model"],
            "file": filename,
            "size_bytes": file_size(path),
            "params": M.count_params(model),
            "onnx_accuracy": onnx_accuracy(path, data.test),
            "macs": {},
            "latency": [],
        }
        for size in sizes:
            row["macs"][str(size)] = M.count_macs(model, size)
            bench_path = path
            if size != data.image_size:  # the artifact has a fixed spatial size; benchmark a copy at this one
                bench_path = export_onnx(model, work / f"{role}_{size}.onnx", size, opset=ctx.cfg.export.opset)
            for threads in cfg.threads:
                lat = latency(bench_path, size, threads=threads, warmup=cfg.warmup, runs=cfg.runs)
                row["latency"].append(lat)
                log(f"[bench] {role} {meta['model']} {size}x{size} {lat['threads_setting']}: "
                    f"mean {lat['mean_ms']:.3f} ms, p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
        result["models"][role] = row
    return result


register_stage(Stage("teacher", run_teacher, (), extra_identity=_teacher_identity))
register_stage(Stage("distill", run_distill, ("teacher",)))
register_stage(Stage("export", run_export, ("teacher", "distill")))
register_stage(Stage("bench", run_bench, ("export",)))

from compress.pipeline import STAGES as STAGES_BY_NAME  # noqa: E402
