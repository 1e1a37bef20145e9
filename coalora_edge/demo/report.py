"""The demo's report.md from its report.json content: pure functions, no I/O.

:func:`device_table` is the one summary table; the CLI prints the same rows with Rich.
"""

from __future__ import annotations

from typing import Any

from coalora_edge.units import format_size

DEVICE_COLUMNS = ("device", "runtime", "bits/weight", "model files", "headroom",
                  "ppl quantized", "ppl + adapter", "ppl in runtime", "KL", "top-1")
#: what a runtime loads; the rest of an export folder is tokenizer and config files
MODEL_SUFFIXES = (".gguf", ".onnx", ".onnx_data")


def model_files_bytes(row: dict[str, Any]) -> int:
    return sum(n for name, n in row["files"].items() if name.endswith(MODEL_SUFFIXES))


def device_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per device, in DEVICE_COLUMNS order. KL and top-1: the runtime against the
    model as trained (PyTorch, adapter applied unmerged), from the exporter's verification."""
    rows = []
    for r in report["devices"]:
        ppl, agreement = r["perplexity"], r["verification"]["runtime_vs_trained"]
        rows.append((
            r["device"], f"{r['runtime']} {r['adapter_mode']}", f"{r['bits_per_weight']:.2f}",
            format_size(model_files_bytes(r)), format_size(r["headroom"]),
            f"{ppl['pytorch_no_adapter']:.2f}", f"{ppl['pytorch']:.2f}", f"{ppl['runtime']:.2f}",
            f"{agreement['kl']:.2g}", f"{agreement['top1']:.2f}",
        ))
    return rows


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Two short lines per device for a terminal of any width (the table is in report.md)."""
    lines = []
    for r in report["devices"]:
        ppl, agreement = r["perplexity"], r["verification"]["runtime_vs_trained"]
        lines += [
            f"{r['device']}: {r['runtime']} {r['adapter_mode']}, {r['bits_per_weight']:.2f} bits/weight, "
            f"{format_size(model_files_bytes(r))}, headroom {format_size(r['headroom'])}",
            f"  perplexity {ppl['pytorch_no_adapter']:.2f} quantized, {ppl['pytorch']:.2f} adapted, "
            f"{ppl['runtime']:.2f} in {r['runtime']} (top-1 {agreement['top1']:.2f})",
        ]
    return lines


def _md_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _base_model(report: dict[str, Any]) -> list[str]:
    b = report["base_model"]
    shape = (f"{b['model_type']}, hidden {b['hidden_size']}, {b['num_hidden_layers']} layers, "
             f"MLP {b['intermediate_size']}, vocabulary {b['vocab_size']}")
    if not b["pretrained_by_demo"]:
        return [f"Base model: `{b['path']}` ({shape})."]
    p = b["pretraining"]["spec"]
    how = "loaded from the cache" if b["cached"] else f"pretrained in {report['seconds']['base model']:.0f} s and cached"
    return [f"Base model: a {shape} model pretrained by the demo for {p['steps']} steps of {p['batch_size']} x "
            f"{p['seq_len']} tokens on `{report['data'][0]}` (the Python standard library's docstrings), {how}: "
            f"`{b['path']}`."]


def _bundles(report: dict[str, Any]) -> list[str]:
    lines = ["| bundle | steps | trained on | evaluated | hypervolume | search share | unquantized ppl | front (bits: ppl) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in report["bundles"].values():
        front = ", ".join(f"{e['bits_per_weight']:.2f}: {e['perplexity']:.2f}" for e in s["front"])
        hv = f"{s['hypervolume']:.4f}" if s["hypervolume"] is not None else "-"
        lines.append(f"| `{s['path']}` ({s['scheme']}) | {s['steps']} | {s['training_set']} configurations | "
                     f"{s['evaluated']} | {hv} | {100 * s['search_share']:.0f} % | {s['unquantized_perplexity']:.2f} | {front} |")
    lines.append("")
    lines += [f"![Pareto front, {s['scheme']}]({s['plot']})" for s in report["bundles"].values()]
    return lines


def _device_details(r: dict[str, Any]) -> list[str]:
    formats = ", ".join(f"{fmt} x{n}" for fmt, n in sorted(r["formats"].items()))
    kind = "a measured configuration" if r["source"] == "measured" else "a new configuration built for its budget"
    lines = [
        f"### {r['device']} ({r['runtime']}, {r['adapter_mode']})",
        "",
        f"Profile `{r['profile']}`: {format_size(r['memory_bytes'])} of memory. The resolver picked {kind}: "
        f"{r['bits_per_weight']:.3f} bits per weight ({formats}), {format_size(r['memory_total'])} in all, "
        f"headroom {format_size(r['headroom'])}. Model files in `{r['export']}`: "
        f"{', '.join(f'{n} {format_size(b)}' for n, b in r['files'].items() if n.endswith(MODEL_SUFFIXES))}; tensor bytes equal the "
        f"resolver's: {'yes' if r['sizes_match'] else 'NO'}.",
        "",
        f"Greedy sample in {r['runtime']}, prompt `{r['sample']['prompt']}`:",
        "",
        "```text",
        r["sample"]["prompt"] + r["sample"]["text"],
        "```",
    ]
    for warning in r["warnings"]:
        lines += ["", f"Warning: {warning}"]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    seconds = report["seconds"]
    m = report["machine"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    lines = [
        "# coalora-edge demo",
        "",
        f"One CoA-LoRA training per runtime's formats, then every device gets its own configuration "
        f"with no retraining. Plan `{report['plan']}`; {seconds['total'] / 60:.1f} minutes on {m['cores']} cores "
        f"({m['cpu']}; {phases}).",
        "",
        *_base_model(report),
        "",
        f"Perplexities are on the {report['eval_blocks']} held-out blocks of {report['seq_len']} tokens that "
        "training never saw (the tail of the data): the configuration's quantized model without and with its "
        "adapter in PyTorch, and the exported files in their runtime. KL and top-1 are the exporter's own "
        "verification (next-token agreement of the runtime with the trained model; the export fails beyond its "
        "thresholds).",
        "",
        "## Devices",
        "",
        *_md_table(DEVICE_COLUMNS, device_table(report)),
        "",
        "## Training and the Pareto search",
        "",
        *_bundles(report),
        "",
        "## Per device",
        "",
    ]
    for r in report["devices"]:
        lines += _device_details(r)
    lines += [
        "## The same with your model",
        "",
        "```bash",
        "coalora-edge train MODEL --data TEXT --scheme gguf --out my-bundle",
        "coalora-edge pareto my-bundle --plot front.png",
        "coalora-edge resolve my-bundle --profile raspberry-pi-5-8gb",
        "coalora-edge export my-bundle --profile raspberry-pi-5-8gb --out pi5",
        "coalora-edge run pi5/model.gguf --prompt \"Once upon a time\"",
        "```",
        "",
    ]
    return "\n".join(lines)
