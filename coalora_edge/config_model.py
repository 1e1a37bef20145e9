"""The configuration-aware model: (format, layer index, module type) -> an r x r matrix M.

One small network shared by every adapted matrix (PAPER.md, "The model"). Each
categorical feature has its own embedding table; the concatenated embeddings go through
LayerNorm -> Linear -> SiLU -> Linear to r*r numbers, and ``M = sigma * out + I``. The
last layer starts near zero and sigma at one, so M starts near the identity and the
adapter starts as a plain LoRA, with sigma free to scale the learnt correction.

Features are categorical *values* looked up in vocabularies built from the scheme's whole
format table, so a configuration never seen in training (any mix of the scheme's
formats) is encoded like any other. A format is described by its fields (bits, block,
...), not by its name, so formats that share a field share what was learnt about it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coalora_edge.errors import CoaloraError
from coalora_edge.models import Matrix
from coalora_edge.schemes.base import Format, Scheme

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


class ConfigModel(nn.Module):
    """Maps categorical features of each matrix to its ``(r, r)`` matrix M, many at once."""

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
