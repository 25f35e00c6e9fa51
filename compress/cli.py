"""Command line: parses flags into config overrides and calls the library. Failures a user can fix
print one line on stderr and exit with code 2; ``-v``/``-q`` set how much the log says."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from compress.errors import CompressError, as_os_error, os_error_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distill, prune, quantize and export image classifiers for edge CPUs.")


@app.callback()
def _options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="say more (repeatable): debug lines"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only"),
) -> None:
    from compress import dist
    from compress.logs import setup

    # under torchrun the console is rank 0's; the others say only what goes wrong
    setup(-1 if quiet or (dist.launched() and dist.launch_rank() != 0) else verbose)


@app.command()
def pipeline(
    recipe: Path = typer.Argument(..., help="recipe YAML, e.g. pipelines/mobilenet.yaml"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a recipe value: section.key=value (repeatable)"),
    teacher: Optional[str] = typer.Option(None, help="teacher model (same as --set teacher.model=NAME)"),
    student: Optional[str] = typer.Option(None, help="student model (same as --set distill.student=NAME)"),
    dataset: Optional[str] = typer.Option(None, help="digits | cifar10 | cifar100 | imagefolder:PATH"),
    download: bool = typer.Option(False, "--download", help="download the dataset if absent (needs the network)"),
    name: Optional[str] = typer.Option(None, help="run name (folder under the artifacts directory)"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where runs are written"),
    force: bool = typer.Option(False, "--force", help="rerun every stage even if unchanged"),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", min=0, metavar="SECONDS",
                                                 help="while another process runs the same run name, wait at "
                                                      "most this long (0: refuse at once); default: wait"),
    tune: bool = typer.Option(False, "--tune", help="search the recipe's tune.space on the validation split first "
                                                    "and run with the best settings (same as tune.enabled=true)"),
    check: bool = typer.Option(False, "--check", help="validate the recipe and its overrides for --processes "
                                                      "processes and exit; runs nothing"),
    processes: Optional[int] = typer.Option(None, "--processes", min=1, max=4096,
                                            help="with --check: the number of processes torchrun will start "
                                                 "(default: torchrun's, or 1)"),
) -> None:
    """Run a recipe's stages; unchanged stages are skipped."""
    from compress.config import load_recipe
    from compress.pipeline import run_pipeline
    from compress.report import write_reports

    overrides = list(set_)
    for key, value in (("teacher.model", teacher), ("distill.student", student), ("data.dataset", dataset),
                       ("name", name)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if download:
        overrides.append("data.download=true")
    if tune:
        overrides.append("tune.enabled=true")
    cfg = load_recipe(recipe, overrides)
    output_folder(artifacts / cfg.name, "--artifacts")
    from compress import dist

    if processes is not None and not check:
        raise CompressError("--processes goes with --check; torchrun --nproc_per_node sets how many processes run")
    if check:
        from compress.pipeline import check_processes

        n = processes or dist.launch_world()
        check_processes(cfg, n)
        if dist.launch_rank() == 0:
            typer.echo(f"{recipe}: valid, stages {' -> '.join(cfg.stages)}, {n} process{'es' if n > 1 else ''}")
        return

    tuning = None
    if cfg.tune.enabled:
        from compress.tune import run_tune, with_settings

        if dist.launched():
            raise CompressError("tuning runs as one process; run compress tune first, then the pipeline under torchrun")
        tuning = run_tune(cfg, artifacts=artifacts)
        cfg = with_settings(cfg, tuning["settings"])
    from compress.graph import NODES

    dist.init([cfg.training_section(s).device for s in cfg.stages if NODES[s].trains])
    try:
        ctx = run_pipeline(cfg, artifacts=artifacts, force=force, lock_timeout=lock_timeout,
                           finish=lambda c: write_reports(c, tuning=tuning))
    finally:
        dist.shutdown()
    if dist.launch_rank() == 0:
        typer.echo(f"run {cfg.name}: {ctx.run_dir}/report.md")
        typer.echo((ctx.run_dir / "report.md").read_text())


@app.command("tune")
def tune_command(
    recipe: Path = typer.Argument(..., help="recipe YAML; its tune section sets the studies, space and budget"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a recipe value: section.key=value (repeatable)"),
    dataset: Optional[str] = typer.Option(None, help="digits | cifar10 | cifar100 | imagefolder:PATH"),
    name: Optional[str] = typer.Option(None, help="run name (folder under the artifacts directory)"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where runs are written"),
    force: bool = typer.Option(False, "--force", help="start the studies over"),
) -> None:
    """Search the settings of the recipe's tune section on the validation split (Optuna); a killed
    search continues with the same command. Prints the chosen settings as --set flags for the pipeline."""
    from compress.config import load_recipe
    from compress.report import tuning_markdown
    from compress.tune import run_tune

    overrides = list(set_)
    for key, value in (("data.dataset", dataset), ("name", name)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_recipe(recipe, overrides)
    output_folder(artifacts / cfg.name, "--artifacts")
    record = run_tune(cfg, artifacts=artifacts, force=force)
    typer.echo("\n".join(tuning_markdown(record)))
    flags = " ".join(f"--set {k}={v}" for k, v in record["settings"].items())
    typer.echo(f"\nrun with: compress pipeline {recipe} {flags}   (or: compress pipeline {recipe} --tune)")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="a model.safetensors written by compress (with its .json)"),
    out: Path = typer.Option(..., "--out", "-o", help="ONNX file to write"),
    image_size: Optional[int] = typer.Option(None, min=8, max=2048, help="input size; default: the training size"),
    opset: int = typer.Option(18, min=17, max=23),
) -> None:
    """Export a compress checkpoint to ONNX (dynamic batch axis, onnx.checker, metadata); a QAT
    checkpoint (quantize/model.safetensors) becomes an int8 QDQ file."""
    import json

    from compress.export import export_onnx
    from compress.models import load_checkpoint
    from compress.qat import export_qdq, load_qat_checkpoint

    if out.is_dir():
        raise CompressError(f"--out {out} is a folder; give the path of the ONNX file to write")
    output_folder(out.parent, "--out")
    meta_path = checkpoint.with_suffix(".json")
    try:
        is_qat = bool(json.loads(meta_path.read_text()).get("qat"))
    except (OSError, ValueError, AttributeError):
        is_qat = False  # load_checkpoint names the problem
    model, meta = load_qat_checkpoint(checkpoint) if is_qat else load_checkpoint(checkpoint)
    size = image_size or int(meta.get("image_size", 224))
    props = {f"compress.{k}": v for k, v in meta.items()}
    props["compress.input_size"] = [1, 3, size, size]
    props["compress.precision"] = "int8" if is_qat else "fp32"
    if is_qat:
        export_qdq(model, out, size, opset=opset, metadata=props)
    else:
        export_onnx(model, out, size, opset=opset, metadata=props)
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX files, e.g. teacher FP32, student FP32, pruned, INT8"),
    runtime: list[str] = typer.Option(["onnxruntime"], "--runtime", "-r",
                                      help="onnxruntime | openvino (repeatable; an absent runtime is reported, not an error)"),
    threads: list[int] = typer.Option([1], help="threads per cell, pinned to as many cores (repeatable; 0 = all cores)"),
    batch: list[int] = typer.Option([1], help="batch sizes (repeatable)"),
    size: list[int] = typer.Option([], help="input sizes (repeatable); default: each file's own"),
    cores: Optional[str] = typer.Option(None, help="cores to pin to, e.g. 0,1 (default: the first N for N threads)"),
    runs: int = typer.Option(100, min=1, max=100_000),
    warmup: int = typer.Option(10, min=0, max=10_000),
    dataset: Optional[str] = typer.Option(None, help="also measure each file's accuracy on this dataset's test split"),
    out: Path = typer.Option(Path("artifacts/bench"), "--out", "-o", help="folder for bench.md, bench.json, bench.html"),
    as_json: bool = typer.Option(False, "--json", help="print the JSON result instead of the Markdown table"),
) -> None:
    """Edge latency report: each ONNX file × runtime × threads × batch × input size in a fresh process
    pinned to CPU cores: p50/p90/p99, throughput, peak memory, load time; Markdown, JSON and HTML."""
    import json
    import os

    from compress.edgebench import bench_files, markdown, write_report
    from compress.evaluate import onnx_accuracy

    ncpu = os.cpu_count() or 1
    threads = [ncpu if t == 0 else t for t in threads]
    if any(b < 1 or b > 4096 for b in batch):
        raise CompressError("--batch must be between 1 and 4096")
    if any(s < 8 or s > 2048 for s in size):
        raise CompressError("--size must be between 8 and 2048")
    core_list = None
    if cores:
        try:
            core_list = [int(c) for c in cores.split(",") if c.strip()]
        except ValueError:
            raise CompressError(f"--cores {cores!r}: give core numbers separated by commas, e.g. 0,1") from None
        if len(core_list) < max(threads):
            raise CompressError(f"--cores lists {len(core_list)} cores for {max(threads)} threads")
    for m in models:
        if not m.is_file():
            raise CompressError(f"ONNX file {m} is a folder" if m.is_dir() else f"ONNX file not found: {m}")
    output_folder(out, "--out")
    result = bench_files(models, list(dict.fromkeys(runtime)), threads, batch, size or None, core_list, warmup, runs)
    if all("error" in c for c in result["cells"]):  # a report with no measurement in it is not written
        why = "; ".join(dict.fromkeys(f"{c['label']} ({c['runtime']}): {c['error']}" for c in result["cells"]))
        raise CompressError(f"nothing could be measured: {why}")
    if dataset:
        from pydantic import ValidationError

        from compress.config import DataConfig
        from compress.data import load_data

        for f in result["files"]:
            try:
                data = load_data(DataConfig(dataset=dataset, image_size=f["input"][-1] or 224))
            except ValidationError as e:
                raise CompressError(f"--dataset: {e.errors()[0]['msg']}") from None
            f["accuracy"] = onnx_accuracy(Path(f["file"]), data.test)
    write_report(result, out)
    typer.echo(json.dumps(result, indent=2) if as_json else markdown(result))
    logging.getLogger("compress.cli").info(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.html'}")


@app.command()
def models(
    pattern: str = typer.Argument("*", help="wildcard filter, e.g. 'mobilenet*'"),
    all_: bool = typer.Option(False, "--all", help="every timm and torchvision classification model, not only "
                                                   "the tested ones"),
) -> None:
    """List the tested teachers and students with their parameter counts (10 classes); with --all, the
    name of every timm and torchvision classification model a recipe may use."""
    from compress.models import ALIASES, REGISTRY, all_model_names, list_models

    if all_:
        names = all_model_names(pattern)
        if not names:
            raise CompressError(f"no timm or torchvision model matches {pattern!r}")
        width = max(24, max(len(n) for n, _ in names) + 2)
        typer.echo(f"{'name':<{width}}{'source':<13}tested")
        for name, source in names:
            typer.echo(f"{name:<{width}}{source:<13}{'yes' if name in REGISTRY else ''}".rstrip())
        typer.echo(f"{len(names)} models; 'tested' ones are those of 'compress models'")
        return
    from compress.metrics import count_params
    from compress.models import create_model

    specs = list_models(pattern)
    if not specs:
        raise CompressError(f"no tested model matches {pattern!r}; try compress models, or "
                            f"compress models --all '{pattern}' for every timm and torchvision model")
    alias_of = {v: k for k, v in ALIASES.items()}
    typer.echo(f"{'name':<24}{'role':<9}{'source':<13}{'params (10 classes)':>20}  alias")
    for s in specs:
        n = count_params(create_model(s.name, num_classes=10))
        typer.echo(f"{s.name:<24}{s.role:<9}{s.source:<13}{n:>20,}  {alias_of.get(s.name, '')}")
    typer.echo("these are the tested models; any timm or torchvision classification model works too: "
               "compress models --all PATTERN")


@app.command()
def methods() -> None:
    """List the distillation methods (distill.method in a recipe) with a line each."""
    from compress.distill.methods import METHODS, summary

    width = max(map(len, METHODS)) + 2
    needs = {"none": "no teacher", "one": "teacher", "many": "several teachers"}
    for name, cls in METHODS.items():
        need = "teacher + assistant" if cls.uses_assistant else needs[cls.teachers]
        typer.echo(f"{name:<{width}}{need:<21}{summary(cls)}")


@app.command()
def compare(
    recipe: Path = typer.Argument(Path("pipelines/methods.yaml"), help="recipe with a compare section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a recipe value: section.key=value (repeatable)"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where runs are written"),
    force: bool = typer.Option(False, "--force", help="retrain every method even if unchanged"),
) -> None:
    """Train the recipe's student with each listed distillation method on the same data and budget;
    writes a table (accuracy, relative error, KL, correlation, time per epoch) to the run's report."""
    from compress.compare import run_compare

    _run_recipe(run_compare, recipe, set_, artifacts, force)


def _run_recipe(runner, recipe: Path, overrides: list[str], artifacts: Path, force: bool) -> None:
    """Load the recipe with its overrides, run it, print the report it wrote."""
    from compress.config import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    output_folder(artifacts / cfg.name, "--artifacts")
    runner(cfg, artifacts=artifacts, force=force)
    typer.echo((artifacts / cfg.name / "report.md").read_text())


@app.command()
def sweep(
    recipe: Path = typer.Argument(Path("pipelines/sweep.yaml"), help="recipe with a sweep section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a recipe value: section.key=value (repeatable)"),
    artifacts: Path = typer.Option(Path("artifacts"), help="where runs are written"),
    force: bool = typer.Option(False, "--force", help="retrain every student even if unchanged"),
) -> None:
    """Train every student of the sweep with each series (KD and from scratch) on one budget; writes
    sweep.csv, sweep.json, accuracy-vs-distillation-factor / relative-error / latency plots and report.html."""
    from compress.sweep import run_sweep

    _run_recipe(run_sweep, recipe, set_, artifacts, force)


def output_folder(folder: Path, option: str) -> None:
    """Refuse, before anything runs, an output folder that cannot be one: an existing file, a path
    through a file, or a place this user may not write to. (A full disk, or a read-only file system
    that permissions do not show, is met when writing: the CLI's one line too.)"""
    import os

    existing = folder.expanduser()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CompressError(f"{option}: {existing} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1))
        raise CompressError(f"{option}: {existing} is on a read-only file system" if read_only else
                            f"{option}: no permission to write in {existing}")


def _usage_errors() -> tuple[type[Exception], ...]:
    """What a bad command line raises: typer's own exceptions (typer >= 0.20 carries its own copy of
    click), or click's for older typer releases."""
    kinds: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def _exits() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [typer.Exit]
    try:
        import click

        kinds.append(click.exceptions.Exit)
    except (ImportError, AttributeError):
        pass
    return tuple(kinds)


def _one_process_unless_pipeline(args: list[str]) -> None:
    from compress import dist

    command = next((a for a in args if not a.startswith("-")), "")
    if dist.launched() and command != "pipeline":
        raise CompressError(f"only 'compress pipeline' runs under torchrun; run 'compress {command}' as one process")


def main() -> None:
    """Entry point: one line on stderr and exit 2 for every error a user can fix."""
    command = typer.main.get_command(app)
    args = sys.argv[1:] or ["--help"]
    try:
        _one_process_unless_pipeline(args)
        code = command.main(args=args, prog_name="compress", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130) and, not standalone, returns its code
            raise KeyboardInterrupt
    except CompressError as e:
        logging.getLogger("compress").debug("failed", exc_info=True)
        print(f"compress: error: {e}", file=sys.stderr)
        sys.exit(2)
    except _exits() as e:
        sys.exit(getattr(e, "exit_code", 0))
    except _usage_errors() as e:
        print(f"compress: error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("compress: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    except typer.Abort:
        print("compress: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a failed system call (full disk, permissions) is the user's to fix
        failed = as_os_error(e)
        if failed is None:
            raise  # a bug: its traceback is what a report needs
        logging.getLogger("compress").debug("failed", exc_info=True)
        print(f"compress: error: {os_error_line(failed)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
