"""exllamav2-style measurement for bench/vs_llamacpp.py (``--part probe``): the sensitivity
proxy's cost per (matrix type, format) against the KL measured when only that type's
matrices are stored in that format (the rest F16), and a knapsack on the measured costs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle
from coalora_edge.training.data import load_blocks

from llamacpp_side import Reference, measure_export
from real_model import EVAL_TEXT, TRAIN_TEXT, log, save


def group_of(matrix: str) -> str:
    return matrix.rsplit(".", 1)[-1]


def part_probe(args, work: Path, console: Console) -> dict:
    """Why an allocation can lose to a preset: the proxy's cost per (matrix type, format)
    against the KL measured when only that type's matrices (all layers) are stored in that
    format (the others F16), exllamav2-style; then a knapsack on the measured costs."""
    from coalora_edge.bundle.store import SENSITIVITY
    from coalora_edge.search.knapsack import best_config
    from coalora_edge.search.problem import Problem
    from coalora_edge.search.sensitivity import Sensitivity

    result = json.loads(args.base_out.read_text())
    bundle = load_bundle(work / "none.bundle")
    restored = restore(bundle)
    wrapper = restored.wrapper
    blocks = load_blocks(restored.tokenizer, [str(TRAIN_TEXT)], args.seq_len, 0.1).valid[: args.probe_blocks]
    sens = Sensitivity.from_dict(bundle.read_json(SENSITIVITY))
    shapes = {m.name: m.shape for m in bundle.matrices}
    problem = Problem.build(wrapper.scheme, shapes, sens)
    names = list(problem.matrices)
    groups = list(dict.fromkeys(group_of(m) for m in names))

    def logps():
        with torch.no_grad():
            return [torch.log_softmax(wrapper(input_ids=b).logits.float(), -1) for b in blocks.split(args.batch)]

    with torch.no_grad(), wrapper.unquantized():
        ref = logps()

    def kl_now() -> float:
        out = logps()
        return float(sum((r.exp() * (r - o)).sum(-1).sum() for r, o in zip(ref, out)) / sum(r.shape[0] * r.shape[1] for r in ref))

    started = time.perf_counter()
    measured = {}  # (group, choice) -> KL
    for g in groups:
        rows = [i for i, m in enumerate(names) if group_of(m) == g]
        seen = {}
        for c, choice in enumerate(problem.choices):
            if not np.isfinite(problem.cost[rows[0], c]):
                continue
            stored_as = problem.stored[rows[0], c]
            if stored_as not in seen:
                config = {m: ("F16" if group_of(m) != g else choice) for m in names}
                wrapper.set_config(config)
                seen[stored_as] = kl_now()
            measured[(g, choice)] = seen[stored_as]
        log(f"probe {g}: " + ", ".join(f"{k} {v:.4f}" for k, v in seen.items()))
    probe = []
    for (g, choice), kl in measured.items():
        rows = [i for i, m in enumerate(names) if group_of(m) == g]
        c = problem.choices.index(choice)
        probe.append({"group": g, "choice": choice, "stored": problem.stored[rows[0], c], "measured_kl": kl,
                      "proxy": float(problem.cost[rows, c].sum()),
                      "bits_per_weight": 8 * float(problem.nbytes[rows, c].sum()) / float(problem.numel[rows].sum())})
    # measured costs, spread over a group's layers by the proxy's shares
    cost = np.full_like(problem.cost, np.inf)
    for i, m in enumerate(names):
        g = group_of(m)
        rows = [j for j, n in enumerate(names) if group_of(n) == g]
        for c, choice in enumerate(problem.choices):
            if (g, choice) in measured:
                share = problem.cost[i, c] / max(problem.cost[rows, c].sum(), 1e-30)
                cost[i, c] = measured[(g, choice)] * share
    corrected = Problem(problem.matrices, problem.choices, problem.nbytes, cost, problem.numel, problem.stored)
    result["probe"] = {"rows": probe, "blocks": len(blocks), "seconds": time.perf_counter() - started}
    configs = {}
    for size in result["sizes"]:
        try:
            configs[size["preset"]] = dict(best_config(corrected, problem.budget_bytes(size["bits"])).config)
        except Exception as e:
            log(f"measured knapsack {size['preset']}: {e}")
    result["probe"]["configs"] = configs
    save(args.base_out, result)
    ref_gguf = Reference(work / "f16.gguf", load_blocks(restored.tokenizer, [str(EVAL_TEXT)], args.eval_seq, 0.1)
                         .valid[: args.eval_blocks], args.threads)
    rows = []
    for size in result["sizes"]:
        config = configs.get(size["preset"])
        if config:
            row, _ = measure_export(restored, config, work / f"none-measured-{size['preset']}", size, ref_gguf,
                                    "none-measured", "nearest")
            rows.append(row | {"imatrix": True, "choices": list(bundle.choices)})
    result["ours"] = [r for r in result["ours"] if r["method"] != "none-measured"] + rows
    save(args.base_out, result)
    return result
