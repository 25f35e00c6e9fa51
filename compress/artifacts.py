"""The one table of what a run ships: each ONNX file's role, the stage whose model it holds, its file
name, its label in reports and its precision. Export writes these files, bench measures them and the
report lists them; nothing decides what a file is from its name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Artifact:
    role: str
    stage: str  # the stage whose checkpoint the file is made from
    file: str
    label: str
    precision: Literal["fp32", "int8"]
    # how the file is made: "fp32" exports the stage's float model, "qat" the stage's fake-quant model
    # to an int8 QDQ file, "ptq" quantizes the student's FP32 file with onnxruntime (no PyTorch twin)
    made_by: Literal["fp32", "qat", "ptq"]

    @property
    def has_torch_twin(self) -> bool:
        return self.made_by != "ptq"


TABLE: tuple[Artifact, ...] = (
    Artifact("teacher", "teacher", "teacher_fp32.onnx", "teacher", "fp32", "fp32"),
    Artifact("student", "distill", "model_fp32.onnx", "student FP32", "fp32", "fp32"),
    Artifact("student_pruned", "prune", "model_pruned_fp32.onnx", "student pruned FP32", "fp32", "fp32"),
    Artifact("student_int8", "quantize", "model_int8.onnx", "student INT8 (QAT)", "int8", "qat"),
    Artifact("student_int8_ptq", "quantize", "model_int8_ptq.onnx", "student INT8 (PTQ)", "int8", "ptq"),
)
ARTIFACTS: dict[str, Artifact] = {a.role: a for a in TABLE}


def student_stage(stages: list[str]) -> str:
    """The stage whose FP32 student quantization starts from: the pruned one when pruning runs."""
    return "prune" if "prune" in stages else "distill"


def architecture_stage(artifact: Artifact, stages: list[str]) -> str:
    """The stage whose float model has this file's architecture: a quantized file keeps the
    architecture of the student it was made from."""
    return student_stage(stages) if artifact.precision == "int8" else artifact.stage


def fp32_student(stages: list[str]) -> Artifact:
    """The FP32 file that onnxruntime's PTQ quantizes: the pruned student when pruning runs."""
    return next(a for a in TABLE if a.stage == student_stage(stages) and a.made_by == "fp32")


def for_run(stages: list[str], ptq_baseline: bool) -> list[Artifact]:
    """The files a run with these stages ships, in report order: one per stage of the table that
    runs, the PTQ baseline only when asked for."""
    return [a for a in TABLE if a.stage in stages and (a.made_by != "ptq" or ptq_baseline)]
