"""The quantization cache holds one tensor per (matrix, stored format): choices that the
runtime stores alike (llama.cpp's fallback for rows that are not a multiple of 256) share it."""

from __future__ import annotations

import torch

from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import QuantCache


def test_choices_that_fall_back_to_one_type_share_one_tensor():
    scheme = get_scheme("gguf")
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))  # rows of 128: K-quants fall back
    assert scheme.storage("Q2_K", (64, 128)).name == scheme.storage("Q3_K", (64, 128)).name == "Q4_0"
    cache = QuantCache(scheme, {"w": weight}, workers=1)
    q2 = cache.get("w", "Q2_K")
    assert cache.get("w", "Q3_K") is q2 and cache.for_config({"w": "Q4_0"})["w"] is q2
    assert len(cache) == 1
    assert torch.equal(q2, scheme.format("Q4_0").roundtrip(weight))  # what llama.cpp computes for either choice


def test_formats_stored_differently_are_kept_apart():
    scheme = get_scheme("gguf")
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))  # rows of 256: no fallback
    cache = QuantCache(scheme, {"w": weight}, workers=1)
    assert not torch.equal(cache.get("w", "Q2_K"), cache.get("w", "Q3_K"))
    assert len(cache) == 2
