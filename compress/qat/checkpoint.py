"""QAT checkpoints: the fake-quant form of a model in its final inference state, and a quantize
stage's checkpoint rebuilt from its metadata (which names the float architecture, pruned or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from compress.errors import CompressError
from compress.models import load_state_dict_file, model_from_meta
from compress.qat.prepare import prepare_qat
from compress.qat.schedule import enable_fake_quant, freeze_bn, set_observers


def quantized_model(model: nn.Module, image_size: int, float_stem: bool = True,
                    weight_bits: int | None = None) -> fx.GraphModule:
    """The fake-quant form of ``model`` in its final, inference state (observers and BN frozen)."""
    gm = prepare_qat(model, torch.zeros(1, 3, image_size, image_size), float_stem=float_stem,
                     weight_bits=weight_bits)
    set_observers(gm, False)
    freeze_bn(gm, True)
    enable_fake_quant(gm, True)
    return gm.eval()


def load_qat_checkpoint(path: Path) -> tuple[fx.GraphModule, dict]:
    """Rebuild a QAT model saved by the quantize stage (its JSON names the float architecture)."""
    meta_path = Path(path).with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        # checkpoints written before the float stem existed quantized the first convolution too
        gm = quantized_model(model_from_meta(meta), int(meta["image_size"]), bool(meta.get("float_stem", False)),
                             int(meta.get("weight_bits", 8)))
    except (OSError, ValueError, KeyError, TypeError):
        raise CompressError(f"QAT checkpoint metadata {meta_path} is missing or corrupt") from None
    try:
        gm.load_state_dict(load_state_dict_file(path))
    except RuntimeError:
        raise CompressError(f"checkpoint {path} does not fit the QAT form of {meta['model']}") from None
    return gm.eval(), meta
