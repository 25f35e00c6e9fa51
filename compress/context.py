"""What a stage is handed: the run's context (recipe, folders, data, earlier stages' results) and
what a finished stage leaves behind. Stages import this, never the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compress.config import PipelineConfig
from compress.data import DataBundle, Withheld, data_identity, load_data
from compress.train import resolve_schedule

#: the recipe sections that train, each a TrainConfig
TRAINING_SECTIONS = ("teacher", "distill", "prune", "quantize")


def input_defaults(cfg: PipelineConfig) -> dict | None:
    """Input settings (mean, std, size, interpolation, crop) of the model that starts from published
    weights, the student's first, else the teacher's; None when neither does."""
    for name, pretrained in ((cfg.distill.student, cfg.distill.pretrained),
                             (cfg.teacher.model, cfg.teacher.pretrained)):
        if pretrained:
            from compress.models import pretrained_data_config

            return pretrained_data_config(name, pretrained)
    return None


@dataclass
class StageResult:
    name: str
    dir: Path
    fingerprint: str
    metrics: dict
    skipped: bool = False


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    cache_dir: Path
    force: bool = False
    results: dict[str, StageResult] = field(default_factory=dict)
    derived: dict = field(default_factory=dict)  # what :func:`derive_settings` derived from the data
    withhold_test: bool = False  # a tuning trial: the test split is never read
    #: per stage, called after each of its training epochs with (epoch, row): a tuner's pruner
    epoch_hooks: dict[str, Callable[[int, dict], None]] = field(default_factory=dict)
    _data: DataBundle | None = None

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            self._data = load_data(self.cfg.data, defaults=input_defaults(self.cfg),
                                   scan_cache=self.cache_dir / "image-scans")
            if self.withhold_test:
                self._data.test = Withheld(len(self._data.test))
        return self._data

    def data_identity(self) -> dict:
        """The data as stage fingerprints see it, with the input settings resolved."""
        return data_identity(self.cfg.data, self.data)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def metrics(self, stage: str) -> dict:
        """The metrics of an earlier stage of this run."""
        return self.results[stage].metrics


def derive_settings(ctx: RunContext) -> dict:
    """Replace ``ctx.cfg`` by the recipe with what it leaves to the data resolved: each training
    section's ``steps`` as epochs for this training split (:func:`compress.train.resolve_schedule`).
    Returns what was derived, the data's augmentation included (``auto`` crop range and jitter,
    resolved when the images are loaded), and keeps it in ``ctx.derived``."""
    cfg, data = ctx.cfg, ctx.data
    derived: dict = {}
    aug = data.augmentation
    if aug and aug.get("derived"):
        derived["data"] = {"image_size": data.image_size, **{k: aug[k] for k in aug["derived"]}}
    update = {}
    for section in TRAINING_SECTIONS:
        resolved, record = resolve_schedule(getattr(cfg, section), len(data.train), cfg.data.batch_size)
        if record is not None:
            update[section], derived[section] = resolved, record
    if update:
        ctx.cfg = cfg.model_copy(update=update)
    ctx.derived = derived
    return derived


def describe_derived(derived: dict) -> list[str]:
    """One phrase per derived setting, for the console and the report."""
    out = []
    if "data" in derived:
        d = derived["data"]
        parts = []
        if "scale" in d:
            parts.append(f"crop area {d['scale'][0]:g}-{d['scale'][1]:g}")
        if "color_jitter" in d:
            parts.append(f"colour jitter {d['color_jitter']:g}")
        out.append(f"augmentation for {d['image_size']}-px images: {', '.join(parts)}")
    for section in TRAINING_SECTIONS:
        if section in derived:
            r = derived[section]
            extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("steps", "batches_per_epoch", "epochs"))
            out.append(f"{section}: {r['steps']} steps = {r['epochs']} epochs of {r['batches_per_epoch']} batches"
                       + (f" ({extra})" if extra else ""))
    return out
