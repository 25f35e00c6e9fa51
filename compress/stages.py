"""The pipeline's stages: teacher → [assistant →] distill → prune → quantize → export → bench. Each reads earlier stages' folders and
writes its own; they share nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from compress import metrics as M
from compress.bench import file_size, latency
from compress.distill import HintonKD
from compress.errors import CompressError
from compress.export import export_onnx, parity, update_metadata
from compress.fsio import link_or_copy, read_json, replace_dir, sha256_file, write_json
from compress.models import (REGISTRY, create_model, load_checkpoint, load_weights, resolve_name,
                             save_checkpoint)
from compress.pipeline import RunContext, Stage, log, register_stage
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


def _extra_teachers(ctx: RunContext) -> list[str]:
    """Teachers besides ``teacher.model`` that the distillation method needs (multi-teacher KD)."""
    from compress.distill.methods import METHODS

    if METHODS[ctx.cfg.distill.method].teachers != "many":
        return []
    return list(ctx.cfg.distill.method_params().teachers)


def _teacher_identity(ctx: RunContext) -> dict:
    ident: dict = {}
    ckpt = ctx.cfg.teacher.checkpoint
    if ckpt:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise CompressError(f"teacher checkpoint not found: {path}")
        ident["checkpoint_sha256"] = sha256_file(path)
    if _extra_teachers(ctx):
        ident["extra_teachers"] = _extra_teachers(ctx)
    return ident


def _teacher_cache_key(ctx: RunContext, name: str) -> str:
    """A teacher trained from scratch is reused by every run with the same model, training settings,
    data and seed."""
    from compress.data import data_identity
    from compress.fsio import sha256_json
    from compress.pipeline import FORMAT_VERSION

    cfg = ctx.cfg.teacher.model_copy(update={"model": name, "checkpoint": None})
    return sha256_json({"stage": "teacher", "format": FORMAT_VERSION, "config": cfg.model_dump(mode="json"),
                        "data": data_identity(ctx.cfg.data), "seed": ctx.cfg.seed, "upstream": {}, "extra": {}})


def _train_teacher(ctx: RunContext, name: str, out: Path, work: Path) -> tuple[torch.nn.Module | None, dict]:
    """Train ``name`` as a teacher into ``out`` or link it from the cache; returns (model or None if
    cached, metrics)."""
    cfg, data = ctx.cfg.teacher, ctx.data
    cache = ctx.cache_dir / "teachers" / _teacher_cache_key(ctx, name)
    if not ctx.force and (cache / "metrics.json").is_file():
        log(f"[teacher] reusing cached {name} from {cache}")
        out.mkdir(parents=True, exist_ok=True)
        for f in (MODEL_FILE, "model.json"):
            link_or_copy(cache / f, out / f)
        return None, {**read_json(cache / "metrics.json"), "source": f"cache {cache}", "cached": True}
    seed_everything(ctx.cfg.seed)
    model = create_model(name, data.num_classes, pretrained=cfg.pretrained)
    info: dict = {"model": name, "source": "timm pretrained, fine-tuned" if cfg.pretrained else "trained from scratch"}
    loss = HintonKD(alpha=0.0, label_smoothing=cfg.label_smoothing)
    train_cfg = cfg.model_copy(update={"lr": cfg.lr * REGISTRY[name].lr_scale})
    info["lr"] = train_cfg.lr
    result = fit(model, data.train, data.val, train_cfg, loss, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"teacher {name}")
    info["history"] = result.history
    info["train_seconds"] = round(result.seconds, 2)
    save_checkpoint(model, out / MODEL_FILE, _model_meta(name, ctx, "teacher"))
    info.update(_evaluate(model, ctx))
    _store_cache(out, info, cache)
    return model, {**info, "cached": False}


def run_teacher(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.teacher, ctx.data
    name = resolve_name(cfg.model)
    if cfg.checkpoint:
        model = load_weights(create_model(name, data.num_classes), Path(cfg.checkpoint).expanduser())
        save_checkpoint(model, out / MODEL_FILE, _model_meta(name, ctx, "teacher"))
        info = {"model": name, "source": f"checkpoint {cfg.checkpoint}", **_evaluate(model, ctx), "cached": False}
    else:
        _, info = _train_teacher(ctx, name, out, work / name)
    extras = {}
    for extra in _extra_teachers(ctx):
        _, extras[extra] = _train_teacher(ctx, extra, out / "teachers" / extra, work / extra)
        extras[extra].pop("history", None)
    if extras:
        info["extra_teachers"] = extras
    return info


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


def load_teachers(ctx: RunContext, teacher: torch.nn.Module) -> list[torch.nn.Module]:
    """The teachers the distillation method learns from: ``teacher`` (the pipeline's, already loaded)
    first, or the assistant."""
    from compress.distill.methods import METHODS

    kind = METHODS[ctx.cfg.distill.method]
    if kind.teachers == "none":
        return []
    if kind.uses_assistant:
        return [load_stage_model(ctx, "assistant")]
    teachers = [teacher]
    for extra in _extra_teachers(ctx):
        teachers.append(load_checkpoint(ctx.stage_dir("teacher") / "teachers" / extra / MODEL_FILE)[0])
    return teachers


# -- distill -----------------------------------------------------------------------------------


def _assistant_config(ctx: RunContext) -> dict:
    d = ctx.cfg.distill
    train = {k: v for k, v in d.model_dump(mode="json").items() if k not in ("student", "method", "params")}
    return {"assistant": d.method_params().assistant, **train}


def run_assistant(ctx: RunContext, out: Path, work: Path) -> dict:
    """The teacher assistant (Mirzadeh et al. 2020): distilled from the teacher with Hinton KD and the
    distill stage's training settings; the student is then distilled from it."""
    cfg, data = ctx.cfg.distill, ctx.data
    name = cfg.method_params().assistant
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    model = create_model(name, data.num_classes)
    loss = HintonKD(alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    result = fit(model, data.train, data.val, cfg, loss, work, seed=ctx.cfg.seed, batch_size=ctx.cfg.data.batch_size,
                 teacher=teacher, desc=f"assistant {name}")
    save_checkpoint(model, out / MODEL_FILE, {**_model_meta(name, ctx, "assistant"),
                                              "teacher": ctx.results["teacher"].metrics["model"]})
    return {"model": name, **_review(ctx, teacher, model), "history": result.history,
            "train_seconds": round(result.seconds, 2)}


def _review(ctx: RunContext, teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    data = ctx.data
    s_logits, targets = predict(student, data.test)
    t_logits, _ = predict(teacher, data.test)
    review = M.review_metrics(t_logits, s_logits, targets, M.count_params(teacher), M.count_params(student))
    return {**review, "test_accuracy": review["accuracy"], "params": M.count_params(student),
            "macs": M.count_macs(student, data.image_size)}


def run_distill(ctx: RunContext, out: Path, work: Path) -> dict:
    from compress.distill.methods import build_method

    cfg, data = ctx.cfg.distill, ctx.data
    name = resolve_name(cfg.student)
    teacher = load_stage_model(ctx, "teacher")
    seed_everything(ctx.cfg.seed)
    student = create_model(name, data.num_classes)

    def make_model(model_name: str, k: int) -> torch.nn.Module:
        seed_everything(ctx.cfg.seed + 1000 * k)  # each peer its own initialization
        return create_model(model_name, data.num_classes)

    objective = build_method(cfg.method, cfg.params, alpha=cfg.alpha, temperature=cfg.temperature,
                             label_smoothing=cfg.label_smoothing)
    objective.bind(student, load_teachers(ctx, teacher), image_size=data.image_size, train_ds=data.train,
                   make_model=make_model, student_name=name)
    result = fit(student, data.train, data.val, cfg, objective, work, seed=ctx.cfg.seed,
                 batch_size=ctx.cfg.data.batch_size, desc=f"distill {name} ({cfg.method})")
    info: dict = {}
    peers = objective.candidates()
    if peers:  # mutual learning: continue with the chosen peer
        names = [name] + list(objective.peer_names)
        val = [M.accuracy(*predict(m, data.val)) for m in [student] + peers]
        pick = 0 if objective.p.keep == "student" else max(range(len(val)), key=lambda i: (val[i], -i))
        info["peers"] = [{"model": n, "val_accuracy": v, "test_accuracy": M.accuracy(*predict(m, data.test))}
                         for n, v, m in zip(names, val, [student] + peers)]
        info["chosen_peer"] = pick
        student, name = ([student] + peers)[pick], names[pick]
        log(f"[distill] continuing with peer {pick} ({name}, val accuracy {val[pick]:.4f})")
    meta = {**_model_meta(name, ctx, "student"), "teacher": ctx.results["teacher"].metrics["model"],
            "method": cfg.method, "alpha": cfg.alpha, "temperature": cfg.temperature}
    save_checkpoint(student, out / MODEL_FILE, meta)
    if "assistant" in ctx.results:
        info["assistant"] = ctx.results["assistant"].metrics["model"]
    return {
        "model": name,
        "teacher": ctx.results["teacher"].metrics["model"],
        "method": cfg.method,
        "method_params": objective.p.model_dump(mode="json"),
        "alpha": cfg.alpha,
        "temperature": cfg.temperature,
        **info,
        **_review(ctx, teacher, student),
        "history": result.history,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_seconds": round(result.seconds, 2),
        "seconds_per_epoch": round(result.seconds / max(1, cfg.epochs - result.resumed_from_epoch), 3),
    }


# -- prune -------------------------------------------------------------------------------------


def student_stage(ctx: RunContext) -> str:
    """The stage whose FP32 student quantization starts from: the pruned one when pruning runs."""
    return "prune" if "prune" in ctx.cfg.stages else "distill"


def run_prune(ctx: RunContext, out: Path, work: Path) -> dict:
    from compress import prune as P
    from compress.train import loader

    cfg, data = ctx.cfg.prune, ctx.data
    name = ctx.results["distill"].metrics["model"]
    model = load_stage_model(ctx, "distill")
    teacher = load_stage_model(ctx, "teacher")
    size = data.image_size
    base_macs, base_params = M.count_macs(model, size), M.count_params(model)
    arch_before = P.architecture(model)
    plan = P.plan(model, size, data.num_classes)
    for part in plan.left_whole:
        log(f"[prune] left whole: {part}")
    by_macs = cfg.macs_target is not None
    # a MACs budget is reached by fine sub-steps; a channel ratio in exactly iterative_steps steps
    P.build_pruners(plan, cfg.importance, cfg.max_layer_ratio if by_macs else cfg.channel_ratio,
                    30 if by_macs else cfg.iterative_steps, cfg.round_to, cfg.global_pruning)
    loss = HintonKD(alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    clean_train = _without_augmentation(data.train)

    def taylor_grads() -> None:
        x, y = next(iter(loader(clean_train, 128)))
        model.eval()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    grad_fn = taylor_grads if cfg.importance == "taylor" else None
    steps = []
    for i in range(cfg.iterative_steps):
        seed_everything(ctx.cfg.seed + i)
        if by_macs:
            goal = int(base_macs * (1.0 - (1.0 - cfg.macs_target) * (i + 1) / cfg.iterative_steps))
            P.prune_to(model, plan, goal, size, grad_fn)
        else:
            if grad_fn is not None:
                model.zero_grad(set_to_none=True)
                grad_fn()
            for u in plan.units:
                u.pruner.step()
        model.zero_grad(set_to_none=True)
        pruned_logits, targets = predict(model, data.test)
        row = {"step": i + 1, "macs": M.count_macs(model, size), "params": M.count_params(model),
               "accuracy_after_pruning": M.accuracy(pruned_logits, targets)}
        last = i == cfg.iterative_steps - 1
        step_cfg = cfg.model_copy(update={"epochs": cfg.epochs + (cfg.final_epochs if last else 0)})
        fit(model, data.train, data.val, step_cfg, loss, work / f"step{i + 1}", seed=ctx.cfg.seed + i,
            batch_size=ctx.cfg.data.batch_size, teacher=teacher, desc=f"prune {name} step {i + 1}/{cfg.iterative_steps}")
        tuned_logits, _ = predict(model, data.test)
        row["accuracy_after_finetune"] = M.accuracy(tuned_logits, targets)
        log(f"[prune] step {i + 1}: MACs {row['macs'] / base_macs:.1%} of the student, accuracy "
            f"{row['accuracy_after_pruning']:.4f} after pruning, {row['accuracy_after_finetune']:.4f} after fine-tuning")
        steps.append(row)
    arch = P.architecture(model)
    meta = {**_model_meta(name, ctx, "student_pruned"), "arch": arch}
    save_checkpoint(model, out / MODEL_FILE, meta)
    macs, params = M.count_macs(model, size), M.count_params(model)
    return {
        "model": name,
        "importance": cfg.importance,
        "target": {"macs_target": cfg.macs_target} if by_macs else {"channel_ratio": cfg.channel_ratio},
        "unpruned_macs": base_macs, "macs": macs, "macs_reduction": 1.0 - macs / base_macs,
        "unpruned_params": base_params, "params": params,
        "unpruned_accuracy": ctx.results["distill"].metrics["test_accuracy"],
        "accuracy_before_finetune": steps[-1]["accuracy_after_pruning"] if steps else None,
        "test_accuracy": steps[-1]["accuracy_after_finetune"] if steps else ctx.results["distill"].metrics["test_accuracy"],
        "steps": steps,
        "pruned_units": [u.name for u in plan.units][:5] + (["..."] if len(plan.units) > 5 else []),
        "left_whole": plan.left_whole,
        "channels": P.channel_report(arch_before, arch),
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
    source = student_stage(ctx)
    student = load_stage_model(ctx, source)
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
    if source == "prune":
        meta["arch"] = read_json(ctx.stage_dir("prune") / "model.json")["arch"]
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
        "fp32_accuracy": ctx.results[source].metrics["test_accuracy"],
        "from_stage": source,
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
    "student_pruned": ("prune", "model_pruned_fp32.onnx"),
    "student_int8": ("quantize", "model_int8.onnx"),
    "student_int8_ptq": ("quantize", "model_int8_ptq.onnx"),
}


def roles(ctx: RunContext) -> list[str]:
    out = ["teacher", "student"]
    if "prune" in ctx.cfg.stages:
        out.append("student_pruned")
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
    if role in ("teacher", "student", "student_pruned"):
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
        fp32_source = ARTIFACTS["student_pruned" if student_stage(ctx) == "prune" else "student"][1]
        model = build_onnx(ctx, role, data.image_size, path, fp32_path=out / fp32_source)
        entry: dict = {"file": filename, "opset": cfg.opset}
        if role in ("teacher", "student", "student_pruned"):
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
            "compress.model": distill["model"] if role != "teacher" else distill["teacher"],
            "compress.pruned": role != "teacher" and role != "student" and student_stage(ctx) == "prune",
            "compress.teacher": distill["teacher"],
            "compress.student": distill["model"],
            "compress.dataset": data.name,
            "compress.accuracy": round(accuracy, 6),
            "compress.distillation_factor": round(distill["distillation_factor"], 4),
            "compress.precision": "int8" if "int8" in role else "fp32",
        }
        if role == "student_int8":
            props["compress.quantization"] = {**SCHEME, "method": "quantization-aware training"}
        elif role == "student_int8_ptq":
            props["compress.quantization"] = {**SCHEME, "method": "onnxruntime quantize_static (min/max calibration)",
                                              "bias": "int32"}
        update_metadata(path, props)
        p = entry.get("parity")
        log(f"[export] {filename}: " + (f"max |Δlogit| {p['max_abs_logit_diff']:.2e}, agreement {p['argmax_agreement']:.2%}, "
                                        if p else "") + f"onnx accuracy {accuracy:.4f}")
        entry["size_bytes"] = path.stat().st_size
        entry["onnx_accuracy"] = accuracy
        result[role] = entry
    return result


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
        stage = ARTIFACTS[role][0] if "int8" not in role else student_stage(ctx)
        model = load_stage_model(ctx, stage)
        logits, targets = ort_predict(ort_session(path), data.test)
        logits_t = torch.from_numpy(logits)
        if role == "teacher":
            teacher_logits = logits_t
        fp32_params[role] = M.count_params(model)
        row: dict = {
            "model": ctx.results[stage].metrics["model"],
            "file": filename,
            "precision": "int8" if "int8" in role else "fp32",
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
                fp32_role = "student_pruned" if student_stage(ctx) == "prune" else "student"
                build_onnx(ctx, role, size, bench_path, fp32_path=work / f"{fp32_role}_{size}.onnx")
            for threads in cfg.threads:
                lat = latency(bench_path, size, threads=threads, warmup=cfg.warmup, runs=cfg.runs)
                row["latency"].append(lat)
                log(f"[bench] {role} {row['model']} {size}x{size} {lat['threads_setting']}: "
                    f"mean {lat['mean_ms']:.3f} ms, p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
        result["models"][role] = row
    return result


register_stage(Stage("teacher", run_teacher, (), extra_identity=_teacher_identity))
register_stage(Stage("assistant", run_assistant, ("teacher",), config=_assistant_config))
register_stage(Stage("distill", run_distill, ("teacher", "assistant")))
register_stage(Stage("prune", run_prune, ("teacher", "distill")))
register_stage(Stage("quantize", run_quantize, ("teacher", "distill", "prune"), version=4))
register_stage(Stage("export", run_export, ("teacher", "distill", "prune", "quantize"), version=5))
register_stage(Stage("bench", run_bench, ("export",), version=5))

