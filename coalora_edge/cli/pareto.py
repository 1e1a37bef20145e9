"""`coalora-edge pareto BUNDLE [--json] [--plot FILE] [--compare OTHER]...`: the bundle's
Pareto front of bits per weight against validation perplexity, its hypervolume, and a
plot of every evaluated configuration with the front highlighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import typer
from rich.table import Table

from coalora_edge.bundle import PARETO, Bundle, load_bundle
from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.errors import CoaloraError
from coalora_edge.search.pareto import front_mask


def final_front(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front among the measurements with the final adapter, fewest bits first.

    Bundles written before the search carry no ``front`` flags: computed here alike.
    """
    last = max(e["step"] for e in evaluations)
    final = [e for e in evaluations if e["step"] == last]
    if all("front" in e for e in final):
        front = [e for e in final if e["front"]]
    else:
        mask = front_mask(np.array([[e["bits_per_weight"], e["loss"]] for e in final]))
        front = [e for e, keep in zip(final, mask) if keep]
    return sorted(front, key=lambda e: e["bits_per_weight"])


def summary(bundle: Bundle) -> dict[str, Any]:
    doc = bundle.read_json(PARETO)
    evaluated = bundle.evaluated()
    front = [e | {"formats": evaluated[e["config"]]} for e in final_front(doc["evaluations"])]
    training = bundle.manifest["training"]
    return {
        "bundle": str(bundle.path), "method": bundle.manifest["adapter"]["method"],
        "search": training.get("search", {}).get("mode", "ladder"), "evaluated": len(doc["evaluations"]),
        "front": front, "hypervolume": doc.get("hypervolume"), "unquantized": doc.get("unquantized"),
        "rounds": doc.get("search", {}).get("rounds", []),
        "search_seconds": training.get("search_seconds"), "search_share": training.get("search_share"),
    }


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


def write_plot(path: Path, evaluations: list[dict[str, Any]], main: dict[str, Any], others: list[dict[str, Any]]) -> None:
    """Every evaluation (earlier rounds' in grey), the front, compared fronts, the unquantized model."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if not path.parent.is_dir():
        raise CoaloraError(f"cannot write the plot: folder {path.parent} does not exist; create it or pick another --plot")
    last = max(e["step"] for e in evaluations)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stale, style in ((True, dict(color="0.8", s=10, label="earlier rounds")), (False, dict(color="tab:blue", s=14, label="final adapter"))):
        pts = [(e["bits_per_weight"], e["perplexity"]) for e in evaluations if (e["step"] != last) == stale]
        if pts:
            ax.scatter(*zip(*pts), **style)
    _front_line(ax, main["front"], dict(color="tab:red", marker="o", label=f"front ({main['method']}, {main['search']})"))
    for other in others:
        _front_line(ax, other["front"], dict(linestyle="--", marker=".", label=f"{other['method']}, {other['search']}: {Path(other['bundle']).name}"))
    if main["unquantized"]:
        ax.axhline(main["unquantized"]["perplexity"], color="k", linestyle=":", label="unquantized")
    ax.set_xlabel("bits per weight (adapted matrices)")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _front_line(ax, front: list[dict[str, Any]], style: dict) -> None:
    """A front as a staircase: at any budget, the best perplexity reachable at or under it."""
    ax.step([e["bits_per_weight"] for e in front], [e["perplexity"] for e in front], where="post", **style)
