"""Stage ``prune``: structured pruning of the distilled student (``compress.prune``: torch-pruning's
dependency graph; ShuffleNet's branches on their own), in ``prune.iterative_steps`` steps to a MACs
budget or a channel ratio, each step followed by KD fine-tuning from the teacher (its logits read
through the teacher-output cache when ``distill.teacher_cache`` is on: the first step shares
distill's entry).

Reads: ``distill/model.safetensors``, ``teacher/model.safetensors``.
Writes: ``model.safetensors`` + ``model.json`` with the pruned architecture (``arch``: the channel
counts every layer now has), and per-step MACs, parameters and accuracy in ``metrics.json``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from compress import metrics as M
from compress import prune as P
from compress.context import RunContext
from compress.data import without_augmentation
from compress.distill import HintonKD, logit_objective
from compress.evaluate import loader, predict
from compress.errors import short
from compress.models import apply_architecture, architecture, save_checkpoint
from compress.stages import register
from compress.stages.common import MODEL_FILE, kd_teacher_cache, load_stage_model, model_meta, teacher_cache_setting
from compress.train import fit, seed_everything

log = logging.getLogger(__name__)


def pruners(ctx: RunContext, model: torch.nn.Module, steps: int | None = None) -> P.Plan:
    """The pruning plan of ``model`` with its pruners as the recipe sets them (``steps``: how many
    pruning steps reach the target; default the stage's own)."""
    cfg, data = ctx.cfg.prune, ctx.data
    plan = P.plan(model, data.image_size, data.num_classes)
    by_macs = cfg.macs_target is not None
    # a MACs budget is reached by fine sub-steps; a channel ratio in exactly iterative_steps steps
    P.build_pruners(plan, cfg.importance, cfg.max_layer_ratio if by_macs else cfg.channel_ratio,
                    steps or (30 if by_macs else cfg.iterative_steps), cfg.round_to, cfg.global_pruning)
    return plan


def probe(ctx: RunContext, student: torch.nn.Module) -> torch.nn.Module:
    """Prune a copy of ``student`` as far as the recipe allows in one step, run it, and rebuild it from
    its stored architecture as the later stages will; returns the pruned copy."""
    model = P.clone(student)
    size, n = ctx.data.image_size, ctx.data.num_classes
    plan = pruners(ctx, model, steps=1)
    x = torch.randn(2, 3, size, size)
    model.eval()
    if ctx.cfg.prune.importance == "taylor":
        model(x).sum().backward()
    for u in plan.units:
        u.pruner.step()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = model(x)
    if tuple(out.shape) != (2, n):
        raise RuntimeError(f"the pruned model returns shape {tuple(out.shape)}, not (2, {n})")
    rebuilt = apply_architecture(P.clone(student), architecture(model))
    try:
        rebuilt.load_state_dict(model.state_dict())
    except RuntimeError as e:
        found = re.search(r"(?:size mismatch for|Missing key\(s\) in state_dict:|Unexpected key\(s\) in state_dict:) "
                          r"\"?([\w.]+)", str(e))
        what = found.group(1) if found else short(e, 80)
        raise RuntimeError(f"pruning resizes {what}, which a pruned checkpoint does not record (it keeps the "
                           "sizes of convolutions, BatchNorm and linear layers only)") from None
    return model


@register("prune", identity=teacher_cache_setting, probe=probe, probe_does="pruned")
def run(ctx: RunContext, out: Path, work: Path) -> dict:
    cfg, data = ctx.cfg.prune, ctx.data
    name = ctx.metrics("distill")["model"]
    model = load_stage_model(ctx, "distill")
    teacher = load_stage_model(ctx, "teacher")
    size = data.image_size
    base_macs, base_params = M.count_macs(model, size), M.count_params(model)
    arch_before = architecture(model)
    plan = pruners(ctx, model)
    for part in plan.left_whole:
        log.info(f"[prune] left whole: {part}")
    by_macs = cfg.macs_target is not None
    steps = _steps(ctx, model, teacher, plan, base_macs, work)
    arch = architecture(model)
    save_checkpoint(model, out / MODEL_FILE, {**model_meta(ctx, name, "student_pruned"), "arch": arch})
    macs, params = M.count_macs(model, size), M.count_params(model)
    unpruned_accuracy = ctx.metrics("distill")["test_accuracy"]
    return {
        "model": name,
        "importance": cfg.importance,
        "target": {"macs_target": cfg.macs_target} if by_macs else {"channel_ratio": cfg.channel_ratio},
        "unpruned_macs": base_macs, "macs": macs, "macs_reduction": 1.0 - macs / base_macs,
        "unpruned_params": base_params, "params": params,
        "unpruned_accuracy": unpruned_accuracy,
        "accuracy_before_finetune": steps[-1]["accuracy_after_pruning"] if steps else None,
        "test_accuracy": steps[-1]["accuracy_after_finetune"] if steps else unpruned_accuracy,
        "steps": steps,
        "pruned_units": [u.name for u in plan.units][:5] + (["..."] if len(plan.units) > 5 else []),
        "left_whole": plan.left_whole,
        "channels": P.channel_report(arch_before, arch),
        "derived": ctx.derived.get("prune"),
    }


def _steps(ctx: RunContext, model: torch.nn.Module, teacher: torch.nn.Module, plan: P.Plan,
           base_macs: int, work: Path) -> list[dict]:
    """Prune and fine-tune ``model`` in place, step by step; one row of measurements per step."""
    cfg, data = ctx.cfg.prune, ctx.data
    size, name = data.image_size, ctx.metrics("distill")["model"]
    by_macs = cfg.macs_target is not None
    loss = HintonKD(alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing)
    clean_train = without_augmentation(data.train)

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
        objective = logit_objective(loss, model, teacher)
        cache = kd_teacher_cache(ctx, objective, step_cfg, ctx.cfg.seed + i)
        fitted = fit(model, data.train, data.val, step_cfg, objective, work / f"step{i + 1}",
            seed=ctx.cfg.seed + i, batch_size=ctx.cfg.data.batch_size,
            desc=f"prune {name} step {i + 1}/{cfg.iterative_steps}")
        tuned_logits, _ = predict(model, data.test)
        row["accuracy_after_finetune"] = M.accuracy(tuned_logits, targets)
        row.update(fitted.selection())
        if cache is not None:
            log.info(f"[prune] step {i + 1}: {cache.summary()}")
            row["teacher_cache"] = {"key": cache.key, **cache.stats}
        log.info(f"[prune] step {i + 1}: MACs {row['macs'] / base_macs:.1%} of the student, accuracy "
                 f"{row['accuracy_after_pruning']:.4f} after pruning, {row['accuracy_after_finetune']:.4f} after fine-tuning")
        steps.append(row)
    return steps
