"""What edge apps load, made from a shipped ONNX file and checked against it on a whole split:
onnxruntime's ORT format with saved runtime optimizations (onnxruntime mobile), OpenVINO IR (``.xml``
and ``.bin``, when the optional ``openvino`` package is installed), and onnxruntime's verdict on how
much of a model the NNAPI and CoreML execution providers would take (its mobile usability checker).

The reference of every check is the ONNX file in onnxruntime: the ONNX file itself is checked against
its PyTorch model by :func:`compress.export.parity`."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from compress.errors import CheckFailed, CompressError, short
from compress.evaluate import loader, ort_predict, ort_session
from compress.fsio import atomic_path, link_or_copy, write_text

log = logging.getLogger(__name__)

FORMATS = ("ort", "openvino")

# -- ORT format ------------------------------------------------------------------------------------

ORT_OPTIMIZATION_STYLE = "Runtime"
# edge devices run ARM cores: the converter then leaves out the x86-only NCHWc layout transformer and
# lets QDQ groups with int8 activations be fused (session.qdqisint8allowed)
ORT_TARGET_PLATFORM = "arm"
# what a session needs to replay the optimizations saved in the file (among them the QDQ fusions that
# make an int8 file run int8 kernels; without them it runs the QDQ graph in float)
ORT_SESSION_CONFIG = {"session.enable_saved_runtime_optimizations": "1"}
# the ONNX file a converted file is compared with runs with the optimizations the conversion keeps:
# the basic ones it applies and the extended ones it saves (QDQ and activation fusions), none of the
# layout level (NCHWc and NHWC rewrites), with the converter's setting for int8 activations
ORT_REFERENCE_LEVEL = "ORT_ENABLE_EXTENDED"
ORT_REFERENCE_CONFIG = {"session.qdqisint8allowed": "1"}
# the operators (of every converted file) a reduced onnxruntime build must hold
ORT_OPERATORS_CONFIG = "required_operators.with_runtime_opt.config"

# -- OpenVINO --------------------------------------------------------------------------------------

OPENVINO_DEVICE = "CPU"
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def _move(src: Path, dest: Path) -> None:
    """Move a finished file into place atomically (``dest`` is whole or absent)."""
    with atomic_path(dest) as tmp:
        shutil.move(str(src), str(tmp))


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


@contextlib.contextmanager
def _captured(logger: logging.Logger, level: int) -> Iterator[list[str]]:
    """The messages ``logger`` emits at ``level`` and above while the block runs, kept from every
    other handler."""
    lines: list[str] = []
    handler = _Lines(lines)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _ort_converter():
    """onnxruntime's ``convert_onnx_models_to_ort`` module. Importing it calls ``logging.basicConfig``
    (a stderr handler on the root logger); that handler is taken off again so the console stays as
    ``compress.logs`` set it."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        from onnxruntime.tools import convert_onnx_models_to_ort as converter
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
    return converter


def ort_file_name(onnx_file: str) -> str:
    return str(Path(onnx_file).with_suffix(".ort"))


def to_ort(onnx_files: list[Path], out_dir: Path, work: Path) -> dict:
    """Convert ``onnx_files`` to ORT format files ``<stem>.ort`` in ``out_dir`` with onnxruntime's
    converter (optimization style Runtime: basic optimizations applied, the others saved for the
    session to replay; target platform arm), in one call so that ``out_dir`` also gets one operator
    list for a reduced onnxruntime build that runs all of them. The converter works in ``work``;
    only the finished files are moved to ``out_dir``."""
    converter = _ort_converter()
    src, dst = work / "ort-in", work / "ort-out"
    for folder in (src, dst):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    for f in onnx_files:
        link_or_copy(f, src / f.name)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), _captured(logging.getLogger("ort_format_model.utils"),
                                                            logging.INFO) as logged:
            converter.convert_onnx_models_to_ort(
                src, output_dir=dst, optimization_styles=[converter.OptimizationStyle[ORT_OPTIMIZATION_STYLE]],
                target_platform=ORT_TARGET_PLATFORM)
    except Exception as e:  # noqa: BLE001 - the converter raises whatever onnxruntime raised
        log.debug(f"ORT format converter: {printed.getvalue()}")
        failed = [m for m in map(re.compile(r"^Error converting (.+?): (.*)$").match, printed.getvalue().splitlines()) if m]
        why = f"{Path(failed[-1][1]).name}: {failed[-1][2][:200]}" if failed else short(e, 200)
        raise CompressError(f"onnxruntime cannot convert to ORT format ({why})") from None
    for line in [*printed.getvalue().splitlines(), *logged]:
        log.debug(f"ORT format converter: {line}")
    files = {}
    for f in onnx_files:
        made = dst / f"{f.stem}.with_runtime_opt.ort"
        if not made.is_file():
            raise CompressError(f"onnxruntime's ORT format converter wrote no file for {f.name}")
        _move(made, out_dir / ort_file_name(f.name))
        files[f.name] = ort_file_name(f.name)
    # the converter's header names its own work files; the shipped list names the shipped ones
    ops = [line for line in (dst / ORT_OPERATORS_CONFIG).read_text(encoding="utf-8").splitlines()
           if line.strip() and not line.startswith("#")]
    write_text(out_dir / ORT_OPERATORS_CONFIG, "\n".join(["# Generated from model/s:", *(f"# - {n}" for n in files.values()),
                                                          *ops]) + "\n")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    return {"files": files, "required_operators_config": ORT_OPERATORS_CONFIG}


def _ort(path: Path, config: dict[str, str], level: str = "ORT_ENABLE_ALL"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"onnxruntime cannot load {path}: {short(e, 200, typed=False)}") from None


def _entries(config: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def ort_parity(ort_path: Path, onnx_path: Path, ds: Dataset, onnx_logits: np.ndarray | None = None) -> dict:
    """The ORT format file against its ONNX file on the whole split in onnxruntime's CPU provider: the
    ORT file in a default session that replays its saved optimizations, the ONNX file with the
    optimizations the conversion keeps (basic and extended, no layout rewrites). The gate: bitwise
    identical logits. ``onnx_logits`` (the ONNX file in the session the pipeline measures it with,
    whose layout rewrites pick other convolution kernels) adds the difference to those, for information."""
    got, _ = ort_predict(_ort(ort_path, ORT_SESSION_CONFIG), ds)
    ref, _ = ort_predict(_ort(onnx_path, ORT_REFERENCE_CONFIG, ORT_REFERENCE_LEVEL), ds)
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    identical = bool(np.array_equal(got, ref))
    result = {
        "reference": f"{onnx_path.name} in onnxruntime, {ORT_REFERENCE_LEVEL}, {_entries(ORT_REFERENCE_CONFIG)}",
        "session_config": ORT_SESSION_CONFIG,
        "images": int(len(ref)),
        "max_abs_logit_diff": diff,
        "argmax_agreement": agree,
        "gate": "bitwise identical logits",
        "passed": identical,
    }
    if onnx_logits is not None:
        result["max_abs_logit_diff_vs_default_session"] = float(np.abs(got - onnx_logits).max()) if ref.size else 0.0
    if not identical:
        raise CheckFailed(f"ORT format parity failed for {ort_path.name}: its logits are not identical to "
                          f"{onnx_path.name}'s: max |Δlogit| {diff:.3g}, argmax agreement {agree:.4%} "
                          "(gate: bitwise identical)")
    return result


# -- OpenVINO IR -----------------------------------------------------------------------------------


def openvino_status() -> dict:
    """Whether OpenVINO can be used: ``available`` with its version, or the reason it cannot."""
    if importlib.util.find_spec("openvino") is None:
        return {"available": False, "reason": "openvino is not installed (pip install 'compress[openvino]')"}
    try:
        import openvino as ov
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        return {"available": False, "reason": f"openvino does not import ({short(e)})"}
    return {"available": True, "version": str(ov.get_version())}


def ir_file_names(onnx_file: str) -> tuple[str, str]:
    stem = Path(onnx_file).stem
    return f"{stem}.xml", f"{stem}.bin"


def to_openvino(onnx_path: Path, out_dir: Path, work: Path) -> dict:
    """OpenVINO IR of ``onnx_path`` in ``out_dir``: ``openvino.convert_model`` and
    ``openvino.save_model`` with the weights kept in float32 (``compress_to_fp16=False``). Written in
    ``work``; the ``.bin`` is moved into place before the ``.xml`` that reads it."""
    import openvino as ov

    xml, bin_ = ir_file_names(onnx_path.name)
    folder = work / "openvino"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(ov.convert_model(str(onnx_path)), str(folder / xml), compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own RuntimeErrors
        raise CompressError(f"OpenVINO cannot convert {onnx_path.name}: {short(e, 200)}") from None
    _move(folder / bin_, out_dir / bin_)
    _move(folder / xml, out_dir / xml)
    shutil.rmtree(folder, ignore_errors=True)
    return {"xml": xml, "bin": bin_, "size_bytes": (out_dir / xml).stat().st_size + (out_dir / bin_).stat().st_size,
            "compress_to_fp16": False}


def accuracy_no_worse(got: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict:
    """Whether logits ``got`` are as accurate as ``ref`` on ``labels`` within chance: of the images the
    two classify differently, those only ``ref`` gets right (``c``) may outnumber those only ``got``
    gets right (``b``) by at most two standard deviations of that difference under the hypothesis that
    neither is better (McNemar's test: c - b <= 2 sqrt(b + c)). Two int8 runtimes that round
    differently disagree on images whose top two classes lie close; what the user loses is accuracy."""
    got_right, ref_right = got.argmax(1) == labels, ref.argmax(1) == labels
    c, b = int((ref_right & ~got_right).sum()), int((got_right & ~ref_right).sum())
    bound = 2.0 * float(np.sqrt(b + c))
    return {"accuracy": float(got_right.mean()) if len(labels) else float("nan"),
            "reference_accuracy": float(ref_right.mean()) if len(labels) else float("nan"),
            "right_only_in_reference": c, "right_only_here": b, "max_net_images_lost": round(bound, 2),
            "no_worse": c - b <= bound}


def openvino_parity(xml_path: Path, onnx_path: Path, ds: Dataset, min_agreement: float,
                    onnx_logits: np.ndarray | None = None, *, accuracy_gate: bool = False) -> dict:
    """The OpenVINO IR against its ONNX file (onnxruntime, the pipeline's session; ``onnx_logits`` when
    already computed) on the whole split: compiled for the CPU with the f32 precision hint. The gate:
    argmax agreement of at least ``min_agreement``; with ``accuracy_gate`` (INT8 files, whose int8
    arithmetic OpenVINO does its own way) also an accuracy on the split's labels no worse than the ONNX
    file's within chance (:func:`accuracy_no_worse`); max |Δlogit| is recorded. A failed gate is
    returned (``passed`` false, ``reason``), not raised: the caller decides what an IR that disagrees
    costs."""
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(str(xml_path), OPENVINO_DEVICE, OPENVINO_CONFIG)
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"OpenVINO cannot compile {xml_path.name}: {short(e, 200)}") from None
    request, output = compiled.create_infer_request(), compiled.outputs[0]
    got, labels = [], []
    for x, y in loader(ds, 256):
        got.append(request.infer({0: x.numpy()})[output].copy())
        labels.append(y.numpy())
    got, labels = np.concatenate(got), np.concatenate(labels)
    ref = onnx_logits if onnx_logits is not None else ort_predict(ort_session(onnx_path), ds)[0]
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    result = {
        "reference": f"{onnx_path.name} in onnxruntime",
        "device": OPENVINO_DEVICE,
        "config": OPENVINO_CONFIG,
        "images": int(len(ref)),
        "max_abs_logit_diff": diff,
        "argmax_agreement": agree,
        "min_argmax_agreement": min_agreement,
    }
    reasons = []
    if agree < min_agreement:
        reasons.append(f"argmax agreement with {onnx_path.name} {agree:.4%} (limit {min_agreement:.2%}), "
                       f"max |Δlogit| {diff:.3g}; logits reach {float(np.abs(ref).max()):.3g}")
    if accuracy_gate:
        acc = accuracy_no_worse(got, ref, labels)
        result["accuracy_check"] = acc
        if not acc["no_worse"]:
            reasons.append(f"accuracy {acc['accuracy']:.4f} against {acc['reference_accuracy']:.4f} for "
                           f"{onnx_path.name}: {acc['right_only_in_reference']} images right only in onnxruntime, "
                           f"{acc['right_only_here']} only in OpenVINO (chance allows a net "
                           f"{acc['max_net_images_lost']:.1f})")
    result["passed"] = not reasons
    if reasons:
        result["reason"] = f"OpenVINO parity failed for {xml_path.name}: " + "; ".join(reasons)
    return result


# -- onnxruntime's mobile usability checker --------------------------------------------------------

_EP = re.compile(r"^Checking ([A-Za-z][\w ]*)$")
_PARTITIONS = re.compile(r"^(\d+) partitions with a total of (\d+)/(\d+) nodes can be handled by the (.+) EP\.$")
_UNSUPPORTED = re.compile(r"^\s*Unsupported ops: (.+)$")
_AS_IS = re.compile(r"^Model should perform well with (.+) as is: (\w+)$")
_FIXED = re.compile(r"^Model should perform well with (.+) if modified to have fixed input shapes: (\w+)$")
_FIXED_START = "Partition information if the model was updated to make the shapes fixed"
_RANK = {"NO": 0, "MAYBE": 1, "YES": 2}


def _parse_usability(lines: list[str]) -> dict[str, dict]:
    """Per execution provider, the checker's findings as it is (``as_is``) and, when it tried, with
    fixed input shapes (``fixed_input_shape``): its verdict (YES, MAYBE, NO), partitions, the nodes
    they take and the operators it does not support."""
    eps: dict[str, dict] = {}
    ep, phase = None, "as_is"
    for line in lines:
        if m := _EP.match(line):
            ep, phase = m[1], "as_is"
            eps[ep] = {"as_is": {}}
        elif ep is None:
            continue
        elif line.startswith(_FIXED_START):
            phase = "fixed_input_shape"
            eps[ep][phase] = {}
        elif m := _PARTITIONS.match(line):
            eps[ep][phase].update(partitions=int(m[1]), supported_nodes=int(m[2]), nodes=int(m[3]))
        elif m := _UNSUPPORTED.match(line):
            eps[ep][phase]["unsupported_ops"] = m[1].split(",")
        elif m := _AS_IS.match(line):
            eps[ep]["as_is"]["verdict"] = m[2]
        elif m := _FIXED.match(line):
            eps[ep].setdefault("fixed_input_shape", {})["verdict"] = m[2]
    return eps


def _input_shape(onnx_path: Path) -> tuple[str, list[int]]:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    inp = next(i for i in graph.input if i.name not in inits)
    return inp.name, [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]


def mobile_usability(onnx_path: Path) -> dict:
    """onnxruntime's mobile usability checker on ``onnx_path`` (after its basic optimizations, as the
    ORT format conversion does them): per execution provider (NNAPI, CoreML NeuralNetwork, CoreML
    MLProgram) its verdict, partitions and covered nodes, whether NNAPI or CoreML are worth trying,
    and what to do. Every line it logs goes to the debug log (``run.log`` in a pipeline)."""
    from onnxruntime.tools.mobile_helpers import usability_checker

    logger = logging.getLogger(f"{__name__}.usability")
    try:
        with _captured(logger, logging.INFO) as lines:
            try_eps = bool(usability_checker.analyze_model(onnx_path, skip_optimize=False, logger=logger))
    except Exception as e:  # noqa: BLE001 - the checker raises whatever onnx or onnxruntime raised
        raise CompressError(f"onnxruntime's mobile usability check failed on {onnx_path.name}: {short(e, 200)}") from None
    for line in lines:
        log.debug(f"mobile usability of {onnx_path.name}: {line}")
    eps = _parse_usability(lines)
    fixed_helps = [ep for ep, v in eps.items() if _RANK.get(v.get("fixed_input_shape", {}).get("verdict"), -1)
                   > _RANK.get(v["as_is"].get("verdict"), -1)]
    if try_eps:
        advice = "NNAPI or CoreML may be faster than the CPU EP: measure both on the device"
    else:
        advice = "use the CPU EP: NNAPI and CoreML would take too little of the model"
    if try_eps and fixed_helps:
        name, shape = _input_shape(onnx_path)
        advice += (f"; {', '.join(fixed_helps)} {'needs' if len(fixed_helps) == 1 else 'need'} a fixed input "
                   "shape: python -m onnxruntime.tools."
                   f"make_dynamic_shape_fixed --input_name {name} --input_shape {','.join(map(str, shape))} "
                   f"{onnx_path.name} {onnx_path.stem}_fixed.onnx")
    return {"try_nnapi_or_coreml": try_eps, "execution_providers": eps, "recommendation": advice}

