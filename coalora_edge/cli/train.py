"""`coalora-edge train MODEL --data PATH... --scheme S --out BUNDLE`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from coalora_edge.adapter.config_model import CONFIG_MODELS
from coalora_edge.bundle.lookup import final_evaluations
from coalora_edge.bundle.store import train_bundle
from coalora_edge.cli.common import console, one_line_errors, print_json, split_list
from coalora_edge.search.rounds import SearchSettings
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings


#: no format stores more than fp32: a larger budget is a typo or a unit mistake
MAX_BUDGET_BITS = 32.0


def _budgets(value: Optional[str]) -> Optional[list[float]]:
    """`--budgets 2.5,3,4`: bits per weight, each finite, above 0 and at most 32."""
    items = split_list(value, "--budgets")
    if items is None:
        return None
    try:
        budgets = [float(v) for v in items]
    except ValueError:
        raise typer.BadParameter(f"expected numbers like 2.5,3,4, got {value!r}", param_hint="'--budgets'") from None
    if not all(0 < b <= MAX_BUDGET_BITS for b in budgets):  # also false for nan
        raise typer.BadParameter(f"bits per weight must be above 0 and at most {MAX_BUDGET_BITS:g}, got {value!r}",
                                 param_hint="'--budgets'")
    return budgets


@one_line_errors
def train(
    model: str = typer.Argument(..., help="Hugging Face model folder or hub id."),
    data: List[str] = typer.Option(..., "--data", help="Text (.txt), JSON Lines (.jsonl, field \"text\") or hf:DATASET[:SPLIT]; repeatable."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write."),
    scheme: str = typer.Option("gguf", help="Quantization scheme: gguf, onnx or nf."),
    choices: Optional[str] = typer.Option(None, help="Comma-separated formats to train for (default: the scheme's)."),
    method: str = typer.Option("coa", help="coa (CoA-LoRA), per-config, shared or none."),
    objective: str = typer.Option("lm", help="lm: next-token loss on the data; distill: KL to the unquantized model."),
    rank: int = typer.Option(16, help="LoRA rank r."),
    alpha: float = typer.Option(32.0, help="LoRA alpha (scale alpha / r)."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate."),
    config_model: str = typer.Option(CONFIG_MODELS[0], help="coa: the configuration model, mlp (the paper's network) or table (one M per matrix and format)."),
    config_model_lr: Optional[float] = typer.Option(None, help="coa: learning rate of the configuration model (default: --lr)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay (LoRA factors and configuration-model weights only)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (per configuration for per-config). Default: one epoch."),
    epochs: Optional[float] = typer.Option(None, help="Passes over the training blocks; converted to steps."),
    batch_size: int = typer.Option(8, help="Blocks per optimizer step (over all processes)."),
    seq_len: int = typer.Option(256, help="Tokens per block."),
    k_configs: int = typer.Option(2, "--k", help="Configurations per step; their gradients are averaged."),
    budgets: Optional[str] = typer.Option(None, help="Train on the best configuration at these bits per weight (e.g. 2.5,3,3.5,4) instead of the whole ladder."),
    ladder_step: float = typer.Option(0.1, help="Bits-per-weight step of the budget ladder."),
    search: str = typer.Option("auto", help="Training set: none (uniform configurations), ladder (budget ladder, never "
                               "refined), pareto (ladder refined by GP + qLogEHVI in rounds). auto: pareto for coa/shared "
                               "without --budgets, else ladder."),
    search_rounds: int = typer.Option(4, help="pareto: refinement rounds, spread evenly over training (the last at its end)."),
    search_every: int = typer.Option(0, help="pareto: a round every N steps instead of --search-rounds (0: off)."),
    segments: int = typer.Option(40, help="pareto: bins of the bits axis in segmented Pareto selection."),
    candidates: int = typer.Option(12, help="pareto: new configurations proposed and measured per round."),
    eval_blocks: int = typer.Option(32, help="Held-out blocks every configuration is measured on: the search's fixed batch set and pareto.json's validation loss."),
    seed: int = typer.Option(0, help="Seed of initialisation, data order and configuration sampling."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dtype: str = typer.Option("auto", help="Base model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward (large models)."),
    merge_aware: bool = typer.Option(False, "--merge-aware", help="Train what a merged export stores, Q(W + s B M A) with a straight-through gradient, instead of Q(W) + s B M A: the merged file is then exactly the trained model (export merged, nearest rounding only)."),
    imatrix: bool = typer.Option(True, help="gguf: quantize with the importance matrix from the calibration blocks, as llama.cpp does."),
    checkpoint_every: int = typer.Option(50, help="Save a resumable checkpoint every N steps (0: only between runs)."),
    resume: bool = typer.Option(False, help="Continue a killed run from BUNDLE.checkpoint/."),
    force: bool = typer.Option(False, help="Replace an existing bundle."),
    trust_remote_code: bool = typer.Option(False, help="Run the model repository's own Python code (only for repos you trust)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (the bundle summary) instead of tables."),
) -> None:
    """Train one configuration-aware adapter for every quantization configuration."""
    settings = TrainSettings(
        method=method, objective=objective, rank=rank, alpha=alpha, lr=lr, config_model=config_model,
        config_model_lr=config_model_lr, weight_decay=weight_decay,
        steps=steps if steps is not None else 0, batch_size=batch_size, k_configs=k_configs, seed=seed,
        checkpoint_every=checkpoint_every, gradient_checkpointing=gradient_checkpointing,
        merge_aware=merge_aware,
    )
    job = TrainJob(model=model, data=data, out=out, scheme=scheme, choices=split_list(choices, "--choices"), settings=settings,
                   search=SearchSettings(mode=search, rounds=search_rounds, every=search_every, segments=segments,
                                         candidates=candidates),
                   seq_len=seq_len, eval_blocks=eval_blocks, budgets=_budgets(budgets), ladder_step=ladder_step, device=device, dtype=dtype,
                   use_imatrix=imatrix, resume=resume, force=force, trust_remote_code=trust_remote_code,
                   epochs=(epochs or 1.0) if steps is None else None, show_progress=not json_out)
    bundle = train_bundle(job)
    if bundle is None:  # not the main process of a multi-process launch
        return
    training = bundle.manifest.training
    summary = {"bundle": str(bundle.path), "method": method, "scheme": scheme, "search": training.search.mode,
               "configs": training.configs, "evaluated": training.evaluated, "steps": training.settings["steps"],
               "seconds": round(training.seconds, 2), "search_seconds": round(training.search_seconds, 2),
               "search_share": round(training.search_share, 4), "evaluations": bundle.read_json("pareto.json")}
    if json_out:
        print_json(summary)
        return
    console.print(f"[green]wrote[/] {bundle.path}: {summary['configs']} configurations ({summary['evaluated']} "
                  f"evaluated, search {summary['search']}), {summary['steps']} steps, {summary['seconds']:.1f} s "
                  f"(search {summary['search_seconds']:.1f} s, {100 * summary['search_share']:.1f}% of wall time)")
    from coalora_edge.cli.eval import render_evaluations

    pareto = summary["evaluations"]
    trained = [e for e in final_evaluations(pareto["evaluations"]) if e["config"] < summary["configs"]]
    render_evaluations({**pareto, "evaluations": trained})
    console.print(f"the front of all {summary['evaluated']} evaluated configurations: coalora-edge pareto {bundle.path}")
