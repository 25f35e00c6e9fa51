"""One registry and factory for teachers and students (timm and torchvision), with aliases."""

from __future__ import annotations

import fnmatch
import json
import pickle
import re
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError, as_os_error, short
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
# a name that timm and torchvision both know goes to timm; this prefix picks torchvision's
TORCHVISION = "torchvision:"
TIMM = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _timm_known(name: str) -> bool:
    """A timm model name, with or without a pretrained tag (``resnet18.a1_in1k``) that exists."""
    import timm

    if not timm.is_model(name):
        return False
    if "." in name:
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(name)
        except RuntimeError:  # an unknown tag
            return False
    return True


def _torchvision_names() -> list[str]:
    """torchvision's image classification builders (not detection, segmentation, video...)."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def resolve_name(name: str) -> str:
    """The canonical name of a model: a tested model of the registry (or its alias), any timm model
    name (with an optional pretrained tag), or a torchvision classification model, written
    ``torchvision:NAME`` unless it is one of the registry's. Unknown names raise a CompressError."""
    canonical = ALIASES.get(name, name)
    if canonical in REGISTRY:
        return canonical
    if canonical.startswith(TORCHVISION):
        base = canonical[len(TORCHVISION):]
        if base in _torchvision_names():
            spec = REGISTRY.get(base)
            return base if spec is not None and spec.source == "torchvision" else canonical
    elif canonical.startswith(TIMM):
        base = canonical[len(TIMM):]
        if _timm_known(base):
            return base
    elif _timm_known(canonical):
        return canonical
    elif canonical in _torchvision_names():
        return TORCHVISION + canonical
    raise CompressError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    import difflib

    base = name.split(":", 1)[-1]
    names = [*REGISTRY, *ALIASES, *(n for n, _ in all_model_names())]
    close = difflib.get_close_matches(base, list(dict.fromkeys(names)), n=4, cutoff=0.6)
    stem = re.match(r"[A-Za-z]+", base)
    pattern = f"{stem.group(0)}*" if stem else "*"
    hint = f"; close: {', '.join(close)}" if close else ""
    return (f"unknown model {name!r} (not a timm or torchvision classification model){hint}; "
            f"list names with: compress models --all '{pattern}'")


def source_of(name: str) -> tuple[str, str]:
    """(source, the name its library knows) of a canonical or user-written model name."""
    canonical = resolve_name(name)
    if canonical in REGISTRY:
        return REGISTRY[canonical].source, canonical
    if canonical.startswith(TORCHVISION):
        return "torchvision", canonical[len(TORCHVISION):]
    return "timm", canonical


def model_spec(name: str) -> ModelSpec:
    """The registry's entry for a tested model; for any other name one with the defaults (role
    ``any``, ``lr_scale`` 1)."""
    canonical = resolve_name(name)
    if canonical in REGISTRY:
        return REGISTRY[canonical]
    source, _ = source_of(canonical)
    return ModelSpec(canonical, source, "any", "")


def list_models(pattern: str = "*", role: str | None = None) -> list[ModelSpec]:
    """The tested models of the registry matching ``pattern``."""
    return [s for s in _SPECS if fnmatch.fnmatch(s.name, pattern) and (role is None or s.role == role)]


def all_model_names(pattern: str = "*") -> list[tuple[str, str]]:
    """(canonical name, source) of every timm and torchvision classification model matching
    ``pattern``; nothing is built."""
    import timm

    out = [(n, "timm") for n in timm.list_models(pattern)]
    for n in _torchvision_names():
        spec = REGISTRY.get(n)
        written = n if spec is not None and spec.source == "torchvision" else TORCHVISION + n
        if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(written, pattern):
            out.append((written, "torchvision"))
    return sorted(out)


def create_model(name: str, num_classes: int, pretrained: bool | str | Path = False, **kwargs: Any) -> nn.Module:
    """Build a model with a ``num_classes`` head. ``pretrained``: ``True`` for the model's published
    weights (needs the network unless cached), a path to a local weights file (safetensors, or a torch
    file read with ``weights_only=True``), or ``False``; the classifier head is created anew for
    ``num_classes`` when the weights have another number of classes. ``None`` kwargs are dropped so
    unset options never override a model's defaults."""
    source, base = source_of(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    path = None if isinstance(pretrained, bool) else Path(pretrained).expanduser()
    if path is not None:
        state = load_state_dict_file(path, what="pretrained weights")
        if source == "timm":
            return _timm_from_file(base, num_classes, path, state, kwargs)
        return _load_skipping_head(_build(source, base, num_classes, kwargs), resolve_name(name), state,
                                   num_classes, f"pretrained weights {path}")
    if not pretrained:
        return _build(source, base, num_classes, kwargs)
    try:
        with _hub_access():
            if source == "timm":
                import timm

                return timm.create_model(base, pretrained=True, num_classes=num_classes, **kwargs)
            import contextlib
            import io

            from torchvision.models import get_model_weights

            with contextlib.redirect_stderr(io.StringIO()):  # torch.hub's "Downloading..." line
                state = get_model_weights(base).DEFAULT.get_state_dict(progress=False)
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to fetch weights becomes one clear line
        if "No pretrained weights exist" in str(e):
            raise CompressError(f"{name} has no published pretrained weights; give pretrained: PATH "
                                "(a local weights file) or pretrained: false") from None
        raise CompressError(
            f"could not fetch pretrained weights for {name} ({type(e).__name__}); they need the network: "
            "connect, or give pretrained: PATH (a local .safetensors or torch file) or pretrained: false"
        ) from None
    return _load_skipping_head(_build(source, base, num_classes, kwargs), resolve_name(name), state, num_classes,
                               f"torchvision's weights for {base}")


def _build(source: str, base: str, num_classes: int, kwargs: dict) -> nn.Module:
    try:
        if source == "timm":
            import timm

            return timm.create_model(base, pretrained=False, num_classes=num_classes, **kwargs)
        import torchvision

        return torchvision.models.get_model(base, weights=None, num_classes=num_classes, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"cannot build {source} model {base} with {num_classes} classes ({short(e)})") from e


@contextmanager
def _hub_access():
    """Offline, the Hugging Face hub is asked for its cached files only: its client would otherwise
    retry for a minute before failing."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    was = constants.HF_HUB_OFFLINE
    if not was and not _reachable("huggingface.co"):
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def _reachable(host: str) -> bool:
    import os
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy resolves names
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _timm_from_file(base: str, num_classes: int, path: Path, state: dict, kwargs: dict) -> nn.Module:
    """timm loads the file itself (its checkpoint filter converts other layouts) and drops the
    classifier when the file has another number of classes; any other key the file lacks or adds is
    an error here (timm only logs it)."""
    import timm

    if not state:
        raise CompressError(f"pretrained weights {path} hold no tensors")
    cls_keys = _timm_classifier_keys(base)
    notes: list[str] = []
    try:
        with _capture_log("timm.models._builder", notes):
            model = timm.create_model(base, pretrained=True, num_classes=num_classes,
                                      pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"pretrained weights {path} do not fit {base}: {_first_key_problem(e)}") from None
    for note in notes:
        m = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading", note)
        if m:
            keys = [k for k in m.group(2).split(", ") if k and k not in cls_keys]
            if keys:
                raise CompressError(f"pretrained weights {path} do not fit {base}: {m.group(1).lower()} "
                                    f"{len(keys)} key(s), e.g. {keys[0]!r}")
    return model


def _timm_classifier_keys(base: str) -> set[str]:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(base)
    except RuntimeError:
        cfg = None
    names = (cfg.classifier if cfg is not None else None) or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


@contextmanager
def _capture_log(logger_name: str, into: list[str]):
    """Collect a library logger's INFO-and-above messages into ``into`` without printing them."""
    import logging

    logger = logging.getLogger(logger_name)

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            into.append(record.getMessage())

    handler = _Collect(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _first_key_problem(e: BaseException) -> str:
    """The first line of a ``load_state_dict`` error that names a key, else the error's first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
    return detail[:200]


def head_modules(model: nn.Module, num_classes: int) -> dict[str, nn.Module]:
    """The layers that write the logits (and auxiliary logits): linear layers with ``num_classes``
    outputs, or, for a model without one (SqueezeNet), such 1×1 convolutions."""
    named = dict(model.named_modules())
    heads = {n: m for n, m in named.items() if isinstance(m, nn.Linear) and m.out_features == num_classes}
    return heads or {n: m for n, m in named.items() if isinstance(m, nn.Conv2d) and m.out_channels == num_classes}


def _load_skipping_head(model: nn.Module, name: str, state: dict[str, torch.Tensor], num_classes: int,
                        what: str) -> nn.Module:
    """Load ``state`` into ``model``: every key must fit, except the classifier's, which keep their
    fresh initialization when the weights were trained for another number of classes."""
    own = model.state_dict()
    head_keys = {f"{n}.{k}" for n, m in head_modules(model, num_classes).items() for k in m.state_dict()}
    skip = {k for k in head_keys if k in state and state[k].shape != own[k].shape}
    missing = [k for k in own if k not in state and k not in skip and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and k not in skip and state[k].shape != own[k].shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("differently shaped", wrong)):
        if keys:
            raise CompressError(f"{what} do not fit {name}: {problem} {len(keys)} key(s), e.g. {keys[0]!r}")
    kept = OrderedDict((k, v) for k, v in state.items() if k not in skip)
    kept._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(_with_versions(kept, model), strict=False)
    return model


def pretrained_data_config(name: str, pretrained: bool | str | Path) -> dict | None:
    """The preprocessing the model's published weights were trained with: ``mean``, ``std`` (3 floats
    each), ``input_size`` (pixels), ``interpolation`` and ``crop_pct``; ``None`` when ``pretrained``
    is false. Read from timm's pretrained config (``timm.data.resolve_data_config``) or torchvision's
    weights' transforms, so nothing is downloaded; a local file is taken to follow the model's own
    published weights."""
    if pretrained is False or pretrained is None or pretrained == "":
        return None
    source, base = source_of(name)
    if source == "timm":
        from timm.data import resolve_data_config, resolve_model_data_config
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(base)
        if cfg is not None:
            dc = resolve_data_config(pretrained_cfg=cfg.to_dict())
        else:  # no registered weights: the defaults the built model carries
            dc = resolve_model_data_config(_build("timm", base, 1000, {}))
        mean, std = tuple(dc["mean"]), tuple(dc["std"])
        return {"mean": _three(mean), "std": _three(std), "input_size": int(dc["input_size"][-1]),
                "interpolation": str(dc["interpolation"]), "crop_pct": float(dc["crop_pct"])}
    out = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "input_size": 224, "interpolation": "bilinear",
           "crop_pct": 0.875}
    try:
        from torchvision.models import get_model_weights

        t = get_model_weights(base).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return out
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    interp = getattr(t.interpolation, "value", t.interpolation)
    return {"mean": _three(tuple(t.mean)), "std": _three(tuple(t.std)), "input_size": crop,
            "interpolation": str(interp), "crop_pct": round(crop / resize, 4)}


def _three(values: tuple) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    return values * 3 if len(values) == 1 else values[:3]  # type: ignore[return-value]


# -- checkpoints: safetensors weights + JSON metadata; nothing a user hands in is unpickled ----------


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """Write ``path`` (.safetensors) and ``path.with_suffix('.json')`` atomically. A failed write (a
    full disk) raises OSError, as any other file write does, whatever library wrote it."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp))
        except Exception as e:  # noqa: BLE001 - safetensors reports I/O errors as its own exception type
            failed = as_os_error(e, path)
            if failed is None:
                raise
            raise failed from e
    write_json(path.with_suffix(".json"), meta)


# the pickled globals a torch state dict needs besides torch's own: anything else is an object or code
_PLAIN_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                  "_codecs.encode", "builtins.slice", "builtins.complex", "builtins.int", "builtins.float",
                  "builtins.bool", "builtins.str", "builtins.bytes", "builtins.list", "builtins.dict",
                  "builtins.tuple"}
_SAVE_HINT = "save the weights alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file"


def _pickle_globals(data: bytes, streams: int = 1) -> set[str]:
    """The globals (``module.name``) the first ``streams`` pickles of ``data`` would import, read
    without running anything (``pickletools``). Raises ValueError where the bytes are not a pickle."""
    import io
    import pickletools

    found: set[str] = set()
    buf = io.BytesIO(data)
    for n in range(streams):
        if buf.tell() >= len(data):
            break
        recent: list[Any] = []  # what the last ops pushed, enough to name a STACK_GLOBAL's module and name
        memo: dict[int, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(buf):
                kind = op.name
                if kind in ("GLOBAL", "INST"):
                    found.add(_py3_name(*str(arg).split(" ", 1)))
                    recent.append(None)
                elif kind == "STACK_GLOBAL":
                    module, name = ([None, None] + recent)[-2:]
                    found.add(_py3_name(module, name) if isinstance(module, str) and isinstance(name, str)
                              else "<a computed global>")
                    recent.append(None)
                elif kind == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = recent[-1] if recent else None
                elif kind in ("GET", "BINGET", "LONG_BINGET"):
                    recent.append(memo.get(int(arg)))
                elif kind in ("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING",
                              "SHORT_BINSTRING", "BINSTRING"):
                    recent.append(arg)
                elif kind not in ("FRAME", "PROTO"):
                    recent.append(None)
                recent = recent[-2:]
        except Exception as e:  # noqa: BLE001 - pickletools raises ValueError or others on garbage
            if n == 0:
                raise ValueError(f"not a pickle ({short(e, 80, typed=False)})") from None
            break  # the raw tensor bytes after the pickles of a legacy torch file
    return found


def _py3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 imports it (protocol 2 pickles write Python 2 names: __builtin__.set)."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _refused_globals(found: set[str]) -> list[str]:
    """The globals torch's weights-only loader would not import (its allow-list where this torch
    release exposes it, else torch's own names and plain containers)."""
    try:
        from torch import _weights_only_unpickler as wo

        allowed = set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
        return sorted(g for g in found if g not in allowed)
    except (ImportError, AttributeError):
        return sorted(g for g in found if not (g.startswith("torch.") or g in _PLAIN_GLOBALS))


def _torch_pickle(path: Path, head: bytes) -> bytes | None:
    """The pickled part of a torch file: ``data.pkl`` of a zip archive, else the file's first 4 MiB
    (torch's legacy format and plain pickles); None for a TorchScript archive. Raises ValueError for a
    zip archive that is not a torch file."""
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
                    return None
                data = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
                if not data:
                    raise ValueError("a zip archive without data.pkl")
                return z.read(data[0])
        except zipfile.BadZipFile as e:
            raise ValueError(f"a damaged zip archive ({short(e, 80, typed=False)})") from None
    with open(path, "rb") as f:  # a pickle (torch's legacy format, or a plain one) or nothing known
        return f.read(1 << 22)


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then that much JSON starting with '{'."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def load_state_dict_file(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read weights from safetensors, or a torch file with ``weights_only=True`` (a state dict, or one
    under ``state_dict`` or ``model``; a ``module.`` prefix is dropped). The format is told from the
    bytes, not the name. Nothing is unpickled beyond tensors and plain containers: a pickle that would
    import anything else (an object, a callable such as ``os.system``) is refused after reading its
    opcodes (``pickletools``), before torch sees it; torch's own weights-only loader is the second
    guard. Each failure is one line saying which it is: missing, empty, damaged, carrying code or
    objects, or not a state dict."""
    import warnings

    path = Path(path)
    if path.is_dir():
        raise CompressError(f"{what} {path} is a folder, not a weights file")
    if not path.is_file():
        raise CompressError(f"{what} not found: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise CompressError(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None
    if size == 0:
        raise CompressError(f"{what} {path} cannot be read: the file is empty (0 bytes)")
    try:
        if _is_safetensors(head, size):
            from safetensors.torch import load_file

            try:
                state = load_file(str(path))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"a damaged safetensors file ({short(e, 120, typed=False)})") from None
        else:
            pickled = _torch_pickle(path, head)
            if pickled is None:
                raise CompressError(f"{what} {path} is a TorchScript archive (code and weights), not a state dict; "
                                    f"{_SAVE_HINT}")
            try:
                found = _pickle_globals(pickled, streams=1 if head.startswith(b"PK") else 4)
            except ValueError:
                raise ValueError("it is neither a safetensors file nor a torch file or pickle") from None
            refused = _refused_globals(found)
            if refused:
                raise CompressError(_carries_code(what, path, refused))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols and on weights_only
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as e:
                    m = re.search(r"GLOBAL ([\w.]+)", str(e))
                    if m:
                        raise CompressError(_carries_code(what, path, [m.group(1)])) from None
                    raise ValueError(f"not a torch file ({_torch_reason(e)})") from None
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"a damaged torch file ({_torch_reason(e)})") from None
    except ValueError as e:
        raise CompressError(f"{what} {path} cannot be read: {e}; is it corrupt?") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressError(f"{what} {path} does not hold a state dict of tensors; {_SAVE_HINT}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _carries_code(what: str, path: Path, refused: list[str]) -> str:
    shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
    return (f"{what} {path} is a pickle that carries code or objects ({shown}), refused for safety and not run; "
            f"{_SAVE_HINT}")


def _torch_reason(e: BaseException) -> str:
    """The last meaningful line of torch's (often long) loader error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Check the doc")]
    return (lines[-1] if lines else type(e).__name__)[:120]


def _with_versions(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with the module versions of ``model``'s own state dict when it carries none (a
    safetensors file keeps no ``_metadata``; torchvision's MNASNet refuses a state dict without it)."""
    if getattr(state, "_metadata", None) is not None:
        return state
    out = OrderedDict(state)
    out._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    return out


def load_weights(model: nn.Module, path: str | Path, what: str = "checkpoint", name: str | None = None) -> nn.Module:
    """Load a weights file into ``model``, every key and shape as the model has them; ``name``: the
    model's name for the message (default: its class)."""
    state = _with_versions(load_state_dict_file(path, what=what), model)
    own = model.state_dict()
    problems = [(kind, keys) for kind, keys in (
        ("missing", [k for k in own if k not in state]),
        ("unexpected", [k for k in state if k not in own]),
        ("differently shaped", [k for k in state if k in own and state[k].shape != own[k].shape]))
        if keys]
    if problems:
        kind, keys = problems[0]
        raise CompressError(f"{what} {path} does not fit {name or type(model).__name__} (weights of another "
                            f"architecture or number of classes?): {kind} {len(keys)} key(s), e.g. {keys[0]!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CompressError(f"{what} {path} does not fit {name or type(model).__name__}: "
                            f"{_first_key_problem(e)}") from None
    return model


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_checkpoint` from its JSON metadata and weights."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise CompressError(f"checkpoint not found: {path}")
    if not meta_path.is_file():
        raise CompressError(f"checkpoint metadata not found: {meta_path} (a checkpoint written by compress, "
                            "model.safetensors, has its model.json beside it)")
    try:
        meta = json.loads(meta_path.read_text())
        model = model_from_meta(meta)
    except (ValueError, KeyError, TypeError):
        raise CompressError(f"checkpoint metadata {meta_path} is corrupt") from None
    load_weights(model, path, name=str(meta.get("model")))
    return model.eval(), meta


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
    """A fresh model of the architecture a checkpoint's metadata describes: its registry name and
    classes, and for a pruned model the stored channel counts."""
    model = create_model(meta["model"], int(meta["num_classes"]))  # the name resolve_name wrote
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

