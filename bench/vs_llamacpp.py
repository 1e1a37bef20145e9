"""Quality on a real model (issue 18): llama.cpp's own presets against CoA-LoRA at equal file bytes.

One model (default SmolLM2-135M-Instruct, /work/shared/assets/fetch-smollm2.sh), one F16
GGUF written from it (every matrix F16, vectors F32: the source of both sides), and

    presets   llama.cpp's quantizer (llama_model_quantize, default params) at its presets,
              from that F16 file; with and without an importance matrix (the same one we
              use, collected on the training text and handed over through params.imatrix)
    ours      at each preset's exact file size (embeddings and head included): the
              knapsack configuration for the bytes left after embeddings/norms/metadata,
              exported merged (one self-contained GGUF, the LoRA folded in), as
                none        allocation only (no adapter)
                coa         one CoA-LoRA run over the configurations of every size
                shared      one ordinary LoRA over the same configurations
                per-config  one LoRA per configuration (only the sizes in --per-config-sizes)

Everything is measured in llama.cpp itself (llama-cpp-python, CPU) on held-out text of
another domain than the training/calibration text: perplexity, mean KL divergence from
the F16 file's next-token distribution, top-1 agreement with it, and the file size.

    scripts/env.sh python bench/vs_llamacpp.py --part base            # no training
    scripts/env.sh python bench/vs_llamacpp.py --part train           # reuses the base JSON
    scripts/env.sh python bench/vs_llamacpp.py --quick                # smoke run
    scripts/env.sh python bench/vs_llamacpp.py --part plot            # table + PNG from the JSON

Writes bench/results/vs_llamacpp_base.json, vs_llamacpp.json and vs_llamacpp.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import gguf
import torch
from rich.console import Console

from coalora_edge.bundle.store import load_bundle
from coalora_edge.training.data import load_blocks
from coalora_edge.exporters.gguf.arch import Target
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices
from coalora_edge.bundle.lookup import evaluations
from coalora_edge.bundle.restore import restore
from coalora_edge.schemes import get_scheme
from coalora_edge.search.rounds import SearchSettings
from coalora_edge.search.sensitivity import collect_imatrix
from coalora_edge.bundle.store import train_bundle
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

from llamacpp_side import Reference, embedding_type, measure_export, quantize_preset, tensor_types, write_f16
from measured_costs import part_probe
from real_model import (
    CHOICES, DEFAULT_CHOICES, EVAL_TEXT, MODEL, PRESETS, RESULTS, SIZE_MARGIN, TRAIN_TEXT, log, machine, rss_gb, save,
    tokenizer_of,
)
from vs_llamacpp_report import report

# --- our side ------------------------------------------------------------------------------


def adapted_numel(model_dir: Path) -> tuple[int, int]:
    """(weights of the adapted matrices, bytes of everything else as our GGUF stores it)."""
    from coalora_edge.resolve.non_adapted import base_bytes

    model = load_model(str(model_dir))
    matrices = find_matrices(model)
    return sum(m.numel for m in matrices), base_bytes(model, [m.name for m in matrices], "llama.cpp")


def smallest_bits(model_dir: Path, choices) -> float:
    """Bits per adapted weight of the smallest configuration ``choices`` can store."""
    scheme = get_scheme("gguf")
    matrices = find_matrices(load_model(str(model_dir)))
    nbytes = sum(min(scheme.storage(c, m.shape).nbytes(m.shape) for c in choices) for m in matrices)
    return 8 * nbytes / sum(m.numel for m in matrices)


def budget_bits(file_bytes: int, metadata: int, base: int, numel: int) -> float:
    """Bits per adapted weight that leave our file at or just under ``file_bytes``."""
    adapted = file_bytes - metadata - base - SIZE_MARGIN
    return math.floor(adapted * 8 / numel * 1e6) / 1e6


def make_bundle(args, out: Path, method: str, bits: list[float], choices, use_imatrix: bool = True,
                 objective: str = "distill", steps: int | None = None) -> tuple:
    started = time.perf_counter()
    if args.reuse and (out / "manifest.json").exists():
        log(f"reusing {out} (--reuse): an earlier run's bundle of this method")
        bundle = load_bundle(out)
        return bundle, bundle.manifest.training.wall_seconds or 0.0, rss_gb()
    settings = TrainSettings(method=method, objective=objective, steps=0 if method == "none" else (steps or args.steps),
                             batch_size=args.batch, rank=args.rank, alpha=2 * args.rank, lr=args.lr,
                             k_configs=1 if method == "per-config" else args.k_configs, checkpoint_every=0)
    job = TrainJob(model=str(args.model), data=[str(TRAIN_TEXT)], out=out, scheme="gguf", choices=list(choices),
                   settings=settings, search=SearchSettings(mode="ladder"), seq_len=args.seq_len, budgets=bits,
                   calib_blocks=args.calib_blocks, eval_blocks=args.valid_blocks, use_imatrix=use_imatrix,
                   device="cpu", force=True, show_progress=False)
    bundle = train_bundle(job)
    seconds = time.perf_counter() - started
    return load_bundle(bundle.path), seconds, rss_gb()


def export_and_measure(args, bundle, label: str, sizes: list[dict], ref: Reference, work: Path) -> list[dict]:
    """Every size's configuration (the bundle's best measured one that fits) exported merged,
    once per rounding of ``--roundings`` (feedback only at ``--feedback-sizes``); a feedback
    row is labelled ``<label>+fb``."""
    restored = restore(bundle)
    trained = bundle.configs()
    rows = []
    for size in sizes:
        # the ladder's configuration for this budget: the largest measured one that fits
        # (picking by the few validation blocks' loss would let noise choose a smaller one)
        fitting = [e for e in evaluations(bundle) if e["bits_per_weight"] <= size["bits"] + 1e-9]
        if not fitting:
            log(f"{label} {size['preset']}: nothing fits {size['bits']} bits")
            continue
        evaluation = max(fitting, key=lambda e: e["bits_per_weight"])
        config = bundle.evaluated()[evaluation["config"]]
        if bundle.manifest.adapter.method == "per-config" and dict(config) not in trained:
            continue
        roundings = [r for r in args.roundings
                     if r == "nearest" or not args.feedback_sizes or size["preset"] in args.feedback_sizes]
        for rounding in roundings:
            method = label if rounding == "nearest" else f"{label}+fb"
            row, report = measure_export(restored, config, work / f"{method}-{size['preset']}", size, ref, method, rounding)
            verification = report["verification"]
            rows.append(row | {"valid_loss": evaluation["loss"], "fold": verification["fold"],
                               "adapter_effect_kl": verification["adapter_effect_kl"],
                               "runtime_vs_artifact_kl": verification["runtime_vs_artifact"]["kl"],
                               "seconds": report["seconds"]})
    del restored
    gc.collect()
    return rows


# --- parts -----------------------------------------------------------------------------------


def part_base(args, work: Path, console: Console) -> dict:
    tokenizer = tokenizer_of(args.model)
    eval_blocks = load_blocks(tokenizer, [str(EVAL_TEXT)], args.eval_seq, 0.1).valid[: args.eval_blocks]
    f16 = work / "f16.gguf"
    if f16.exists() and not args.quick:  # written by an earlier run of this command
        tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(f16).tensors)
        source = {"file_bytes": f16.stat().st_size, "tensor_bytes": tensor_bytes,
                  "metadata_bytes": f16.stat().st_size - tensor_bytes}
    else:
        log("writing the F16 source")
        source = write_f16(args.model, f16)
    ref = Reference(f16, eval_blocks, args.threads)
    log(f"F16: {source['file_bytes'] / 1e6:.2f} MB, ppl {ref.f16['perplexity']:.3f}")
    # the importance matrix both sides get: collected on the training text
    model = load_model(str(args.model))
    calib = load_blocks(tokenizer, [str(TRAIN_TEXT)], args.seq_len, 0.1).train[: args.calib_blocks]
    imatrix = collect_imatrix(model, calib.split(args.batch))
    target = Target.from_config(model.config)
    gguf_imatrix = {target.tensor_name(f"{name}.weight"): v.float().numpy() for name, v in imatrix.values.items()}
    del model
    presets = []
    for preset in args.presets:
        for with_imatrix in (False, True):
            path = work / f"{preset}{'-imat' if with_imatrix else ''}.gguf"
            seconds = quantize_preset(f16, path, preset, gguf_imatrix if with_imatrix else None)
            row = {"preset": preset, "imatrix": with_imatrix, "quantize_seconds": seconds, "types": tensor_types(path),
                   "token_embd": embedding_type(path), **ref.measure(path)}
            presets.append(row)
            log(f"llama.cpp {preset:>7}{' imatrix' if with_imatrix else '        '}: {row['file_bytes'] / 1e6:7.2f} MB "
                f"ppl {row['perplexity']:.3f} KL {row['kl']:.4f} {row['types']}")
            path.unlink()
    numel, base = adapted_numel(args.model)
    sizes = []
    for preset in args.presets:
        file_bytes = next(p["file_bytes"] for p in presets if p["preset"] == preset and not p["imatrix"])
        sizes.append({"preset": preset, "file_bytes": file_bytes,
                      "bits": budget_bits(file_bytes, source["metadata_bytes"], base, numel)})
    result = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "f16": {**source, **ref.f16},
              "adapted_weights": numel, "base_bytes": base, "sizes": sizes, "presets": presets, "ours": []}
    save(args.base_out, result)
    return part_none(args, work, console) if args.part == "all" else result


#: none: allocation only; label -> (choices, imatrix)
NONE_VARIANTS = {"none": (CHOICES, True), "none-noimat": (CHOICES, False), "none-default": (DEFAULT_CHOICES, True)}


def part_none(args, work: Path, console: Console) -> dict:
    result = json.loads(args.base_out.read_text())
    tokenizer = tokenizer_of(args.model)
    eval_blocks = load_blocks(tokenizer, [str(EVAL_TEXT)], args.eval_seq, 0.1).valid[: args.eval_blocks]
    ref = Reference(work / "f16.gguf", eval_blocks, args.threads)
    for label in args.none_variants:
        choices, use_imatrix = NONE_VARIANTS[label]
        low = smallest_bits(args.model, choices)
        sizes = [s for s in result["sizes"] if s["preset"] in args.none_sizes]
        fits = [s for s in sizes if s["bits"] >= low]
        result.setdefault("smallest_bits", {})[label] = low
        log(f"{label}: calibration, sensitivity, configurations ({len(fits)} sizes fit; smallest {low:.3f} bpw)")
        bundle, seconds, rss = make_bundle(args, work / f"{label}.bundle", "none", [s["bits"] for s in fits],
                                            choices, use_imatrix)
        rows = export_and_measure(args, bundle, label, fits, ref, work)
        for r in rows:
            r.update(imatrix=use_imatrix, choices=list(choices), train_seconds=seconds)
        labels = {r["method"] for r in rows}
        result["ours"] = [r for r in result["ours"] if r["method"] not in labels] + rows
        save(args.base_out, result)
    return result


def part_train(args, work: Path, console: Console) -> dict:
    result = json.loads(args.base_out.read_text())
    if args.out.exists():  # keep the trained methods of an earlier run (another --methods)
        earlier = json.loads(args.out.read_text())
        ours = {r["method"] for r in result["ours"]}
        result["ours"] += [r for r in earlier["ours"] if r["method"] not in ours
                           and r["method"].removesuffix("+fb") not in args.methods]
        result["training"] = [t for t in earlier.get("training", []) if t["method"] not in args.methods]
    sizes = result["sizes"]
    tokenizer = tokenizer_of(args.model)
    eval_blocks = load_blocks(tokenizer, [str(EVAL_TEXT)], args.eval_seq, 0.1).valid[: args.eval_blocks]
    ref = Reference(work / "f16.gguf", eval_blocks, args.threads)
    if args.out.exists():
        result["train_args_runs"] = earlier.get("train_args_runs", [earlier.get("train_args")])
    result["train_args"] = {k: str(v) for k, v in vars(args).items()}
    result.setdefault("train_args_runs", []).append(result["train_args"])
    result.setdefault("training", [])
    sizes = [s for s in sizes if s["bits"] >= result["smallest_bits"]["none"]]
    few = [s for s in sizes if s["preset"] in args.per_config_sizes]
    # (label, method, objective, sizes trained on, sizes exported and measured)
    main_sizes = [s for s in sizes if not args.coa_sizes or s["preset"] in args.coa_sizes]
    plan = [("coa", "coa", "distill", sizes, main_sizes), ("shared", "shared", "distill", sizes, few),
            ("per-config", "per-config", "distill", few, few), ("coa-lm", "coa", "lm", sizes, few)]
    for label, method, objective, trained_on, which in plan:
        if label not in args.methods:
            continue
        log(f"{label}: training ({objective}, {args.steps} steps, {len(trained_on)} sizes)")
        bundle, seconds, rss = make_bundle(args, work / f"{label}.bundle", method, [s["bits"] for s in trained_on],
                                            CHOICES, True, objective)
        history = bundle.manifest.training.history
        result["training"].append({"method": label, "objective": objective, "seconds": seconds, "peak_rss_gb": rss,
                                   "configs": bundle.manifest.training.configs,
                                   "first_loss": history[0]["loss"] if history else None,
                                   "last_loss": history[-1]["loss"] if history else None})
        rows = export_and_measure(args, bundle, label, which, ref, work)
        for r in rows:
            r.update(imatrix=True, choices=list(CHOICES), objective=objective, train_seconds=seconds)
        labels = {r["method"] for r in rows}
        result["ours"] = [r for r in result["ours"] if r["method"] not in labels] + rows
        save(args.out, result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--part", choices=["base", "none", "probe", "train", "all", "plot"], default="all")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--methods", nargs="+", default=["coa", "shared", "per-config", "coa-lm"])
    parser.add_argument("--per-config-sizes", nargs="+", default=["Q3_K_M", "Q4_K_M", "Q5_K_M"])
    parser.add_argument("--none-variants", nargs="+", default=list(NONE_VARIANTS))
    parser.add_argument("--none-sizes", nargs="+", default=list(PRESETS), help="sizes the none variants are measured at")
    parser.add_argument("--coa-sizes", nargs="*", default=[], help="sizes coa is exported and measured at (default: all)")
    parser.add_argument("--roundings", nargs="+", choices=["nearest", "feedback"], default=["nearest", "feedback"],
                        help="merged files' rounding (exporters/common/merge.py); feedback rows are labelled <method>+fb")
    parser.add_argument("--feedback-sizes", nargs="*", default=[],
                        help="sizes the feedback rounding is measured at (default: all); it costs 2-2.5x an export")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--k-configs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128, help="training and calibration block length")
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--valid-blocks", type=int, default=4, help="training-domain blocks each configuration is measured on")
    parser.add_argument("--eval-seq", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--probe-blocks", type=int, default=8, help="training-domain blocks of the per-type KL probe")
    parser.add_argument("--reuse", action="store_true", help="reuse the bundles an earlier run left in --work")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs_llamacpp"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 presets, 2 steps, small evaluation")
    parser.add_argument("--base-out", type=Path, default=RESULTS / "vs_llamacpp_base.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_llamacpp.json")
    args = parser.parse_args()
    if args.quick:
        args.presets, args.per_config_sizes = ["Q4_0", "Q4_K_M", "Q8_0"], ["Q4_K_M"]
        args.steps, args.calib_blocks, args.valid_blocks, args.eval_blocks, args.eval_seq = 2, 4, 2, 4, 128
        args.base_out = args.base_out.with_name("vs_llamacpp_quick_base.json")
        args.out = args.out.with_name("vs_llamacpp_quick.json")
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part in ("base", "all"):
        result = part_base(args, args.work, console)
    if args.part == "none":
        result = part_none(args, args.work, console)
    if args.part in ("probe", "all"):
        result = part_probe(args, args.work, console)
    if args.part in ("train", "all"):
        result = part_train(args, args.work, console)
    if args.part == "plot":
        result = json.loads((args.out if args.out.exists() else args.base_out).read_text())
    out = args.out if args.part in ("train", "all", "plot") and args.out.exists() else args.base_out
    report(result, console, out.with_suffix(".png"))
    save(out, result)


if __name__ == "__main__":
    main()
