"""The configuration-aware model: (format, layer index, module type) -> an r x r matrix M.

Two designs, one interface (``encode`` feature rows, ``forward`` to ``(n, r, r)`` in one
call, ``decayed_parameters``), listed in :data:`CONFIG_MODELS`:

``mlp`` (default)
    The paper's reference design (PAPER.md, "The model"): one embedding table per
    categorical feature, concatenated -> LayerNorm -> Linear -> SiLU -> Linear to r*r
    numbers, ``M = sigma * out + I`` with the last layer near zero and sigma at one.
    Features are looked up in vocabularies built from the scheme's whole format table, so
    it encodes any format of the scheme, and formats sharing a field share what was learnt.

``table``
    One free ``(r, r)`` correction per (layer, module, stored format): ``M = I + T[key]``,
    starting at exactly I. The keys are every adapted matrix in every format the adapter
    is trained for (the ``choices``), so any configuration over those formats, seen in
    training or not, has its M. A pair never met in training, or a format outside the
    choices, gets M = I: the shared LoRA part, the adapter's best guess without data.

Why both (BENCHMARKS.md, "Configuration model"): each matrix's A and B span their own
rank space, so an (r, r) output shared across matrices means something different for
each, and the network's shared output layer moves every matrix's M at once. But a table
row learns only when its (matrix, format) pair is sampled. On TinyStories the table beat
the network in most cells of the quality benchmark (rank 16, 450 steps) and lost at every
budget of short runs over many configurations (rank 8, 200 steps, 29 configurations), so
the paper's design stays the default until a larger model decides.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coalora_edge.errors import CoaloraError
from coalora_edge.model.matrices import Matrix
from coalora_edge.schemes.base import Format, Scheme

#: the designs, by the name `train --config-model` takes; the first is the default
CONFIG_MODELS = ("mlp", "table")
EMBED_DIM = 8
HIDDEN = 128
#: std of the last layer at init: M starts within about 1e-2 of the identity
OUT_INIT_STD = 1e-3

Features = Mapping[str, Any]  # feature name -> categorical value, for one matrix


def format_features(fmt: Format) -> dict[str, Any]:
    # Prefixed so that a field can never collide with "layer", "module" or a Module attribute.
    return {f"format_{k}": v for k, v in fmt.fields.items()}


def matrix_features(scheme: Scheme, matrix: Matrix, choice: str) -> dict[str, Any]:
    """What the configuration model sees of ``matrix`` stored in format ``choice``.

    The format is the one the runtime really stores (after fallback: GGUF Q4_K on a row of
    128 is Q5_0), because that is the weight the adapter corrects.
    """
    fmt = scheme.storage(choice, matrix.shape)
    return {**format_features(fmt), "layer": matrix.layer, "module": matrix.module}


def vocabularies(scheme: Scheme, n_layers: int, module_types: Iterable[str]) -> dict[str, tuple]:
    """Feature name -> its values in embedding-row order.

    Format fields come from every format of ``scheme``, not only the chosen ones, so any
    fallback format is covered; a field some format lacks gets the value None.
    """
    rows = [format_features(f) for f in scheme.formats.values()]
    names = sorted({name for row in rows for name in row})
    vocab = {name: _sorted({row.get(name) for row in rows}) for name in names}
    vocab["layer"] = tuple(range(n_layers))
    vocab["module"] = _sorted(set(module_types))
    return vocab


def _sorted(values: set) -> tuple:
    return tuple(sorted(values, key=lambda v: (type(v).__name__, v)))


class ConfigMLP(nn.Module):
    """The paper's design: categorical features of each matrix -> its ``(r, r)`` M, many at once."""

    def __init__(self, vocabularies: Mapping[str, Sequence[Any]], rank: int,
                 embed_dim: int = EMBED_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.rank = rank
        self.vocabularies = {name: tuple(values) for name, values in vocabularies.items()}
        self._rows = {name: {v: i for i, v in enumerate(values)} for name, values in self.vocabularies.items()}
        self.embeddings = nn.ModuleDict(
            {name: nn.Embedding(len(values), embed_dim) for name, values in self.vocabularies.items()}
        )
        width = embed_dim * len(self.vocabularies)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, rank * rank)
        nn.init.normal_(self.out.weight, std=OUT_INIT_STD)
        nn.init.zeros_(self.out.bias)
        self.sigma = nn.Parameter(torch.ones(()))

    def encode(self, rows: Sequence[Features]) -> torch.Tensor:
        """Feature dicts -> embedding rows ``(n, n_features)``, on the model's device."""
        index = [[self._row(name, row.get(name)) for name in self._rows] for row in rows]
        return torch.tensor(index, dtype=torch.long, device=self.sigma.device).view(len(rows), len(self._rows))

    def _row(self, name: str, value: Any) -> int:
        try:
            return self._rows[name][value]
        except KeyError:
            known = ", ".join(map(repr, self.vocabularies.get(name, ())))
            raise CoaloraError(
                f"the configuration model has no embedding for {name}={value!r} (known: {known}); "
                "it was built for another scheme or model: build the adapter with the one it was trained on"
            ) from None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Embedding rows ``(n, n_features)`` -> M ``(n, r, r)``, one call for all matrices."""
        emb = torch.cat(
            [table(features[:, i]) for i, table in enumerate(self.embeddings.values())], dim=-1
        )  # (n, n_features * embed_dim)
        out = self.out(F.silu(self.hidden(self.norm(emb))))  # (n, r*r)
        eye = torch.eye(self.rank, device=out.device, dtype=out.dtype)
        return self.sigma * out.view(-1, self.rank, self.rank) + eye  # (n, r, r)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The weights AdamW may decay: the Linear matrices only. Decaying sigma would pull
        M towards I, and decaying embeddings, LayerNorm or biases has no regularising sense."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Linear)]


class ConfigTable(nn.Module):
    """One learnt ``(r, r)`` correction per (layer, module, stored format), M = I + T[key].

    ``rows`` lists the feature rows the table holds: every adapted matrix in every format
    the adapter may meet. Only the table is state; the keys follow from the rows, which a
    loaded adapter rebuilds from its bundle (matrices and choices)."""

    def __init__(self, rows: Iterable[Features], rank: int):
        super().__init__()
        self.rank = rank
        self._index = {key: i for i, key in enumerate(dict.fromkeys(map(_key, rows)))}
        self.delta = nn.Parameter(torch.zeros(len(self._index), rank, rank))

    def encode(self, rows: Sequence[Features]) -> torch.Tensor:
        """Feature dicts -> table rows ``(n,)``, on the model's device; -1 for a (matrix,
        format) the table does not hold (a format outside the trained ones)."""
        index = [self._index.get(_key(row), -1) for row in rows]
        return torch.tensor(index, dtype=torch.long, device=self.delta.device)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Table rows ``(n,)`` -> M ``(n, r, r)``; row -1 gives M = I."""
        held = (index >= 0).to(self.delta.dtype)[:, None, None]  # (n, 1, 1)
        eye = torch.eye(self.rank, device=self.delta.device, dtype=self.delta.dtype)
        return self.delta[index.clamp(min=0)] * held + eye

    def decayed_parameters(self) -> list[nn.Parameter]:
        """None: decaying T would pull every M towards I, i.e. towards the shared LoRA."""
        return []


def _key(row: Features) -> tuple:
    return tuple(sorted(row.items()))


def build_config_model(kind: str, scheme: Scheme, matrices: Sequence[Matrix], choices: Sequence[str],
                       n_layers: int, rank: int) -> nn.Module:
    """The configuration model ``kind`` (one of :data:`CONFIG_MODELS`) for these matrices."""
    if kind == "table":
        return ConfigTable([matrix_features(scheme, m, c) for m in matrices for c in choices], rank)
    if kind == "mlp":
        return ConfigMLP(vocabularies(scheme, n_layers, (m.module for m in matrices)), rank)
    raise CoaloraError(f"unknown configuration model {kind!r}; choose one of: {', '.join(CONFIG_MODELS)}")
