"""The memory model: exact KV cache and side-car bytes, compute buffers against llama.cpp's
own numbers, and the fit/headroom arithmetic."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from coalora_edge.errors import ModelError, ProfileError
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices
from coalora_edge.profiles import load_profile, validate_profile
from coalora_edge.resolve.memory import (
    ModelDims, estimate_memory, kv_cache_bytes, kv_cells, llamacpp_compute_bytes, onnxruntime_compute_bytes, sidecar_bytes,
)
from coalora_edge.resolve.non_adapted import base_bytes
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.inspection import inspect_model

TINYSTORIES = ModelDims(layers=2, heads=8, kv_heads=4, head_dim=16, hidden=128, intermediate=384, vocab=2048)
#: the session's own model (conftest's own_model): TinyStories-656K's shapes, a 512 vocabulary
OWN = dataclasses.replace(TINYSTORIES, vocab=512)
#: the second model measured with llama.cpp below: 4 layers, head_dim 64, a 32000 vocabulary
MID = ModelDims(layers=4, heads=16, kv_heads=4, head_dim=64, hidden=1024, intermediate=2816, vocab=32000)


def profile(**fields):
    base = dict(name="test", runtime="llama.cpp", memory_bytes="1GiB", reserved_bytes="100MiB", context_length=256)
    return validate_profile({**base, **fields}, "test")


# -- model dimensions ------------------------------------------------------------------------


def test_dims_from_the_real_config(tinystories_dir):
    as_json = json.loads((tinystories_dir / "config.json").read_text())
    assert ModelDims.from_config(as_json) == TINYSTORIES  # no head_dim key: hidden / heads = 16
    assert ModelDims.from_config(AutoConfig.from_pretrained(tinystories_dir)) == TINYSTORIES


def test_dims_from_a_saved_config(own_model):
    as_json = json.loads((own_model / "config.json").read_text())
    assert ModelDims.from_config(as_json) == OWN
    as_json.pop("head_dim", None)
    assert ModelDims.from_config(as_json) == OWN  # without the key: hidden / heads = 16
    assert ModelDims.from_config(AutoConfig.from_pretrained(own_model)) == OWN


def test_dims_defaults_and_explicit_head_dim():
    config = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512, "intermediate_size": 1024, "vocab_size": 100}
    assert ModelDims.from_config(config).kv_heads == 8  # no GQA key: multi-head attention
    assert ModelDims.from_config({**config, "intermediate_size": None}).intermediate == 4 * 512  # GPT-2 style
    assert ModelDims.from_config({**config, "head_dim": 256, "num_key_value_heads": 1}).head_dim == 256  # Gemma-style


def test_dims_need_the_llama_style_keys():
    with pytest.raises(ModelError, match="no integer num_attention_heads, vocab_size"):
        ModelDims.from_config({"num_hidden_layers": 2, "hidden_size": 8})


# -- KV cache ------------------------------------------------------------------------------------


def test_kv_cache_by_hand():
    # 2 (K and V) x 2 layers x 4 kv heads x 16 head_dim x tokens x bytes
    assert kv_cache_bytes(TINYSTORIES, 256, "f16") == 2 * 2 * 4 * 16 * 256 * 2 == 131072
    assert kv_cache_bytes(TINYSTORIES, 300, "f32") == 2 * 2 * 4 * 16 * 300 * 4
    assert kv_cache_bytes(TINYSTORIES, 256, "bf16") == kv_cache_bytes(TINYSTORIES, 256, "f16")
    # q8_0: 32 elements in 34 bytes (a 2-byte scale per block)
    assert kv_cache_bytes(MID, 1024, "q8_0") == 2 * 4 * 1024 * (4 * 64 // 32) * 34


@pytest.mark.parametrize("dtype, logged_mib", [("f16", 8.00), ("q8_0", 2.12), ("q4_0", 1.12)])
def test_kv_cache_matches_llamacpp(dtype, logged_mib):
    # "llama_kv_cache: size = ..." for MID, as llama-cpp-python 0.3.36 logged it (n_ctx 1000 and
    # 2048, flash attention on for the quantized caches), rounded to 0.01 MiB by llama.cpp.
    cells = kv_cells("llama.cpp", 2048 if dtype == "f16" else 1000, 1)
    assert round(kv_cache_bytes(MID, cells, dtype) / 2**20, 2) == logged_mib


def test_llamacpp_pads_the_cache_and_onnxruntime_does_not():
    # llama.cpp logged n_ctx = 256 for 100 requested, 512 for 300.
    assert [kv_cells("llama.cpp", c, 1) for c in (100, 256, 300, 2048)] == [256, 256, 512, 2048]
    assert kv_cells("llama.cpp", 100, 3) == 512
    assert kv_cells("onnxruntime", 100, 3) == 300


def test_quantized_kv_needs_head_dim_in_whole_blocks():
    # llama.cpp: "K cache type q8_0 with block size 32 does not divide n_embd_head_k=16"
    with pytest.raises(ProfileError, match="do not divide this model's head_dim 16"):
        kv_cache_bytes(TINYSTORIES, 256, "q8_0")


# -- compute buffers -------------------------------------------------------------------------------

#: "CPU compute buffer size" in MiB that llama.cpp logged (llama-cpp-python 0.3.36, ggml CPU,
#: flash attention off, n_threads 1) for GGUF files of these dimensions at these n_ctx.
LLAMACPP_MEASURED = [
    (TINYSTORIES, 100, 1.17), (TINYSTORIES, 300, 6.16), (TINYSTORIES, 512, 10.51),
    (TINYSTORIES, 2048, 37.51), (TINYSTORIES, 4096, 73.51), (TINYSTORIES, 16384, 289.51),
    (MID, 100, 14.46), (MID, 300, 38.97), (MID, 512, 66.50),
    (MID, 2048, 79.01), (MID, 4096, 147.01), (MID, 8192, 283.01),
]


@pytest.mark.parametrize("dims, n_ctx, logged_mib", LLAMACPP_MEASURED)
def test_llamacpp_compute_estimate_bounds_the_measured_buffer(dims, n_ctx, logged_mib):
    # llama-cpp-python also holds an fp32 scores array of n_batch = min(n_ctx, 512) x vocab.
    measured = logged_mib * 2**20 + min(n_ctx, 512) * dims.vocab * 4
    estimate = llamacpp_compute_bytes(dims, n_ctx, 1)
    assert measured <= estimate <= 2 * measured


def test_onnxruntime_compute_grows_with_the_square_of_the_context():
    short, long = (onnxruntime_compute_bytes(TINYSTORIES, c, 1) for c in (256, 512))
    assert long > 2 * short  # attention scores are context x context


def test_onnxruntime_holds_two_caches_and_llamacpp_one():
    onnx = estimate_memory(profile(runtime="onnxruntime", kv_cache_dtype="f16"), TINYSTORIES, weights_bytes=0, non_adapted_bytes=0)
    llama = estimate_memory(profile(kv_cache_dtype="f16"), TINYSTORIES, weights_bytes=0, non_adapted_bytes=0)
    assert llama.kv_cache == kv_cache_bytes(TINYSTORIES, 256, "f16")
    assert onnx.kv_cache == 2 * llama.kv_cache  # past and present


# -- side-car LoRA ---------------------------------------------------------------------------------


def test_sidecar_bytes_by_hand(own_model):
    shapes = [m.shape for m in find_matrices(load_model(str(own_model)))]  # TinyStories-656K's
    # per layer: q 128x128, k 64x128, v 64x128, o 128x128, gate/up 384x128, down 128x384
    per_layer = (128 + 128) + 2 * (64 + 128) + (128 + 128) + 2 * (384 + 128) + (128 + 384)
    assert sidecar_bytes(shapes, rank=8) == 2 * per_layer * 8 * 4 == 155648
    assert sidecar_bytes(shapes, rank=8, dtype_bytes=2) == 155648 // 2


def test_sidecar_counts_only_when_the_runtime_applies_it():
    merged = estimate_memory(profile(), TINYSTORIES, weights_bytes=1000, non_adapted_bytes=10, lora_bytes=777)
    sidecar = estimate_memory(profile(adapter_mode="sidecar"), TINYSTORIES, weights_bytes=1000, non_adapted_bytes=10, lora_bytes=777)
    assert merged.sidecar == 0 and sidecar.sidecar == 777
    assert sidecar.total - merged.total == 777


# -- the breakdown ---------------------------------------------------------------------------------


def test_breakdown_sums_to_total():
    b = estimate_memory(profile(kv_cache_dtype="f32"), TINYSTORIES, weights_bytes=300_000, non_adapted_bytes=1_051_136)
    assert b.kv_cache == kv_cache_bytes(TINYSTORIES, 256, "f32")
    assert b.compute == llamacpp_compute_bytes(TINYSTORIES, 256, 1)
    assert b.total == b.weights + b.non_adapted + b.sidecar + b.kv_cache + b.compute + b.reserved
    assert b.available == 2**30 - 100 * 2**20 and b.headroom == b.memory - b.total
    as_dict = b.as_dict()
    assert as_dict["total"] == b.total and as_dict["fits"] is True and set(as_dict) >= {"weights", "headroom", "available"}


def test_fits_exactly_at_zero_headroom():
    p = profile(runtime="onnxruntime")
    rest = estimate_memory(p, TINYSTORIES, weights_bytes=0, non_adapted_bytes=0)
    exact = estimate_memory(p, TINYSTORIES, weights_bytes=rest.headroom, non_adapted_bytes=0)
    over = estimate_memory(p, TINYSTORIES, weights_bytes=rest.headroom + 1, non_adapted_bytes=0)
    assert (exact.headroom, exact.fits) == (0, True)
    assert (over.headroom, over.fits) == (-1, False)  # says by how much


@pytest.mark.parametrize("name, scheme", [("tiny-demo-llamacpp", "gguf"), ("tiny-demo-onnx", "onnx")])
def test_tiny_demo_profiles_make_the_resolver_choose(tinystories_dir, name, scheme):
    model = load_model(str(tinystories_dir))
    sch = get_scheme(scheme)
    report = inspect_model(model, sch, sch.default_choices)
    device = load_profile(name)
    # Embeddings and norms at the types the exporters write for this runtime.
    non_adapted = base_bytes(model, [r["name"] for r in report["matrices"]], device.runtime)
    dims = ModelDims.from_config(model.config)
    fit = [estimate_memory(device, dims, weights_bytes=report[key], non_adapted_bytes=non_adapted).fits
           for key in ("smallest_config_bytes", "largest_config_bytes")]
    assert fit == [True, False]
