"""`coalora-edge export BUNDLE --profile P --format gguf|onnx|peft --out DIR [--adapter-mode merged|sidecar]`:
write the configuration a device runs as files its runtime loads, verified in that runtime
(peft: a PEFT adapter and the base as trained, for PyTorch, from a bundle of any scheme)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import Bundle, load_bundle
from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.errors import CoaloraError
from coalora_edge.exporters.common.report import ADAPTER_MODES
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.selection import select_config
from coalora_edge.runtimes import FRAMEWORK_EXPORTERS, export_formats
from coalora_edge.units import format_size


@one_line_errors
def export(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `coalora-edge train`."),
    out: Path = typer.Option(..., "--out", help="Folder to write (atomically: complete or not at all)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Device profile (name or YAML file): picks the configuration, the adapter mode and the memory check."),
    fmt: Optional[str] = typer.Option(None, "--format", help=f"Artifact format: {', '.join([*export_formats(), *FRAMEWORK_EXPORTERS])} (default: the bundle's scheme)."),
    config: Optional[Path] = typer.Option(None, help="Export this configuration instead of the profile's: JSON {matrix: format} or a list of formats."),
    bpw: Optional[float] = typer.Option(None, help="Export the best known configuration at or under this many bits per weight."),
    adapter_mode: Optional[str] = typer.Option(None, help="merged: one self-contained file; sidecar: base as trained + LoRA the runtime applies (default: the profile's, else merged; merged for a bundle trained --merge-aware; peft: sidecar only)."),
    model: Optional[str] = typer.Option(None, help="Base model folder, if it moved since training."),
    rounding: Optional[str] = typer.Option(None, help="Merged files: nearest (default) re-quantizes W + s B'A plainly; feedback picks the codes for the layers' outputs on calibration text (GPTQ)."),
    calibration: Optional[Path] = typer.Option(None, help="Calibration text for --rounding feedback (implies it; default: the training data the bundle names)."),
    accuracy_level: Optional[int] = typer.Option(None, min=0, max=4, help="onnx only: MatMulNBits accuracy level; 4 (default) rounds activations to int8 and decodes 2/8-bit nodes fast, 0 computes in exact fp32."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print export.json instead of a summary."),
) -> None:
    """Export a bundle's configuration for a device, and verify it in the real runtime."""
    b = load_bundle(bundle)
    device = load_profile(profile) if profile else None
    fmt = fmt or b.scheme
    # PEFT applies the LoRA itself: a profile's mode is its device runtime's, not PEFT's
    # a merge-aware bundle is only what it learned as a merged file, whatever the profile prefers
    default = "merged" if b.manifest.adapter.merge_aware or not device else device.adapter_mode
    mode = adapter_mode or ("sidecar" if fmt in FRAMEWORK_EXPORTERS else default)
    if mode not in ADAPTER_MODES:
        raise CoaloraError(f"--adapter-mode must be one of {', '.join(ADAPTER_MODES)}, got {mode!r}")
    if device:
        device = device.model_copy(update={"adapter_mode": mode})  # the memory model counts the mode shipped
    exporter = _exporter(fmt, b)
    chosen = select_config(b, config=config, bpw=bpw, profile=device, model=model)
    options = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    if options and fmt != "onnx":
        raise CoaloraError("--accuracy-level applies to --format onnx only")
    report = exporter.export(restore(b, model), chosen, out, adapter_mode=mode, profile=device, force=force,
                             rounding=rounding, calibration=calibration, **options)
    if json_out:
        print_json(report)
    else:
        render(report, out)


def _exporter(fmt: str, bundle: Bundle) -> Any:
    if fmt in FRAMEWORK_EXPORTERS:
        return importlib.import_module(FRAMEWORK_EXPORTERS[fmt])
    formats = export_formats()
    if fmt not in formats:
        raise CoaloraError(f"unknown --format {fmt!r}; choose one of: {', '.join([*formats, *FRAMEWORK_EXPORTERS])}")
    if fmt != bundle.scheme:
        raise CoaloraError(
            f"bundle {bundle.path} was trained for {bundle.scheme} formats and cannot be shipped as {fmt}; "
            f"use --format {bundle.scheme} or retrain with --scheme {fmt}"
        )
    return formats[fmt].hook("exporter")


def render(report: dict[str, Any], out: Path) -> None:
    files = Table("file", "bytes", "size", title=f"{out} ({report['runtime']}, {report['adapter_mode']})")
    for name, f in report["files"].items():
        files.add_row(name, f"{f['bytes']:,}", format_size(f["bytes"]))
    console.print(files)
    checks = Table("verification", "KL (nats)", "top-1", "top-1, decisive", "positions",
                   title="next-token agreement on the verification prompts and calibration text")
    for label, figures in report["verification"].items():
        if isinstance(figures, dict) and {"kl", "top1"} <= figures.keys():
            checks.add_row(label.replace("_", " "), f"{figures['kl']:.3g}", f"{figures['top1']:.3f}",
                           f"{figures['decisive_top1']:.3f}", f"{figures['decisive_positions']}/{figures['positions']}")
    console.print(checks)
    memory = report.get("memory")
    if memory:
        console.print(f"memory on {report['profile']}: {format_size(memory['total'])} of {format_size(memory['memory'])} "
                      f"(headroom {format_size(memory['headroom'])})", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
