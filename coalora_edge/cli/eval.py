"""`coalora-edge eval BUNDLE --data PATH (--bpw X | --config FILE | --profile P)`: perplexity of one
configuration with its generated adapter, next to the same configuration without the
adapter and the unquantized base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import torch
import typer
from rich.table import Table

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle
from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.model.evaluate import lm_score
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.selection import select_config
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import bits_per_weight, config_nbytes
from coalora_edge.training.data import load_blocks


@one_line_errors
def eval(  # noqa: A001 - the command is called eval
    bundle: Path = typer.Argument(..., help="Bundle folder written by `coalora-edge train`."),
    data: List[str] = typer.Option(..., "--data", help="Text (.txt), JSON Lines (.jsonl) or hf:DATASET[:SPLIT]; repeatable."),
    bpw: Optional[float] = typer.Option(None, help="Use the best known configuration at or under this many bits per weight."),
    config: Optional[Path] = typer.Option(None, help="JSON file: {matrix: format} or a list of formats in matrix order."),
    profile: Optional[str] = typer.Option(None, help="Use the configuration `coalora-edge resolve` picks for this device profile (name or YAML file)."),
    model: Optional[str] = typer.Option(None, help="Base model folder, if it moved since training."),
    seq_len: int = typer.Option(256, help="Tokens per evaluation block."),
    max_blocks: int = typer.Option(64, min=1, help="Evaluate at most this many blocks."),
    batch_size: int = typer.Option(8, min=1, help="Blocks per forward pass."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Perplexity of a configuration with its adapter, without it, and of the unquantized model."""
    b = load_bundle(bundle)
    chosen = select_config(b, config=config, bpw=bpw, profile=load_profile(profile) if profile else None, model=model)
    restored = restore(b, model)
    # All of it is evaluation text: the split's validation part would only drop tokens.
    blocks = load_blocks(restored.tokenizer, data, seq_len, valid_fraction=0.5)
    text = torch.cat([blocks.train, blocks.valid])[:max_blocks]
    restored.use(chosen)
    wrapper = restored.wrapper
    adapted = lm_score(wrapper, text, batch_size)
    with wrapper.unquantized():
        unquantized = lm_score(wrapper, text, batch_size)
    with wrapper.without_adapter():
        quantized_only = lm_score(wrapper, text, batch_size)
    shapes = {m.name: m.shape for m in b.matrices}
    nbytes = config_nbytes(get_scheme(b.scheme), shapes, chosen)
    numel = sum(s[0] * s[1] for s in shapes.values())
    result = {
        "bundle": str(bundle), "method": b.manifest.adapter.method, "bytes": nbytes,
        "bits_per_weight": bits_per_weight(nbytes, numel), "config": chosen,
        "adapted": adapted.as_dict(), "quantized_without_adapter": quantized_only.as_dict(),
        "unquantized": unquantized.as_dict(),
    }
    if json_out:
        print_json(result)
        return
    table = Table("model", "perplexity", "mean loss", "tokens", title=f"{bundle} at {result['bits_per_weight']:.3f} bits/weight ({nbytes:,} bytes)")
    for label, key in [("quantized + adapter", "adapted"), ("quantized, no adapter", "quantized_without_adapter"), ("unquantized", "unquantized")]:
        s = result[key]
        table.add_row(label, f"{s['perplexity']:.3f}", f"{s['loss']:.4f}", f"{s['tokens']:,}")
    console.print(table)


def render_evaluations(pareto: dict[str, Any]) -> None:
    """The validation table `train` prints: one row per training configuration."""
    table = Table("config", "bits/weight", "bytes", "val. perplexity", "val. loss", title="training configurations (validation)")
    for e in sorted(pareto["evaluations"], key=lambda e: e["bits_per_weight"]):
        table.add_row(str(e["config"]), f"{e['bits_per_weight']:.3f}", f"{e['bytes']:,}", f"{e['perplexity']:.3f}", f"{e['loss']:.4f}")
    ref = pareto.get("unquantized")
    if ref:
        table.add_row("unquantized", "", "", f"{ref['perplexity']:.3f}", f"{ref['loss']:.4f}")
    console.print(table)
