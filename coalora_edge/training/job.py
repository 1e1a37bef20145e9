"""From a model folder and text to a bundle: the whole `coalora-edge train` job.

    model + data -> importance matrix (calibration) -> sensitivity per (matrix, format)
    -> training configuration set (uniform / budget ladder) -> Trainer, with the Pareto
    search refining the set in rounds -> validation of the final set -> bundle

Everything heavy is delegated (data.py, search/, adapter/, trainer.py); this module only
decides the order and what the bundle will record (bundle/store.py writes it).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from coalora_edge import resources
from coalora_edge.adapter.methods import TRAINING_METHODS
from coalora_edge.adapter.model import CoALoRAModel, check_rank
from coalora_edge.errors import CoaloraError
from coalora_edge.fileio import existing_parent
from coalora_edge.model.dims import ModelDims
from coalora_edge.model.evaluate import LMScore, lm_score
from coalora_edge.model.loading import load_model, load_tokenizer, resolve_model_dir
from coalora_edge.model.matrices import Matrix, find_matrices
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import Configuration
from coalora_edge.search.knapsack import best_config
from coalora_edge.search.ladder import ladder
from coalora_edge.search.problem import Problem
from coalora_edge.search.rounds import ConfigSearch, SearchSettings, uniform_configs
from coalora_edge.search.sensitivity import Imatrix, activation_sensitivity, collect_imatrix
from coalora_edge.search.surrogate import LevelSpace
from coalora_edge.training.data import TokenBlocks, load_blocks
from coalora_edge.training.trainer import Trainer, TrainSettings, per_config_state, progress_bar


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainJob:
    model: str
    data: list[str]
    out: Path
    scheme: str = "gguf"
    choices: list[str] | None = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    seq_len: int = 256
    valid_fraction: float = 0.1
    epochs: float | None = None  # if set, replaces settings.steps: passes over the training blocks
    budgets: list[float] | None = None  # bits per weight; default: the whole ladder
    ladder_step: float = 0.1
    calib_blocks: int = 32
    eval_blocks: int = 32  # the fixed held-out blocks every configuration is measured on
    use_imatrix: bool = True  # gguf only: quantize with llama.cpp's importance matrix
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}"),
            (self.device != "cuda" or torch.cuda.is_available(), "--device cuda, but torch sees no CUDA device; "
                                                                 "use --device cpu or a CUDA build of torch"),
            (self.eval_blocks >= 1, f"--eval-blocks must be at least 1, got {self.eval_blocks}"),
            (self.calib_blocks >= 1, f"calibration needs at least 1 block, got {self.calib_blocks}"),
            (self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoaloraError(message)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".checkpoint")


@dataclass
class Trained:
    """Everything a bundle records of one training run; bundle/store.py writes it."""

    model_dir: Path
    base_model: dict[str, Any]  # source, model type, architecture (the writer adds the weights' fingerprint)
    scheme: str
    choices: list[str]
    matrices: list[Matrix]
    adapter: dict[str, Any]
    adapter_state: dict[str, torch.Tensor]
    training_set: list[Configuration]
    evaluated: list[Configuration]  # the training set first
    training: dict[str, Any]
    sensitivity: dict[str, Any]
    pareto: dict[str, Any]
    imatrix: Imatrix


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs (what 1-8B training needs), fp32 on CPUs (bf16 is slow there)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise CoaloraError(f"unknown dtype {name!r}; choose auto, {', '.join(table)}")
    return table[name]


def training_set(problem: Problem, budgets: Sequence[float] | None, step: float) -> list[Configuration]:
    """The budget ladder, or the best configuration at each given budget (deduplicated)."""
    if budgets is None:
        return [s.config for s in ladder(problem, step)]
    configs: list[Configuration] = []
    for bits in budgets:
        config = best_config(problem, problem.budget_bytes(bits)).config
        if config not in configs:
            configs.append(config)
    return configs


def initial_set(mode: str, problem: Problem, space: LevelSpace, budgets: Sequence[float] | None,
                step: float) -> list[Configuration]:
    """``none``: the uniform configurations; ``ladder`` and ``pareto``: the budget ladder."""
    return uniform_configs(space) if mode == "none" else training_set(problem, budgets, step)


def _need(job: TrainJob, model: torch.nn.Module, matrices: list[Matrix], formats: int) -> resources.Need:
    dims = ModelDims.from_config(model.config)
    return resources.training_need(
        adapted=sum(m.numel for m in matrices), shapes=[m.shape for m in matrices], rank=job.settings.rank,
        dtype_bytes=model.dtype.itemsize, formats=formats, batch_tokens=job.settings.batch_size * job.seq_len,
        hidden=dims.hidden, intermediate=dims.intermediate, layers=dims.layers, vocab=dims.vocab,
        gradient_checkpointing=job.settings.gradient_checkpointing,
        table_entries=len(matrices) * formats if job.settings.method == "coa" and job.settings.config_model == "table" else 0,
    )


def train(job: TrainJob) -> Trained | None:
    """Train; what the bundle records, or None in the other processes of a multi-process run."""
    from accelerate import Accelerator

    started = time.perf_counter()
    if job.out.exists() and not job.force:
        raise CoaloraError(f"{job.out} already exists; choose another --out or pass --force to replace it")
    existing_parent(job.out)  # an --out under a file fails now, not when the bundle is written
    if job.resume and not job.checkpoint_dir.exists():
        raise CoaloraError(f"nothing to resume: {job.checkpoint_dir} does not exist; train without --resume")
    scheme = get_scheme(job.scheme)
    choices = list(scheme.choices(job.choices))
    mode = job.search.resolve(job.settings.method, job.budgets is not None)
    acc = Accelerator(cpu=job.device == "cpu")
    model_dir = resolve_model_dir(job.model)
    model = load_model(str(model_dir), dtype=torch_dtype(job.dtype, acc.device), device=str(acc.device),
                       trust_remote_code=job.trust_remote_code)
    matrices = find_matrices(model)
    check_rank(matrices, job.settings.rank)  # here, not after calibration
    resources.check(_need(job, model, matrices, len(choices)), job.out, str(acc.device))
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size, job.trust_remote_code)
    blocks: TokenBlocks = load_blocks(tokenizer, job.data, job.seq_len, job.valid_fraction)
    valid = blocks.valid[: job.eval_blocks]  # the fixed held-out blocks every configuration is measured on
    if len(valid) == 0:
        raise CoaloraError(f"no validation blocks to measure configurations on (--eval-blocks {job.eval_blocks}, "
                           f"{len(blocks.valid)} held out); pass --eval-blocks >= 1 and more text")
    s = job.settings
    if job.epochs is not None:
        s = replace(s, steps=math.ceil(job.epochs * len(blocks.train) / s.batch_size))

    torch.manual_seed(s.seed)  # the adapter's initialisation
    imatrix: Imatrix = collect_imatrix(model, blocks.train[: job.calib_blocks].split(s.batch_size))
    wrapper = CoALoRAModel(
        model, scheme, rank=s.rank, alpha=s.alpha, method=TRAINING_METHODS[s.method],
        imatrix=imatrix.values if job.use_imatrix and job.scheme == "gguf" else None,
        config_model=s.config_model, choices=choices, merge_aware=s.merge_aware,
    )
    shapes = {m.name: m.shape for m in wrapper.matrices}
    sensitivity = activation_sensitivity(wrapper.cache, imatrix, choices)
    problem = Problem.build(scheme, shapes, sensitivity)
    space = LevelSpace.from_problem(problem)
    configs = initial_set(mode, problem, space, job.budgets, job.ladder_step)

    def measure(config: Configuration) -> LMScore:
        wrapper.set_config(config)
        return lm_score(wrapper, valid, s.batch_size)

    search = ConfigSearch(space, measure, job.search, job.search.schedule(s.steps) if mode == "pareto" else [], s.seed)
    trainer = Trainer(wrapper, blocks, s, acc, job.checkpoint_dir, refiner=search if mode == "pareto" else None)
    steps = s.steps * (len(configs) if s.method == "per-config" else 1) if wrapper.trainable_parameters() else 0
    progress, advance = progress_bar(steps, s.batch_size * job.seq_len, job.show_progress and acc.is_main_process)
    with progress:
        states = trainer.train(configs, resume=job.resume, on_step=advance)
    train_seconds = time.perf_counter() - started

    acc.wait_for_everyone()
    # No collective follows; a process that exits with gloo's threads alive aborts ("terminate called ...").
    acc.end_training()
    if not acc.is_main_process:
        return None
    final = search.finish(s.steps, trainer.training_set)  # rounds training never reached (method none)
    for i, config in enumerate(final):
        if s.method == "per-config" and states:
            wrapper.load_trainable_state(per_config_state(states, i))
        loss = search.records[search.measure_at(space.encode(config), s.steps)].loss
        if not math.isfinite(loss) and s.method != "none":
            raise CoaloraError(f"training diverged: the trained adapter's validation loss is {loss} with --lr {s.lr}; "
                               f"train again with a lower --lr (e.g. {s.lr / 10:g})")
    with torch.no_grad(), wrapper.unquantized():
        reference = lm_score(wrapper, valid, s.batch_size)
    # the bundle's configurations: the final training set first, then every other one measured
    trained = [space.encode(c) for c in final]
    others = list(dict.fromkeys(r.levels for r in search.records if r.levels not in set(trained)))
    evaluated = trained + others
    evaluated_configs = list(final) + [space.decode(levels) for levels in others]
    wall_seconds = time.perf_counter() - started
    return Trained(
        model_dir=model_dir,
        base_model={"source": job.model, "model_type": model.config.model_type, "architecture": type(model).__name__},
        scheme=job.scheme, choices=choices, matrices=wrapper.matrices,
        adapter={"method": s.method, "adapter_method": TRAINING_METHODS[s.method], "rank": s.rank, "alpha": s.alpha,
                 "config_model": s.config_model, "imatrix": bool(imatrix.values) and job.use_imatrix and job.scheme == "gguf",
                 "merge_aware": s.merge_aware},
        adapter_state=states, training_set=final, evaluated=evaluated_configs,
        training={"settings": asdict(s), "search": asdict(job.search) | {"mode": mode}, "data": job.data,
                  "seq_len": job.seq_len, "train_blocks": len(blocks.train), "valid_blocks": len(blocks.valid),
                  "eval_blocks": len(valid), "configs": len(final), "evaluated": len(evaluated),
                  "seconds": train_seconds, "wall_seconds": wall_seconds, "search_seconds": search.seconds,
                  "search_share": search.seconds / wall_seconds,
                  "history": trainer.history, "device": str(acc.device), "processes": acc.num_processes},
        sensitivity=sensitivity.to_dict(), pareto=search.document(evaluated, reference, mode), imatrix=imatrix,
    )
