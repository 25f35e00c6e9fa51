"""The typed recipe: one pydantic model per stage; unknown keys and out-of-range values are rejected
with a message that names the field."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.data import DataConfig
from compress.distill.methods import METHODS, validate_params
from compress.edge_formats import FORMATS as EDGE_FORMATS
from compress.errors import CompressError, ConfigError
from compress.graph import DEFAULT_STAGES, check_stages
from compress.models import resolve_name
from compress.train import TrainConfig

__all__ = ["DataConfig", "TrainConfig", "PipelineConfig", "load_recipe", "validate_recipe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _model_name(v: str) -> str:
    try:
        resolve_name(v)
    except CompressError as e:
        raise ValueError(str(e)) from None
    return v


def _pretrained(v: Any) -> bool | str:
    """``true`` (the model's published weights), ``false``, or the path of a local weights file."""
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    if v is None:
        return False
    if not isinstance(v, (bool, str)) or (isinstance(v, str) and not v.strip()):
        raise ValueError("give true, false or the path of a weights file (.safetensors or a torch file)")
    return v


PRETRAINED_HELP = ("true: the model's published weights (needs the network); PATH: a local .safetensors or torch "
                   "file; the classifier is made anew for the dataset's classes")


class TeacherConfig(TrainConfig):
    """The teacher: loaded from ``checkpoint``, started from ``pretrained`` weights (the model's
    published ones, or a local file) and fine-tuned for ``epochs``, or trained from scratch on the
    dataset. A trained teacher is cached across runs."""

    model: str = "resnet18"
    checkpoint: str | None = None
    pretrained: bool | str = Field(False, description=PRETRAINED_HELP)

    _model = field_validator("model")(_model_name)
    _pretrained = field_validator("pretrained", mode="before")(lambda cls, v: _pretrained(v))

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherConfig":
        if self.checkpoint and self.pretrained:
            raise ValueError("checkpoint and pretrained exclude each other; choose one")
        return self


class DistillConfig(TrainConfig):
    """The student and the distillation method (a name from ``compress methods``). ``alpha`` and
    ``temperature`` are those of equation (1), used by the methods built on it (kd, multi_teacher, ta);
    ``params`` holds the chosen method's own settings."""

    student: str = "mobilenet"
    pretrained: bool | str = Field(False, description="the student's starting weights; " + PRETRAINED_HELP)
    assistant_pretrained: bool | str = Field(False, description="the assistant's (method ta) starting weights; "
                                             + PRETRAINED_HELP)
    method: str = "kd"
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the distillation term of eq. (1)")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    params: dict[str, Any] = Field({}, description="the method's own settings; see compress methods")
    teacher_cache: bool = Field(True, description="store the teacher's logits of every training batch once "
                                "(float16, in <artifacts>/.cache/teacher_logits/) and read them in every later "
                                "run with the same teacher, data, seed and batch plan (the KD fine-tuning of "
                                "prune and quantize too); methods that need the teacher's features or have no "
                                "teacher never use it")
    teacher_cache_topk: int | None = Field(None, ge=1, description="store only the k largest logits of each "
                                           "image; the others are read back as their mean")

    _student = field_validator("student")(_model_name)
    _pretrained = field_validator("pretrained", "assistant_pretrained", mode="before")(lambda cls, v: _pretrained(v))

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown distillation method {v!r}; valid: {', '.join(METHODS)}")
        return v

    @model_validator(mode="after")
    def _method_params(self) -> "DistillConfig":
        validate_params(self.method, self.params)
        return self

    def method_params(self):
        return validate_params(self.method, self.params)


class PruneConfig(TrainConfig):
    """Structured pruning of the distilled student: whole channels removed in ``iterative_steps`` steps,
    each followed by ``epochs`` of distillation fine-tuning from the pipeline's teacher. The target is a
    MACs budget (``macs_target``: the fraction of the student's MACs to keep) or a channel ratio
    (``channel_ratio``: the fraction of channels to remove), not both."""

    epochs: int = Field(3, ge=0, le=10_000, description="fine-tuning epochs after each pruning step")
    final_epochs: int = Field(10, ge=0, le=10_000, description="extra fine-tuning epochs after the last step")
    lr: float = Field(0.01, gt=0.0, le=10.0)
    warmup_epochs: int = Field(0, ge=0)
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    macs_target: float | None = Field(0.5, gt=0.0, lt=1.0)
    channel_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    global_pruning: bool = False
    iterative_steps: int = Field(3, ge=1, le=100)
    round_to: int | None = Field(8, ge=1, le=256, description="channel counts rounded to a multiple of this")
    max_layer_ratio: float = Field(0.9, gt=0.0, lt=1.0, description="no layer loses more than this share")
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0, le=100.0)

    EPOCH_SETTINGS: ClassVar[tuple[str, ...]] = ("warmup_epochs", "final_epochs")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneConfig":
        if (self.macs_target is None) == (self.channel_ratio is None):
            raise ValueError("set exactly one of macs_target and channel_ratio (the other to null)")
        return self


class QuantizeConfig(TrainConfig):
    """Quantization-aware training of the distilled student (int8 weights per channel, uint8
    activations per tensor, BatchNorm folded), fine-tuned with the distillation loss against the FP32
    teacher unless ``distill: false``."""

    epochs: int = Field(6, ge=0, le=10_000)
    lr: float = Field(0.004, gt=0.0, le=10.0)
    warmup_epochs: int = Field(0, ge=0)
    calibration_images: int = Field(1024, ge=1, description="training images that set the activation ranges")
    freeze_observers_after: int = Field(3, ge=0, description="epochs after which activation ranges stay fixed")
    freeze_bn_after: int = Field(4, ge=0, description="epochs after which BatchNorm statistics stay fixed")
    distill: bool = Field(True, description="keep the distillation loss against the FP32 teacher")
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    weight_bits: Literal["auto", 7, 8] = Field(
        "auto", description="weights in ±127 (8) or ±63 (7); auto: 8 where onnxruntime computes int8 convolutions "
        "exactly on this machine, 7 on an x86 CPU without VNNI (its AVX2 kernels saturate 8-bit products)")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "ptq_baseline" in raw:  # read by export and bench, not by QAT
            raise ValueError("ptq_baseline is set in the export section now (export.ptq_baseline); move it there")
        return raw

    def resolved_weight_bits(self) -> int:
        from compress.qat import host_weight_bits

        return host_weight_bits() if self.weight_bits == "auto" else int(self.weight_bits)
    EPOCH_SETTINGS: ClassVar[tuple[str, ...]] = ("warmup_epochs", "freeze_observers_after", "freeze_bn_after")

    float_stem: bool = Field(True, description="keep the first convolution float when its activation is one an int8 "
                             "convolution cannot fold (hard-swish, SiLU...): quantization starts after them (faster "
                             "with onnxruntime on CPU, measured by benchmarks/int8_latency.py)")


class ExportConfig(_Strict):
    """The ONNX files and their gates; ``edge_formats``: what edge apps load, made from each student
    file and checked against it (``ort``: onnxruntime's ORT format, bitwise identical logits, and
    onnxruntime's mobile usability verdict; ``openvino``: OpenVINO IR, when the package is installed,
    FP32 files agreeing with their ONNX file as often as ``min_argmax_agreement`` asks, INT8 files as
    ``openvino_int8_min_argmax_agreement`` asks and as accurate within chance)."""

    opset: int = Field(18, ge=17, le=23)
    ptq_baseline: bool = Field(True, description="also quantize the FP32 ONNX file with onnxruntime's "
                               "quantize_static and ship it beside the QAT file (with the quantize stage)")
    ptq_calibration_images: int = Field(1024, ge=1, description="training images that set the PTQ file's "
                                        "activation ranges")
    max_abs_logit_diff: float = Field(1e-4, gt=0.0, le=1.0, description="FP32 parity: absolute part of the tolerance")
    logit_rtol: float = Field(1e-5, ge=0.0, le=0.1, description="FP32 parity: relative part, times each image's "
                              "largest |logit| (float32 error grows with the logits)")
    float64_factor: float | None = Field(8.0, ge=1.0, le=1e6, description="FP32 parity: the relative part is at "
                                         "least this many times PyTorch's own float32 error against a float64 run "
                                         "of the model on the test split, and a top class that flips between two "
                                         "logits tied within the tolerance counts as agreeing; null: the fixed "
                                         "tolerance alone")
    min_argmax_agreement: float = Field(1.0, gt=0.0, le=1.0, description="FP32 ONNX against PyTorch, and FP32 "
                                        "OpenVINO IR against its ONNX file")
    int8_min_argmax_agreement: float = Field(0.995, gt=0.0, le=1.0,
                                             description="INT8 ONNX against the PyTorch fake-quant model")
    openvino_int8_min_argmax_agreement: float = Field(
        0.9, gt=0.0, le=1.0, description="INT8 OpenVINO IR against its ONNX file: a floor. OpenVINO's int8 "
        "arithmetic is not onnxruntime's (it fuses a residual addition into the convolution before "
        "rounding, where onnxruntime rounds each to int8 first), so images whose top two classes lie close "
        "flip; the IR must also be as accurate as the ONNX file on the split's labels within chance "
        "(McNemar's test, two standard deviations)")
    edge_formats: list[str] = Field(list(EDGE_FORMATS), description="edge formats of the student files: "
                                    + ", ".join(EDGE_FORMATS) + " ([] for ONNX only)")

    @field_validator("edge_formats", mode="before")
    @classmethod
    def _one_format(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else [] if v is None else v

    @field_validator("edge_formats")
    @classmethod
    def _edge_formats(cls, v: list[str]) -> list[str]:
        return _known_once(v, EDGE_FORMATS, "edge format")


class BenchConfig(_Strict):
    warmup: int = Field(10, ge=0, le=10_000)
    runs: int = Field(100, ge=1, le=100_000)
    image_sizes: list[int] | None = Field(None, description="default: the training size and 224")
    threads: list[int] = Field([1, 0], description="intra-op threads per setting; 0 = all cores")

    @field_validator("image_sizes")
    @classmethod
    def _sizes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 8 or s > 2048 for s in v)):
            raise ValueError("must be a non-empty list of sizes between 8 and 2048")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int]) -> list[int]:
        if not v or any(t < 0 or t > 1024 for t in v):
            raise ValueError("must be a non-empty list of thread counts >= 0 (0 = all cores)")
        return v


def _method_list(v: list[str]) -> list[str]:
    """Distillation method names, each known and listed once."""
    return _known_once(v, METHODS, "distillation method", "each method may appear once")


def _known_once(v: list[str], valid, what: str, twice: str | None = None) -> list[str]:
    """``v`` unchanged when each name is one of ``valid`` and listed once."""
    for name in v:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    if len(set(v)) != len(v):
        raise ValueError(twice or f"each {what} may appear once")
    return v


class CompareConfig(_Strict):
    """``compress compare``: the same student trained with each of ``methods`` on the same data and
    budget (the recipe's teacher and distill sections), one run per method."""

    methods: list[str] = Field(..., min_length=1)
    params: dict[str, dict[str, Any]] = Field({}, description="per method: its distill.params")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        return _method_list(v)

    @model_validator(mode="after")
    def _params(self) -> "CompareConfig":
        for m, p in self.params.items():
            if m not in self.methods:
                raise ValueError(f"params.{m}: not one of the compared methods")
            validate_params(m, p)
        return self


class SweepConfig(_Strict):
    """``compress sweep``: one teacher, many students, each trained with every method of ``series`` on
    the same budget (the recipe's distill section); FP32 and INT8 (onnxruntime PTQ) latency per student."""

    students: list[str] = Field([], description="default: every student in the registry")
    series: list[str] = Field(["kd", "scratch"], min_length=1, description="distillation methods to compare")
    latency_size: int = Field(224, ge=8, le=2048, description="input size the latency is measured at")
    latency_runs: int = Field(30, ge=1, le=100_000)
    threads: int = Field(1, ge=1, le=1024)

    @field_validator("students")
    @classmethod
    def _students(cls, v: list[str]) -> list[str]:
        out = [resolve_name(_model_name(n)) for n in v]
        if len(set(out)) != len(out):
            raise ValueError("each student may appear once")
        return out

    @field_validator("series")
    @classmethod
    def _series(cls, v: list[str]) -> list[str]:
        for m in _method_list(v):
            if METHODS[m].uses_assistant or METHODS[m].teachers == "many":
                raise ValueError(f"{m!r} needs extra models per student; a sweep series takes one teacher or none")
        return v


class SearchRange(_Strict):
    """One setting's range for tuning: numbers from ``low`` to ``high`` (``log``: on a log scale;
    ``integer``: whole numbers), or one of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[float | int | str | bool] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchRange":
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either choices (a non-empty list) or low and high")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high, or choices")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


TUNE_SECTIONS = {"teacher": ("teacher", "data"), "distill": ("distill",)}

DEFAULT_SPACES: dict[str, dict[str, dict]] = {
    "teacher": {"teacher.lr": {"low": 0.01, "high": 0.3, "log": True},
                "data.scale": {"low": 0.08, "high": 1.0},
                "data.color_jitter": {"low": 0.0, "high": 0.4}},
    "distill": {"distill.lr": {"low": 0.01, "high": 0.3, "log": True},
                "distill.alpha": {"low": 0.1, "high": 0.95},
                "distill.temperature": {"low": 1.0, "high": 8.0}},
}


class TuneConfig(_Strict):
    """Search for the settings that matter on the validation split (Optuna), before the pipeline
    runs: first the teacher's (and the training augmentation's, which the student shares), then the
    student's with the chosen teacher. Each trial trains its stage with the trial's settings and
    scores the weights it keeps on the validation split; the test split is withheld. The best
    settings are then the recipe's for the pipeline."""

    enabled: bool = Field(False, description="tune before every pipeline run (also: compress pipeline --tune, "
                                             "or compress tune RECIPE alone)")
    stages: list[Literal["teacher", "distill"]] = Field(["teacher", "distill"], min_length=1,
                                                        description="the studies, in this order")
    space: dict[str, dict[str, SearchRange]] = Field(
        {}, description="per study (teacher, distill): recipe key -> range; default: DEFAULT_SPACES "
                        "(learning rate, crop area, colour jitter; learning rate, alpha, temperature)")
    trials: int | None = Field(12, ge=1, le=100_000, description="trials per study (with minutes: what comes first)")
    minutes: float | None = Field(None, gt=0, description="time budget per study, in minutes")
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["successive_halving", "hyperband", "none"] = Field(
        "successive_halving", description="stops weak trials at the epochs where the others are compared")
    startup_trials: int = Field(4, ge=0, le=1000, description="random trials before TPE models the results")
    storage: str | None = Field(None, description="Optuna RDB storage URL; default SQLite under "
                                                  "<artifacts>/<run>/tune/study.db. A PostgreSQL or MySQL URL "
                                                  "lets several machines share one study")

    @model_validator(mode="after")
    def _budget(self) -> "TuneConfig":
        if self.trials is None and self.minutes is None:
            raise ValueError("set trials, minutes or both")
        for study, space in self.space.items():
            if study not in TUNE_SECTIONS:
                raise ValueError(f"space.{study}: studies are {', '.join(TUNE_SECTIONS)}")
            for key in space:
                if key.split(".", 1)[0] not in TUNE_SECTIONS[study] or "." not in key:
                    raise ValueError(f"space.{study}.{key}: a {study} study tunes keys of "
                                     f"{' and '.join(TUNE_SECTIONS[study])} (section.key)")
        return self

    def space_of(self, study: str) -> dict[str, SearchRange]:
        return self.space.get(study) or {k: SearchRange(**v) for k, v in DEFAULT_SPACES[study].items()}


class ComputeConfig(_Strict):
    """How training uses the hardware; none of it changes what a one-process CPU run computes, so
    these settings enter a stage's fingerprint only where they take effect (several processes under
    torchrun, or a GPU)."""

    sync_bn: bool | Literal["auto"] = Field("auto", description="SyncBatchNorm across the processes of a "
                                            "torchrun run on GPUs (torch has it for CUDA only): batch "
                                            "statistics over the global batch; auto: when the per-process "
                                            "batch is below sync_bn_below")
    sync_bn_below: int = Field(32, ge=1, le=1_000_000, description="per-process batch under which auto "
                                                                   "turns SyncBatchNorm on")
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="autocast on CUDA (fp16 with a gradient scaler); auto: bf16 where the GPU has "
                            "it, else fp16; CPU always trains in float32")
    channels_last: bool | Literal["auto"] = Field("auto", description="NHWC memory format for training; auto: on "
                                                                  "CUDA only (on CPU it wins or loses by model and "
                                                                  "size: benchmarks/memory_format.py)")


class PipelineConfig(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    stages: list[str] = Field(list(DEFAULT_STAGES))
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()
    compute: ComputeConfig = ComputeConfig()
    tune: TuneConfig = TuneConfig()
    compare: CompareConfig | None = Field(None, description="used by compress compare only")
    sweep: SweepConfig | None = Field(None, description="used by compress sweep only")

    @model_validator(mode="before")
    @classmethod
    def _add_assistant(cls, raw: Any) -> Any:
        """A method that distills through an assistant gets the assistant stage before distill."""
        if not isinstance(raw, dict):
            return raw
        stages = raw.get("stages", list(DEFAULT_STAGES))
        distill = raw.get("distill")
        method = distill.get("method", "kd") if isinstance(distill, dict) else getattr(distill, "method", "kd")
        if (isinstance(stages, list) and "distill" in stages and "assistant" not in stages
                and method in METHODS and METHODS[method].uses_assistant):
            i = stages.index("distill")
            raw = {**raw, "stages": stages[:i] + ["assistant"] + stages[i:]}
        return raw

    @model_validator(mode="after")
    def _assistant_needs_method(self) -> "PipelineConfig":
        if "assistant" in self.stages and not METHODS[self.distill.method].uses_assistant:
            raise ValueError(f"stage 'assistant' runs only for a method with an assistant (ta), "
                             f"not {self.distill.method!r}")
        return self

    def training_section(self, stage: str) -> TrainConfig:
        """The section whose training settings ``stage`` trains with (the assistant: distill's)."""
        return self.distill if stage == "assistant" else getattr(self, stage)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str]) -> list[str]:
        check_stages(v)
        return v


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "recipe"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``distill.alpha=0.5`` -> (["distill", "alpha"], 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for p in path[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a UTF-8 text file; give a YAML recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_recipe(raw, str(path))
    for line in unused_settings(cfg):
        logging.getLogger(__name__).warning(line)
    return cfg


def unused_settings(cfg: PipelineConfig) -> list[str]:
    """What the recipe sets that the run does not use: eq. (1)'s ``distill.alpha`` / ``temperature``
    under a method that does not compute with them (its own, if it has them, are in ``params``)."""
    if "distill" not in cfg.stages:
        return []
    kind = METHODS[cfg.distill.method]
    ignored = [k for k in ("alpha", "temperature") if k in cfg.distill.model_fields_set and k not in kind.reads]
    if not ignored:
        return []
    own = [f"distill.params.{k}" for k in ignored if k in kind.Params.model_fields]
    return [f"{' and '.join('distill.' + k for k in ignored)} not used: method {kind.name} does not compute with "
            f"{'it' if len(ignored) == 1 else 'them'}" + (f" (it reads {' and '.join(own)})" if own else "")]


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
