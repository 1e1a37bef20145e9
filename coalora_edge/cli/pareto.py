"""`coalora-edge pareto BUNDLE [--json] [--plot FILE] [--compare OTHER]...`: the bundle's
Pareto front of bits per weight against validation perplexity, its hypervolume, and a
plot of every evaluated configuration with the front highlighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from coalora_edge.bundle.store import PARETO, load_bundle
from coalora_edge.bundle.summary import summary, write_plot
from coalora_edge.cli.common import console, one_line_errors, print_json


@one_line_errors
def pareto(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `coalora-edge train`."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG: bits per weight vs perplexity, front highlighted."),
    compare: List[Path] = typer.Option([], "--compare", help="Another bundle whose front to draw as a reference line (e.g. one trained with --search none or --method none); repeatable."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (front with every matrix's format, hypervolume, rounds) instead of tables."),
) -> None:
    """The Pareto front of bits per weight vs validation perplexity of a bundle."""
    loaded = load_bundle(bundle)
    main = summary(loaded)
    others = [summary(load_bundle(path)) for path in compare]
    if plot is not None:
        write_plot(plot, loaded.read_json(PARETO)["evaluations"], main, others)
    if json_out:
        print_json(main | {"compare": [{k: o[k] for k in ("bundle", "method", "search", "front")} for o in others]})
        return
    render(main)
    if plot is not None:
        console.print(f"[green]wrote[/] {plot}")


def render(s: dict[str, Any]) -> None:
    table = Table("config", "bits/weight", "bytes", "val. perplexity", "val. loss", "step",
                  title=f"Pareto front of {s['bundle']} ({s['method']}, search {s['search']}, {s['evaluated']} evaluated)")
    for e in s["front"]:
        table.add_row(str(e["config"]), f"{e['bits_per_weight']:.3f}", f"{e['bytes']:,}", f"{e['perplexity']:.3f}",
                      f"{e['loss']:.4f}", str(e["step"]))
    if s["unquantized"]:
        table.add_row("unquantized", "", "", f"{s['unquantized']['perplexity']:.3f}", f"{s['unquantized']['loss']:.4f}", "")
    console.print(table)
    hv = s["hypervolume"]
    if hv:
        console.print(f"hypervolume {hv['value']:.4f} (normalised bits and loss, lo {hv['lo']}, hi {hv['hi']}, "
                      f"reference point {hv['reference_point']})", highlight=False)
    for i, r in enumerate(s["rounds"]):
        console.print(f"round {i + 1} at step {r['step']}: {r['measured']} measured ({r['proposed']} proposed), "
                      f"{r['training_set']} kept, hypervolume {r['hypervolume']:.4f}, {r['seconds']:.1f} s", highlight=False)
    if s["search_share"] is not None:
        console.print(f"search: {s['search_seconds']:.1f} s, {100 * s['search_share']:.1f}% of training wall time")
