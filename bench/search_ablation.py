"""Pareto search ablation (issue 4): which training set, on TinyStories-656K, scheme onnx.

Same data, steps and settings for every run; only the training configuration set
differs (``--search``):

    coa / none     CoA-LoRA on the uniform configurations (one format everywhere), frozen
    coa / ladder   CoA-LoRA on the sensitivity budget ladder, frozen (the paper's ablation)
    coa / pareto   CoA-LoRA on the ladder refined by GP + qLogEHVI rounds (the paper)
    none / ladder  no adapter: the knapsack allocation per budget, what llama.cpp-style
                   mixed quantization gives without fine-tuning
    none / pareto  no adapter, the same search over measured losses

The text is split once: the first 85% trains (its last 10% is the validation set the
search measures on), the rest is a test set no run ever saw. The search chooses on
validation loss, so validation favours it; test figures are the fair comparison.
Hypervolume: the final front's (bits per weight, loss), both normalised over all runs
together (bits from the smallest configuration to the largest front point; loss from
the unquantized model's to the worst front point), reference point (1.1, 1.1).

    scripts/env.sh python bench/search_ablation.py                       # 3 seeds, about 12 min on 2 cores
    scripts/env.sh python bench/search_ablation.py --steps 10 --seeds 0  # smoke run

Prints a table and writes bench/results/search_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.bundle.lookup import config_at_bpw, final_evaluations
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import Bundle, train_bundle
from coalora_edge.errors import SchemeError
from coalora_edge.model.evaluate import lm_score
from coalora_edge.search.front import Normalisation
from coalora_edge.search.rounds import SearchSettings
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

from assets import TINYSTORIES as MODEL, TINYSTORIES_TEXT as TEXT

BUDGETS = (2.5, 3.0, 3.5, 4.0)
RUNS = [("coa", "none"), ("coa", "ladder"), ("coa", "pareto"), ("none", "ladder"), ("none", "pareto")]


def split_text(folder: Path, train_fraction: float = 0.85) -> tuple[Path, Path]:
    text = TEXT.read_text()
    cut = text.index("\n", int(len(text) * train_fraction))
    train, test = folder / "train.txt", folder / "test.txt"
    train.write_text(text[:cut])
    test.write_text(text[cut + 1 :])
    return train, test


def train(method: str, search: str, data: Path, out: Path, seed: int, args) -> Bundle:
    settings = TrainSettings(method=method, steps=args.steps if method != "none" else 0, batch_size=args.batch_size,
                             rank=args.rank, alpha=2 * args.rank, lr=args.lr, seed=seed, checkpoint_every=0,
                             config_model=args.config_model)
    return train_bundle(TrainJob(model=str(MODEL), data=[str(data)], out=out, scheme="onnx", settings=settings,
                        search=SearchSettings(mode=search, rounds=args.rounds, candidates=args.candidates),
                        seq_len=args.seq_len, ladder_step=args.ladder_step, eval_blocks=args.eval_blocks,
                        show_progress=False))


def measure(bundle: Bundle, test_text: Path, args) -> dict:
    """Front and budget picks on validation (pareto.json) and on the held-out test text."""
    doc = bundle.read_json("pareto.json")
    front = [e for e in final_evaluations(doc["evaluations"]) if e["front"]]
    restored = restore(bundle)
    test = load_blocks(restored.tokenizer, [str(test_text)], args.seq_len, 0.5)
    blocks = torch.cat([test.train, test.valid])[: args.test_blocks]
    evaluated = bundle.evaluated()

    def test_loss(config) -> float:
        restored.use(config)
        return lm_score(restored.wrapper, blocks, args.batch_size).loss

    for e in front:
        e["test_loss"] = test_loss(evaluated[e["config"]])
    picks = {}
    for bits in BUDGETS:
        try:
            config, record = config_at_bpw(bundle, bits)
        except SchemeError:
            continue
        loss = next(e["test_loss"] for e in front if e["config"] == record["config"]) if record["front"] else test_loss(config)
        picks[str(bits)] = {"bits_per_weight": record["bits_per_weight"], "valid_perplexity": record["perplexity"],
                            "test_perplexity": float(np.exp(loss))}
    with restored.wrapper.unquantized():
        unquantized_test = lm_score(restored.wrapper, blocks, args.batch_size).loss
    training = bundle.manifest.training
    return {"front": front, "budgets": picks, "unquantized": {"valid": doc["unquantized"]["loss"], "test": unquantized_test},
            "configs": training.configs, "evaluated": training.evaluated, "seconds": training.wall_seconds,
            "search_seconds": training.search_seconds, "search_share": training.search_share,
            "rounds": doc["search"]["rounds"]}


def hypervolumes(runs: list[dict]) -> None:
    """Every run's front hypervolume on validation and test loss, one normalisation for all."""
    fronts = [e for r in runs for e in r["front"]]
    bits_lo = min(e["bits_per_weight"] for e in fronts)
    bits_hi = max(e["bits_per_weight"] for e in fronts)
    for split, key in (("valid", "loss"), ("test", "test_loss")):
        losses = [e[key] for e in fronts] + [r["unquantized"][split] for r in runs]
        norm = Normalisation((bits_lo, min(losses)), (bits_hi, max(losses)))
        for r in runs:
            r[f"hypervolume_{split}"] = norm.hypervolume(np.array([[e["bits_per_weight"], e[key]] for e in r["front"]]))
            r[f"normalisation_{split}"] = norm.as_dict()


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(runs: list[dict]) -> dict:
    """Means over seeds (and the per-seed hypervolumes)."""
    return {
        **{f"hypervolume_{split}": _mean([r[f"hypervolume_{split}"] for r in runs]) for split in ("valid", "test")},
        **{f"hypervolume_{split}_per_seed": [r[f"hypervolume_{split}"] for r in runs] for split in ("valid", "test")},
        "configs": _mean([r["configs"] for r in runs]), "evaluated": _mean([r["evaluated"] for r in runs]),
        "search_seconds": _mean([r["search_seconds"] for r in runs]), "search_share": _mean([r["search_share"] for r in runs]),
        "budgets": {str(b): {k: _mean([r["budgets"][str(b)][k] for r in runs if str(b) in r["budgets"]])
                             for k in ("bits_per_weight", "test_perplexity", "valid_perplexity")} for b in BUDGETS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ladder-step", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=16, help="validation blocks every configuration is measured on")
    ap.add_argument("--test-blocks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (on a shared machine more threads only spin)")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    ap.add_argument("--config-model", default=TrainSettings.config_model, help="coa: the configuration model's design")
    ap.add_argument("--runs", type=lambda v: [tuple(r.split("/")) for r in v.split(",")], default=RUNS,
                    help="which runs, e.g. coa/ladder,coa/pareto (default: all five)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_ablation.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {f"{method} / {search}": [] for method, search in args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        train_text, test_text = split_text(Path(tmp))
        for seed in args.seeds:
            for method, search in args.runs:
                name = f"{method} / {search}"
                bundle = train(method, search, train_text, Path(tmp) / f"{method}-{search}-{seed}", seed, args)
                runs[name].append(measure(bundle, test_text, args) | {"seed": seed})
                Console(stderr=True).print(f"seed {seed}, {name}: {time.perf_counter() - started:.0f} s", highlight=False)
    hypervolumes([r for rs in runs.values() for r in rs])
    summary = {name: summarise(rs) for name, rs in runs.items()}
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "settings": vars(args) | {"out": str(args.out)},
              "seconds": time.perf_counter() - started, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    render(summary)


def render(summary: dict[str, dict]) -> None:
    table = Table("adapter / search", "trained on", "evaluated", "search s (share)", "HV valid", "HV test",
                  "HV test per seed", *[f"test ppl @{b}" for b in BUDGETS],
                  title="TinyStories-656K, onnx: training set ablation (means over seeds)")
    for name, r in summary.items():
        picks = [r["budgets"][str(b)] for b in BUDGETS]
        table.add_row(name, f"{r['configs']:.0f}", f"{r['evaluated']:.0f}",
                      f"{r['search_seconds']:.0f} ({100 * r['search_share']:.0f}%)",
                      f"{r['hypervolume_valid']:.4f}", f"{r['hypervolume_test']:.4f}",
                      " ".join(f"{v:.4f}" for v in r["hypervolume_test_per_seed"]),
                      *[f"{p['test_perplexity']:.1f} ({p['bits_per_weight']:.2f})" if p["test_perplexity"] else "-"
                        for p in picks])
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
