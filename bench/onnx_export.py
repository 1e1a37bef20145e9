"""ONNX export (issue 7): quality in ONNX Runtime, decode speed of mixed precision, export time.

Quality: TinyStories-656K trained once with the onnx scheme (CoA-LoRA) on a three-budget
ladder. For each budget's configuration, perplexity on held-out blocks of

    PyTorch    the trained model (quantized + adapter), and the quantized model alone
    sidecar    the ONNX export with the LoRA as a side branch, in ONNX Runtime, at
               accuracy level 0 (exact fp32) and 4 (int8 activations, the default)
    merged     the ONNX export with the LoRA folded in before quantization, levels 0 and 4:
               rounded to nearest, with error feedback (merged_fb), and of a second bundle
               trained with --merge-aware (merged_aware), at the same configurations

plus each export's wall time.

Speed: a random Llama (hidden 512, 4 layers, MLP 1536, vocabulary 2048) exported fp32,
uniform int4_b32_asym, and a 2/4/8-bit mix of the same size (the exact knapsack at the
uniform model's bytes), each at accuracy level 4 and 0, plus the mix as a sidecar export.
Greedy decoding with the KV cache, one thread, 64 new tokens after a 16-token prompt;
models take turns in every round; the best round, the median and the median per-round
ratio to uniform 4-bit are reported.

    scripts/env.sh python bench/onnx_export.py                # about 6 minutes on 2 cores
    scripts/env.sh python bench/onnx_export.py --steps 20 --repeats 3   # smoke run

Prints tables and writes bench/results/onnx_export.json.
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

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import Bundle, SENSITIVITY, load_bundle, train_bundle
from coalora_edge.fileio import atomic_write_json
from coalora_edge.exporters.common.perplexity import onnx_perplexity
from coalora_edge.exporters.onnx import session as ort
from coalora_edge.exporters.onnx.export import MODEL_FILE, export
from coalora_edge.exporters.onnx.graph import set_accuracy_level
from coalora_edge.model.evaluate import lm_score
from coalora_edge.model.loading import load_model
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.problem import Problem
from coalora_edge.search.sensitivity import Sensitivity
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

from assets import TINYSTORIES as MODEL, TINYSTORIES_TEXT as TEXT, tiny_model_with_tokenizer

BUDGETS = (3.0, 4.5, 6.0)  # bits per weight of the adapted matrices
#: export modes measured -> (adapter mode, rounding, from the merge-aware bundle): sidecar,
#: merged rounded to nearest, merged with error feedback, merged from `train --merge-aware`
MODES = {"sidecar": ("sidecar", None, False), "merged": ("merged", "nearest", False),
         "merged_fb": ("merged", "feedback", False), "merged_aware": ("merged", "nearest", True)}
SPEED_MODEL = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536, vocab=2048, context=256)
UNIFORM = "int4_b32_asym"
BASELINE = "uniform int4, level 4"
PROMPT_TOKENS, NEW_TOKENS = 16, 64


def make_bundle(model: Path, out: Path, steps: int, budgets=BUDGETS, seq_len: int = 128,
                merge_aware: bool = False) -> Bundle:
    settings = TrainSettings(steps=steps, batch_size=8, rank=8, alpha=16, lr=2e-3, merge_aware=merge_aware)
    train_bundle(TrainJob(model=str(model), data=[str(TEXT)], out=out, scheme="onnx", seq_len=seq_len, budgets=list(budgets),
                 eval_blocks=16, show_progress=False, settings=settings))
    return load_bundle(out)


def ort_perplexity(model_dir: Path, level: int, blocks: torch.Tensor) -> float:
    """Perplexity of ``blocks (n, T)`` in ONNX Runtime at accuracy ``level``."""
    import onnx

    model = onnx.load(str(model_dir / MODEL_FILE))
    set_accuracy_level(model, level)
    return onnx_perplexity(model.SerializeToString(), blocks, threads=1)


def quality(work: Path, steps: int, eval_blocks: int) -> list[dict]:
    bundle = make_bundle(MODEL, work / "tinystories-bundle", steps)
    restored = {False: restore(bundle),
                True: restore(make_bundle(MODEL, work / "tinystories-aware", steps, merge_aware=True))}
    blocks = load_blocks(restored[False].tokenizer, [str(TEXT)], 128, 0.1).valid[:eval_blocks]
    shapes = {m.name: m.shape for m in bundle.matrices}
    numel = sum(s[0] * s[1] for s in shapes.values())
    rows = []
    for config in bundle.configs():  # the merge-aware bundle is exported at the same configurations
        for r in restored.values():
            r.use(config)
        ordinary = restored[False].wrapper
        row = {"bits_per_weight": 8 * config_nbytes(ordinary.scheme, shapes, config) / numel,
               "pytorch_trained": lm_score(ordinary, blocks).perplexity,
               "pytorch_trained_merge_aware": lm_score(restored[True].wrapper, blocks).perplexity}
        with ordinary.without_adapter():
            row["pytorch_no_adapter"] = lm_score(ordinary, blocks).perplexity
        for mode, (adapter_mode, rounding, aware) in MODES.items():
            out = work / f"tinystories-{mode}-{row['bits_per_weight']:.2f}"
            started = time.perf_counter()
            report = export(restored[aware], config, out, adapter_mode=adapter_mode, rounding=rounding, threads=1)
            row[f"{mode}_export_seconds"] = time.perf_counter() - started
            row[f"{mode}_exact_relative"] = report["verification"]["exact"]["relative"]
            row[f"{mode}_fold_kl"] = (report["verification"]["fold"] or {}).get("kl")
            for level in (0, 4):
                row[f"ort_{mode}_level{level}"] = ort_perplexity(out, level, blocks)
        rows.append(row)
    return rows


def speed_models(work: Path) -> tuple[dict[str, Path], dict]:
    """Export folders of the speed model (fp32, uniform 4-bit, a same-size 2/4/8 mix) and sizes."""
    from optimum.exporters.onnx import onnx_export_from_model

    model_dir = tiny_model_with_tokenizer(work / "llama-512", **SPEED_MODEL)
    bundle = make_bundle(model_dir, work / "llama-512-bundle", steps=1, budgets=[4.5], seq_len=64)
    restored = restore(bundle)
    scheme = get_scheme("onnx")
    shapes = {m.name: m.shape for m in bundle.matrices}
    uniform = {m: UNIFORM for m in shapes}
    problem = Problem.build(scheme, shapes, Sensitivity.from_dict(bundle.read_json(SENSITIVITY)))
    mixed = best_config(problem, config_nbytes(scheme, shapes, uniform)).config
    folders = {"fp32": work / "speed-fp32"}
    onnx_export_from_model(load_model(str(model_dir)), folders["fp32"], task="text-generation-with-past", do_validation=False)
    for name, config, mode in [("uniform int4", uniform, "merged"), ("mixed 2/4/8", mixed, "merged"),
                               ("mixed 2/4/8 sidecar", mixed, "sidecar")]:
        folders[name] = work / f"speed-{name.replace(' ', '-').replace('/', '')}"
        export(restored, config, folders[name], adapter_mode=mode, threads=1)
    return folders, {"uniform": config_nbytes(scheme, shapes, uniform), "mixed": config_nbytes(scheme, shapes, mixed),
                     "mixed_formats": {f: list(mixed.values()).count(f) for f in sorted(set(mixed.values()))}}


def decode_speed(folders: dict[str, Path], repeats: int) -> dict[str, dict]:
    """Tokens/s of greedy decoding per (model, level), models taking turns in every round.

    On a shared machine other jobs only ever slow a run down, so the best round is the
    closest to the model's own speed; the median and the median per-round ratio to uniform
    4-bit at level 4 (both measured seconds apart) are kept beside it.
    """
    import onnx

    sessions = {}
    for name, folder in folders.items():
        for level in ((None,) if name == "fp32" else (4, 0)):
            model = onnx.load(str(folder / MODEL_FILE))
            if level is not None:
                set_accuracy_level(model, level)
            sessions[name if level is None else f"{name}, level {level}"] = ort.open_session(model.SerializeToString(), 1)
    prompt = list(np.random.default_rng(0).integers(3, SPEED_MODEL["vocab"], PROMPT_TOKENS))
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            ort.greedy(session, prompt, 1, None)  # the prompt and the first token
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            ort.greedy(session, prompt, NEW_TOKENS + 1, None)
            rates[name].append(NEW_TOKENS / (time.perf_counter() - started - prefill))  # the tokens after it
    baseline = rates[BASELINE]
    return {name: {"best": max(r), "median": statistics.median(r),
                   "median_round_ratio": statistics.median(a / b for a, b in zip(r, baseline)), "rounds": r}
            for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps of the TinyStories bundle")
    parser.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks of 128 tokens")
    parser.add_argument("--repeats", type=int, default=15, help="decode rounds (every model once per round)")
    parser.add_argument("--part", choices=["all", "quality"], default="all", help="quality: no decode speed")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_export.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        rows = quality(work, args.steps, args.eval_blocks)
        folders, sizes = speed_models(work) if args.part == "all" else ({}, {})
        speed = decode_speed(folders, args.repeats) if args.part == "all" else {}
        seconds = time.perf_counter() - started
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                          "threads": 1}, "quality": rows, "speed": speed, "speed_sizes": sizes, "seconds": seconds,
              "args": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_json(args.out, result)

    table = Table("bits/weight", "PyTorch trained", "PyTorch trained merge-aware", "PyTorch no adapter",
                  *[f"ORT {mode} L{level}" for mode in MODES for level in (0, 4)], "export s (" + " / ".join(MODES) + ")",
                  title=f"TinyStories-656K perplexity, {args.eval_blocks} held-out blocks of 128 tokens "
                        "(merged: nearest rounding, merged_fb: error feedback, merged_aware: of `train --merge-aware`)")
    for r in rows:
        table.add_row(f"{r['bits_per_weight']:.2f}", *(f"{r[k]:.3f}" for k in (
            "pytorch_trained", "pytorch_trained_merge_aware", "pytorch_no_adapter", *[f"ort_{mode}_level{level}" for mode in MODES for level in (0, 4)])),
            " / ".join(f"{r[f'{mode}_export_seconds']:.1f}" for mode in MODES))
    console.print(table)
    if not speed:
        return
    best = speed[BASELINE]["best"]
    table = Table("model", "tokens/s, best", "tokens/s, median", "best vs uniform int4 L4", "median round ratio",
                  title=f"decode, 1 thread, {args.repeats} rounds ({sizes})")
    for name, s in speed.items():
        table.add_row(name, f"{s['best']:.1f}", f"{s['median']:.1f}", f"{s['best'] / best:.3f}", f"{s['median_round_ratio']:.3f}")
    console.print(table)
    console.print(f"total {seconds:.0f} s, load average {os.getloadavg()}; JSON: {args.out}")


if __name__ == "__main__":
    main()
