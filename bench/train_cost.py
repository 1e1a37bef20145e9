"""What CoA-LoRA costs over a plain LoRA: step time, adapter generation time, peak memory.

1. Step time: one forward/backward of the same batch, same configuration, with the
   configuration-aware adapter (``coa``: M from the configuration model, recomputed every
   forward) and with a plain LoRA (``shared``: M = I). Rotated repeats in one process;
   the median of each. Target ratio <= 1.15.
2. Adapter for a new configuration: ``collapsed_lora(config)`` for a configuration never
   set before (all M in one batched call, then B' = B M). Target < 50 ms on CPU.
3. Peak memory (max RSS) of a short training run, each method in its own process: plain
   LoRA on one configuration vs CoA-LoRA on the whole ladder (which caches the quantized
   weights of every format it meets).

    scripts/env.sh python bench/train_cost.py            # TinyStories-656K and a 111M Llama
    scripts/env.sh python bench/train_cost.py --quick    # TinyStories only

Prints a table and writes bench/results/train_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.model.loading import load_model
from coalora_edge.model.synthetic import build_tiny_model
from coalora_edge.schemes import get_scheme

from assets import TINYSTORIES, TINYSTORIES_TEXT as TEXT


def step_time(wrapper: CoALoRAModel, config: dict, ids: torch.Tensor) -> float:
    wrapper.set_config(config)
    start = time.perf_counter()
    wrapper(input_ids=ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    for p in wrapper.trainable_parameters():
        p.grad = None
    return elapsed


def compare_steps(model_dir: Path, scheme: str, batch: int, seq: int, repeats: int, rank: int) -> dict:
    sch = get_scheme(scheme)
    wrappers = {}
    for method in ("coa", "shared"):
        torch.manual_seed(0)
        wrappers[method] = CoALoRAModel(load_model(str(model_dir)), sch, rank=rank, alpha=2 * rank, method=method)
        for layer in wrappers[method].layers.values():
            torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter
    matrices = wrappers["coa"].matrices
    config = {m.name: sch.default_choices[i % len(sch.default_choices)] for i, m in enumerate(matrices)}
    vocab = wrappers["coa"].model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"coa": [], "shared": []}
    for method in times:  # warm-up: caches, allocator
        step_time(wrappers[method], config, ids)
    for r in range(repeats):
        order = ("coa", "shared") if r % 2 == 0 else ("shared", "coa")
        for method in order:
            times[method].append(step_time(wrappers[method], config, ids))

    coa = wrappers["coa"]
    unseen = [{m.name: sch.default_choices[(i + k) % len(sch.default_choices)] for i, m in enumerate(matrices)}
              for k in range(1, 6)]
    adapt = []
    for c in unseen:
        start = time.perf_counter()
        coa.collapsed_lora(c)
        adapt.append(time.perf_counter() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "model": str(model_dir.name), "scheme": scheme, "matrices": len(matrices), "rank": rank,
        "batch": batch, "seq_len": seq, "repeats": repeats,
        "coa_step_s": med["coa"], "lora_step_s": med["shared"], "step_ratio": med["coa"] / med["shared"],
        "adapter_ms_median": 1e3 * statistics.median(adapt), "adapter_ms_max": 1e3 * max(adapt),
    }


def peak_rss_mb(method: str, model_dir: Path, scheme: str, budgets: str | None) -> float:
    """Max RSS of a short `train`, measured by a fresh parent whose only child it is."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "coalora_edge", "train", str(model_dir), "--data", str(TEXT), "--out",
                f"{tmp}/b", "--scheme", scheme, "--method", method, "--steps", "10", "--seq-len", "128", "--json"]
        if budgets:
            args += ["--budgets", budgets]
        probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", probe, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="TinyStories only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/train_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # steady timings on a shared 2-core machine

    models = [(TINYSTORIES, 8, 128, 16)]
    if not args.quick:
        big = Path(tempfile.mkdtemp()) / "llama-111m"
        build_tiny_model(big, "llama", hidden=768, layers=12, heads=12, kv_heads=12, intermediate=3072, vocab=8192, context=512)
        models.append((big, 2, 128, 16))
    rows = [compare_steps(m, "onnx", b, s, args.repeats, r) for m, b, s, r in models]
    memory = {
        "plain_lora_one_config_mb": peak_rss_mb("shared", TINYSTORIES, "onnx", "4"),
        "coa_ladder_mb": peak_rss_mb("coa", TINYSTORIES, "onnx", None),
    }

    table = Table("model", "matrices", "coa step ms", "LoRA step ms", "ratio", "new adapter ms (median/max)",
                  title=f"CoA-LoRA cost, 1 thread, {os.cpu_count()} CPUs")
    for r in rows:
        table.add_row(r["model"], str(r["matrices"]), f"{1e3 * r['coa_step_s']:.1f}", f"{1e3 * r['lora_step_s']:.1f}",
                      f"{r['step_ratio']:.3f}", f"{r['adapter_ms_median']:.2f} / {r['adapter_ms_max']:.2f}")
    console = Console(width=140)
    console.print(table)
    console.print(f"peak RSS of a 10-step train on TinyStories-656K: plain LoRA (one config) "
                  f"{memory['plain_lora_one_config_mb']:.0f} MB, CoA-LoRA on the ladder {memory['coa_ladder_mb']:.0f} MB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                    "rows": rows, "memory": memory}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
