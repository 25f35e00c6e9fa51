"""The pipeline's stages: teacher → distill → export → bench. Each reads earlier stages' folders and
writes its own; they share nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from compress import metrics as M
from compress.bench import file_size, latency
from compress.distill import build_loss
from compress.errors import CompressError
from compress.export import export_onnx, parity
from compress.fsio import link_or_copy, read_json, replace_dir, sha256_file, write_json
from compress.models import (REGISTRY, create_model, load_checkpoint, load_weights, resolve_name,
                             save_checkpoint)
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
        train_cfg = cfg.model_copy(update={"lr": cfg.lr * REGISTRY[name].lr_scale})
        info["lr"] = train_cfg.lr
        result = fit(model, data.train, data.val, train_cfg, loss, work, seed=ctx.cfg.seed,
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


# -- quantize ----------------------------------------------------------------------------------


def load_quantized(ctx: RunContext) -> torch.nn.Module:
    from compress.quantize import load_qat_checkpoint

    return load_qat_checkpoint(ctx.stage_dir("quantize") / MODEL_FILE)[0]


def run_quantize(ctx: RunContext, out: Path, work: Path) -> dict:
    from compress.distill.losses import HintonKD
    from compress.quantize import SCHEME, calibrate, prepare_qat, qat_schedule, qat_summary
    from compress.train import loader

    cfg, data = ctx.cfg.quantize, ctx.data
    student = load_stage_model(ctx, "distill")
    name = ctx.results["distill"].metrics["model"]
    seed_everything(ctx.cfg.seed)
    gm = prepare_qat(student, torch.zeros(1, 3, data.image_size, data.image_size))
    calib_ds = data.train
    if cfg.calibration_images < len(calib_ds):
        calib_ds = torch.utils.data.Subset(calib_ds, list(range(cfg.calibration_images)))
    eval_train = _without_augmentation(calib_ds)
    seen = calibrate(gm, (x for x, _ in loader(eval_train, 128)))
    teacher = load_stage_model(ctx, "teacher") if cfg.distill else None
    loss = HintonKD(alpha=cfg.alpha if cfg.distill else 0.0, temperature=cfg.temperature,
                    label_smoothing=cfg.label_smoothing)
    qat_schedule(gm, 0, cfg.freeze_observers_after, cfg.freeze_bn_after)
    before_logits, targets = predict(gm, data.test)
    result = fit(gm, data.train, data.val, cfg, loss, work, seed=ctx.cfg.seed, batch_size=ctx.cfg.data.batch_size,
                 teacher=teacher, desc=f"qat {name}",
                 on_epoch_start=lambda e: qat_schedule(gm, e, cfg.freeze_observers_after, cfg.freeze_bn_after))
    qat_schedule(gm, 10**9, cfg.freeze_observers_after, cfg.freeze_bn_after)  # final state: all frozen
    gm.eval()
    meta = {**_model_meta(name, ctx, "student_int8"), "qat": True, "scheme": SCHEME}
    save_checkpoint(gm, out / MODEL_FILE, meta)
    logits, _ = predict(gm, data.test)
    return {
        "model": name,
        "scheme": SCHEME,
        "graph": qat_summary(gm),
        "calibration_images": seen,
        "loss": "kd" if cfg.distill else "ce",
        "fake_quant_accuracy_before_qat": M.accuracy(before_logits, targets),
        "test_accuracy": M.accuracy(logits, targets),
        "fp32_accuracy": ctx.results["distill"].metrics["test_accuracy"],
        "history": result.history,
        "train_seconds": round(result.seconds, 2),
    }


def _without_augmentation(ds):
    """The same images without random shifts (calibration must see the data as inference does)."""
    import copy

    base = ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds
    clean = copy.copy(base)
    clean.augment = False
    return torch.utils.data.Subset(clean, ds.indices) if isinstance(ds, torch.utils.data.Subset) else clean


# -- export ------------------------------------------------------------------------------------

# role -> (stage it comes from, file name)
ARTIFACTS = {
    "teacher": ("teacher", "teacher_fp32.onnx"),
    "student": ("distill", "model_fp32.onnx"),
    "student_int8": ("quantize", "model_int8.onnx"),
    "student_int8_ptq": ("quantize", "model_int8_ptq.onnx"),
}


def roles(ctx: RunContext) -> list[str]:
    out = ["teacher", "student"]
    if "quantize" in ctx.cfg.stages:
        out.append("student_int8")
        if ctx.cfg.quantize.ptq_baseline:
            out.append("student_int8_ptq")
    return out


def _calibration_array(ctx: RunContext, size: int, limit: int) -> np.ndarray:
    import torch.nn.functional as F

    from compress.train import loader

    ds = _without_augmentation(ctx.data.train)
    xs = []
    for x, _ in loader(ds, 256):
        xs.append(x)
        if sum(len(b) for b in xs) >= limit:
            break
    x = torch.cat(xs)[:limit]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.numpy().astype(np.float32)


def build_onnx(ctx: RunContext, role: str, size: int, path: Path, fp32_path: Path | None = None) -> torch.nn.Module | None:
    """Write ``role``'s ONNX file at input ``size``; returns the PyTorch model it must match (None for PTQ)."""
    from compress.int8 import ptq_static
    from compress.quantize import export_qdq

    opset = ctx.cfg.export.opset
    if role in ("teacher", "student"):
        model = load_stage_model(ctx, ARTIFACTS[role][0])
        export_onnx(model, path, size, opset=opset)
        return model
    if role == "student_int8":
        model = load_quantized(ctx)
        export_qdq(model, path, size, opset=opset)
        return model
    if fp32_path is None:
        raise CompressError("PTQ needs the FP32 ONNX file")
    limit = ctx.cfg.quantize.calibration_images if size == ctx.data.image_size else 64
    ptq_static(fp32_path, path, _calibration_array(ctx, size, limit))
    return None


def run_export(ctx: RunContext, out: Path, work: Path) -> dict:
    from compress.export import ort_predict, ort_session
    from compress.int8 import kernel_report
    from compress.quantize import SCHEME

    cfg, data = ctx.cfg.export, ctx.data
    distill = ctx.results["distill"].metrics
    result: dict = {}
    for role in roles(ctx):
        filename = ARTIFACTS[role][1]
        path = out / filename
        model = build_onnx(ctx, role, data.image_size, path, fp32_path=out / ARTIFACTS["student"][1])
        entry: dict = {"file": filename, "opset": cfg.opset}
        if role in ("teacher", "student"):
            entry["parity"] = parity(model, path, data.test, cfg.max_abs_logit_diff, cfg.min_argmax_agreement)
            accuracy = entry["parity"]["onnx_accuracy"]
        else:
            entry["kernels"] = kernel_report(path)
            if entry["kernels"]["float_convolutions"]:
                raise CompressError(f"{filename}: onnxruntime runs {entry['kernels']['float_convolutions']} "
                                    "convolutions in float; the int8 graph is not fused")
            if model is not None:
                entry["parity"] = parity(model, path, data.test, max_abs_diff=float("inf"),
                                         min_agreement=cfg.int8_min_argmax_agreement)
                accuracy = entry["parity"]["onnx_accuracy"]
            else:
                logits, targets = ort_predict(ort_session(path), data.test)
                accuracy = float((logits.argmax(1) == targets).mean())
        props = {
            "compress.role": role,
            "compress.input_size": [1, 3, data.image_size, data.image_size],
            "compress.input_layout": "NCHW float32, (x - mean) / std per channel" if data.name != "digits"
            else "NCHW float32; digits' 0..16 gray levels scaled to 0..1, copied to 3 channels, then (x - mean) / std",
            "compress.mean": list(data.mean),
            "compress.std": list(data.std),
            "compress.class_names": data.class_names,
            "compress.model": ctx.results[ARTIFACTS[role][0] if role != "student_int8_ptq" else "distill"].metrics["model"],
            "compress.teacher": distill["teacher"],
            "compress.student": distill["model"],
            "compress.dataset": data.name,
            "compress.accuracy": round(accuracy, 6),
            "compress.distillation_factor": round(distill["distillation_factor"], 4),
            "compress.precision": "fp32" if role in ("teacher", "student") else "int8",
        }
        if role == "student_int8":
            props["compress.quantization"] = {**SCHEME, "method": "quantization-aware training"}
        elif role == "student_int8_ptq":
            props["compress.quantization"] = {**SCHEME, "method": "onnxruntime quantize_static (min/max calibration)",
                                              "bias": "int32"}
        _rewrite_metadata(path, props)
        p = entry.get("parity")
        log(f"[export] {filename}: " + (f"max |Δlogit| {p['max_abs_logit_diff']:.2e}, agreement {p['argmax_agreement']:.2%}, "
                                        if p else "") + f"onnx accuracy {accuracy:.4f}")
        entry["size_bytes"] = path.stat().st_size
        entry["onnx_accuracy"] = accuracy
        result[role] = entry
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
    from compress.export import ort_predict, ort_session

    cfg, data = ctx.cfg.bench, ctx.data
    sizes = cfg.image_sizes or sorted({data.image_size, 224})
    export_dir = ctx.stage_dir("export")
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"models": {}}
    teacher_logits = None
    fp32_params = {}
    for role in roles(ctx):
        filename = ARTIFACTS[role][1]
        path = export_dir / filename
        stage = ARTIFACTS[role][0] if role in ("teacher", "student") else "distill"
        model = load_stage_model(ctx, stage)
        logits, targets = ort_predict(ort_session(path), data.test)
        logits_t = torch.from_numpy(logits)
        if role == "teacher":
            teacher_logits = logits_t
        fp32_params[role] = M.count_params(model)
        row: dict = {
            "model": ctx.results[stage].metrics["model"],
            "file": filename,
            "precision": "fp32" if role in ("teacher", "student") else "int8",
            "size_bytes": file_size(path),
            "params": fp32_params[role],
            "onnx_accuracy": float((logits.argmax(1) == targets).mean()),
            "macs": {},
            "latency": [],
        }
        if role != "teacher":
            row["review"] = M.review_metrics(teacher_logits, logits_t, torch.from_numpy(targets),
                                             fp32_params["teacher"], row["params"])
        for size in sizes:
            row["macs"][str(size)] = M.count_macs(model, size)
            bench_path = path
            if size != data.image_size:  # the artifact has a fixed spatial size; benchmark a copy at this one
                bench_path = work / f"{role}_{size}.onnx"
                build_onnx(ctx, role, size, bench_path, fp32_path=work / f"student_{size}.onnx")
            for threads in cfg.threads:
                lat = latency(bench_path, size, threads=threads, warmup=cfg.warmup, runs=cfg.runs)
                row["latency"].append(lat)
                log(f"[bench] {role} {row['model']} {size}x{size} {lat['threads_setting']}: "
                    f"mean {lat['mean_ms']:.3f} ms, p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
        result["models"][role] = row
    return result


register_stage(Stage("teacher", run_teacher, (), extra_identity=_teacher_identity))
register_stage(Stage("distill", run_distill, ("teacher",)))
register_stage(Stage("quantize", run_quantize, ("teacher", "distill"), version=3))
register_stage(Stage("export", run_export, ("teacher", "distill", "quantize"), version=3))
register_stage(Stage("bench", run_bench, ("export",), version=3))

from compress.pipeline import STAGES as STAGES_BY_NAME  # noqa: E402
