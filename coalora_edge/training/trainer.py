"""Training: CoA-LoRA and the baselines it is compared with, on one budget of steps.

Each optimizer step takes one batch and K configurations sampled from the training
set; every configuration gets a forward/backward on the batch, gradients are averaged
(each loss is divided by K), clipped to ``max_grad_norm`` and AdamW steps. Methods:

    coa          shared A, B + configuration model (the paper)
    shared       one ordinary LoRA for every configuration (M = I)
    per-config   one ordinary LoRA per configuration, ``steps`` steps each (QLoRA / LQ-LoRA)
    none         quantization only: nothing is trained

Objectives: ``lm`` is next-token cross-entropy on the data; ``distill`` is the KL
divergence from the unquantized model's own next-token distribution to the quantized,
adapted one, so it needs no labels and recovers exactly what quantization lost.

Everything a step uses is a pure function of (seed, step): the batch (an epoch-wise
permutation) and the sampled configurations. So resuming from a checkpoint continues
the very same sequence, and a resumed run ends equal to an uninterrupted one.
Multi-process training goes through Hugging Face Accelerate (DDP): every process
samples the same configurations and takes its slice of the batch.

A ``refiner`` (the Pareto search, :mod:`coalora_edge.search.rounds`) may replace the
training set after any step. It runs on the main process only and the new set is
broadcast, so every process trains on the same one; its state goes into checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from coalora_edge.adapter.config_model import CONFIG_MODELS
from coalora_edge.adapter.methods import TRAINING_METHODS
from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.errors import CoaloraError
from coalora_edge.progress import LoggedProgress
from coalora_edge.schemes.quantize import Configuration
from coalora_edge.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from coalora_edge.training.data import TokenBlocks

OBJECTIVES = ("lm", "distill")
#: seed offsets so that the data order and configuration sampling draw independent streams
_DATA_STREAM, _CONFIG_STREAM = 1, 2


@dataclass
class TrainSettings:
    """What a run does; saved in checkpoints and bundles."""

    method: str = "coa"
    objective: str = "lm"
    rank: int = 16
    alpha: float = 32.0
    lr: float = 2e-4
    config_model: str = CONFIG_MODELS[0]  # coa: the configuration model's design (config_model.py)
    config_model_lr: float | None = None  # the configuration model's own rate (default: lr)
    weight_decay: float = 0.0
    steps: int = 200  # optimizer steps (per configuration for per-config)
    batch_size: int = 8
    k_configs: int = 2  # configurations per step, gradients averaged
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # steps; 0 = only at the end of each run
    gradient_checkpointing: bool = False
    merge_aware: bool = False  # train Q_c(W + s B M A), what a merged export stores (adapter/layer.py)

    def __post_init__(self) -> None:
        checks = [
            (self.method in TRAINING_METHODS, f"method must be one of {', '.join(TRAINING_METHODS)}, got {self.method!r}"),
            (self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"),
            (self.config_model in CONFIG_MODELS,
             f"configuration model must be one of {', '.join(CONFIG_MODELS)}, got {self.config_model!r}"),
            (self.rank >= 1, f"rank must be at least 1, got {self.rank}"),
            (self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr}"),
            (self.config_model_lr is None or (math.isfinite(self.config_model_lr) and self.config_model_lr > 0),
             f"configuration-model learning rate must be a positive number, got {self.config_model_lr}"),
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.k_configs >= 1, f"K (configurations per step) must be at least 1, got {self.k_configs}"),
            (self.checkpoint_every >= 0, f"checkpoint interval must be >= 0, got {self.checkpoint_every}"),
            (not (self.merge_aware and self.method == "none"),
             "--merge-aware folds the LoRA into the weights, and --method none trains none; "
             "drop --merge-aware or choose --method coa, shared or per-config"),
        ]
        for ok, message in checks:
            if not ok:
                raise CoaloraError(message)


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((seed, stream, index)) & 0x7FFF_FFFF_FFFF_FFFF)


def batch_indices(n_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Block indices of ``step``'s batch: consecutive slices of per-epoch permutations."""
    flat = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, positions = flat // n_blocks, flat % n_blocks
    perms = {int(e): torch.randperm(n_blocks, generator=_generator(seed, _DATA_STREAM, int(e))) for e in epochs.unique()}
    return torch.stack([perms[int(e)][p] for e, p in zip(epochs, positions)])


def sample_configs(n_configs: int, k: int, step: int, seed: int) -> list[int]:
    """Indices of the ``k`` configurations of ``step`` (without replacement while possible)."""
    g = _generator(seed, _CONFIG_STREAM, step)
    if k <= n_configs:
        return torch.randperm(n_configs, generator=g)[:k].tolist()
    return torch.randint(n_configs, (k,), generator=g).tolist()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on next-token distributions."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)  # (tokens, vocab)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


@dataclass
class Leg:
    """One adapter trained on a set of configurations; its state keys get ``prefix``."""

    configs: list[Configuration]
    prefix: str = ""


def plan_legs(method: str, configs: Sequence[Configuration]) -> list[Leg]:
    if method == "per-config":
        return [Leg([c], config_prefix(i)) for i, c in enumerate(configs)]
    return [Leg(list(configs))]


def config_prefix(index: int) -> str:
    """Where a per-config adapter state keeps the adapter of training configuration ``index``."""
    return f"cfg{index}."


def per_config_state(states: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The adapter of training configuration ``index`` from a per-config state."""
    prefix = config_prefix(index)
    return {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}


class Refiner(Protocol):
    """Changes the training set during a run; its state must be JSON."""

    def due(self, step: int) -> bool:
        """Whether :meth:`refine` acts after ``step`` (every process must agree)."""

    def refine(self, step: int, configs: Sequence[Configuration]) -> list[Configuration] | None:
        """The new training set after ``step``, or None to keep the current one."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Trains ``wrapper`` on ``blocks.train`` over the runs of ``settings.method``.

    ``accelerator`` is a Hugging Face ``Accelerator``; its ``prepare`` wraps the model
    for DDP when launched with ``accelerate launch``.
    """

    def __init__(self, wrapper: CoALoRAModel, blocks: TokenBlocks, settings: TrainSettings,
                 accelerator, checkpoint_dir: Path | None = None, refiner: Refiner | None = None):
        self.wrapper, self.blocks, self.settings = wrapper, blocks, settings
        self.acc = accelerator
        self.checkpoint_dir = checkpoint_dir
        self.refiner = refiner
        if refiner is not None and settings.method == "per-config":
            raise CoaloraError("a refined training set needs one shared adapter; per-config trains one per configuration")
        world = accelerator.num_processes
        if settings.batch_size % world:
            raise CoaloraError(f"batch size {settings.batch_size} must be a multiple of the {world} processes")
        if settings.gradient_checkpointing:
            # Non-reentrant: M is computed outside the checkpointed blocks and needs gradients.
            wrapper.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            wrapper.model.train()  # transformers only checkpoints in training mode
        # The freshly initialised adapter: every run (per-config) starts from it.
        self.initial_state = wrapper.trainable_state()
        self.states: dict[str, torch.Tensor] = {}  # finished runs' states, prefixed
        self.history: list[dict[str, float]] = []  # per logged step: step, loss, tokens/s
        self.training_set: list[Configuration] = []  # after train(): the set as the refiner left it

    # -- one step ---------------------------------------------------------------------

    def _loss(self, model, ids: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            return model(input_ids=ids, labels=ids).loss
        return distill_loss(model(input_ids=ids).logits[:, :-1], teacher)

    def step(self, model, optimizer, leg: Leg, step: int) -> float:
        s = self.settings
        idx = batch_indices(len(self.blocks.train), s.batch_size, step, s.seed)
        idx = idx[self.acc.process_index :: self.acc.num_processes]  # this process's slice
        ids = self.blocks.train[idx].to(self.acc.device)  # (b, T)
        teacher = None
        if s.objective == "distill":
            with torch.no_grad(), self.wrapper.unquantized():
                teacher = self.wrapper.model(input_ids=ids).logits[:, :-1]
        picks = sample_configs(len(leg.configs), s.k_configs, step, s.seed)
        total = 0.0
        for j, c in enumerate(picks):
            self.wrapper.set_config(leg.configs[c])
            # Gradients of all K configurations are averaged; DDP syncs on the last only.
            sync = contextlib.nullcontext() if j == len(picks) - 1 else self.acc.no_sync(model)
            with sync:
                loss = self._loss(model, ids, teacher) / len(picks)
                self.acc.backward(loss)
            total += loss.item()
        self.acc.clip_grad_norm_(self.wrapper.trainable_parameters(), s.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.acc.num_processes > 1:  # report the loss of the whole batch, not this slice's
            total = self.acc.reduce(torch.tensor(total, device=self.acc.device), reduction="mean").item()
        return total

    # -- runs, checkpoints ------------------------------------------------------------

    def _optimizer(self):
        s = self.settings
        return torch.optim.AdamW(self.wrapper.param_groups(s.weight_decay, s.config_model_lr), lr=s.lr)

    def _save(self, legs: list[Leg], leg_index: int, step: int, optimizer=None) -> None:
        """Checkpoint: finished runs' states, plus (mid-run) the current state and optimizer."""
        if self.checkpoint_dir is None or not self.acc.is_main_process:
            return
        adapter = dict(self.states)
        if step > 0:
            adapter |= {legs[leg_index].prefix + k: v for k, v in self.wrapper.trainable_state().items()}
        state = {"run": leg_index, "step": step, "settings": asdict(self.settings),
                 "configs": self._planned, "history": self.history}
        if self.refiner is not None:
            state |= {"training_set": [dict(c) for c in legs[leg_index].configs], "search": self.refiner.state_dict()}
        optimizer_state = optimizer.state_dict() if step > 0 else {"state": {}, "param_groups": []}
        save_checkpoint(self.checkpoint_dir, Checkpoint(adapter, optimizer_state, state))

    def train(self, configs: Sequence[Configuration], resume: bool = False,
              on_step: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
        """Train every run; returns the adapter state (prefixed per run for per-config)."""
        legs = plan_legs(self.settings.method, configs)
        self._planned = [dict(c) for c in _all_configs(legs)]  # what a resumed run must match
        start_leg, start_step, ckpt = 0, 0, None
        if resume:
            ckpt = load_checkpoint(self.checkpoint_dir)
            try:  # a state.json of other shapes is as damaged as one that is not JSON
                self._check_resumable(ckpt.state, legs)
                start_leg, start_step = ckpt.state["run"], ckpt.state["step"]
                self.history = ckpt.state["history"]
                if self.refiner is not None:
                    self.refiner.load_state_dict(ckpt.state["search"])
                    legs[start_leg].configs = ckpt.state["training_set"]
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise CoaloraError(f"checkpoint {self.checkpoint_dir} is damaged ({type(e).__name__}); delete it "
                                   "and train again without --resume") from None
        self.training_set = _all_configs(legs)
        if not self.wrapper.trainable_parameters():  # method "none"
            return {}
        for r in range(start_leg, len(legs)):
            leg = legs[r]
            optimizer = self._optimizer()
            self.wrapper.load_trainable_state(self.initial_state)
            first = start_step if r == start_leg else 0
            if ckpt is not None and r == start_leg:
                p = leg.prefix
                self.states = {k: v for k, v in ckpt.adapter.items() if p and not k.startswith(p)}
                if first > 0:  # mid-run: continue from the saved adapter and optimizer
                    self.wrapper.load_trainable_state({k[len(p):]: v for k, v in ckpt.adapter.items() if k.startswith(p)})
                    optimizer.load_state_dict(ckpt.optimizer)
            model, optimizer = self.acc.prepare(self.wrapper, optimizer)
            for step in range(first, self.settings.steps):
                loss = self.step(model, optimizer, leg, step)
                if not math.isfinite(loss):  # before anything is saved: the last checkpoint stays good
                    raise CoaloraError(self._diverged(step + 1, loss))
                self.history.append({"run": r, "step": step + 1, "loss": loss})
                if on_step:
                    on_step(step + 1, loss)
                self._refine(leg, step + 1)
                every = self.settings.checkpoint_every
                if every and (step + 1) % every == 0:
                    self._save(legs, r, step + 1, optimizer)
            self.states.update({leg.prefix + k: v for k, v in self.wrapper.trainable_state().items()})
            self.training_set = _all_configs(legs)
            if r + 1 < len(legs):
                self._save(legs, r + 1, 0)
        return dict(self.states)

    def _refine(self, leg: Leg, step: int) -> None:
        if self.refiner is None or not self.refiner.due(step):
            return
        new = self.refiner.refine(step, leg.configs) if self.acc.is_main_process else None
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            new = broadcast_object_list([new])[0]
        if new is not None:
            leg.configs = new

    def _diverged(self, step: int, loss: float) -> str:
        saved = f"; the last checkpoint ({self.checkpoint_dir}) is from before it" if self.checkpoint_dir and \
            self.checkpoint_dir.exists() else ""
        return (f"training diverged at step {step} (loss {loss}) with --lr {self.settings.lr}{saved}; "
                f"train again with a lower --lr (e.g. {self.settings.lr / 10:g})")

    def _check_resumable(self, state: dict[str, Any], legs: list[Leg]) -> None:
        if state["step"] > self.settings.steps:
            raise CoaloraError(f"checkpoint {self.checkpoint_dir} is at step {state['step']}, past --steps "
                               f"{self.settings.steps}; resume with --steps {state['step']} or more, or train afresh "
                               "without --resume")
        saved = TrainSettings(**state["settings"])
        if asdict(saved) | {"steps": 0, "checkpoint_every": 0} != asdict(self.settings) | {"steps": 0, "checkpoint_every": 0}:
            raise CoaloraError(
                f"checkpoint {self.checkpoint_dir} was made with other settings ({_diff(saved, self.settings)}); "
                "resume with the same options, or train afresh without --resume"
            )
        if ("search" in state) != (self.refiner is not None):
            made = "with" if "search" in state else "without"
            raise CoaloraError(f"checkpoint {self.checkpoint_dir} was made {made} the Pareto search; resume with the "
                               "same --search, or train afresh without --resume")
        if state["configs"] != [dict(c) for c in _all_configs(legs)]:
            raise CoaloraError(f"checkpoint {self.checkpoint_dir} used another configuration set; train afresh without --resume")


def _all_configs(legs: list[Leg]) -> list[Configuration]:
    return [c for leg in legs for c in leg.configs]


def _diff(a: TrainSettings, b: TrainSettings) -> str:
    da, db = asdict(a), asdict(b)
    return ", ".join(f"{k}: {da[k]} vs {db[k]}" for k in da if da[k] != db[k] and k not in ("steps", "checkpoint_every"))


def progress_bar(total: int, batch_tokens: int, enabled: bool = True,
                 label: str = "training") -> tuple[Progress, Callable[[int, float], None]]:
    """A Rich progress bar showing loss and tokens/s, and the callback that advances it."""
    progress = LoggedProgress(
        TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )
    task = progress.add_task("train", total=total, loss=float("nan"), tps=0.0)
    started = time.perf_counter()
    done = [0]

    def advance(step: int, loss: float) -> None:
        done[0] += 1
        elapsed = time.perf_counter() - started
        progress.update(task, advance=1, loss=loss, tps=done[0] * batch_tokens / max(elapsed, 1e-9))

    return progress, advance
