"""CoA-LoRA: one LoRA adapter that adjusts itself to the quantization configuration.

Every adapted ``nn.Linear`` becomes a :class:`CoALoRALinear`, a thin wrapper around its
frozen ``base_layer`` (PEFT's pattern) computing

    y = x Q_c(W)^T + b + s * x A^T M^T B^T,        s = alpha / r

with ``Q_c(W)`` the weight quantized and dequantized exactly as the runtime will, in the
format configuration ``c`` gives it, and ``M`` the ``(r, r)`` output of the shared
configuration model (config_model.py). :class:`CoALoRAModel` wraps a Hugging Face causal
LM in place and owns the per-(matrix, format) cache of quantized weights, so switching
configuration reads nothing from disk and quantizes each (matrix, format) once.

When M is computed: ``set_config(c)`` swaps in the cached weights, encodes c's features
once and computes every M in one batched call, without a graph. ``forward`` computes
them again, in one call, before delegating to the wrapped model: in training each forward
gets its own graph through the configuration model and uses the parameters of the latest
optimizer step, so a trainer only does ``set_config(c); loss = model(**batch).loss`` per
sampled configuration. Code that calls the wrapped ``.model`` directly (``generate``)
should call ``refresh()`` under ``torch.no_grad()`` after parameters change.

Build the wrapper after moving the model to its device: the cache quantizes the weights
where they are. With reentrant gradient checkpointing M gets no gradient (it is not an
input of the checkpointed blocks); use ``use_reentrant=False``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from coalora_edge.adapter.config_model import CONFIG_MODELS, build_config_model, matrix_features
from coalora_edge.adapter.layer import CoALoRALinear, collapse
from coalora_edge.adapter.methods import ADAPTERS
from coalora_edge.errors import CoaloraError, ModelError, SchemeError
from coalora_edge.model.matrices import Matrix, decoder_blocks, find_matrices
from coalora_edge.schemes.base import Scheme
from coalora_edge.schemes.quantize import Configuration, QuantCache


def check_rank(matrices: Iterable[Matrix], rank: int) -> None:
    """A rank above a matrix's shorter side adds no capacity, only memory (the r x r
    configuration matrices grow with its square): refuse it before anything is allocated."""
    shortest = min(min(m.shape) for m in matrices)
    if rank > shortest:
        raise CoaloraError(f"LoRA rank {rank} is above the shortest side of an adapted matrix ({shortest}), "
                           f"where it adds nothing; pass --rank {shortest} or less")


class CoALoRAModel(nn.Module):
    """A causal LM whose adaptable matrices are quantized per configuration and adapted.

    ``model`` is modified in place: its parameters are frozen and each adapted
    ``nn.Linear`` is replaced by a :class:`CoALoRALinear`. ``matrices`` limits adaptation
    to these names (default: every nn.Linear of the decoder blocks); ``imatrix`` is passed
    to the cache for GGUF types that quantize with an importance matrix. ``config_model``
    names the configuration model's design (config_model.py); the ``table`` design holds
    an M for every matrix in every format of ``choices`` (default: the scheme's).
    ``merge_aware``: every layer computes ``Q_c(W + s B M A)``, what a merged export of the
    configuration stores (layer.py), instead of ``Q_c(W) + s B M A``.
    """

    def __init__(
        self,
        model: nn.Module,
        scheme: Scheme,
        *,
        rank: int = 64,
        alpha: float = 16.0,
        method: str = "coa",
        matrices: Iterable[str] | None = None,
        imatrix: Mapping[str, torch.Tensor] | None = None,
        config_model: str = CONFIG_MODELS[0],
        choices: Iterable[str] | None = None,
        merge_aware: bool = False,
    ):
        super().__init__()
        if method not in ADAPTERS:
            raise CoaloraError(f"unknown method {method!r}; choose one of: {', '.join(ADAPTERS)}")
        if rank < 1:
            raise CoaloraError(f"LoRA rank must be a positive integer, got {rank}")
        if any(isinstance(m, CoALoRALinear) for m in model.modules()):
            raise ModelError("this model is already wrapped by a CoALoRAModel; wrap a freshly loaded model")
        spec = ADAPTERS[method]
        if merge_aware and not spec.lora:
            raise CoaloraError(f"merge-aware training folds the LoRA into the weights, and method {method!r} has "
                               "none; drop --merge-aware or train with --method coa or shared")
        self.merge_aware = merge_aware
        self.model, self.scheme, self.method = model, scheme, method
        self.rank, self.alpha = rank, alpha
        self.matrices: list[Matrix] = select_matrices(model, matrices)
        check_rank(self.matrices, rank)
        model.requires_grad_(False)
        # A plain dict, not a ModuleDict: the layers are registered once, inside ``model``.
        self.layers: dict[str, CoALoRALinear] = {
            m.name: _wrap(model, m.name, rank, alpha, spec.lora) for m in self.matrices
        }
        self.cache = QuantCache(scheme, {n: layer.base_layer.weight for n, layer in self.layers.items()}, imatrix)
        if spec.config_aware:
            device = next(iter(self.layers.values())).base_layer.weight.device
            self.config_model: nn.Module | None = build_config_model(
                config_model, scheme, self.matrices, list(choices or scheme.default_choices),
                len(decoder_blocks(model)[1]), rank).to(device)
        else:
            self.config_model = None
        self.config: dict[str, str] | None = None
        self._features: torch.Tensor | None = None  # (n_matrices, n_features) of self.config

    # -- configuration -------------------------------------------------------------------

    def set_config(self, config: Configuration) -> None:
        """Make ``config`` (matrix name -> format name) current: cached weights swapped in,
        every M recomputed in one call."""
        if self.is_merged:
            raise CoaloraError("the adapter is merged; call unmerge() before switching configuration")
        self._check_config(config)
        features = self._encode(config)
        weights = self.cache.for_config(config)
        for name, layer in self.layers.items():
            w = layer.base_layer.weight
            layer.quantized = weights[name].to(w.device, w.dtype)
            if self.merge_aware:
                layer.quantizer = self.cache.quantizer(name, config[name])
        self.config = {m.name: config[m.name] for m in self.matrices}
        self._features = features
        with torch.no_grad():
            self.refresh()

    def refresh(self) -> None:
        """Recompute every M of the current configuration, in one configuration-model call."""
        for layer, M in zip(self.layers.values(), self._multipliers(self._features)):
            layer.M = M

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        """Inside: the quantized model alone (the `none` baseline of this configuration)."""
        try:
            for layer in self.layers.values():
                layer.adapter_enabled = False
            yield
        finally:
            for layer in self.layers.values():
                layer.adapter_enabled = True

    @contextlib.contextmanager
    def unquantized(self) -> Iterator[None]:
        """Inside: the original model (full-precision weights, no adapter), e.g. the
        teacher of distillation. The current configuration is restored on exit."""
        saved = [layer.quantized for layer in self.layers.values()]
        try:
            for layer in self.layers.values():
                layer.quantized = layer.base_layer.weight.detach()
            with self.without_adapter():
                yield
        finally:
            for layer, quantized in zip(self.layers.values(), saved):
                layer.quantized = quantized

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, after recomputing M (see the module docstring)."""
        if self.config is None:
            raise CoaloraError("no quantization configuration is set; call set_config(config) first")
        self.refresh()
        return self.model(*args, **kwargs)

    def _check_config(self, config: Configuration) -> None:
        missing = [m.name for m in self.matrices if m.name not in config]
        if missing:
            raise SchemeError(
                f"the configuration gives no format for {len(missing)} adapted matrices "
                f"(first: {missing[0]}); give every adapted matrix a format"
            )
        # A matrix left out of adaptation is not quantized either: a format for it would
        # be silently ignored and the trained model would differ from the shipped one.
        extra = sorted(config.keys() - self.layers.keys())
        if extra:
            raise SchemeError(
                f"the configuration gives formats for {len(extra)} matrices this adapter does not "
                f"adapt (first: {extra[0]}); drop them or adapt them (the matrices argument)"
            )

    def _encode(self, config: Configuration) -> torch.Tensor | None:
        if self.config_model is None:
            return None
        return self.config_model.encode([matrix_features(self.scheme, m, config[m.name]) for m in self.matrices])

    def _multipliers(self, features: torch.Tensor | None) -> Iterable[torch.Tensor | None]:
        if features is None:
            return [None] * len(self.layers)
        return self.config_model(features).unbind(0)  # (n, r, r) -> n x (r, r)

    # -- what exporters ship -------------------------------------------------------------

    def collapsed_lora(self, config: Configuration | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Matrix name -> (A ``(r, in)``, B M ``(out, r)``): the plain LoRA of ``config``
        (default: the current one); its update is ``scaling * B' A``. Detached copies."""
        if self.method == "none":
            raise CoaloraError("method 'none' has no LoRA factors to collapse")
        config = self.config if config is None else config
        if config is None:
            raise CoaloraError("no quantization configuration given or set; pass one or call set_config first")
        self._check_config(config)
        with torch.no_grad():
            multipliers = self._multipliers(self._encode(config))
            return {
                name: (layer.lora_A.detach().clone(), collapse(layer.lora_B, M).detach().clone())
                for (name, layer), M in zip(self.layers.items(), multipliers)
            }

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def is_merged(self) -> bool:
        return any(layer.merged_weight is not None for layer in self.layers.values())

    def merge(self) -> None:
        """Fold the current configuration's adapter into its weights; all layers or none."""
        with torch.no_grad():
            self.refresh()
        merged: list[CoALoRALinear] = []
        try:
            for layer in self.layers.values():
                layer.merge()
                merged.append(layer)
        except CoaloraError:
            for layer in merged:
                layer.unmerge()
            raise

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    # -- training --------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float, config_model_lr: float | None = None) -> list[dict[str, Any]]:
        """AdamW parameter groups: decay on the LoRA factors and the configuration model's
        Linear weights only; sigma, embeddings, LayerNorm and biases get none. With
        ``config_model_lr`` the configuration model learns at its own rate."""
        decayed = {id(p) for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B) if p is not None}
        own_rate = set()
        if self.config_model is not None:
            decayed |= {id(p) for p in self.config_model.decayed_parameters()}
            if config_model_lr is not None:
                own_rate = {id(p) for p in self.config_model.parameters()}
        params = self.trainable_parameters()
        groups = [
            {"params": [p for p in params if (id(p) in own_rate) == own and (id(p) in decayed) == decay],
             "weight_decay": weight_decay if decay else 0.0, **({"lr": config_model_lr} if own else {})}
            for own in (False, True) for decay in (True, False)
        ]
        return [g for g in groups if g["params"]]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything trained, flat and safetensors-ready (CPU copies): ``{matrix}.lora_A``
        ``(r, in)``, ``{matrix}.lora_B`` ``(out, r)`` and ``config_model.*``."""
        return {k: t.detach().to("cpu", copy=True) for k, t in self._live_state().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state` gave, strictly: same keys, same shapes."""
        if self.is_merged:
            raise CoaloraError("the adapter is merged; call unmerge() before loading a state")
        live = self._live_state()
        problems = _mismatches(live, state)
        if problems:
            raise CoaloraError(
                f"adapter state does not fit this model ({problems}); load it into an adapter built "
                "with the same base model, scheme, adapted matrices, rank and method"
            )
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(state[key])
            if self.config is not None:
                self.refresh()

    def _live_state(self) -> dict[str, torch.Tensor]:
        live: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            if layer.lora_A is not None:
                live[f"{name}.lora_A"] = layer.lora_A
                live[f"{name}.lora_B"] = layer.lora_B
        if self.config_model is not None:
            live.update({f"config_model.{k}": t for k, t in self.config_model.state_dict().items()})
        return live


def _mismatches(live: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = sorted(live.keys() - state.keys())
    unexpected = sorted(state.keys() - live.keys())
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(live[k].shape)}"
        for k in live.keys() & state.keys()
        if state[k].shape != live[k].shape
    )
    parts = [(missing, "missing"), (unexpected, "unexpected"), (shapes, "wrong shape (given vs expected)")]
    return "; ".join(f"{label}: {some(keys)}" for keys, label in parts if keys)


def select_matrices(model: nn.Module, names: Iterable[str] | None) -> list[Matrix]:
    """The adaptable matrices named in ``names`` (default all), in block order."""
    found = find_matrices(model)
    if names is None:
        return found
    wanted = set(names)
    unknown = sorted(wanted - {m.name for m in found})
    if unknown or not wanted:
        raise ModelError(
            f"cannot adapt {unknown[:3] if unknown else 'an empty list'}: pass names of the model's "
            "adaptable matrices (listed by `coalora-edge inspect MODEL`), or none for all"
        )
    return [m for m in found if m.name in wanted]


def _wrap(model: nn.Module, name: str, rank: int, alpha: float, lora: bool) -> CoALoRALinear:
    parent_path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_path)
    layer = CoALoRALinear(getattr(parent, leaf), rank, alpha, lora)
    setattr(parent, leaf, layer)
    return layer
