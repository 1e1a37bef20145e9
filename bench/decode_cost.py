"""Relative decode cost of every ggml type in llama.cpp: the table in coalora_edge/decode_speed.py.

For each type of the gguf scheme, a random Llama (hidden 512, MLP 1536, vocabulary 2048:
the decode benchmark's model) is exported merged with every adapted matrix in that type,
at two depths. Each model decodes single tokens with one thread; all models are loaded in
one process and measured in rotation: per model the median time of its tokens, the
fastest of the rotations (on a shared machine load only ever slows a model down). The
time a layer adds, (t_deep - t_shallow) / (deep - shallow layers), is the adapted
matrices' time plus the layer's small type-independent work (norms, attention over a
short context); the embeddings, the output head and llama.cpp's fixed per-token work
cancel out. A type's cost is its time per layer over Q4_K's. The spread shown is the
same ratio computed within each rotation, min .. max: how noisy the machine was.

    scripts/env.sh python bench/decode_cost.py                  # about 5 minutes on 2 cores
    scripts/env.sh python bench/decode_cost.py --repeats 2 --decode-tokens 32   # smoke run

Prints the table (ready to paste) and writes bench/results/decode_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle
from coalora_edge.schemes.gguf import DEFAULT_CHOICES, OTHER_TYPES
from gguf_export import SPEED_SIZES, TEXT, exported, fastest_rotation, model_with_tokenizer, train

TYPES = DEFAULT_CHOICES + OTHER_TYPES
REFERENCE = "Q4_K"
DEPTHS = (1, 6)


def export_uniform(root: Path, layers: int) -> tuple[dict, list[int]]:
    """type -> artifact of the model with ``layers`` layers, every adapted matrix in that type."""
    model_dir = model_with_tokenizer(root, f"cost model {layers}", {**SPEED_SIZES, "layers": layers})
    bundle = load_bundle(train(model_dir, root / f"cost-{layers}.bundle", [4.5], steps=1, seq_len=32,
                               choices=[REFERENCE, "Q8_0"]).path)
    restored = restore(bundle)
    tokens = restored.tokenizer(TEXT.read_text()[:4000])["input_ids"]
    artifacts = {t: exported(restored, {m.name: t for m in bundle.matrices}, root / f"{t}-{layers}", "merged")[0]
                 for t in TYPES}
    return artifacts, tokens


def per_layer(seconds: dict, fmt: str) -> float:
    shallow, deep = DEPTHS
    return (seconds[(fmt, deep)] - seconds[(fmt, shallow)]) / (deep - shallow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, tokens = {}, []
        for layers in DEPTHS:
            built, tokens = export_uniform(Path(tmp), layers)
            artifacts.update({(t, layers): a for t, a in built.items()})
        best, every = fastest_rotation(artifacts, tokens[: args.decode_tokens + 1], args.repeats)
    rotations = [{key: s[i] for key, s in every.items()} for i in range(args.repeats)]
    rows = []
    for fmt in TYPES:
        spread = [per_layer(r, fmt) / per_layer(r, REFERENCE) for r in rotations]
        rows.append({"type": fmt, "cost": per_layer(best, fmt) / per_layer(best, REFERENCE), "min": min(spread),
                     "max": max(spread), "median": statistics.median(spread), "ms_per_layer": 1e3 * per_layer(best, fmt),
                     "ms_per_token": {d: 1e3 * best[(fmt, d)] for d in DEPTHS}})
    console = Console()
    table = Table("type", "cost vs Q4_K", "per rotation: median (min .. max)", "ms per layer",
                  *(f"ms/token, {d} layers" for d in DEPTHS), title=f"1 thread, fastest of {args.repeats} rotations")
    for r in rows:
        table.add_row(r["type"], f"{r['cost']:.2f}", f"{r['median']:.2f} ({r['min']:.2f} .. {r['max']:.2f})",
                      f"{r['ms_per_layer']:.3f}",
                      *(f"{r['ms_per_token'][d]:.3f}" for d in DEPTHS))
    console.print(table)
    console.print("{" + ", ".join(f'"{r["type"]}": {r["cost"]:.2f}' for r in rows) + "}", highlight=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load,
                    "load_average_at_end": os.getloadavg()[0], "llama_threads": 1},
        "args": {k: str(v) for k, v in vars(args).items()}, "depths": DEPTHS, "rows": rows,
    }, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
