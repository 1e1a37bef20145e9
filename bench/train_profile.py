"""Where a CPU training step's time and memory go on a real model (issue 18, part 3).

On SmolLM2-135M-Instruct (gguf scheme, 2 torch threads), one batch of ``--batch`` x
``--seq-len`` tokens:

1. Setup: model load, calibration (importance matrix), the wrapper, and filling the
   quantized-weight cache for every (matrix, format) (what sensitivity needs), with RSS
   after each and the bytes the cache holds.
2. One training step as the Trainer runs it (distill, K configurations): teacher forward
   (unquantized), then per configuration set_config / forward / backward, then clip and
   AdamW; each phase timed, median over ``--repeats`` steps.
3. The same batch through plain LoRA steps, forward + backward + AdamW, LM loss, one
   configuration: PEFT's LoRA on the F32 model (the reference a user would write),
   our ``shared`` adapter (M = I), our ``coa`` adapter, rotated; tokens/s and ratios.
4. torch.profiler's top operators of one coa distill step.

    scripts/env.sh python bench/train_profile.py      # about 5-8 minutes on 2 cores

Writes bench/results/train_profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

from coalora_edge.fileio import atomic_write_json
from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.training.data import load_blocks
from coalora_edge.model.loading import load_model, load_tokenizer
from coalora_edge.model.matrices import find_matrices
from coalora_edge.schemes import get_scheme
from coalora_edge.search.sensitivity import activation_sensitivity, collect_imatrix
from coalora_edge.training.trainer import distill_loss

CACHE = Path(os.environ.get("COALORA_CACHE", Path.home() / ".cache" / "coalora-edge"))
MODEL = CACHE / "assets" / "SmolLM2-135M-Instruct"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "assets" / "text" / "tinystories_dev.txt"
CHOICES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "IQ4_NL")


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Clock:
    def __init__(self):
        self.t: dict[str, list[float]] = {}

    def time(self, name, fn, *a, **k):
        start = time.perf_counter()
        out = fn(*a, **k)
        self.t.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def medians(self):
        return {k: statistics.median(v) for k, v in self.t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-cache", action="store_true", help="fill the cache for every choice, as train does")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_profile.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "cpus": os.cpu_count()}
    setup, memory = {}, {"start_rss_gb": rss_gb()}

    t = time.perf_counter()
    model = load_model(str(args.model))
    setup["load_model_s"] = time.perf_counter() - t
    memory["model_rss_gb"] = rss_gb()
    memory["model_param_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    tok = load_tokenizer(args.model, model.config.vocab_size)
    blocks = load_blocks(tok, [str(TEXT)], args.seq_len, 0.1)
    ids = blocks.train[: args.batch]
    t = time.perf_counter()
    imatrix = collect_imatrix(model, blocks.train[:16].split(args.batch))
    setup["calibration_16_blocks_s"] = time.perf_counter() - t
    scheme = get_scheme("gguf")
    t = time.perf_counter()
    torch.manual_seed(0)
    wrapper = CoALoRAModel(model, scheme, rank=args.rank, alpha=2 * args.rank, method="coa", imatrix=imatrix.values,
                           choices=list(CHOICES))
    setup["wrap_s"] = time.perf_counter() - t
    for layer in wrapper.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter
    matrices = wrapper.matrices
    configs = [{m.name: ["Q4_K", "Q6_K", "IQ4_XS", "Q8_0"][(i + k) % 4] for i, m in enumerate(matrices)} for k in range(args.k)]
    t = time.perf_counter()
    if args.full_cache:  # what train does: every (matrix, choice) for the sensitivity
        activation_sensitivity(wrapper.cache, imatrix, list(CHOICES))
    else:  # only the formats of the profiled configurations
        for c in configs:
            wrapper.cache.for_config(c)
    setup["cache_fill_s"] = time.perf_counter() - t
    cache_bytes = sum(v.numel() * v.element_size() for v in wrapper.cache._cache.values())
    memory.update(after_cache_rss_gb=rss_gb(), cache_entries=len(wrapper.cache), cache_gb=cache_bytes / 2**30,
                  full_cache=args.full_cache)

    # 2. the Trainer's distill step, phase by phase
    opt = torch.optim.AdamW(wrapper.param_groups(0.0, None), lr=1e-4)
    clock = Clock()

    def trainer_step():
        def teacher():
            with torch.no_grad(), wrapper.unquantized():
                return wrapper.model(input_ids=ids).logits[:, :-1]
        tl = clock.time("teacher_forward", teacher)
        for c in configs:
            clock.time("set_config", wrapper.set_config, c)
            loss = clock.time("forward", lambda: distill_loss(wrapper(input_ids=ids).logits[:, :-1], tl) / len(configs))
            clock.time("backward", loss.backward)
        clock.time("clip", torch.nn.utils.clip_grad_norm_, wrapper.trainable_parameters(), 1.0)
        clock.time("optimizer", opt.step)
        opt.zero_grad(set_to_none=True)

    trainer_step()  # warm-up (unquantized context, allocator)
    clock.t.clear()
    step_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        trainer_step()
        step_times.append(time.perf_counter() - t)
    phases = clock.medians()
    per_step = {k: v * (args.k if k in ("set_config", "forward", "backward") else 1) for k, v in phases.items()}
    out["trainer_step"] = {"median_s": statistics.median(step_times), "tokens_per_s":
                           args.batch * args.seq_len / statistics.median(step_times),
                           "phase_s_per_step": per_step, "peak_rss_gb": peak_gb()}
    memory["after_steps_rss_gb"] = rss_gb()

    # 4. profile one step
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer_step()
    out["profile_top"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(out["profile_top"])

    # 3. plain LoRA steps: PEFT vs ours (shared, coa), LM loss, one configuration
    def lm_step(m, params, o):
        t = time.perf_counter()
        m(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        o.step()
        o.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    shared = CoALoRAModel(load_model(str(args.model)), scheme, rank=args.rank, alpha=2 * args.rank, method="shared",
                          imatrix=imatrix.values, choices=list(CHOICES))
    shared.set_config(configs[0])
    wrapper.set_config(configs[0])
    contenders = {"coa": (wrapper, wrapper.trainable_parameters()), "shared": (shared, shared.trainable_parameters())}
    try:
        from peft import LoraConfig, get_peft_model

        base = load_model(str(args.model))
        names = sorted({m.name.rsplit(".", 1)[-1] for m in find_matrices(base)})
        peft_model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=names,
                                                     lora_dropout=0.0))
        contenders["peft"] = (peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    except ImportError:
        out["peft"] = "not installed"
    opts = {k: torch.optim.AdamW(list(p), lr=1e-4) for k, (_, p) in contenders.items()}
    times = {k: [] for k in contenders}
    for k, (m, p) in contenders.items():
        lm_step(m, p, opts[k])  # warm-up
    for r in range(args.repeats + 1):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for k in order:
            m, p = contenders[k]
            times[k].append(lm_step(m, p, opts[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    out["lm_step"] = {k: {"median_s": v, "tokens_per_s": args.batch * args.seq_len / v, "times": times[k]}
                      for k, v in med.items()}
    ref = med.get("peft", med["shared"])
    out["ratios"] = {f"{k}_over_{'peft' if 'peft' in med else 'shared'}": v / ref for k, v in med.items()}
    out["ratios"]["coa_over_shared"] = med["coa"] / med["shared"]
    out["setup_s"], out["memory"] = setup, memory | {"peak_rss_gb": peak_gb()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k != "profile_top"}, indent=2))


if __name__ == "__main__":
    main()
