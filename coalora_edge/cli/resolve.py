"""`coalora-edge resolve BUNDLE --profile P [--json]`: the configuration a device runs, its
formats, bits per weight, measured or predicted perplexity, and where the memory goes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from coalora_edge.bundle.store import load_bundle
from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.resolver import Resolution, resolve as resolve_bundle
from coalora_edge.units import format_size

#: memory terms in the order the breakdown adds them up, as people read them
MEMORY_TERMS = {
    "weights": "adapted matrices", "non_adapted": "embeddings, head, norms", "sidecar": "LoRA side-car",
    "kv_cache": "KV cache", "compute": "compute buffers", "reserved": "reserved (OS, app)",
}


@one_line_errors
def resolve(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `coalora-edge train`."),
    profile: str = typer.Option(..., "--profile", help="A shipped profile's name (see `coalora-edge profiles list`) or a profile YAML file."),
    model: Optional[str] = typer.Option(None, help="Base model folder, if it moved since training (only its config is read)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (with every matrix's format) instead of tables."),
) -> None:
    """The bundle's best configuration that fits the device, and its memory breakdown."""
    resolution = resolve_bundle(load_bundle(bundle), load_profile(profile), model)
    if json_out:
        print_json({"bundle": str(bundle), **resolution.as_dict()})
        return
    render(resolution)


def render(r: Resolution) -> None:
    quality = "measured" if r.loss_is == "measured" else f"predicted, {r.loss_is} from the measured configurations"
    kind = "a measured configuration" if r.source == "measured" else "a new configuration built for this budget"
    console.print(
        f"[bold]{r.profile.name}[/] ({r.profile.runtime}, {format_size(r.profile.memory_bytes)}, context "
        f"{r.profile.context_length}): {kind}, {r.bits_per_weight:.3f} bits/weight, "
        f"perplexity {r.perplexity:.3f} ({quality})", highlight=False,
    )
    if r.decode_ratio is not None:
        floor = f"floor {r.profile.min_decode_ratio:g}" if r.profile.min_decode_ratio else "no floor"
        console.print(f"predicted decode speed: {r.decode_ratio:.2f}x a uniform-format configuration of its size "
                      f"({floor}; min_decode_ratio in the profile)", highlight=False)
    formats = Table("stored format", "matrices", title="adapted matrices by format")
    for fmt, count in sorted(Counter(r.stored.values()).items()):
        formats.add_row(fmt, str(count))
    console.print(formats)
    memory = Table("memory", "bytes", "size", title=f"memory on {r.profile.name}")
    for term, label in MEMORY_TERMS.items():
        n = getattr(r.memory, term)
        memory.add_row(label, f"{n:,}", format_size(n))
    for label, n in [("total", r.memory.total), ("device memory", r.memory.memory), ("headroom", r.headroom)]:
        memory.add_row(f"[bold]{label}[/]", f"{n:,}", format_size(n))
    console.print(memory)
