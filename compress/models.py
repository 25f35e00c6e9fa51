"""One registry and factory for teachers and students (timm and torchvision), with aliases."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.fsio import atomic_path, write_json


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "timm" | "torchvision"
    role: str  # "teacher" | "student"
    family: str
    # timm's VGG has no BatchNorm in its 4096-wide head and diverges at learning rates the other
    # networks train well with; the training loop scales the configured rate by this factor
    lr_scale: float = 1.0


_SPECS = [
    *(ModelSpec(n, "timm", "teacher", "resnet") for n in ("resnet18", "resnet34", "resnet50")),
    *(ModelSpec(n, "timm", "teacher", "vgg", lr_scale=0.2) for n in ("vgg11_bn", "vgg16_bn")),
    *(ModelSpec(f"mobilenetv2_{w}", "timm", "student", "mobilenetv2") for w in ("035", "050", "075", "100")),
    *(ModelSpec(f"mobilenetv3_small_{w}", "timm", "student", "mobilenetv3") for w in ("050", "075", "100")),
    *(ModelSpec(f"mobilenetv3_large_{w}", "timm", "student", "mobilenetv3") for w in ("075", "100")),
    *(ModelSpec(f"shufflenet_v2_{w}", "torchvision", "student", "shufflenetv2") for w in ("x0_5", "x1_0", "x1_5", "x2_0")),
]
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
ALIASES: dict[str, str] = {"mobilenet": "mobilenetv2_100", "shufflenet": "shufflenet_v2_x1_0"}


def resolve_name(name: str) -> str:
    """Canonical registry name for ``name`` (an alias or a registered name), else a CompressError."""
    canonical = ALIASES.get(name, name)
    if canonical not in REGISTRY:
        valid = ", ".join([*REGISTRY, *ALIASES])
        raise CompressError(f"unknown model {name!r}; valid names: {valid}")
    return canonical


def list_models(pattern: str = "*", role: str | None = None) -> list[ModelSpec]:
    return [s for s in _SPECS if fnmatch.fnmatch(s.name, pattern) and (role is None or s.role == role)]


def create_model(name: str, num_classes: int, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered model with a ``num_classes`` head. ``None`` kwargs are dropped so unset
    options never override a model's defaults."""
    spec = REGISTRY[resolve_name(name)]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if spec.source == "timm":
            import timm

            return timm.create_model(spec.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        import torchvision

        builder = getattr(torchvision.models, spec.name)
        if not pretrained:
            return builder(weights=None, num_classes=num_classes, **kwargs)
        model = builder(weights="DEFAULT", **kwargs)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to fetch weights becomes one clear line
        if pretrained:
            raise CompressError(
                f"could not fetch pretrained weights for {spec.name} ({type(e).__name__}); they need the "
                "network: connect, or give teacher.checkpoint=PATH, or set teacher.pretrained=false to train"
            ) from None
        raise


# -- checkpoints: safetensors weights + JSON metadata; nothing a user hands in is unpickled ----------


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors) and ``path.with_suffix('.json')`` atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    write_json(path.with_suffix(".json"), meta)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from safetensors, or a torch file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"checkpoint {path} cannot be read ({type(e).__name__}); is it corrupt?") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CompressError(f"checkpoint {path} does not fit {type(model).__name__}: {detail[:200]}") from None
    return model


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` from its JSON metadata and weights."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CompressError(f"checkpoint metadata not found: {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
        model = model_from_meta(meta)
    except (ValueError, KeyError, TypeError):
        raise CompressError(f"checkpoint metadata {meta_path} is corrupt") from None
    load_weights(model, path)
    return model.eval(), meta


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A fresh model of the architecture a checkpoint's metadata describes: its registry name and
    classes, and for a pruned model the stored channel counts."""
    model = create_model(meta["model"], int(meta["num_classes"]))
    if meta.get("arch"):
        apply_architecture(model, meta["arch"])
    return model


# -- architecture of a pruned model, stored beside its weights --------------------------------


def architecture(model: nn.Module) -> dict[str, dict]:
    """The channel counts of every convolution, BatchNorm and linear layer (what pruning changes)."""
    arch = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            arch[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            arch[name] = {"features": m.num_features}
        elif isinstance(m, nn.Linear):
            arch[name] = {"in": m.in_features, "out": m.out_features}
    return arch


def apply_architecture(model: nn.Module, arch: dict[str, dict]) -> nn.Module:
    """Resize the layers of a freshly built model to the channel counts of ``arch`` (values are then
    loaded from the checkpoint)."""
    modules = dict(model.named_modules())
    for name, spec in arch.items():
        m = modules.get(name)
        if m is None:
            raise CompressError(f"pruned architecture names a layer {name!r} the model does not have")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = spec["in"], spec["out"], spec["groups"]
            m.weight = nn.Parameter(torch.empty(spec["out"], spec["in"] // spec["groups"], *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(spec["out"]))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = spec["features"]
            m.num_features = n
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = spec["in"], spec["out"]
            m.weight = nn.Parameter(torch.empty(spec["out"], spec["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(spec["out"]))
    return model

