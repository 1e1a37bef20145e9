"""Language-modelling quality on token blocks: mean next-token loss and perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LMScore:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int  # predicted tokens counted

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def lm_score(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> LMScore:
    """Token-weighted mean loss of ``model`` over ``blocks`` ``(n, seq_len)``.

    Every block predicts its ``seq_len - 1`` next tokens; blocks are independent (no
    context carried across), as in training.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)  # (b, T)
        logits = model(input_ids=ids).logits.float()  # (b, T, vocab)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    mean = total / count
    return LMScore(loss=mean, perplexity=math.exp(mean), tokens=count)
