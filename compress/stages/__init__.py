"""The pipeline's stages, one module each (``teacher``, ``assistant``, ``distill``, ``prune``,
``quantize``, ``export``, ``bench``). Each module says in its docstring what it reads and writes and
registers its ``run(ctx, out, work) -> metrics`` with :func:`register` where it is defined. Their order,
what each needs and reads, and their versions are the stage graph (``compress.graph``).

Modules are imported by name on first use (:func:`get`), so the runner names no stage module."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from compress.context import RunContext
from compress.graph import NODES, ORDER, StageNode

Run = Callable[[RunContext, Path, Path], dict]  # (ctx, out_dir, work_dir) -> metrics
# (ctx, student) -> the student as the stage would leave it; raises when the stage cannot handle it
Probe = Callable[[RunContext, Any], Any]
# ctx -> (role, model name, starting weights) of each model the stage builds
Models = Callable[[RunContext], list[tuple[str, str, Any]]]


@dataclass(frozen=True)
class Stage:
    node: StageNode
    run: Run
    # the settings that make up the stage's fingerprint; default: the recipe section named like it
    config: Callable[[RunContext], dict] | None = None
    # more of what the stage's output depends on (a checkpoint's hash, extra teachers)
    identity: Callable[[RunContext], dict] | None = None
    # a cheap check, before the run starts, that the stage can handle the student: a copy is pruned or
    # rewritten on a tiny input; ``probe_does`` says what for the message ("pruned", "quantized")
    probe: Probe | None = None
    probe_does: str = ""
    # the models the stage builds (role "student" for the one the later stages change), which the
    # runner builds with their starting weights and runs once before the run starts
    models: Models | None = None

    @property
    def name(self) -> str:
        return self.node.name


STAGES: dict[str, Stage] = {}


def register(name: str, *, config: Callable[[RunContext], dict] | None = None,
             identity: Callable[[RunContext], dict] | None = None, probe: Probe | None = None,
             probe_does: str = "", models: Models | None = None) -> Callable[[Run], Run]:
    """Decorator for a stage's ``run``: ``@register("prune")``."""
    if name not in NODES:
        raise ValueError(f"stage {name!r} is not in the stage graph ({', '.join(ORDER)})")

    def deco(run: Run) -> Run:
        STAGES[name] = Stage(NODES[name], run, config, identity, probe, probe_does, models)
        return run

    return deco


def get(name: str) -> Stage:
    """The registered stage ``name``, importing its module on first use."""
    if name not in STAGES:
        if name not in NODES:
            raise KeyError(f"unknown stage {name!r}; stages are {', '.join(ORDER)}")
        importlib.import_module(f"{__name__}.{name}")
    return STAGES[name]
