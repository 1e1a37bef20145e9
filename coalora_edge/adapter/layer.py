"""The adapted layer: an ``nn.Linear`` computing with a quantized weight plus a
configuration-aware LoRA (PEFT's pattern, a thin wrapper around the frozen base layer),

    y = x Q_c(W)^T + b + s * x A^T M^T B^T,        s = alpha / r

where ``Q_c(W)`` is set by the owning :class:`~coalora_edge.adapter.model.CoALoRAModel`
and ``M`` is the configuration model's ``(r, r)`` output (None stands for I). Merge-aware
(the owner sets ``quantizer``), the layer computes what a merged export stores instead,

    y = x Q_c(W + s B M A)^T + b

with a straight-through gradient through ``Q_c``, so A, B and M learn the weight that
survives the format's rounding."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coalora_edge.errors import CoaloraError


def collapse(lora_B: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """B' = B M ``(out, r)``: the plain-LoRA B of one configuration (None stands for I)."""
    return lora_B if M is None else lora_B @ M


def fold(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + s B' A`` fp32 ``(out, in)``: the merged weight, as merge-aware training and every
    merged export compute it. One expression (dtype and order of operations included), so that
    the format's quantizer gets the same floats in both and the stored bytes are the trained ones."""
    return weight.float() + scaling * (lora_B.float() @ lora_A.float())  # (out, in)


class CoALoRALinear(nn.Module):
    """An ``nn.Linear`` computing with the current configuration's quantized weight plus
    the configuration-aware LoRA. ``quantized``, ``M`` and ``merged_weight`` are set by
    :class:`CoALoRAModel` and are not state: they follow from the configuration."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, lora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.scaling = alpha / rank
        out_features, in_features = base_layer.weight.shape
        device = base_layer.weight.device
        if lora:
            # fp32 whatever the base dtype, as PEFT does: bf16 would drop small updates, and the
            # LoRA path runs in this dtype, so M (about 1e-2 from I at init) is applied in fp32.
            self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # (r, in)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # (out, r)
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        self.quantized: torch.Tensor | None = None  # (out, in) Q_c(W); the cache's tensor, never written
        self.M: torch.Tensor | None = None  # (r, r); None is the identity
        self.merged_weight: torch.Tensor | None = None  # (out, in) Q_c(W) + s B M A while merged
        self.adapter_enabled = True  # off inside CoALoRAModel.without_adapter()
        #: merge-aware: the current format's quantize -> dequantize, fp32 (out, in) -> (out, in)
        self.quantizer: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_config()
        bias = self.base_layer.bias
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight, bias)
        if self.lora_A is None or not self.adapter_enabled:
            return F.linear(x, self.quantized, bias)
        if self.quantizer is not None:
            return F.linear(x, self.merge_aware_weight(), bias)
        y = F.linear(x, self.quantized, bias)  # (..., out)
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        if self.M is not None:
            h = F.linear(h, self.M)  # (..., r): h M^T
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)  # (..., out)

    def collapsed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B M): the plain LoRA this layer is for the current configuration."""
        self._require_lora()
        return self.lora_A, collapse(self.lora_B, self.M)

    def delta_weight(self) -> torch.Tensor:
        """``s B M A`` ``(out, in)``: what merging adds to Q_c(W)."""
        A, B = self.collapsed()
        return self.scaling * (B @ A)

    def merge_aware_weight(self) -> torch.Tensor:
        """``Q_c(W + s B M A)`` ``(out, in)`` in the base dtype, differentiable straight through ``Q_c``."""
        A, B = self.collapsed()
        folded = fold(self.base_layer.weight, A, B, self.scaling)  # (out, in) fp32
        rounded = self.quantizer(folded.detach())
        # rounded + (folded - folded) is exactly ``rounded`` in floats (x - x is 0), where the usual
        # folded + (rounded - folded).detach() can be off by an ulp: the trained bytes must be the shipped ones
        return (rounded + (folded - folded.detach())).to(self.base_layer.weight.dtype)

    def merge(self) -> None:
        """Compute with ``Q_c(W) + s B M A`` (merge-aware: ``Q_c(W + s B M A)``) from now on;
        refuses a non-finite result.

        The cached Q_c(W) is never written (other configurations' switches read it), so
        unmerging is exact and no PEFT-style ``safe_merge`` copy is needed.
        """
        self._require_config()
        if self.merged_weight is not None:
            raise CoaloraError("this layer is already merged; call unmerge() first")
        with torch.no_grad():
            if self.quantizer is not None and self.lora_A is not None:
                merged = self.merge_aware_weight()  # (out, in): already what the forward computes
            else:
                merged = self.quantized + self.delta_weight().to(self.quantized.dtype)  # (out, in)
        if not torch.isfinite(merged).all():
            raise CoaloraError(
                "merging the adapter gives non-finite weights; the adapter has diverged: "
                "load an earlier checkpoint or train with a lower learning rate"
            )
        self.merged_weight = merged

    def unmerge(self) -> None:
        if self.merged_weight is None:
            raise CoaloraError("this layer is not merged; nothing to unmerge")
        self.merged_weight = None

    def _require_config(self) -> None:
        if self.quantized is None:
            raise CoaloraError("no quantization configuration is set; call CoALoRAModel.set_config(config) first")

    def _require_lora(self) -> None:
        if self.lora_A is None:
            raise CoaloraError("method 'none' has no LoRA factors to collapse or merge")

    def _apply(self, fn, recurse=True):
        # The configuration's tensors are plain attributes, not buffers, because DDP would
        # broadcast buffers (whole weights) every step; they still follow .to() and .half().
        super()._apply(fn, recurse)
        for name in ("quantized", "M", "merged_weight"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        return self
