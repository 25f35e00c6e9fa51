"""INT8 against FP32, and QAT-INT8 against onnxruntime's PTQ-INT8, measured as latency ratios in one run.

For each network: the FP32 ONNX file, the int8 QDQ file from compress's QAT path (prepare, calibrate,
export; the float stem as the pipeline ships it) and the int8 file from onnxruntime's quantize_static
(QDQ, per channel), all at the same input size. The three are timed in alternating rounds with
onnxruntime's CPU provider so that machine drift hits them alike; each round is warm-up + timed runs,
and the best p50 per file over the rounds counts.

    .venv/bin/python benchmarks/int8_latency.py                      # every student and resnet18, 224x224
    .venv/bin/python benchmarks/int8_latency.py --models mobilenetv2_100 --threads 0

Goals (INT8/FP32 at 224x224, 1 thread): no network slower in INT8 than in FP32; MobileNetV3 <= 0.70;
mobilenetv2_100 <= 0.45; resnet18 <= 0.40. The ratios depend on the CPU's int8 instructions, which the
output names: onnxruntime's int8 convolutions run on VNNI (AVX-512 VNNI, AVX-VNNI) where the CPU has
it and on AVX2 otherwise, while the float work an int8 file keeps (a float stem, hard-swish, squeeze-
excitation scales, the classifier) costs the same on both. Networks made mostly of int8 convolutions
(mobilenetv2_100, resnet18) gain on either; MobileNetV3, whose int8 file keeps more float and
element-wise work, met its goal on a VNNI CPU and does not on an AVX2-only one (see README).

Latency does not depend on the weights' values, so networks are built fresh (random init, 10 classes)
and calibrated on digits images upscaled to the input size; pass --checkpoint to use a trained one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from compress.bench import latency

# each latency measurement runs in a fresh process that imports this script again: torch, timm and the
# QAT code are imported inside the functions that build the files, not at the top


def networks() -> list[str]:
    from compress.models import REGISTRY

    return sorted(n for n, spec in REGISTRY.items() if spec.role == "student") + ["resnet18"]


def goal(name: str) -> float:
    """INT8/FP32 latency goal at 224x224, 1 thread."""
    if name.startswith("mobilenetv3"):
        return 0.70
    return {"mobilenetv2_100": 0.45, "resnet18": 0.40}.get(name, 1.0)


QAT_OVER_PTQ_GOAL = 1.05


def calibration_images(size: int, n: int) -> "torch.Tensor":
    import torch.nn.functional as F

    from compress.config import DataConfig
    from compress.data import load_data

    x = load_data(DataConfig(image_size=32, augment=False)).train.images[:n]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def int8_instructions() -> str:
    """The CPU and the int8 instruction sets onnxruntime's kernels can use on it."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    have = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model} ({', '.join(have) or 'no AVX2'})"


def build(name: str, size: int, calib: torch.Tensor, tmp: Path, checkpoint: Path | None,
          float_stem: bool = True, weight_bits: int | None = None) -> dict[str, Path]:
    import numpy as np
    import torch

    from compress.export import export_onnx
    from compress.models import create_model, load_checkpoint
    from compress.qat import calibrate, export_qdq, prepare_qat, ptq_static, qat_schedule

    torch.manual_seed(0)
    model = load_checkpoint(checkpoint)[0] if checkpoint else create_model(name, 10)
    if checkpoint is None:
        # timm zero-initializes the last BatchNorm of each residual block; all-zero layers are not what
        # a trained network runs, so give every BatchNorm a trained-looking scale and statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.uniform_(m.weight, 0.5, 1.5)
                torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
    model.eval()
    paths = {"fp32": export_onnx(model, tmp / f"{name}_fp32.onnx", size)}
    gm = prepare_qat(model, torch.zeros(1, 3, size, size), float_stem=float_stem, weight_bits=weight_bits)
    calibrate(gm, calib.split(8))
    qat_schedule(gm, 10**9, 0, 0)
    gm.eval()
    paths["qat_int8"] = tmp / f"{name}_qat_int8.onnx"
    export_qdq(gm, paths["qat_int8"], size)
    paths["ptq_int8"] = tmp / f"{name}_ptq_int8.onnx"
    ptq_static(paths["fp32"], paths["ptq_int8"], calib.numpy().astype(np.float32))
    return paths


def measure(paths: dict[str, Path], size: int, threads: int, runs: int, rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in paths}
    for _ in range(rounds):
        for k, p in paths.items():
            best[k] = min(best[k], latency(p, size, threads=threads, warmup=10, runs=runs)["p50_ms"])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every student and resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--int8-stem", action="store_true", help="quantize the first convolution too (no float stem)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a compress model.safetensors (one model only)")
    ap.add_argument("--weight-bits", type=int, choices=(7, 8), default=None,
                    help="the QAT file's weights in ±63 or ±127 (default: what onnxruntime computes exactly here)")
    args = ap.parse_args()
    import torch

    from compress.qat import host_weight_bits, kernel_report

    bits = args.weight_bits or host_weight_bits()

    args.models = args.models or networks()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    calib = calibration_images(args.size, args.calibration_images)
    results, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = build(name, args.size, calib, Path(tmp), args.checkpoint, not args.int8_stem, bits)
            p50 = measure(paths, args.size, args.threads, args.runs, args.rounds)
            kernels = {k: kernel_report(paths[k]) for k in ("qat_int8", "ptq_int8")}
            row = {
                "model": name,
                "p50_ms": {k: round(v, 3) for k, v in p50.items()},
                "size_bytes": {k: p.stat().st_size for k, p in paths.items()},
                "int8_over_fp32": round(p50["qat_int8"] / p50["fp32"], 3),
                "ptq_int8_over_fp32": round(p50["ptq_int8"] / p50["fp32"], 3),
                "qat_over_ptq": round(p50["qat_int8"] / p50["ptq_int8"], 3),
                "int8_size_over_fp32": round(paths["qat_int8"].stat().st_size / paths["fp32"].stat().st_size, 3),
                "int8_convolutions": {k: f"{v['quantized_convolutions']} int8 / {v['float_convolutions']} float"
                                      for k, v in kernels.items()},
            }
            limit = goal(name)
            row["goals"] = {
                "int8_over_fp32": f"<= {limit}: {'met' if row['int8_over_fp32'] <= limit else 'MISSED'}",
                "qat_over_ptq": f"<= {QAT_OVER_PTQ_GOAL}: {'met' if row['qat_over_ptq'] <= QAT_OVER_PTQ_GOAL else 'MISSED'}",
            }
            ok &= row["int8_over_fp32"] <= limit and row["qat_over_ptq"] <= QAT_OVER_PTQ_GOAL
            results.append(row)
            print(json.dumps(row, indent=2), flush=True)
    print(f"machine: {int8_instructions()}; QAT weights {bits}-bit, "
          f"{'int8' if args.int8_stem else 'float'} stem")
    print(f"setting: {args.size}x{args.size}, batch 1, {args.threads} thread(s), best p50 of {args.rounds} rounds x {args.runs} runs")
    print(f"{'network':24s} {'int8/fp32':>9s} {'goal':>5s} {'ptq/fp32':>8s} {'qat/ptq':>8s}")
    for r in results:
        print(f"{r['model']:24s} {r['int8_over_fp32']:9.3f} {goal(r['model']):5.2f} {r['ptq_int8_over_fp32']:8.3f} "
              f"{r['qat_over_ptq']:8.3f}  {'met' if r['int8_over_fp32'] <= goal(r['model']) else 'MISSED'}")
    print("all goals met" if ok else "some goals MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
