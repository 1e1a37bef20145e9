"""A bundle's Pareto front as people read it: the front measured with the final adapter,
a summary of the search, and the plot of bits per weight against perplexity (used by
`coalora-edge pareto` and the demo)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from coalora_edge.bundle.lookup import final_evaluations
from coalora_edge.bundle.store import PARETO, Bundle
from coalora_edge.errors import CoaloraError
from coalora_edge.fileio import atomic_write_bytes
from coalora_edge.search.front import front_mask

#: perplexities spanning more than this factor are drawn on a log axis, narrower ones linear
LOG_SCALE_RANGE = 3.0


def final_front(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The front among the measurements with the final adapter, fewest bits first.

    Bundles written before the search carry no ``front`` flags: computed here alike.
    """
    final = final_evaluations(evaluations)
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
    training = bundle.manifest.training
    return {
        "bundle": str(bundle.path), "method": bundle.manifest.adapter.method,
        "search": training.search.mode, "evaluated": len(doc["evaluations"]),
        "front": front, "hypervolume": doc.get("hypervolume"), "unquantized": doc.get("unquantized"),
        "rounds": doc.get("search", {}).get("rounds", []),
        "search_seconds": training.search_seconds, "search_share": training.search_share,
    }


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
    low, high = ax.get_ylim()
    if high > LOG_SCALE_RANGE * low:  # 2-bit configurations can be 10-100x worse than 8-bit ones
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def _front_line(ax, front: list[dict[str, Any]], style: dict) -> None:
    """A front as a staircase: at any budget, the best perplexity reachable at or under it."""
    ax.step([e["bits_per_weight"] for e in front], [e["perplexity"] for e in front], where="post", **style)
