"""GGUF export for llama.cpp: quality in the real runtime, decode speed of mixed types, export time.

1. Quality. For TinyStories-656K and a tiny K-quant Llama (hidden 256, MLP 768,
   TinyStories' tokenizer, pretrained here for a few hundred steps: every matrix can hold
   K-quants), one CoA-LoRA bundle each; at three budgets, perplexity on held-out blocks of
       trained   the PyTorch model as trained (Q_c(W) + LoRA, fp32 embeddings)
       sidecar   llama.cpp: the trained Q_c(W) + the LoRA adapter GGUF
       merged    llama.cpp: W + s B'A re-quantized into one GGUF
2. Decode speed. A random Llama of a few MB (hidden 512, 6 layers) exported merged with
   per-matrix mixes of K-quants (the knapsack's at 4.5 bits per weight, and fixed
   alternations) and uniformly in each type the mixes use; tokens/s of single-token
   decode with one thread, all models loaded in one process and measured in rotation
   (median of the repeats). Each mix is compared with the uniform file of about its size
   (target >= 0.95) and with the speed predicted from its types' uniform speeds (whether
   mixing itself costs anything).
3. Export wall time of every export above (write + verification in llama.cpp).

    scripts/env.sh python bench/gguf_export.py             # about 4-8 minutes on 2 cores
    scripts/env.sh python bench/gguf_export.py --steps 20 --repeats 2   # smoke run

Prints tables and writes bench/results/gguf_export.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
from collections import Counter
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.bundle import load_bundle
from coalora_edge.data import load_blocks
from coalora_edge.evaluate import lm_score
from coalora_edge.exporters import gguf as gguf_export
from coalora_edge.exporters.verify_llamacpp import Artifact, open_llama, runtime_logits
from coalora_edge.models import load_model
from coalora_edge.quantize import config_nbytes
from coalora_edge.restore import evaluations, restore
from coalora_edge.tiny import build_tiny_model
from coalora_edge.train_job import TrainJob, run
from coalora_edge.training import TrainSettings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
TINYSTORIES = SHARED / "models" / "TinyStories-656K"
TEXT = SHARED / "text" / "tinystories_dev.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: model -> (sizes for build_tiny_model, or None for TinyStories itself; budgets in bits per weight)
QUALITY_MODELS = {
    "TinyStories-656K": (None, [4.5, 5.5, 8.5]),
    "tiny K-quant Llama": ({"hidden": 256, "intermediate": 768, "layers": 2, "heads": 4, "kv_heads": 2}, [3.5, 4.5, 6.0]),
}
SPEED_SIZES = {"hidden": 512, "intermediate": 1536, "layers": 6, "heads": 8, "kv_heads": 4}
#: decode-speed mixes: (label, formats cycled over the matrices or None for the knapsack's
#: configuration at 4.5 bits per weight, the uniform type of about the same size)
SPEED_MIXES = [
    ("knapsack mix at 4.5", None, "Q4_K"),
    ("Q3_K/Q5_K alternating", ("Q3_K", "Q5_K"), "Q4_K"),
    ("Q4_K/Q6_K alternating", ("Q4_K", "Q6_K"), "Q5_K"),
]
#: every type a mix uses, uniformly: a mix's speed predicted from its types' own speeds
SPEED_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K")
PRETRAIN_LR = 3e-3
PRETRAIN_BATCH = 8


def model_with_tokenizer(root: Path, name: str, sizes: dict | None) -> Path:
    if sizes is None:
        return TINYSTORIES
    path = build_tiny_model(root / name.replace(" ", "-"), "llama", vocab=2048, **sizes)
    for f in TOKENIZER_FILES:
        shutil.copy(TINYSTORIES / f, path / f)
    return path


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
    return run(TrainJob(model=str(model_dir), data=[str(TEXT)], out=out, scheme="gguf", seq_len=seq_len, budgets=budgets,
                        choices=choices, show_progress=False,
                        settings=TrainSettings(steps=steps, batch_size=8, rank=8, alpha=16, lr=2e-3)))


def llamacpp_perplexity(artifact: Artifact, blocks: torch.Tensor) -> float:
    """Perplexity of next tokens within each block, as lm_score counts them."""
    total, count = 0.0, 0
    with open_llama(artifact, n_ctx=blocks.shape[1]) as llm:
        for block in blocks:
            logits = runtime_logits(llm, block.tolist())  # (T, V)
            total += torch.nn.functional.cross_entropy(logits[:-1].double(), block[1:], reduction="sum").item()
            count += len(block) - 1
    return math.exp(total / count)


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
                row[mode] = llamacpp_perplexity(artifact, blocks)
                row["adapter_effect_kl"] = report["verification"]["adapter_effect_kl"]
                row.update({"fold_kl": report["verification"]["fold"]["kl"], "fold_warning": bool(report["warnings"])}
                           if mode == "merged" else {})
                timings.append({"model": name, "budget": bits, "mode": mode, "seconds": seconds,
                                "model_bytes": artifact.model.stat().st_size})
            rows.append(row)
    return rows, timings


def decode_rate(llm, tokens: list[int]) -> float:
    """Tokens per second of one-token decode steps after a BOS."""
    llm.reset()
    llm.eval(tokens[:1])
    started = time.perf_counter()
    for t in tokens[1:]:
        llm.eval([t])
    return (len(tokens) - 1) / (time.perf_counter() - started)


def speed(root: Path, decode_tokens: int, repeats: int) -> tuple[list[dict], list[dict]]:
    model_dir = model_with_tokenizer(root, "speed model", SPEED_SIZES)
    bundle = load_bundle(train(model_dir, root / "speed.bundle", [4.5], steps=1, seq_len=32,
                               choices=["Q3_K", "Q4_K", "Q5_K", "Q6_K"]).path)
    restored = restore(bundle)
    tokens = restored.tokenizer(TEXT.read_text()[:4000])["input_ids"][: decode_tokens + 1]
    knapsack = config_near(bundle, 4.5)
    configs = {f"uniform {t}": {m.name: t for m in bundle.matrices} for t in SPEED_TYPES}
    for label, formats, _ in SPEED_MIXES:
        configs[label] = knapsack if formats is None else {m.name: formats[i % len(formats)] for i, m in enumerate(bundle.matrices)}
    artifacts, timings = {}, []
    for label, config in configs.items():
        artifacts[label], _, seconds = exported(restored, config, root / label.replace(" ", "_").replace("/", "-"), "merged")
        timings.append({"model": "speed model", "config": label, "mode": "merged", "seconds": seconds,
                        "model_bytes": artifacts[label].model.stat().st_size})
    rates: dict[str, list[float]] = {label: [] for label in artifacts}
    with contextlib.ExitStack() as stack:
        loaded = {label: stack.enter_context(open_llama(a, n_ctx=len(tokens), threads=1, logits_all=False))
                  for label, a in artifacts.items()}
        for _ in range(repeats):
            for label, llm in loaded.items():  # rotation: slow phases of a shared machine hit every model
                rates[label].append(decode_rate(llm, tokens))
    rate = {label: statistics.median(r) for label, r in rates.items()}
    numel = {m.name: m.numel for m in bundle.matrices}
    rows = []
    for label, r in rates.items():
        config = configs[label]
        # Seconds per token if each matrix took as long as in its type's uniform file.
        predicted = sum(numel[m] / rate[f"uniform {t}"] for m, t in config.items()) / sum(numel.values())
        rows.append({"config": label, "model_bytes": artifacts[label].model.stat().st_size,
                     "types": dict(Counter(config.values())), "tokens_per_s": rate[label],
                     "predicted_tokens_per_s": 1 / predicted, "all": r})
    return rows, timings


def _types(row: dict) -> str:
    return " ".join(f"{t}:{n}" for t, n in sorted(row["types"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="CoA-LoRA training steps per quality bundle")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="plain training steps of the tiny K-quant model")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gguf_export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the decode comparison is single-threaded; keep PyTorch off the other core
    console = Console()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        quality_rows, quality_times = quality(root, args.steps, args.pretrain_steps, args.seq_len, args.eval_blocks)
        speed_rows, speed_times = speed(root, args.decode_tokens, args.repeats)

    table = Table("model", "budget", "bits/weight", "trained (PyTorch)", "sidecar (llama.cpp)", "merged (llama.cpp)",
                  "fold KL / adapter KL", title=f"perplexity on {args.eval_blocks} held-out blocks of {args.seq_len} tokens")
    for r in quality_rows:
        table.add_row(r["model"], f"{r['budget']}", f"{r['bits_per_weight']:.3f}", f"{r['trained']:.3f}",
                      f"{r['sidecar']:.3f}", f"{r['merged']:.3f}",
                      f"{r['fold_kl']:.2g} / {r['adapter_effect_kl']:.2g}{' (warns)' if r['fold_warning'] else ''}")
    console.print(table)
    rate = {r["config"]: r for r in speed_rows}
    table = Table("configuration", "types (matrices)", "model bytes", "decode tok/s", "vs uniform of ~same size",
                  "vs predicted from its types", title=f"decode, 1 thread, median of {args.repeats} rotations")
    for t in SPEED_TYPES:
        r = rate[f"uniform {t}"]
        table.add_row(f"uniform {t}", _types(r), f"{r['model_bytes']:,}", f"{r['tokens_per_s']:.1f}", "", "")
    for label, _, uniform in SPEED_MIXES:
        r = rate[label]
        table.add_row(label, _types(r), f"{r['model_bytes']:,}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s'] / rate[f'uniform {uniform}']['tokens_per_s']:.3f} ({uniform})",
                      f"{r['tokens_per_s'] / r['predicted_tokens_per_s']:.3f}")
    console.print(table)
    table = Table("model", "export", "model bytes", "seconds", title="export wall time (write + verify)")
    for t in quality_times + speed_times:
        table.add_row(t["model"], f"{t.get('config', t.get('budget'))} {t['mode']}", f"{t['model_bytes']:,}", f"{t['seconds']:.2f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_start": load,
                    "torch_threads": 1, "llama_threads": 1},
        "args": {k: str(v) for k, v in vars(args).items()},
        "quality": quality_rows, "speed": speed_rows, "export_seconds": quality_times + speed_times,
    }, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
