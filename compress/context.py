"""What a stage is handed: the run's context (recipe, folders, data, earlier stages' results) and
what a finished stage leaves behind. Stages import this, never the runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compress.config import PipelineConfig
from compress.data import DataBundle, load_data


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
            self._data = load_data(self.cfg.data)
        return self._data

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def metrics(self, stage: str) -> dict:
        """The metrics of an earlier stage of this run."""
        return self.results[stage].metrics
