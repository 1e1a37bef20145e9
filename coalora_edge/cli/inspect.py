"""`coalora-edge inspect MODEL`: adaptable matrices, the formats each can take, size range."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.table import Table

from coalora_edge.cli.common import console, one_line_errors, print_json, split_list
from coalora_edge.model.loading import load_model
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.inspection import inspect_model


@one_line_errors
def inspect(
    model: str = typer.Argument(..., help="Hugging Face model folder or hub id."),
    scheme: str = typer.Option("gguf", help="Quantization scheme: gguf, onnx or nf."),
    choices: Optional[str] = typer.Option(None, help="Comma-separated formats (default: the scheme's defaults)."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own Python code (only for repos you trust)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show a model's adaptable matrices, the formats each can take and the size range."""
    sch = get_scheme(scheme)
    names = sch.choices(split_list(choices, "--choices"))
    report = inspect_model(load_model(model, trust_remote_code=trust_remote_code), sch, names)
    report["model"] = model
    if json_out:
        print_json(report)
    else:
        render(report)


def render(report: dict[str, Any]) -> None:
    console.print(
        f"[bold]{report['model']}[/]  {report['architecture']}  {report['parameters']:,} parameters, "
        f"{report['layers']} layers, {len(report['matrices'])} adaptable matrices "
        f"({report['adapted_parameters']:,} weights)"
    )
    matrices = Table("matrix", "layer", "module", "shape (out x in)", title="adaptable matrices")
    for r in report["matrices"]:
        matrices.add_row(r["name"], str(r["layer"]), r["module"], "x".join(map(str, r["shape"])))
    console.print(matrices)

    # Matrices of one shape take the same formats: one table per shape keeps this short.
    by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for r in report["matrices"]:
        by_shape.setdefault(tuple(r["shape"]), r["formats"])
    formats = Table("shape", "format", "stored as", "bits/weight", "bytes", title=f"{report['scheme']} formats")
    for shape, options in by_shape.items():
        for i, o in enumerate(options):
            stored = o["stored_as"] if o["stored_as"] == o["choice"] else f"[yellow]{o['stored_as']} (fallback)[/]"
            formats.add_row("x".join(map(str, shape)) if i == 0 else "", o["choice"], stored, f"{o['bits_per_weight']:.4f}", f"{o['bytes']:,}")
    console.print(formats)
    for choice, stored in report["fallbacks"]:
        console.print(f"[yellow]fallback:[/] {choice} cannot hold some rows here; llama.cpp stores them as {stored}")
    console.print(
        f"configuration size: smallest {report['smallest_config_bytes']:,} bytes "
        f"({report['smallest_bits_per_weight']:.3f} bits/weight), largest {report['largest_config_bytes']:,} bytes "
        f"({report['largest_bits_per_weight']:.3f} bits/weight)"
    )
