"""The report of bench/vs_llamacpp.py: the issue's targets at each size, the table and the
plot of file size against perplexity."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


# --- reporting -------------------------------------------------------------------------------


TARGET_RANGE = ("Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M")
HIGH = ("Q6_K", "Q8_0")


def targets(result: dict) -> list[dict]:
    """The issue's targets at each size, against the preset with and without imatrix."""
    f16 = result["f16"]["perplexity"]
    ours = {(r["method"], r["preset"]): r for r in result["ours"]}
    rows = []
    for size in result["sizes"]:
        name = size["preset"]
        for with_imatrix in (True, False):
            p = next((p for p in result["presets"] if p["preset"] == name and p["imatrix"] == with_imatrix), None)
            if p is None:
                continue
            row = {"preset": name, "preset_imatrix": with_imatrix}
            for m in [m + fb for m in ("none", "none-noimat", "coa", "shared", "per-config", "coa-lm", "none-measured")
                      for fb in ("", "+fb")]:
                r = ours.get((m, name))
                if r is None:
                    continue
                gap = p["perplexity"] - f16
                row[m] = {"ppl": r["perplexity"], "kl": r["kl"], "kl_ratio": r["kl"] / p["kl"],
                          "gap_closed": (p["perplexity"] - r["perplexity"]) / gap if gap > 0 else None,
                          "ppl_vs_preset": r["perplexity"] / p["perplexity"] - 1}
            c, pc, sh = ours.get(("coa", name)), ours.get(("per-config", name)), ours.get(("shared", name))
            if c and pc:
                row["coa_vs_per_config_ppl"] = c["perplexity"] / pc["perplexity"] - 1
                row["coa_vs_per_config_kl"] = c["kl"] / pc["kl"] - 1
            if c and sh:
                row["coa_vs_shared_ppl"] = c["perplexity"] / sh["perplexity"] - 1
                row["coa_vs_shared_kl"] = c["kl"] / sh["kl"] - 1
            rows.append(row)
    return rows


def report(result: dict, console: Console, png: Path) -> None:
    result["targets"] = targets(result)
    shown = ("none", "none+fb", "coa", "coa+fb", "shared", "per-config")
    table = Table("preset", "vs preset", *[f"{m}: gap closed / KL ratio" for m in shown],
                  "coa vs per-config ppl", "coa vs shared ppl", title="targets (gap closed >= 0.5 and KL ratio <= 0.5 "
                  "in Q3_K_M..Q5_K_M; ppl no worse at Q6_K+)")
    for t in result["targets"]:
        cells = []
        for m in shown:
            v = t.get(m)
            cells.append(f"{v['gap_closed']:+.2f} / {v['kl_ratio']:.2f}" if v and v["gap_closed"] is not None
                         else (f"- / {v['kl_ratio']:.2f}" if v else "-"))
        table.add_row(t["preset"], "imatrix" if t["preset_imatrix"] else "plain", *cells,
                      f"{100 * t['coa_vs_per_config_ppl']:+.1f} %" if "coa_vs_per_config_ppl" in t else "-",
                      f"{100 * t['coa_vs_shared_ppl']:+.1f} %" if "coa_vs_shared_ppl" in t else "-")
    console.print(table)
    f16 = result["f16"]
    presets = {(p["preset"], p["imatrix"]): p for p in result["presets"]}
    methods = list(dict.fromkeys(r["method"] for r in result["ours"]))
    f16 = result["f16"]
    table = Table("preset", "MB", "llama.cpp ppl / KL", "+imatrix ppl / KL",
                  *[f"{m} ppl / KL" for m in methods],
                  title=f"perplexity and mean KL from F16 in llama.cpp ({result['presets'][0]['tokens']} tokens of held-out "
                        f"text of another domain); F16: ppl {f16['perplexity']:.3f}, {f16['file_bytes'] / 1e6:.1f} MB")
    for size in result["sizes"]:
        p, q = presets.get((size["preset"], False)), presets.get((size["preset"], True))
        cells = []
        for m in methods:
            r = next((r for r in result["ours"] if r["method"] == m and r["preset"] == size["preset"]), None)
            cells.append(f"{r['perplexity']:.2f} / {r['kl']:.3f}" if r else "-")
        table.add_row(size["preset"], f"{size['file_bytes'] / 1e6:.2f}",
                      f"{p['perplexity']:.2f} / {p['kl']:.3f}" if p else "-",
                      f"{q['perplexity']:.2f} / {q['kl']:.3f}" if q else "-", *cells)
    console.print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key in zip(axes, ("perplexity", "kl")):
        for with_imatrix, style in ((False, "ks"), (True, "k^")):
            pts = sorted((p["file_bytes"] / 1e6, p[key], p["preset"]) for p in result["presets"] if p["imatrix"] == with_imatrix)
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style + "--",
                    label=f"llama.cpp presets{' + imatrix' if with_imatrix else ''}", alpha=0.8)
            if not with_imatrix:
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for m in methods:
            pts = sorted((r["file_bytes"] / 1e6, r[key]) for r in result["ours"] if r["method"] == m)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=m, alpha=0.8)
        if key == "perplexity":
            ax.axhline(f16["perplexity"], color="gray", lw=0.8, label="F16")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("perplexity" if key == "perplexity" else "mean KL from F16 (nats/token)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct in llama.cpp: presets vs ours at equal file bytes")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    console.print(f"wrote {png}")
