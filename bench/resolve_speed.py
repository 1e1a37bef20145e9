"""How fast the resolver answers on a Llama-7B-sized configuration space (issue 5: < 100 ms).

A synthetic gguf bundle with Llama-2-7B's shapes (32 layers x 7 matrices = 224, each in
6 formats Q2_K..Q8_0; no weights: only the config is read) whose measured configurations
are a half-bit budget ladder (as training on a few budgets leaves it) with a made-up
validation loss. Timed:

* ``resolve``: one profile, bundle already read (:meth:`Resolver.resolve`), median of
  ``--repeat`` runs, on profiles that end in each outcome: a measured configuration, a
  new one built for the budget (knapsack + prediction), nothing fits (the error with
  the longest context that fits);
* ``read bundle``: :meth:`Resolver.from_bundle` once per bundle (JSON, sensitivities, the
  model's skeleton on the meta device), median of a few runs;
* end to end: :func:`resolve` (read + resolve) on the slowest profile, a new configuration.

    scripts/env.sh python bench/resolve_speed.py
    scripts/env.sh python bench/resolve_speed.py --repeat 20   # quicker

Prints a table and writes JSON (default bench/results/resolve_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.bundle.store import PARETO, SENSITIVITY, load_bundle, write_bundle
from coalora_edge.errors import BudgetError
from coalora_edge.model.matrices import Matrix
from coalora_edge.model.synthetic import tiny_config
from coalora_edge.profiles import load_profile, validate_profile
from coalora_edge.resolve.resolver import Resolver, resolve
from coalora_edge.schemes import get_scheme
from coalora_edge.search.ladder import ladder
from coalora_edge.search.problem import Problem
from coalora_edge.search.sensitivity import Sensitivity

#: Llama-2-7B: hidden 4096, 32 layers, 32 heads (no GQA), MLP 11008, vocabulary 32000
LLAMA_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, context=4096)
#: bits per weight between the measured configurations
MEASURED_STEP = 0.5
MODULES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
           "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def synthetic_bundle(folder: Path, seed: int = 0) -> Path:
    """A gguf bundle for Llama-2-7B's shapes: config only, random sensitivities, a half-bit
    ladder as its measured configurations, with a loss that falls with bits per weight."""
    rng = np.random.default_rng(seed)
    model_dir = folder / "llama-7b"
    model_dir.mkdir()
    tiny_config("llama", **LLAMA_7B).save_pretrained(model_dir)
    h, i = LLAMA_7B["hidden"], LLAMA_7B["intermediate"]
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (i, h), "up": (i, h), "down": (h, i)}
    matrices = [Matrix(f"model.layers.{layer}.{path}", layer, module, shapes[module])
                for layer in range(LLAMA_7B["layers"]) for path, module in MODULES.items()]
    scheme = get_scheme("gguf")
    choices = list(scheme.choices())
    bits = np.array([scheme.format(c).nominal_bits_per_weight for c in choices])  # (C,)
    numel = np.array([m.numel for m in matrices])  # (M,)
    # damage falls about 4x per bit, scaled per matrix; noise keeps the greedy order wrong
    cost = numel[:, None] * 4.0 ** -bits * rng.lognormal(0, 1, (len(matrices), 1)) * rng.uniform(0.8, 1.2, (len(matrices), len(choices)))
    sensitivity = Sensitivity("activation", tuple(m.name for m in matrices), tuple(choices), cost)
    problem = Problem.build(scheme, {m.name: m.shape for m in matrices}, sensitivity)
    solutions = ladder(problem, step=MEASURED_STEP)
    records = []
    for k, solution in enumerate(solutions):
        loss = 1.8 + 2.0 * np.exp(-(solution.bits_per_weight - 2.0)) + rng.normal(0, 0.01)
        records.append({"config": k, "bytes": solution.nbytes, "bits_per_weight": solution.bits_per_weight,
                        "loss": loss, "perplexity": float(np.exp(loss)), "tokens": 0, "step": 0})
    return write_bundle(
        folder / "bundle", base_model={"source": str(model_dir), "sha256": "synthetic", "files": {}}, scheme="gguf",
        choices=choices, matrices=matrices,
        adapter={"method": "coa", "adapter_method": "coa", "rank": 16, "alpha": 32, "config_model": "table", "imatrix": False},
        adapter_state={"unused": torch.zeros(1)}, training_set=[s.config for s in solutions], training={},
        extra_files={SENSITIVITY: json.dumps(sensitivity.to_dict()).encode(),
                     PARETO: json.dumps({"evaluations": records}).encode()},
    ).path


def profiles(resolver: Resolver) -> dict[str, object]:
    """Shipped llama.cpp profiles, plus made-up ones with weight budgets chosen for each outcome."""
    chosen = {p: load_profile(p) for p in ("raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "iphone-6gb", "raspberry-pi-4-4gb")}
    problem = resolver.space.problem
    base = chosen["raspberry-pi-5-8gb"]
    measured_bits = sorted(problem.bits_per_weight(int(n)) for n in resolver.space.nbytes)
    targets = {
        "on a measured one (budget 4.0 bits)": problem.budget_bytes(4.0),
        "between measured ones (+0.3 bits)": problem.budget_bytes(measured_bits[len(measured_bits) // 2] + 0.3),
        "above every measured one (9 bits)": problem.budget_bytes(9.0),
        "nothing fits (2 bits)": problem.budget_bytes(2.0),
    }
    for label, budget in targets.items():
        memory = base.memory_bytes + budget - resolver.breakdown(base).headroom
        chosen[label] = validate_profile({**base.model_dump(), "name": "synthetic", "memory_bytes": memory}, label)
    return chosen


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def outcome(resolver: Resolver, profile) -> str:
    try:
        r = resolver.resolve(profile)
    except BudgetError:
        return "nothing fits"
    how = "measured" if r.source == "measured" else f"new (loss {r.loss_is})"
    return f"{how}, {r.bits_per_weight:.2f} bits/weight"


def resolve_or_error(resolver: Resolver, profile) -> None:
    try:
        resolver.resolve(profile)
    except BudgetError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=100, help="runs per profile (median reported)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/resolve_speed.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(synthetic_bundle(Path(tmp)))
        Resolver.from_bundle(bundle)  # warm-up: imports, transformers' model classes
        read_s = median_seconds(lambda: Resolver.from_bundle(bundle), 5)
        resolver = Resolver.from_bundle(bundle)
        rows = []
        chosen = profiles(resolver)
        for label, profile in chosen.items():
            resolve_or_error(resolver, profile)  # warm-up
            seconds = median_seconds(lambda: resolve_or_error(resolver, profile), args.repeat)
            rows.append({"profile": label, "outcome": outcome(resolver, profile), "median_ms": seconds * 1e3})
        slowest = chosen[max(rows, key=lambda r: r["median_ms"])["profile"]]
        end_to_end_s = median_seconds(lambda: resolve(bundle, slowest), 5)
    space = {"matrices": len(resolver.space.problem.matrices), "formats": len(resolver.space.problem.choices),
             "measured_configurations": len(resolver.space.loss)}

    table = Table("profile", "outcome", "resolve, median ms",
                  title=f"resolver on {space['matrices']} matrices x {space['formats']} formats, "
                        f"{space['measured_configurations']} measured configurations ({args.repeat} runs each)")
    for r in rows:
        table.add_row(r["profile"], r["outcome"], f"{r['median_ms']:.1f}")
    table.add_row("(read the bundle once)", "Resolver.from_bundle", f"{read_s * 1e3:.1f}")
    table.add_row("(end to end, slowest profile)", "resolve(bundle, profile)", f"{end_to_end_s * 1e3:.1f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "args": vars(args) | {"out": str(args.out)}, "space": space, "read_bundle_ms": read_s * 1e3,
              "end_to_end_ms": end_to_end_s * 1e3, "rows": rows}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
