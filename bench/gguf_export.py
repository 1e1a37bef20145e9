"""GGUF export for llama.cpp: quality in the real runtime, decode speed of mixed types, export time.

1. Quality. For TinyStories-656K and a tiny K-quant Llama (hidden 256, MLP 768,
   TinyStories' tokenizer, pretrained here for a few hundred steps: every matrix can hold
   K-quants), one CoA-LoRA bundle each; at three budgets, perplexity on held-out blocks of
       trained   the PyTorch model as trained (Q_c(W) + LoRA, fp32 embeddings)
       sidecar   llama.cpp: the trained Q_c(W) + the LoRA adapter GGUF
       merged    llama.cpp: W + s B'A re-quantized into one GGUF
2. Decode speed. A random Llama of a few MB (hidden 512, 6 layers; a CoA-LoRA bundle of
   1 step over the default K-quant choices) exported merged with what the resolver
   picks at budgets at and between the uniform types' sizes with llama.cpp's default
   speed floor (0.95), with what the knapsack picks there by size and sensitivity alone
   (the resolver's new configurations before the floor), and uniformly in each K-quant.
   Single-token decode with one thread, all models loaded in one process and measured
   in rotation: per model the median time of its tokens (a preemption hits a few
   tokens, not the median), the fastest of the rotations. Each pick is compared with the
   uniform configuration of its size (the uniform file at a type's size, the measured
   times interpolated between two: the resolver's own definition, search/speed.py;
   target >= 0.95), next to the ratio the resolver predicted from the measured kernel
   costs (schemes/gguf.py DECODE_COST).
3. Export wall time of every export above (write + verification in llama.cpp).

    scripts/env.sh python bench/gguf_export.py             # about 6-9 minutes on 2 cores
    scripts/env.sh python bench/gguf_export.py --only speed --out bench/results/gguf_decode.json   # 2-4 minutes
    scripts/env.sh python bench/gguf_export.py --steps 20 --repeats 2   # smoke run

Prints tables and writes bench/results/gguf_export.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
from collections import Counter
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.bundle.lookup import evaluations
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.exporters.common.perplexity import llamacpp_perplexity
from coalora_edge.exporters.gguf import export as gguf_export
from coalora_edge.exporters.gguf.llamacpp import Artifact, open_llama
from coalora_edge.model.evaluate import lm_score
from coalora_edge.model.loading import load_model
from coalora_edge.profiles import load_profile, validate_profile
from coalora_edge.resolve.resolver import Resolver, predicted_decode_ratio
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.knapsack import best_config
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

from assets import TINYSTORIES, TINYSTORIES_TEXT as TEXT, tiny_model_with_tokenizer

#: model -> (sizes for build_tiny_model, or None for TinyStories itself; budgets in bits per weight)
QUALITY_MODELS = {
    "TinyStories-656K": (None, [4.5, 5.5, 8.5]),
    "tiny K-quant Llama": ({"hidden": 256, "intermediate": 768, "layers": 2, "heads": 4, "kv_heads": 2}, [3.5, 4.5, 6.0]),
}
SPEED_SIZES = {"hidden": 512, "intermediate": 1536, "layers": 6, "heads": 8, "kv_heads": 4}
#: uniform files: the references at their own sizes and, interpolated, between them
SPEED_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
#: budgets: the sizes of these uniform types, and these bits per weight between them
SPEED_AT_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K")
SPEED_BETWEEN = (4.0, 5.0, 6.0)
#: the resolver's speed floor: llama.cpp's default
SPEED_FLOOR = 0.95
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 8


def model_with_tokenizer(root: Path, name: str, sizes: dict | None) -> Path:
    if sizes is None:
        return TINYSTORIES
    return tiny_model_with_tokenizer(root / name.replace(" ", "-"), **sizes)


def pretrain(model_dir: Path, steps: int, seq_len: int) -> float:
    """Plain next-token training of the whole model, so that its perplexity means something;
    returns the last loss."""
    from transformers import AutoTokenizer

    model = load_model(str(model_dir)).train()
    blocks = load_blocks(AutoTokenizer.from_pretrained(model_dir), [str(TEXT)], 128, 0.1).train
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (PRETRAIN_BATCH,), generator=generator)]  # (b, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(model_dir)
    return loss.item()


def train(model_dir: Path, out: Path, budgets: list[float], steps: int, seq_len: int, choices=None):
    return train_bundle(TrainJob(model=str(model_dir), data=[str(TEXT)], out=out, scheme="gguf", seq_len=seq_len, budgets=budgets,
                        choices=choices, show_progress=False,
                        settings=TrainSettings(steps=steps, batch_size=8, rank=8, alpha=16, lr=2e-3)))


def config_near(bundle, bits: float) -> dict[str, str]:
    """The measured configuration with the most bits per weight at or under ``bits``."""
    fitting = [e for e in evaluations(bundle) if e["bits_per_weight"] <= bits + 1e-9]
    return bundle.evaluated()[max(fitting, key=lambda e: e["bits_per_weight"])["config"]]


def exported(restored, config, out: Path, mode: str) -> tuple[Artifact, dict, float]:
    started = time.perf_counter()
    report = gguf_export.export(restored, config, out, adapter_mode=mode, force=True)
    return Artifact.find(out), report, time.perf_counter() - started


def quality(root: Path, steps: int, pretrain_steps: int, seq_len: int, eval_blocks: int) -> tuple[list[dict], list[dict]]:
    rows, timings = [], []
    for name, (sizes, budgets) in QUALITY_MODELS.items():
        model_dir = model_with_tokenizer(root, name, sizes)
        if sizes is not None:
            pretrain(model_dir, pretrain_steps, seq_len)
        bundle = load_bundle(train(model_dir, root / f"{name}.bundle", budgets, steps, seq_len).path)
        restored = restore(bundle)
        blocks = load_blocks(restored.tokenizer, [str(TEXT)], seq_len, 0.1).valid[:eval_blocks]
        shapes = {m.name: m.shape for m in bundle.matrices}
        for bits in budgets:
            config = config_near(bundle, bits)
            restored.use(config)
            row = {"model": name, "budget": bits, "bits_per_weight": 8 * config_nbytes(restored.wrapper.scheme, shapes, config)
                   / sum(a * b for a, b in shapes.values()), "trained": lm_score(restored.wrapper, blocks).perplexity}
            for mode in gguf_export.ADAPTER_MODES:
                artifact, report, seconds = exported(restored, config, root / f"{name}-{bits}-{mode}", mode)
                row[mode] = llamacpp_perplexity(artifact.model, blocks)
                row["adapter_effect_kl"] = report["verification"]["adapter_effect_kl"]
                row.update({"fold_kl": report["verification"]["fold"]["kl"], "fold_warning": bool(report["warnings"])}
                           if mode == "merged" else {})
                timings.append({"model": name, "budget": bits, "mode": mode, "seconds": seconds,
                                "model_bytes": artifact.model.stat().st_size})
            rows.append(row)
    return rows, timings


def token_seconds(llm, tokens: list[int]) -> float:
    """Median seconds of the one-token decode steps after a BOS: on a shared machine a
    preemption slows a few tokens, not the median."""
    llm.reset()
    llm.eval(tokens[:1])
    steps = []
    for t in tokens[1:]:
        started = time.perf_counter()
        llm.eval([t])
        steps.append(time.perf_counter() - started)
    return statistics.median(steps)


def fastest_rotation(artifacts: dict, tokens: list[int], repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """label -> seconds per token (the fastest of ``repeats`` rotations), and every rotation's."""
    seconds: dict[str, list[float]] = {label: [] for label in artifacts}
    with contextlib.ExitStack() as stack:
        loaded = {label: stack.enter_context(open_llama(a, n_ctx=len(tokens), threads=1, logits_all=False))
                  for label, a in artifacts.items()}
        for _ in range(repeats):
            for label, llm in loaded.items():  # rotation: slow phases of a shared machine hit every model
                seconds[label].append(token_seconds(llm, tokens))
    return {label: min(s) for label, s in seconds.items()}, seconds


def sensitivity(problem, config: dict[str, str]) -> float:
    return float(sum(problem.cost[i, problem.choices.index(config[m])] for i, m in enumerate(problem.matrices)))


def with_budget(resolver: Resolver, floor: float, budget: int):
    """The demo profile with its memory moved so that exactly ``budget`` bytes are left for the weights."""
    base = load_profile("tiny-demo-llamacpp")
    profile = validate_profile({**base.model_dump(), "min_decode_ratio": floor}, "bench")
    memory = profile.memory_bytes + budget - resolver.breakdown(profile).headroom
    return validate_profile({**profile.model_dump(), "memory_bytes": memory}, "bench")


def speed(root: Path, decode_tokens: int, repeats: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(uniform files, the resolver's picks, export timings)."""
    model_dir = model_with_tokenizer(root, "speed model", SPEED_SIZES)
    bundle = load_bundle(train(model_dir, root / "speed.bundle", [4.5], steps=1, seq_len=32).path)
    resolver = Resolver.from_bundle(bundle)
    problem = resolver.space.problem
    uniform_bytes = {t: int(problem.nbytes[:, problem.choices.index(t)].sum()) for t in SPEED_TYPES}
    budgets = {f"{t}'s size": uniform_bytes[t] for t in SPEED_AT_TYPES}
    budgets.update({f"{bits} bits": problem.budget_bytes(bits) for bits in SPEED_BETWEEN})
    configs = {f"uniform {t}": {m.name: t for m in bundle.matrices} for t in SPEED_TYPES}
    picks = []
    for name, budget in sorted(budgets.items(), key=lambda kv: kv[1]):
        profile = with_budget(resolver, SPEED_FLOOR, budget)
        resolved = resolver.resolve(profile)
        knapsack = best_config(problem, budget)
        for how, config in (("resolver", resolved.config), ("knapsack", knapsack.config)):
            label = next((k for k, c in configs.items() if c == config), f"{how} at {name}")
            configs[label] = config
            nbytes = config_nbytes(get_scheme("gguf"), {m.name: m.shape for m in bundle.matrices}, config)
            picks.append({"budget": name, "budget_bytes": budget, "picked_by": how, "config": label, "bytes": nbytes,
                          "bits_per_weight": problem.bits_per_weight(nbytes),
                          "predicted_ratio": predicted_decode_ratio(bundle, config, profile),
                          # what the floor costs in quality: total sensitivity over the knapsack's optimum
                          "sensitivity_vs_knapsack": sensitivity(problem, config) / knapsack.objective,
                          "source": resolved.source if how == "resolver" else "knapsack"})
    restored = restore(bundle)
    tokens = restored.tokenizer(TEXT.read_text()[:4000])["input_ids"][: decode_tokens + 1]
    artifacts, timings = {}, []
    for label, config in configs.items():
        folder = root / label.replace(" ", "_").replace("/", "-").replace("'", "")
        artifacts[label], _, seconds = exported(restored, config, folder, "merged")
        timings.append({"model": "speed model", "config": label, "mode": "merged", "seconds": seconds,
                        "model_bytes": artifacts[label].model.stat().st_size})
    best, every = fastest_rotation(artifacts, tokens, repeats)
    sizes = [uniform_bytes[t] for t in SPEED_TYPES]

    def ratio(seconds: dict[str, float], row: dict) -> float:
        """Over the uniform configuration of its size: measured files, interpolated between two."""
        return float(np.interp(row["bytes"], sizes, [seconds[f"uniform {t}"] for t in SPEED_TYPES])) / seconds[row["config"]]

    rotations = [{label: s[i] for label, s in every.items()} for i in range(repeats)]
    for row in picks:
        within = [ratio(r, row) for r in rotations]
        row.update(types=dict(Counter(configs[row["config"]].values())), tokens_per_s=1 / best[row["config"]],
                   measured_ratio=ratio(best, row), rotation_ratios=(min(within), max(within)),
                   rotations=every[row["config"]])
    uniforms = [{"config": f"uniform {t}", "bytes": uniform_bytes[t], "tokens_per_s": 1 / best[f"uniform {t}"],
                 "rotations": every[f"uniform {t}"]} for t in SPEED_TYPES]
    return uniforms, picks, timings


def _types(row: dict) -> str:
    return " ".join(f"{t}:{n}" for t, n in sorted(row["types"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="CoA-LoRA training steps per quality bundle")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="plain training steps of the tiny K-quant model")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["quality", "speed"], help="run one part (default: both)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the decode comparison is single-threaded; keep PyTorch off the other core
    console = Console(width=150)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        quality_rows, quality_times = ([], []) if args.only == "speed" else \
            quality(root, args.steps, args.pretrain_steps, args.seq_len, args.eval_blocks)
        uniform_rows, speed_rows, speed_times = ([], [], []) if args.only == "quality" else \
            speed(root, args.decode_tokens, args.repeats)

    table = Table("model", "budget", "bits/weight", "trained (PyTorch)", "sidecar (llama.cpp)", "merged (llama.cpp)",
                  "fold KL / adapter KL", title=f"perplexity on {args.eval_blocks} held-out blocks of {args.seq_len} tokens")
    for r in quality_rows:
        table.add_row(r["model"], f"{r['budget']}", f"{r['bits_per_weight']:.3f}", f"{r['trained']:.3f}",
                      f"{r['sidecar']:.3f}", f"{r['merged']:.3f}",
                      f"{r['fold_kl']:.2g} / {r['adapter_effect_kl']:.2g}{' (warns)' if r['fold_warning'] else ''}")
    if quality_rows:
        console.print(table)
    table = Table("configuration", "adapted bytes", "decode tok/s", title="uniform files")
    for r in uniform_rows:
        table.add_row(r["config"], f"{r['bytes']:,}", f"{r['tokens_per_s']:.1f}")
    if uniform_rows:
        console.print(table)
    table = Table("budget", "picked by", "types (matrices)", "bits/weight", "sensitivity vs knapsack", "decode tok/s",
                  "vs uniform of its size", "within each rotation", "predicted",
                  title=f"decode, 1 thread, fastest of {args.repeats} rotations")
    for r in speed_rows:
        table.add_row(r["budget"], r["picked_by"], _types(r), f"{r['bits_per_weight']:.3f}", f"{r['sensitivity_vs_knapsack']:.3f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['measured_ratio']:.3f}", "{:.2f} .. {:.2f}".format(*r["rotation_ratios"]),
                      f"{r['predicted_ratio']:.3f}")
    if speed_rows:
        console.print(table)
    table = Table("model", "export", "model bytes", "seconds", title="export wall time (write + verify)")
    for t in quality_times + speed_times:
        table.add_row(t["model"], f"{t.get('config', t.get('budget'))} {t['mode']}", f"{t['model_bytes']:,}", f"{t['seconds']:.2f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load,
                    "load_average_at_end": os.getloadavg()[0], "torch_threads": 1, "llama_threads": 1},
        "args": {k: str(v) for k, v in vars(args).items()},
        "quality": quality_rows, "speed_uniform": uniform_rows, "speed": speed_rows,
        "export_seconds": quality_times + speed_times,
    }, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
