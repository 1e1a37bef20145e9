"""Quality of one CoA-LoRA run against the baselines, on TinyStories-656K.

Same data, same validation blocks. For each scheme (onnx, nf) and budget (2.5 / 3 / 3.5
/ 4 bits per weight), the configuration is the exact knapsack optimum at that budget:

    none        the quantized model, no adapter
    per-config  one ordinary LoRA trained for that configuration alone, S steps (one run per budget)
    shared      one ordinary LoRA trained on the whole ladder, 3 S steps, K = 2
    coa         one CoA-LoRA trained on the whole ladder, 3 S steps, K = 2 (one run for all budgets),
                once per configuration-model design (--config-models: mlp, the paper's
                network and the default, and table)

The ladder contains the four budget configurations; "unseen" configurations (random
perturbations of them, in no training set) show how CoA-LoRA generalises.

    scripts/env.sh python bench/quality.py                # full (about 20-40 min on 2 cores)
    scripts/env.sh python bench/quality.py --steps 20     # smoke run
    scripts/env.sh python bench/quality.py --ladder-range 9,9   # train on the four budgets only
    scripts/env.sh python bench/quality.py --text-fraction 0.85 # validate on the tail of the first 85 %

Prints tables and writes bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from coalora_edge.adapter.config_model import CONFIG_MODELS
from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.model.evaluate import lm_score
from coalora_edge.model.loading import load_model
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.ladder import ladder
from coalora_edge.search.problem import Problem
from coalora_edge.search.sensitivity import activation_sensitivity, collect_imatrix
from coalora_edge.training.data import load_blocks
from coalora_edge.training.trainer import Trainer, TrainSettings

from assets import TINYSTORIES as MODEL, TINYSTORIES_TEXT as TEXT

BUDGETS = (2.5, 3.0, 3.5, 4.0)


def fresh(scheme, method: str, rank: int, seed: int, config_model: str = CONFIG_MODELS[0]) -> CoALoRAModel:
    torch.manual_seed(seed)
    return CoALoRAModel(load_model(str(MODEL)), scheme, rank=rank, alpha=2 * rank, method=method,
                        config_model=config_model)


def unseen_configs(budget_configs, seen, choices, shapes, scheme, n: int, max_bpw: float, seed: int):
    """Random perturbations of the budget configurations that no training set contains."""
    rng = random.Random(seed)
    numel = sum(s[0] * s[1] for s in shapes.values())
    found = []
    while len(found) < n:
        base = dict(rng.choice(budget_configs))
        for name in rng.sample(sorted(base), k=max(1, len(base) // 3)):
            base[name] = rng.choice(choices)
        bpw = 8 * config_nbytes(scheme, shapes, base) / numel
        if base not in seen and base not in found and bpw <= max_bpw:
            found.append(base)
    return found


def run_scheme(name: str, args, blocks) -> dict:
    scheme = get_scheme(name)
    acc = Accelerator(cpu=True)
    base = load_model(str(MODEL))
    imatrix = collect_imatrix(base, blocks.train[:32].split(8))  # on the plain model, before wrapping
    probe = CoALoRAModel(base, scheme, rank=args.rank, alpha=2 * args.rank, method="none")
    shapes = {m.name: m.shape for m in probe.matrices}
    problem = Problem.build(scheme, shapes, activation_sensitivity(probe.cache, imatrix, scheme.default_choices))
    at_budget = [best_config(problem, problem.budget_bytes(b)).config for b in BUDGETS]
    lo, hi = args.ladder_range
    train_set = [s.config for s in ladder(problem, args.ladder_step) if lo <= s.bits_per_weight <= hi]
    train_set += [c for c in at_budget if c not in train_set]
    unseen = unseen_configs(at_budget, train_set, scheme.default_choices, shapes, scheme, args.unseen, 4.2, args.seed)
    valid = blocks.valid[: args.eval_blocks]

    def score(wrapper, configs):
        out = []
        for c in configs:
            wrapper.set_config(c)
            out.append(lm_score(wrapper, valid, 8).perplexity)
        return out

    def train(wrapper, configs, steps):
        s = TrainSettings(method=wrapper.method, steps=steps, batch_size=args.batch_size, rank=args.rank,
                          alpha=2 * args.rank, lr=args.lr, config_model_lr=args.config_model_lr, k_configs=args.k,
                          seed=args.seed, checkpoint_every=0)
        start = time.perf_counter()
        Trainer(wrapper, blocks, s, acc).train(configs)
        return time.perf_counter() - start

    result = {"scheme": name, "budgets": list(BUDGETS), "train_set": len(train_set), "unseen": len(unseen),
              "bits_per_weight": [8 * config_nbytes(scheme, shapes, c) / sum(a * b for a, b in shapes.values()) for c in at_budget],
              "seconds": {}}
    probe.set_config(at_budget[0])
    with torch.no_grad(), probe.unquantized():
        result["unquantized"] = lm_score(probe, valid, 8).perplexity
    result["none"], result["none_unseen"] = score(probe, at_budget), score(probe, unseen)

    per_config, seconds = [], 0.0
    for c in at_budget:
        wrapper = fresh(scheme, "shared", args.rank, args.seed)
        seconds += train(wrapper, [c], args.steps)
        per_config += score(wrapper, [c])
    result["per-config"], result["seconds"]["per-config"] = per_config, seconds

    runs = [("shared", "shared", CONFIG_MODELS[0])] + [(coa_name(d), "coa", d) for d in args.config_models.split(",")]
    for name, method, design in runs:
        wrapper = fresh(scheme, method, args.rank, args.seed, design)
        result["seconds"][name] = train(wrapper, train_set, args.multiplier * args.steps)
        result[name], result[f"{name}_unseen"] = score(wrapper, at_budget), score(wrapper, unseen)
    return result


def coa_name(design: str) -> str:
    """The default design reports as plain ``coa``."""
    return "coa" if design == CONFIG_MODELS[0] else f"coa-{design}"


def render(results: list[dict], console: Console) -> None:
    for r in results:
        coas = [m for m in r["seconds"] if m.startswith("coa")]
        methods = ["none", "shared", "per-config", *coas]
        t = Table("budget", "bits/weight", *methods, *(f"{m} vs per-config" for m in coas), *(f"{m} vs shared" for m in coas),
                  title=f"{r['scheme']}: validation perplexity (unquantized {r['unquantized']:.2f}); "
                        f"train set {r['train_set']} configurations")
        for i, b in enumerate(r["budgets"]):
            rel = [f"{100 * (r[m][i] / r[base][i] - 1):+.1f}%" for base in ("per-config", "shared") for m in coas]
            t.add_row(f"{b}", f"{r['bits_per_weight'][i]:.3f}", *(f"{r[m][i]:.2f}" for m in methods), *rel)
        console.print(t)
        unseen = ", ".join(f"{m} {sum(r[f'{m}_unseen']) / len(r[f'{m}_unseen']):.2f}" for m in ("none", "shared", *coas))
        console.print(f"unseen configurations ({r['unseen']}): mean perplexity {unseen}")
        seconds = ", ".join(f"{m} {s:.0f}" for m, s in r["seconds"].items())
        console.print(f"training seconds (per-config: all {len(r['budgets'])} runs): {seconds}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="S: steps of one per-config run")
    ap.add_argument("--multiplier", type=int, default=3, help="coa and shared train multiplier x S steps")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--config-model-lr", type=float, default=None, help="coa: the configuration model's own lr")
    ap.add_argument("--config-models", default="mlp,table", help="coa: the configuration-model designs to train, one run each")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ladder-step", type=float, default=0.1)
    ap.add_argument("--ladder-range", type=lambda v: tuple(map(float, v.split(","))), default=(0.0, 99.0),
                    help="keep ladder configurations within LO,HI bits per weight (default: all)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--unseen", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schemes", default="onnx,nf")
    ap.add_argument("--text-fraction", type=float, default=1.0,
                    help="use the first fraction of the text (its last 10 %% is the validation set)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        text = TEXT.read_text()
        if args.text_fraction < 1:  # the first --text-fraction, cut at a line end
            text = text[: text.index("\n", int(len(text) * args.text_fraction))]
        head = Path(tmp) / "text.txt"
        head.write_text(text)
        blocks = load_blocks(AutoTokenizer.from_pretrained(MODEL), [str(head)], args.seq_len, 0.1)
    results = [run_scheme(s, args, blocks) for s in args.schemes.split(",")]
    render(results, Console(width=140))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                    "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
