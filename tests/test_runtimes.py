"""One runtime registry: a runtime added in one place (a record in coalora_edge.runtimes)
is accepted by profiles and resolved for, with its own memory facts."""

from __future__ import annotations

import pytest

from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.errors import ProfileError
from coalora_edge.profiles import validate_profile
from coalora_edge.resolve.memory import kv_cells
from coalora_edge.resolve.resolver import resolve
from coalora_edge.runtimes import RUNTIMES, Runtime, export_formats, for_scheme, get_runtime, register
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

FAKE = Runtime(
    name="fake-npu", scheme="nf", kv_cache_dtypes=("bf16", "f32"), kv_cell_padding=64, kv_copies=3,
    compute_bytes="coalora_edge.resolve.memory:onnxruntime_compute_bytes", base_types=("F16", "F16", "F32"),
    min_decode_ratio=0.0, format_examples="nf4_b64_s8_fp32 or nf4_*",
)


@pytest.fixture
def fake_runtime():
    register(FAKE)
    yield FAKE
    del RUNTIMES[FAKE.name]


@pytest.fixture(scope="module")
def nf_bundle(own_model, own_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("nf-bundle") / "bundle"
    train_bundle(TrainJob(model=str(own_model), data=[str(own_text)], out=out, scheme="nf", seq_len=32,
                          budgets=[3.0, 4.5], calib_blocks=2, eval_blocks=2, show_progress=False,
                          settings=TrainSettings(steps=1, batch_size=2, rank=4, alpha=8)))
    return load_bundle(out)


def fake_profile(**fields):
    return validate_profile({"name": "fake-board", "runtime": "fake-npu", "memory_bytes": "64MiB",
                             "reserved_bytes": "1MiB", "context_length": 100, **fields}, "fake.yaml")


def test_every_shipped_runtime_has_a_scheme_an_exporter_and_hooks_that_import():
    for runtime in RUNTIMES.values():
        assert for_scheme(runtime.scheme) is runtime
        for hook in ("compute_bytes", "exporter", "stream", "perplexity"):
            assert callable(runtime.hook(hook)) or hasattr(runtime.hook(hook), "export")
    assert set(export_formats()) == {"gguf", "onnx"}


def test_a_registered_runtime_is_resolved_for(fake_runtime, nf_bundle):
    profile = fake_profile()
    assert profile.scheme == "nf" and profile.kv_cache_dtype == "bf16"  # its default
    resolution = resolve(nf_bundle, profile)
    assert resolution.memory.fits
    assert kv_cells("fake-npu", 100, 1) == 128  # its own padding: 100 tokens in 64-cell chunks
    # three copies of a bf16 cache: 2 (K, V) x layers x cells x kv_heads x head_dim x 2 bytes
    assert resolution.memory.kv_cache == 3 * 2 * 2 * 128 * 4 * 16 * 2
    assert set(resolution.config.values()) <= set(nf_bundle.choices)


def test_a_registered_runtime_without_an_exporter_says_so(fake_runtime):
    with pytest.raises(ProfileError, match="fake-npu has no exporter"):
        get_runtime("fake-npu").hook("exporter")
    assert "nf" not in export_formats()


def test_an_unregistered_runtime_is_refused_by_profiles():
    with pytest.raises(ProfileError, match=r"field `runtime`: must be 'llama.cpp' or 'onnxruntime', got 'fake-npu'"):
        fake_profile()
