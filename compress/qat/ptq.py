"""The PTQ baseline: onnxruntime's own static quantization of an FP32 ONNX file, in the same scheme
as QAT (QDQ, per-channel int8 weights, uint8 activations, min/max calibration)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from compress.errors import CompressError, short
from compress.fsio import atomic_path


def ptq_static(fp32: Path, dst: Path, calibration: np.ndarray, batch_size: int = 32, reduce_range: bool = False) -> None:
    """onnxruntime's ``quantize_static``: QDQ, per-channel int8 weights, uint8 activations,
    min/max calibration on ``calibration`` (N, C, H, W); ``reduce_range``: 7-bit weights (what
    onnxruntime computes exactly on x86 CPUs without VNNI)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, name: str):
            self.batches = iter([{name: calibration[i : i + batch_size]} for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self.batches, None)

    input_name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - pre-processing is an optimization; quantize the file as it is
            pre = fp32
        out = Path(tmp) / "ptq.onnx"
        try:
            quantize_static(str(pre), str(out), Reader(input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"onnxruntime static quantization failed: {short(e)}") from None
        with atomic_path(dst) as final:
            final.write_bytes(out.read_bytes())
