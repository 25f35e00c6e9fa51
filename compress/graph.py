"""The stage graph, declared once: the order of the stages, what each needs before it, which earlier
stages' outputs it reads (their fingerprints are part of its own) and the version of what it writes.
The recipe validation (``config``) and the runner (``pipeline``) read it from here; the stages'
code registers itself against these names (``compress.stages``)."""

from __future__ import annotations

from dataclasses import dataclass

# Bump when the layout or meaning of every stage's outputs changes, so old folders are recomputed.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StageNode:
    name: str
    needs: tuple[str, ...]  # stages that must be in the recipe before this one
    reads: tuple[str, ...]  # stages whose outputs (when they ran) this one reads
    version: int = 1  # bump when the stage's code changes what it writes
    default: bool = True  # in a recipe's stages unless it names them
    trains: bool = False  # runs the training loop: every process of a torchrun run takes part


GRAPH: tuple[StageNode, ...] = (
    StageNode("teacher", needs=(), reads=(), trains=True),
    # added by itself before distill when the distillation method distills through an assistant
    StageNode("assistant", needs=("teacher",), reads=("teacher",), default=False, trains=True),
    StageNode("distill", needs=("teacher",), reads=("teacher", "assistant"), trains=True),
    StageNode("prune", needs=("distill",), reads=("teacher", "distill"), trains=True),
    StageNode("quantize", needs=("distill",), reads=("teacher", "distill", "prune"), version=8, trains=True),
    StageNode("export", needs=("distill",), reads=("teacher", "distill", "prune", "quantize"), version=9),
    StageNode("bench", needs=("export",), reads=("export",), version=6),
)
NODES: dict[str, StageNode] = {n.name: n for n in GRAPH}
ORDER: tuple[str, ...] = tuple(NODES)
DEFAULT_STAGES: tuple[str, ...] = tuple(n.name for n in GRAPH if n.default)


def check_stages(stages: list[str]) -> None:
    """Raise ValueError unless ``stages`` are known, in graph order, each with what it needs, and at
    least one (a run of no stage would do nothing)."""
    if not stages:
        raise ValueError(f"no stage to run; name at least one of {', '.join(ORDER)}")
    unknown = [s for s in stages if s not in NODES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are {', '.join(ORDER)}")
    if stages != [s for s in ORDER if s in stages]:
        raise ValueError(f"stages must keep the order {' -> '.join(ORDER)}")
    for s in stages:
        for need in NODES[s].needs:
            if need not in stages:
                raise ValueError(f"stage {s!r} needs stage {need!r} before it")
