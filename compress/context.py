"""What a stage is handed: the run's context (recipe, folders, data, earlier stages' results) and
what a finished stage leaves behind. Stages import this, never the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.config import PipelineConfig
from compress.data import DataBundle, data_identity, load_data


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
    _data: DataBundle | None = None

    @property
    def data(self) -> DataBundle:
        if self._data is None:
            self._data = load_data(self.cfg.data, defaults=input_defaults(self.cfg),
                                   scan_cache=self.cache_dir / "image-scans")
        return self._data

    def data_identity(self) -> dict:
        """The data as stage fingerprints see it, with the input settings resolved."""
        return data_identity(self.cfg.data, self.data)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def metrics(self, stage: str) -> dict:
        """The metrics of an earlier stage of this run."""
        return self.results[stage].metrics
