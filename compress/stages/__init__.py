"""The pipeline's stages, one module each (``teacher``, ``assistant``, ``distill``, ``prune``,
``quantize``, ``export``, ``bench``). Each module says in its docstring what it reads and writes and
registers its ``run(ctx, out, work) -> metrics`` with :func:`register` where it is defined. Their order,
what each needs and reads, and their versions are the stage graph (``compress.graph``).

Modules are imported by name on first use (:func:`get`), so the runner names no stage module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compress.context import RunContext
from compress.graph import NODES, ORDER, StageNode

Run = Callable[[RunContext, Path, Path], dict]  # (ctx, out_dir, work_dir) -> metrics


@dataclass(frozen=True)
class Stage:
    node: StageNode
    run: Run
    # the settings that make up the stage's fingerprint; default: the recipe section named like it
    config: Callable[[RunContext], dict] | None = None
    # more of what the stage's output depends on (a checkpoint's hash, extra teachers)
    identity: Callable[[RunContext], dict] | None = None

    @property
    def name(self) -> str:
        return self.node.name


STAGES: dict[str, Stage] = {}


def register(name: str, *, config: Callable[[RunContext], dict] | None = None,
             identity: Callable[[RunContext], dict] | None = None) -> Callable[[Run], Run]:
    """Decorator for a stage's ``run``: ``@register("prune")``."""
    if name not in NODES:
        raise ValueError(f"stage {name!r} is not in the stage graph ({', '.join(ORDER)})")

    def deco(run: Run) -> Run:
        STAGES[name] = Stage(NODES[name], run, config, identity)
        return run

    return deco


def get(name: str) -> Stage:
    """The registered stage ``name``, importing its module on first use."""
    if name not in STAGES:
        if name not in NODES:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
        importlib.import_module(f"{__name__}.{name}")
    return STAGES[name]
