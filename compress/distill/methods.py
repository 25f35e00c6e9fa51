"""Distillation methods, registered by name: each is an ``Objective`` that scores one batch, holds what
it trains besides the student (regressors, peers) and says which teachers it needs. The formulas live
in ``compress.distill.losses``; here they are wired to models through feature taps (forward hooks), so
the student is never edited and the exported student carries none of a method's adapters."""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from compress.distill import losses as L
from compress.distill.cache import TeacherLogitCache
from compress.distill.taps import EMBEDDING, Taps, feature_points, match_points, probe
from compress.errors import CompressError
from compress.train import Objective as TrainingObjective


class Params(BaseModel):
    """A method's own settings (``distill.params`` in a recipe); unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


def _model_name(v: str) -> str:
    from compress.models import resolve_name

    try:
        return resolve_name(v)
    except CompressError as e:
        raise ValueError(str(e)) from None


class Objective(TrainingObjective):
    """How a method scores a batch: ``forward(student, x, y) -> (loss, student_logits)``.

    Teachers are kept outside the module's parameters (frozen, never saved in its state); what the
    method trains besides the student (adapters, peers) is registered on it, so the training loop
    optimizes and checkpoints it with the student."""

    name: ClassVar[str] = ""
    teachers: ClassVar[Literal["none", "one", "many"]] = "one"
    uses_assistant: ClassVar[bool] = False
    #: whether the teachers' logits are all the method needs of them (no feature taps, teachers frozen):
    #: only such methods may read the teachers' outputs from a :class:`TeacherLogitCache`
    logit_only: ClassVar[bool] = False
    #: which of the distill section's ``alpha`` and ``temperature`` (eq. 1) the method computes with;
    #: the others are not used by it (a method may have its own in ``params``)
    reads: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | None = None, alpha: float = 0.9, temperature: float = 4.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.p = params if params is not None else type(self).Params()
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self._teachers: list[nn.Module] = []
        self._taps: list[Taps] = []
        self._caches: list[TeacherLogitCache] = []
        self.ramp = 1.0  # weight of the knowledge term, ramped up over params.warmup_epochs when a method has it

    def in_effect(self) -> dict[str, float]:
        """The α and temperature this method computes with, by the recipe key each comes from:
        ``distill.alpha`` / ``distill.temperature`` where it reads them, its own ``params`` otherwise."""
        out = {f"distill.{k}": float(getattr(self, k)) for k in type(self).reads}
        for k in ("alpha", "temperature"):
            if k not in type(self).reads and k in type(self.p).model_fields:
                out[f"distill.params.{k}"] = float(getattr(self.p, k))
        return out

    @property
    def needs_teacher(self) -> bool:
        return type(self).teachers != "none"

    def frozen_models(self) -> list[nn.Module]:
        return self._teachers

    def bind(self, student: nn.Module, teachers: list[nn.Module], *, image_size: int,
             train_ds=None, make_model: Callable[[str, int], nn.Module] | None = None,
             student_name: str | None = None) -> "Objective":
        """Attach to the student and its teachers (frozen here) before training."""
        if self.needs_teacher and not teachers:
            raise CompressError(f"distillation method {self.name!r} needs a teacher and none was given")
        self._teachers = list(teachers)
        for t in self._teachers:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)
        self.setup(student, image_size=image_size, train_ds=train_ds, make_model=make_model,
                   student_name=student_name)
        return self

    def setup(self, student: nn.Module, **kwargs) -> None:
        """Build taps and adapters; the default method needs none."""

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the training loop at the start of each epoch (0-based): ramps the knowledge term
        linearly from 1/w to 1 over the first w = ``params.warmup_epochs`` epochs."""
        w = getattr(self.p, "warmup_epochs", 0)
        self.ramp = 1.0 if w == 0 else min(1.0, (epoch + 1) / w)
        for cache in self._caches:
            cache.start_epoch(epoch)

    def use_teacher_cache(self, caches: list[TeacherLogitCache]) -> None:
        """Answer ``teacher_logits(x, i)`` through ``caches[i]`` (one per teacher) from now on."""
        if not self.logit_only:
            raise ValueError(f"method {self.name!r} needs more of its teachers than their logits")
        if len(caches) != len(self._teachers):
            raise ValueError(f"{len(caches)} teacher caches for {len(self._teachers)} teachers")
        self._caches = list(caches)

    def candidates(self) -> list[nn.Module]:
        """Models trained beside the student that may replace it afterwards (mutual learning's peers)."""
        return []

    def release(self) -> None:
        """Remove every hook this method put on the student and teachers; store what the teacher
        caches computed of the current epoch (all of it, or as far as an interrupted one got)."""
        for t in self._taps:
            t.remove()
        self._taps.clear()
        for cache in self._caches:
            cache.flush()

    def teacher_logits(self, x: torch.Tensor, index: int = 0) -> torch.Tensor:
        with torch.no_grad():
            if self._caches:
                return self._caches[index].logits(x, self._teachers[index])
            return self._teachers[index](x)

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


METHODS: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    METHODS[cls.name] = cls
    return cls


def summary(cls: type[Objective]) -> str:
    return (cls.__doc__ or "").strip().splitlines()[0]


def build_method(name: str, params: dict | None = None, **kwargs) -> Objective:
    if name not in METHODS:
        raise CompressError(f"unknown distillation method {name!r}; valid: {', '.join(METHODS)}")
    cls = METHODS[name]
    return cls(validate_params(name, params or {}), **kwargs)


def validate_params(name: str, params: dict) -> Params:
    """``distill.params`` checked against the method's own settings; raises ValueError naming the key."""
    from pydantic import ValidationError

    try:
        return METHODS[name].Params.model_validate(params)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ValueError(f"params.{loc}: {msg} (method {name})") from None


# -- output knowledge ---------------------------------------------------------------------------


@register
class Scratch(Objective):
    """From scratch: cross-entropy on the labels only, no teacher (the baseline every method is compared with).

    L = CE(y, s)."""

    name = "scratch"
    teachers = "none"

    def forward(self, student, x, y):
        s = student(x)
        return L.ce(s, y, self.label_smoothing), s


class LogitParams(Params):
    standardize: bool = Field(False, description="logit standardization: z-score the logits of teacher and "
                                                 "student before the softmax (Sun et al., CVPR 2024)")


@register
class KD(Objective):
    """Hinton KD: the teacher's soft targets at temperature T blended with the labels (eq. 1 of the review).

    L = (1 − α)·CE(y, s) + α·T²·KL(σ(t/T) ‖ σ(s/T)); Hinton, Vinyals and Dean, "Distilling the
    Knowledge in a Neural Network", 2015. α and T are ``distill.alpha`` and ``distill.temperature``."""

    name = "kd"
    reads = ("alpha", "temperature")
    logit_only = True
    Params = LogitParams

    def forward(self, student, x, y):
        s = student(x)
        return L.kd_loss(s, y, self.teacher_logits(x), self.alpha, self.temperature, self.label_smoothing,
                         self.p.standardize), s


@register
class Consistent(Objective):
    """Consistent teaching: teacher and student see the very same augmented, mixed view; distillation loss only (Beyer et al., CVPR 2022).

    L = T²·KL(σ(t/T) ‖ σ(s/T)) on each training batch as the student sees it (random-resized crops,
    flips, mixup/cutmix from the stage's ``mixup``/``cutmix``), no label term: the student matches the
    teacher's function on points between and around the images, which pays off with a long schedule
    ("A good teacher is patient and consistent"). ``distill.alpha`` is not used."""

    name = "consistent"
    reads = ("temperature",)
    logit_only = True
    Params = LogitParams

    def forward(self, student, x, y):
        s = student(x)
        return L.kd_term(s, self.teacher_logits(x), self.temperature, self.p.standardize), s


class DKDParams(LogitParams):
    alpha: float = Field(1.0, ge=0.0, le=100.0, description="weight of the target-class term TCKD")
    beta: float = Field(8.0, ge=0.0, le=100.0, description="weight of the non-target-class term NCKD")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    warmup_epochs: int = Field(20, ge=0, le=10_000, description="the KD terms ramp up linearly over these epochs "
                               "(20 in the authors' code)")


@register
class DKD(Objective):
    """Decoupled KD: target-class and non-target-class knowledge weighted separately (Zhao et al., CVPR 2022).

    L = CE(y, s) + w·T²·(α·TCKD + β·NCKD), TCKD = KL(b^t ‖ b^s) over the binary [p_y, 1 − p_y],
    NCKD = KL(p̂^t ‖ p̂^s) over the softmax of the non-target classes; w ramps linearly from 1/W to 1
    over the first W = ``warmup_epochs`` epochs. Defaults α = 1, β = 8, T = 4 and a 20-epoch warm-up as in the paper's CIFAR setting
    (its ImageNet setting: α = β = 0.5, T = 1)."""

    name = "dkd"
    logit_only = True
    Params = DKDParams
    soft_targets = False

    def forward(self, student, x, y):
        s = student(x)
        t = self.teacher_logits(x)
        s_kd, t_kd = (L.standardize(s), L.standardize(t)) if self.p.standardize else (s, t)
        tckd, nckd = L.dkd_terms(s_kd, y, t_kd, self.p.temperature)
        kd = self.p.temperature ** 2 * (self.p.alpha * tckd + self.p.beta * nckd)
        return F.cross_entropy(s, y) + self.ramp * kd, s


class MultiTeacherParams(LogitParams):
    teachers: list[str] = Field(["resnet34"], min_length=1,
                                description="teachers besides the pipeline's teacher (trained and cached like it)")
    weights: list[float] | None = Field(None, description="one weight per teacher, the pipeline's first; default equal")

    _names = field_validator("teachers")(lambda cls, v: [_model_name(n) for n in v])

    @model_validator(mode="after")
    def _weights(self) -> "MultiTeacherParams":
        if self.weights is not None:
            if len(self.weights) != len(self.teachers) + 1:
                raise ValueError(f"weights needs {len(self.teachers) + 1} values: the pipeline's teacher, then "
                                 f"each of {self.teachers}")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return self


@register
class MultiTeacher(Objective):
    """Multi-teacher KD: the soft targets of several teachers averaged with weights (You et al., KDD 2017).

    L = (1 − α)·CE(y, s) + α·T²·KL(Σ_k w_k σ(t_k/T) ‖ σ(s/T)), Σ_k w_k = 1 (equal unless
    ``params.weights`` says otherwise); the teachers are the pipeline's plus ``params.teachers``."""

    name = "multi_teacher"
    reads = ("alpha", "temperature")
    logit_only = True
    teachers = "many"
    Params = MultiTeacherParams

    def weights(self) -> list[float]:
        n = len(self._teachers)
        w = self.p.weights or [1.0] * n
        if len(w) != n:
            raise CompressError(f"multi_teacher: {len(w)} weights for {n} teachers")
        return [v / sum(w) for v in w]

    def forward(self, student, x, y):
        s = student(x)
        ts = [self.teacher_logits(x, i) for i in range(len(self._teachers))]
        return L.multi_teacher_kd_loss(s, y, ts, self.weights(), self.alpha, self.temperature, self.p.standardize), s


class TAParams(LogitParams):
    assistant: str = Field("mobilenetv2_100", description="any registry model, between teacher and student in size")

    _name = field_validator("assistant")(lambda cls, v: _model_name(v))


@register
class TeacherAssistant(Objective):
    """Teacher assistant: teacher → assistant → student, each step Hinton KD (Mirzadeh et al., AAAI 2020).

    The ``assistant`` stage distills the assistant from the teacher; this stage then distills the
    student from the assistant: L = (1 − α)·CE(y, s) + α·T²·KL(σ(a/T) ‖ σ(s/T)), a the assistant's logits."""

    name = "ta"
    reads = ("alpha", "temperature")
    logit_only = True
    uses_assistant = True
    Params = TAParams

    def forward(self, student, x, y):
        s = student(x)
        return L.kd_loss(s, y, self.teacher_logits(x), self.alpha, self.temperature, self.label_smoothing,
                         self.p.standardize), s


# -- intermediate-feature knowledge --------------------------------------------------------------


def _layer_pair(spec: str) -> tuple[str, str]:
    if spec == "auto":
        return ("", "")
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError("must be 'auto' or 'teacher_layer:student_layer', e.g. layer2:blocks.2")
    t, s = spec.split(":")
    return t, s


class FitNetsParams(Params):
    beta: float = Field(100.0, ge=0.0, le=1e6, description="weight of the hint term")
    layer: str = Field("auto", description="'auto' (the middle stage both share) or 'teacher_layer:student_layer'")

    _layer = field_validator("layer")(lambda cls, v: (_layer_pair(v), v)[1])


class ConvRegressor(nn.Sequential):
    """1×1 convolution and BatchNorm from the student's channels to the teacher's (training only)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))


def _pairs(student: nn.Module, teacher: nn.Module, image_size: int, spec: str = "auto") -> list[tuple[str, str, int, int]]:
    """(teacher layer, student layer, teacher channels, student channels) of the stages to distill."""
    if spec == "auto":
        tp, sp = feature_points(teacher, image_size), feature_points(student, image_size)
        return [(t.name, s.name, t.channels, s.channels) for t, s in match_points(tp, sp)]
    t_name, s_name = _layer_pair(spec)
    channels = []
    for model, n, side in ((teacher, t_name, "teacher"), (student, s_name, "student")):
        shape = probe(model, [n], image_size).get(n)
        if shape is None or len(shape) != 4:
            raise CompressError(f"{side} layer {n!r} does not output a feature map")
        channels.append(shape[1])
    return [(t_name, s_name, *channels)]


@register
class FitNets(Objective):
    """FitNets hints: a learned regressor maps a middle student feature onto the teacher's (Romero et al., ICLR 2015).

    L = CE(y, s) + β·mean((r(F_s) − F_t)²), r a 1×1 convolution with BatchNorm from the student's
    channels to the teacher's (trained with the student, dropped afterwards); maps of different size
    are average-pooled to the smaller. β = 100 by default."""

    name = "fitnets"
    Params = FitNetsParams

    def setup(self, student, *, image_size, **_):
        pairs = _pairs(student, self._teachers[0], image_size, self.p.layer)
        self.t_layer, self.s_layer, ct, cs = pairs[len(pairs) // 2] if self.p.layer == "auto" else pairs[0]
        self.regressor = ConvRegressor(cs, ct).to(next(student.parameters()).device)
        self._taps = [Taps(student, [self.s_layer]), Taps(self._teachers[0], [self.t_layer])]

    def forward(self, student, x, y):
        s = student(x)
        self.teacher_logits(x)
        fs, ft = self._taps[0][self.s_layer], self._taps[1][self.t_layer]
        a, ft = L.match_spatial(self.regressor(fs), ft)
        return F.cross_entropy(s, y) + self.p.beta * L.hint_loss(a, ft), s


class ATParams(Params):
    beta: float = Field(1000.0, ge=0.0, le=1e7, description="weight β; the term is β/2·Σ_j mean((Q_s − Q_t)²)")
    p: float = Field(2.0, gt=0.0, le=8.0, description="power of the activation in the attention map")


@register
class AttentionTransfer(Objective):
    """Attention transfer: match the spatial attention maps of every shared stage (Zagoruyko and Komodakis, ICLR 2017).

    L = CE(y, s) + β/2·Σ_j mean((Q_s^j − Q_t^j)²), Q = normalize(mean_c |F_c|^p) per image, over the
    stages of equal stride (stem left out). β = 1000, p = 2 as in the paper. No adapter is needed."""

    name = "at"
    Params = ATParams

    def setup(self, student, *, image_size, **_):
        self.pairs = _pairs(student, self._teachers[0], image_size)
        self._taps = [Taps(student, [p[1] for p in self.pairs]), Taps(self._teachers[0], [p[0] for p in self.pairs])]

    def forward(self, student, x, y):
        s = student(x)
        self.teacher_logits(x)
        fs = [self._taps[0][p[1]] for p in self.pairs]
        ft = [self._taps[1][p[0]] for p in self.pairs]
        return F.cross_entropy(s, y) + self.p.beta / 2 * L.at_loss(fs, ft, self.p.p), s


# -- relational knowledge ------------------------------------------------------------------------


class RKDParams(Params):
    distance_weight: float = Field(25.0, ge=0.0, le=1e6)
    angle_weight: float = Field(50.0, ge=0.0, le=1e6)


@register
class RKD(Objective):
    """Relational KD: distances and angles between the batch's embeddings (Park et al., CVPR 2019).

    L = CE(y, s) + λ_D·Huber(ψ_D(t), ψ_D(s)) + λ_A·Huber(ψ_A(t), ψ_A(s)) on the penultimate
    embeddings (the classifier's input); ψ_D = pairwise distance / its batch mean, ψ_A = cosine of
    the angle at each middle point of a triplet. λ_D = 25, λ_A = 50 as in the paper."""

    name = "rkd"
    Params = RKDParams

    def setup(self, student, **_):
        self._taps = [Taps(student, [], embedding=True), Taps(self._teachers[0], [], embedding=True)]

    def forward(self, student, x, y):
        s = student(x)
        self.teacher_logits(x)
        es, et = self._taps[0][EMBEDDING], self._taps[1][EMBEDDING]
        rel = self.p.distance_weight * L.rkd_distance_loss(es, et) + self.p.angle_weight * L.rkd_angle_loss(es, et)
        return F.cross_entropy(s, y) + rel, s


class SPParams(Params):
    gamma: float = Field(3000.0, ge=0.0, le=1e7)
    layer: str = Field("auto", description="'auto' (the deepest stage both share) or 'teacher_layer:student_layer'")

    _layer = field_validator("layer")(lambda cls, v: (_layer_pair(v), v)[1])


@register
class SimilarityPreserving(Objective):
    """Similarity preserving: the student's batch similarity matrix matches the teacher's (Tung and Mori, ICCV 2019).

    L = CE(y, s) + γ·(1/b²)·‖G_t − G_s‖²_F, G = normalize_rows(Q·Qᵀ), Q the b images' activations of
    the deepest shared stage flattened per image (channel counts may differ). γ = 3000 as in the paper."""

    name = "sp"
    Params = SPParams

    def setup(self, student, *, image_size, **_):
        pairs = _pairs(student, self._teachers[0], image_size, self.p.layer)
        self.t_layer, self.s_layer = pairs[-1][0], pairs[-1][1]
        self._taps = [Taps(student, [self.s_layer]), Taps(self._teachers[0], [self.t_layer])]

    def forward(self, student, x, y):
        s = student(x)
        self.teacher_logits(x)
        fs, ft = self._taps[0][self.s_layer], self._taps[1][self.t_layer]
        return F.cross_entropy(s, y) + self.p.gamma * L.sp_loss(fs, ft), s


# -- online and self-distillation ----------------------------------------------------------------


WARMUP = Field(0, ge=0, le=10_000, description="the knowledge term ramps up linearly over these epochs")


class DMLParams(Params):
    peers: list[str] = Field([], description="peers besides the student; default one more of the student's model")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    warmup_epochs: int = WARMUP
    keep: Literal["best", "student"] = Field("best", description="which peer the pipeline continues with: "
                                             "the best on the validation split, or the student")

    _names = field_validator("peers")(lambda cls, v: [_model_name(n) for n in v])


@register
class DML(Objective):
    """Deep mutual learning: two or more peers trained together, each distilling from the others (Zhang et al., CVPR 2018).

    L = Σ_k [CE(y, z_k) + T²/(K−1)·Σ_{l≠k} KL(σ(z_l/T) ‖ σ(z_k/T))], each peer's targets held fixed;
    no teacher. The pipeline continues with the peer best on the validation split (``keep: best``)."""

    name = "dml"
    teachers = "none"
    Params = DMLParams

    def setup(self, student, *, make_model=None, student_name=None, **_):
        if make_model is None or (not self.p.peers and student_name is None):
            raise CompressError("dml needs the peers' model names and a way to create them")
        names = self.p.peers or [student_name]
        device = next(student.parameters()).device
        self.peer_names = names
        self.peers = nn.ModuleList([make_model(n, i + 1).to(device) for i, n in enumerate(names)])

    def candidates(self):
        return list(self.peers)

    def forward(self, student, x, y):
        zs = [student(x)] + [p(x) for p in self.peers]
        return L.dml_loss(zs, y, self.p.temperature, kl_weight=self.ramp), zs[0]


class CSKDParams(Params):
    lam: float = Field(1.0, ge=0.0, le=100.0, description="weight λ of the class-wise term")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    warmup_epochs: int = WARMUP


@register
class CSKD(Objective):
    """Class-wise self-KD: the student's prediction on another image of the same class is its own soft target (Yun et al., CVPR 2020).

    L = CE(y, f(x)) + λ·T²·KL(σ(f(x')/T) ‖ σ(f(x)/T)), x' drawn from the training images of class y,
    f(x') held fixed; no teacher. λ = 1, T = 4 as in the paper."""

    name = "cs_kd"
    teachers = "none"
    Params = CSKDParams
    soft_targets = False

    def setup(self, student, *, train_ds=None, **_):
        if train_ds is None:
            raise CompressError("cs_kd needs the training split to draw same-class partners from")
        labels = getattr(train_ds, "labels", None)
        if labels is None:
            labels = torch.tensor([int(train_ds[i][1]) for i in range(len(train_ds))])
        self.train_ds = train_ds
        self.by_class = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}

    def partners(self, y: torch.Tensor) -> torch.Tensor:
        idx = []
        for c in y.tolist():
            pool = self.by_class[int(c)]
            idx.append(int(pool[torch.randint(len(pool), (1,))]))
        return torch.stack([self.train_ds[i][0] for i in idx])

    def forward(self, student, x, y):
        s = student(x)
        with torch.no_grad():
            sp = student(self.partners(y).to(x.device))
        return L.cs_kd_loss(s, y, sp, self.p.lam * self.ramp, self.p.temperature), s


class LogitLoss(Objective):
    """Adapter for a ``DistillLoss`` of logits (the stages after distill fine-tune with Hinton KD);
    build it with :func:`logit_objective`."""

    name = "logit_loss"
    logit_only = True

    def __init__(self, loss: L.DistillLoss):
        super().__init__()
        self.loss = loss

    @property
    def needs_teacher(self) -> bool:
        return self.loss.needs_teacher

    def forward(self, student, x, y):
        s = student(x)
        return self.loss(s, y, self.teacher_logits(x) if self.needs_teacher else None), s


def logit_objective(loss: L.DistillLoss, model: nn.Module, teacher: nn.Module | None = None) -> Objective:
    """``loss`` of (logits, targets, teacher logits) as an objective for ``model``, bound to ``teacher``
    when the loss needs one."""
    objective = LogitLoss(loss)
    if loss.needs_teacher:
        if teacher is None:
            raise CompressError("the loss needs a teacher and none was given")
        objective.bind(model, [teacher], image_size=0)
    return objective

