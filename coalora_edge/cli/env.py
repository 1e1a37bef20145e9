"""`coalora-edge env [--json]`: the versions and hardware a bug report needs (accelerate's
`env` is the model): Python, the libraries coalora-edge runs on, what ggml was built with
and sees of the CPU, ONNX Runtime's providers, and CUDA devices."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import typer
from rich.table import Table

from coalora_edge import __version__
from coalora_edge.cli.common import console, one_line_errors, print_json

#: distributions whose versions matter to a report, in the order they are shown
PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "onnx", "onnxruntime", "onnxruntime-genai",
            "optimum", "llama-cpp-python", "gguf", "peft", "numpy")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ggml() -> dict[str, Any]:
    """What llama-cpp-python's ggml was built with and finds on this CPU."""
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    features = {}
    for part in info.replace("\n", "|").split("|"):
        name, _, value = part.rpartition("=")
        if name.strip():
            features[name.strip().removeprefix("CPU : ")] = value.strip()
    return {"system_info": info.strip(), "features": features, "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime
    except ImportError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"providers": onnxruntime.get_available_providers(), "device": onnxruntime.get_device()}


def _torch() -> dict[str, Any]:
    import torch

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"threads": torch.get_num_threads(), "cuda": torch.version.cuda, "cuda_devices": devices,
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}


def environment() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "coalora-edge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": cpus,
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": _torch(),
        "ggml": _ggml(),
        "onnxruntime": _onnxruntime(),
    }


@one_line_errors
def env(json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Print versions, ggml's CPU features and the accelerators seen, for bug reports."""
    found = environment()
    if json_out:
        print_json(found)
        return
    table = Table("", "", title="coalora-edge env (paste this into a bug report)", show_header=False)
    for key in ("coalora-edge", "python", "platform", "cpus"):
        table.add_row(key, str(found[key]))
    for package, version in found["packages"].items():
        table.add_row(package, version or "[dim]not installed[/]")
    t = found["torch"]
    table.add_row("torch threads / CUDA", f"{t['threads']} / {t['cuda'] or 'none'}: {', '.join(t['cuda_devices']) or 'no devices'}")
    g = found["ggml"]
    table.add_row("ggml", g.get("system_info") or g.get("error", ""))
    o = found["onnxruntime"]
    table.add_row("onnxruntime providers", ", ".join(o.get("providers", [])) or o.get("error", ""))
    console.print(table)
