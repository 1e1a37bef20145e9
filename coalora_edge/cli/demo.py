"""`coalora-edge demo`: the end-to-end story on a model it builds itself.

For now the story stops after inspection: training, search, resolving and export join
as those parts land (see the issues). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import typer

from coalora_edge.cli.common import console, one_line_errors
from coalora_edge.cli.inspect import render
from coalora_edge.inspection import inspect_model
from coalora_edge.models import load_model
from coalora_edge.schemes import SCHEME_MODULES, get_scheme
from coalora_edge.tiny import build_tiny_model


@one_line_errors
def demo(
    out: Path = typer.Option(Path("coalora-demo"), help="Folder for the demo's model and outputs."),
) -> None:
    """Build a small Llama and show what every scheme can do with it (no download)."""
    model_dir = out / "base-model"
    if not (model_dir / "config.json").exists():
        # Rows of 256 let every ggml format hold every matrix, as in a real 1-8B model.
        build_tiny_model(model_dir, "llama", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=768, vocab=512)
    model = load_model(str(model_dir))
    for name in SCHEME_MODULES:
        scheme = get_scheme(name)
        report = inspect_model(model, scheme, scheme.default_choices)
        report["model"] = f"{model_dir} [{name}]"
        render(report)
    console.print("[dim]training, Pareto search, resolving and export join the demo as they land[/]")
