"""Latency of ONNX files on the CPU, and their size: the one way compress measures latency.

Every measurement (:func:`measure`) runs in a fresh process, started with multiprocessing's "spawn"
method and pinned to CPU cores, so that no earlier work of the caller (threads, caches, allocations)
colours it and its memory figures are its own: the session's load time (the first inference included),
mean/p50/p90/p99 latency over the timed runs after the warm-up, throughput and peak resident memory.
Runtimes: onnxruntime's CPU provider and OpenVINO reading the same ONNX file. :func:`latency` is the
onnxruntime measurement in the form the bench stage, the sweep and the benchmarks record.

Pinning: ``threads=N`` (N ≥ 1) pins the process to the first N of the cores it may run on (all of them
when N is larger); ``threads=0`` lets the runtime choose its thread count ("all cores") and pins
nothing. Explicit ``cores`` override the default; ``cores=[]`` pins nothing."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from compress.errors import CompressError, short

RUNTIMES = ("onnxruntime", "openvino")
START_METHOD = "spawn"


def file_size(path: Path) -> int:
    return Path(path).stat().st_size


def allowed_cores() -> list[int]:
    """The CPU cores this process may run on (every core where the system cannot tell)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_cores(threads: int) -> list[int]:
    """The cores a measurement with ``threads`` threads is pinned to: the first ``threads`` of
    :func:`allowed_cores` (all of them when ``threads`` is larger); none for ``threads=0``."""
    if threads == 0 or not hasattr(os, "sched_setaffinity"):
        return []
    return allowed_cores()[:threads]


def threads_setting(threads: int) -> str:
    return "1 thread" if threads == 1 else ("all cores" if threads == 0 else f"{threads} threads")


def input_spec(path: Path) -> tuple[str, list]:
    """Name and dimensions (``None`` where dynamic) of the ONNX file's first input that is not an initializer."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def require_images(path: Path, dims: list) -> None:
    """Refuse a file whose input is not a batch of images (N×C×H×W)."""
    if len(dims) != 4:
        raise CompressError(f"{Path(path).name} takes a {len(dims)}-D input; latency is measured on N×C×H×W images")


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _input(path: Path, batch: int, size: int | None) -> tuple[str, np.ndarray]:
    """The input name and a batch of random N×C×H×W images for the file; CompressError where the file
    is unreadable or its fixed dimensions do not take ``batch`` images of ``size``×``size``."""
    try:
        name, dims = input_spec(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise CompressError(f"{path.name} is not a readable ONNX file ({short(e, 200)})") from None
    require_images(path, dims)
    n, c, h, w = dims
    size = size or w or h
    if size is None:
        raise CompressError(f"{path.name} has a dynamic spatial size; pass an image size")
    if (h is not None and h != size) or (w is not None and w != size):
        raise CompressError(f"{path.name} takes {h or '?'}x{w or '?'} inputs, not {size}x{size}")
    if n is not None and n != batch:
        raise CompressError(f"{path.name} takes batch {n}, not {batch}")
    return name, np.random.default_rng(0).standard_normal((batch, c or 3, size, size)).astype(np.float32)


def _measure(path: str, runtime: str, threads: int, batch: int, size: int | None, cores: list[int], warmup: int,
             runs: int) -> dict:
    """One measurement, in the process it was started in (the child of :func:`measure`)."""
    if cores:
        os.sched_setaffinity(0, cores)
    used = allowed_cores()
    p = Path(path)
    name, x = _input(p, batch, size)
    rss_before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if runtime == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 4  # a failure comes back as the exception's one line, not on stderr
        try:
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise CompressError(f"onnxruntime cannot load {p.name}: {short(e, 300, typed=False)}") from None

        def infer():
            sess.run(None, {name: x})
    else:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(path)
        if not model.inputs[0].get_partial_shape().is_static:
            model.reshape({model.inputs[0].any_name: ov.PartialShape(list(x.shape))})
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        compiled = core.compile_model(model, "CPU", config if threads > 0 else
                                      {k: v for k, v in config.items() if k != "INFERENCE_NUM_THREADS"})
        request = compiled.create_infer_request()

        def infer():
            request.infer({0: x})
    infer()  # the first run belongs to loading: lazy allocation, kernel selection
    load_ms = (time.perf_counter() - t0) * 1000.0
    for _ in range(warmup):
        infer()
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        infer()
        times[i] = time.perf_counter() - t
    ms = times * 1000.0
    peak = _status_kb("VmHWM")
    return {"runtime": runtime, "threads": threads, "cores": used, "pinned": bool(cores), "batch": batch,
            "size": int(x.shape[-1]), "warmup": warmup, "runs": runs,
            "mean_ms": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "throughput_ips": float(batch * 1000.0 / ms.mean()), "load_ms": load_ms,
            "peak_rss_mb": peak / 1024.0, "session_mb": max(0, peak - rss_before) / 1024.0}


def _child(conn, args: tuple) -> None:
    """Entry point of the measuring process: sends ("ok", result) or ("error", one line) back."""
    try:
        conn.send(("ok", _measure(*args)))
    except BaseException as e:  # noqa: BLE001 - the parent turns it into one CompressError
        path, runtime, _, batch, size = args[:5]
        where = f"batch {batch}" + (f" of {size}×{size}" if size else "")
        why = short(e, 1000, typed=False) if isinstance(e, CompressError) else \
            f"{Path(path).name}: {runtime} failed on {where}: {short(e, 1000)}"
        conn.send(("error", why))
    finally:
        conn.close()


def measure(path: Path | str, runtime: str = "onnxruntime", threads: int = 1, batch: int = 1,
            size: int | None = None, cores: list[int] | None = None, warmup: int = 10, runs: int = 100,
            timeout: float | None = None) -> dict:
    """Latency of ``batch`` random images of ``size``×``size`` (default: the file's own size) through
    ``runtime``, measured in a fresh process pinned to ``cores``.

    ``threads`` is the runtime's intra-op thread count (0: the runtime's default, every core).
    ``cores`` default to :func:`default_cores` of ``threads``: the first ``threads`` cores this process
    may run on, none (no pinning) for ``threads=0``; ``[]`` pins nothing. After ``warmup`` runs,
    ``runs`` timed runs. ``timeout`` (seconds, ``None``: no limit) bounds the whole measurement.

    Returns runtime, threads, cores (those the measuring process ran on), pinned, batch, size, warmup,
    runs, mean_ms, p50_ms, p90_ms, p99_ms, throughput_ips (images/s), load_ms (session load and first
    inference), peak_rss_mb (the process's peak resident memory) and session_mb (what loading and
    running added to it). Any failure, the measuring process's own included (an unreadable file, an
    input size the file does not take, a runtime error, a crash, the timeout), raises one CompressError
    of one line."""
    path = Path(path)
    if runtime not in RUNTIMES:
        raise CompressError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    if not path.is_file():
        raise CompressError(f"ONNX file not found: {path}")
    if threads < 0 or batch < 1 or warmup < 0 or runs < 1:
        raise CompressError(f"latency of {path.name}: threads must be >= 0, batch and runs >= 1, warmup >= 0 "
                            f"(got {threads}, {batch}, {runs}, {warmup})")
    if cores is None:
        cores = default_cores(threads)
    elif cores:
        allowed = allowed_cores()
        if not hasattr(os, "sched_setaffinity"):
            raise CompressError("pinning to cores is not supported on this system")
        if any(c not in allowed for c in cores):
            raise CompressError(f"cores {cores}: this process may run on cores {','.join(map(str, allowed))} only")
    args = (str(path), runtime, threads, batch, size, list(cores), warmup, runs)
    ctx = mp.get_context(START_METHOD)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, args), daemon=True)
    proc.start()
    child.close()
    answered = False
    try:
        if not parent.poll(timeout):
            raise CompressError(f"latency of {path.name}: timed out after {timeout:.0f} s")
        try:
            status, value = parent.recv()
            answered = True
        except EOFError:
            proc.join(10)
            raise CompressError(f"latency of {path.name}: the measuring process died "
                                f"(exit code {proc.exitcode})") from None
    finally:
        parent.close()
        proc.join(10 if answered else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise CompressError(value)
    return value


def latency(path: Path, image_size: int | None = None, threads: int = 1, warmup: int = 10, runs: int = 100,
            batch: int = 1, cores: list[int] | None = None) -> dict:
    """onnxruntime CPU latency of ``batch`` images through :func:`measure` (a fresh process pinned to
    ``cores``, by default as many as ``threads``; ``threads=0`` uses every core and pins nothing).

    Returns image_size (default: the file's own), batch, threads (the core count for ``threads=0``),
    threads_setting ("1 thread", "N threads", "all cores"), cores (those the measurement ran on), pinned,
    runs, mean_ms, p50_ms, p90_ms, p99_ms, load_ms and peak_rss_mb. A file whose fixed spatial size is
    not ``image_size``, or that cannot be measured, raises CompressError."""
    m = measure(path, "onnxruntime", threads=threads, batch=batch, size=image_size, cores=cores, warmup=warmup,
                runs=runs)
    return {
        "image_size": m["size"],
        "batch": batch,
        "threads": threads if threads > 0 else (os.cpu_count() or 1),
        "threads_setting": threads_setting(threads),
        "cores": m["cores"],
        "pinned": m["pinned"],
        "runs": runs,
        "mean_ms": m["mean_ms"],
        "p50_ms": m["p50_ms"],
        "p90_ms": m["p90_ms"],
        "p99_ms": m["p99_ms"],
        "load_ms": m["load_ms"],
        "peak_rss_mb": m["peak_rss_mb"],
    }
