"""How much each matrix suffers in each format: the costs the budget ladder trades off.

Both estimates are the diagonal second-order loss increase of replacing ``W`` by its
runtime-exact ``Q_c(W)``, summed over the matrix:

* activation-weighted error, ``sum_ij E[x_j^2] (W - Q_c(W))_ij^2``: the diagonal part of
  ``E ||(W - Q_c(W)) x||^2`` over calibration inputs ``x``, expected per calibration token;
* empirical Fisher, ``sum_ij F_ij (W - Q_c(W))_ij^2`` with ``F`` the squared gradients of
  the LM loss (what the CoA-LoRA / LQ-LoRA reference uses; one backward pass per batch).

The statistics ``E[x_j^2]`` are llama.cpp's importance matrix. ``llama-imatrix`` sums
``x_j^2`` over every token that reaches a matrix and counts those tokens;
``llama-quantize`` hands ggml the ratio, the mean of ``x_j^2`` per input column, and ggml
uses the values only as relative weights of its weighted least-squares fit (scaling
them all by one constant changes no byte). :class:`Imatrix` keeps that mean, so its
``values`` go to ``QuantCache(imatrix=...)`` unchanged and compare with llama.cpp's files.

Results are plain data: :class:`Imatrix` values are a dict of tensors (safetensors),
:class:`Sensitivity` turns into JSON with :meth:`Sensitivity.to_dict`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from coalora_edge.errors import DataError, SchemeError
from coalora_edge.model.matrices import Matrix, find_matrices
from coalora_edge.schemes.base import Format, Scheme, Shape
from coalora_edge.schemes.quantize import QuantCache

#: Calibration data: token ids ``(batch, tokens)``, packed (no padding: every id counts).
Batches = Iterable[torch.Tensor]


@dataclass(frozen=True)
class Imatrix:
    """Activation statistics per adapted matrix, in llama.cpp's importance-matrix convention."""

    #: matrix -> fp32 ``[in]``: mean of ``x_j^2`` over the tokens that reached the matrix.
    #: Matrices no token reached (an unused MoE expert) are absent, as in llama.cpp's
    #: files, so ggml quantizes them without an importance matrix.
    values: dict[str, torch.Tensor]
    tokens: dict[str, int]  # matrix -> tokens that reached it
    total_tokens: int  # tokens fed to the model

    def expected_square(self, matrix: str, in_features: int) -> torch.Tensor:
        """``E[x_j^2]`` per calibration token, fp64 ``[in]``: zero where no token went."""
        mean = self.values.get(matrix)
        if mean is None:
            return torch.zeros(in_features, dtype=torch.float64)
        return mean.double() * (self.tokens[matrix] / self.total_tokens)


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """``cost[m, c]``: the damage of storing matrix ``m`` in choice ``c`` (lower is better)."""

    kind: str  # "activation" or "fisher"
    matrices: tuple[str, ...]
    choices: tuple[str, ...]
    cost: np.ndarray  # (M, C) float64; inf where the choice cannot store the matrix at all

    def to_dict(self) -> dict:
        """JSON-ready: ``cost`` as nested lists, ``None`` where it is inf."""
        return {
            "kind": self.kind,
            "matrices": list(self.matrices),
            "choices": list(self.choices),
            "cost": [[float(v) if np.isfinite(v) else None for v in row] for row in self.cost],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Sensitivity:
        cost = np.array([[np.inf if v is None else v for v in row] for row in d["cost"]], dtype=np.float64)
        return cls(d["kind"], tuple(d["matrices"]), tuple(d["choices"]), cost.reshape(len(d["matrices"]), -1))


def stored_format(scheme: Scheme, choice: str, shape: Shape) -> Format | None:
    """The format the runtime stores ``shape`` in when ``choice`` is chosen; None if none can."""
    scheme.format(choice)  # an unknown name is the caller's mistake: let it raise
    try:
        return scheme.storage(choice, shape)
    except SchemeError:
        return None


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Calibrate without dropout, and hand the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collect_imatrix(model: nn.Module, batches: Batches, matrices: Sequence[Matrix] | None = None) -> Imatrix:
    """Sum ``x^2`` over every token entering each adapted linear layer (forward hooks, no
    gradients) and return llama.cpp's importance matrix with token counts."""
    matrices = list(matrices or find_matrices(model))
    device = _device(model)
    sums = {m.name: torch.zeros(m.shape[1], dtype=torch.float64, device=device) for m in matrices}
    tokens = dict.fromkeys(sums, 0)

    def accumulator(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            sums[name] += x.double().square().sum(dim=0)  # (in,)
            tokens[name] += x.shape[0]

        return hook

    handles = [model.get_submodule(m.name).register_forward_pre_hook(accumulator(m.name)) for m in matrices]
    total = 0
    try:
        with torch.no_grad(), _eval_mode(model):
            for ids in batches:
                model(input_ids=ids.to(device))
                total += ids.numel()
    finally:
        for h in handles:
            h.remove()
    _check_calibrated(total)
    values = {n: (s / tokens[n]).float().cpu() for n, s in sums.items() if tokens[n] > 0}
    return Imatrix(values=values, tokens=tokens, total_tokens=total)


def collect_fisher(
    model: nn.Module, batches: Batches, matrices: Sequence[Matrix] | None = None
) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal per adapted weight: the mean over batches of the squared
    gradient of the batch's LM loss, fp32 ``[out, in]``.

    Gradients are per batch, not per sequence (batches of one sequence give the textbook
    per-example estimate at the cost of more backward passes). They are taken with
    ``torch.autograd.grad``, so the model's ``.grad`` fields and ``requires_grad`` flags
    are left as they were.
    """
    matrices = list(matrices or find_matrices(model))
    device = _device(model)
    weights = [model.get_submodule(m.name).weight for m in matrices]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags = [w.requires_grad for w in weights]
    n_batches = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with _eval_mode(model):
            for ids in batches:
                ids = ids.to(device)
                loss = model(input_ids=ids, labels=ids).loss
                for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                    s += g.float().square()  # (out, in)
                n_batches += 1
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    _check_calibrated(n_batches)
    return {m.name: (s / n_batches).cpu() for m, s in zip(matrices, sums)}


def _check_calibrated(count: int) -> None:
    if count == 0:
        raise DataError("the calibration batches were empty; pass at least one (batch, tokens) tensor of token ids")


def weighted_error(
    cache: QuantCache,
    importance: Mapping[str, torch.Tensor],
    kind: str,
    choices: Sequence[str] | None = None,
) -> Sensitivity:
    """``cost[m, c] = sum_ij importance_m (W_m - Q_c(W_m))_ij^2`` for every matrix of the
    cache, with ``importance_m`` broadcast to ``[out, in]`` (a ``[in]`` vector or a full
    ``[out, in]`` tensor). ``Q_c`` is the cache's runtime-exact roundtrip, so the cache
    keeps every dequantized weight for training to reuse."""
    choices = cache.scheme.choices(choices)
    missing = [m for m in cache.weights if m not in importance]
    if missing:
        raise SchemeError(
            f"no calibration statistics for {missing[:3]}; collect them on the model the weights came from"
        )
    cost = np.full((len(cache.weights), len(choices)), np.inf)
    for i, (name, weight) in enumerate(cache.weights.items()):
        imp = importance[name].to(weight.device, torch.float64)  # (in,) or (out, in)
        for j, choice in enumerate(choices):
            if stored_format(cache.scheme, choice, tuple(weight.shape)) is None:
                continue
            delta = weight.double() - cache.get(name, choice).double()  # (out, in)
            cost[i, j] = float((delta.square() * imp).sum())
    return Sensitivity(kind=kind, matrices=tuple(cache.weights), choices=choices, cost=cost)


def activation_sensitivity(cache: QuantCache, imatrix: Imatrix, choices: Sequence[str] | None = None) -> Sensitivity:
    """Activation-weighted error per calibration token (the importance-matrix estimate)."""
    importance = {
        name: imatrix.expected_square(name, weight.shape[1])
        for name, weight in cache.weights.items()
        if name in imatrix.tokens
    }
    return weighted_error(cache, importance, "activation", choices)


def fisher_sensitivity(
    cache: QuantCache, fisher: Mapping[str, torch.Tensor], choices: Sequence[str] | None = None
) -> Sensitivity:
    """Fisher-weighted error (the CoA-LoRA / LQ-LoRA estimate)."""
    return weighted_error(cache, fisher, "fisher", choices)
