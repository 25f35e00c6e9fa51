"""Quantization-aware training to an int8 ONNX file onnxruntime runs with int8 kernels.

Scheme (the one onnxruntime's own static quantizer produces, so the same fused kernels apply):
weights int8, symmetric, per output channel (zero point 0, scale max|w|/127); activations uint8,
asymmetric, per tensor. Two explicit steps, as in torchao: :func:`prepare_qat` rewrites a float model
into a fake-quant one (BatchNorm folded into the preceding convolution, observers on every tensor the
int8 graph will hold), training follows with the one training loop under :func:`qat_schedule`, and
:func:`export_qdq` writes the int8 ONNX file.

Rooms: ``fakequant`` (the arithmetic), ``modules`` (QAT modules and their frozen forms), ``prepare``
(the FX rewrite), ``schedule`` (switches, calibration), ``checkpoint``, ``qdq`` (the int8 file),
``kernels`` (what onnxruntime runs), ``ptq`` (onnxruntime's static quantization, the baseline)."""

from compress.qat.checkpoint import load_qat_checkpoint, quantized_model
from compress.qat.fakequant import ActFakeQuant, host_weight_bits
from compress.qat.kernels import FLOAT_CONV_OPS, INT8_OPS, QUANT_CONV_OPS, float_ops_between_int8, kernel_report, optimized_ops
from compress.qat.modules import QAddMul, QConvBn2d, QHardsigmoid, QLinear
from compress.qat.prepare import prepare_qat
from compress.qat.ptq import ptq_static
from compress.qat.qdq import SCHEME, export_qdq, finalize_qdq
from compress.qat.schedule import (calibrate, enable_fake_quant, freeze_bn, qat_schedule, qat_summary,
                                   set_observers)

__all__ = ["SCHEME", "FLOAT_CONV_OPS", "INT8_OPS", "QUANT_CONV_OPS", "float_ops_between_int8", "ActFakeQuant", "host_weight_bits", "QAddMul", "QConvBn2d", "QHardsigmoid", "QLinear", "calibrate",
           "enable_fake_quant", "export_qdq", "finalize_qdq", "freeze_bn", "kernel_report", "load_qat_checkpoint",
           "optimized_ops", "prepare_qat", "ptq_static", "qat_schedule", "qat_summary", "quantized_model",
           "set_observers"]
