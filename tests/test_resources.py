"""Memory and disk checks: the estimates, what the machine reports, and jobs refused up
front (the amounts available are set through the environment, as a user can), and a disk
that fills after the check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coalora_edge.cli.commands import app
from coalora_edge.errors import CoaloraError
from coalora_edge.model.loading import load_model
from coalora_edge.resources import (
    DISK_ENV, MEMORY_ENV, Need, ResourceError, available_disk, available_memory, check, export_need, training_need,
    weight_count,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("model", ["own_model", "tinystories_dir"])  # untied and tied embeddings
def test_weight_count_reads_the_headers_only(request, model):
    folder = request.getfixturevalue(model)
    assert weight_count(folder) == sum(p.numel() for p in load_model(str(folder)).parameters())


def test_training_need_counts_the_cached_copies_and_the_batch():
    need = training_need(adapted=1000, shapes=[(10, 100)], rank=2, dtype_bytes=2, formats=6, batch_tokens=8,
                         hidden=10, intermediate=30, layers=2, vocab=50, gradient_checkpointing=False)
    assert need.memory == {
        "quantized copies of the adapted weights": 6 * 1000 * 2,
        "adapter and optimizer": 2 * 110 * 4 * 4,
        "logits": 8 * 50 * 4 * 3,
        "activations": 8 * 2 * (8 * 10 + 3 * 30) * 2,
    }
    assert need.disk == 2 * 110 * 4 * 4
    lean = training_need(adapted=1000, shapes=[(10, 100)], rank=2, dtype_bytes=2, formats=6, batch_tokens=8,
                         hidden=10, intermediate=30, layers=2, vocab=50, gradient_checkpointing=True)
    assert lean.memory["activations"] == 8 * 2 * 10 * 2


def test_onnx_export_needs_more_copies_than_gguf():
    gguf, onnx = (export_need(fmt, params=100, adapted=80, artifact_bytes=60) for fmt in ("gguf", "onnx"))
    assert gguf.memory_bytes == 80 * 4 + 60 + 100 * 4 + 60 and gguf.disk == 60
    assert onnx.memory_bytes == 80 * 4 + 2 * 100 * 4 + 2 * 60 and onnx.disk == 100 * 4 + 2 * 60


def test_the_machine_reports_memory_and_disk(tmp_path):
    assert available_memory() > 0
    assert available_disk(tmp_path / "not" / "yet") > 0


def test_check_says_what_is_needed_and_available(monkeypatch, tmp_path):
    monkeypatch.setenv(MEMORY_ENV, "1KiB")
    need = Need("the job", {"weights": 2048, "cache": 1024}, advice="buy more")
    with pytest.raises(ResourceError, match=r"the job needs at least 3 KiB of memory \(weights 2 KiB \+ cache 1 KiB\), "
                                            r"1 KiB available; buy more"):
        check(need)
    monkeypatch.setenv(MEMORY_ENV, "1GiB")
    monkeypatch.setenv(DISK_ENV, "1000")
    check(need)
    with pytest.raises(ResourceError, match=r"needs at least 4 KiB of disk for .*, 1000 B free"):
        check(Need("the job", disk=4096), tmp_path / "out")
    monkeypatch.setenv(DISK_ENV, "lots")
    with pytest.raises(CoaloraError, match=f"{DISK_ENV}='lots'"):
        check(Need("the job", disk=4096), tmp_path / "out")


#: model and text fixtures
FIXTURES = {"own": ("own_model", "own_text"), "tinystories": ("tinystories_dir", "tinystories_text")}


@pytest.mark.parametrize("command, env, message, model", [
    # TinyStories-656K: 2.5 MiB of fp32 weights; the session's own model of its shapes, with a
    # 512 vocabulary and untied embeddings: 524,928 weights, 2.00 MiB. Training and export
    # (of small_bundle, of the own model) need several MiB more.
    ("train", {MEMORY_ENV: "1MiB"}, "loading .* needs at least 2.50 MiB of memory", "tinystories"),
    ("train", {MEMORY_ENV: "1MiB"}, "loading .* needs at least 2.00 MiB of memory", "own"),
    ("train", {MEMORY_ENV: "3MiB"}, "training needs at least .* of memory .*quantized copies", "own"),
    ("train", {DISK_ENV: "1KiB"}, "training needs at least .* of disk", "own"),
    ("export", {MEMORY_ENV: "3MiB"}, "the gguf export needs at least .* of memory", "own"),
    ("export", {DISK_ENV: "1KiB"}, "the gguf export needs at least .* of disk", "own"),
])
def test_jobs_are_refused_up_front(request, command, env, message, model, tmp_path):
    model_dir, text = (request.getfixturevalue(name) for name in FIXTURES[model])
    out = tmp_path / "out"
    args = {"train": ["train", str(model_dir), "--data", str(text), "--out", str(out),
                      "--seq-len", "32", "--budgets", "4.5", "--steps", "1"],
            "export": ["export", str(request.getfixturevalue("small_bundle")), "--bpw", "9", "--out", str(out)]}[command]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 6 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []


def _fails_with(error: Exception | None) -> CliRunner:
    """A command that raises ``error`` (or writes to /dev/full), behind the CLI's error handling."""
    import typer

    from coalora_edge.cli.common import one_line_errors

    @one_line_errors
    def write() -> None:
        if error is not None:
            raise error
        with open("/dev/full", "wb", buffering=0) as f:  # the kernel's own ENOSPC
            f.write(b"\0" * 4096)

    app_ = typer.Typer()
    app_.command()(write)
    return CliRunner().invoke(app_, [])


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs the /dev/full device (Linux)")
def test_a_disk_that_fills_is_one_line_and_exit_code_6():
    """ENOSPC after the up-front space check, from the kernel and as safetensors reports it."""
    from safetensors import SafetensorError

    for error in (None, SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        result = _fails_with(error)
        assert result.exit_code == 6 and "the disk is full" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    other = _fails_with(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert other.exit_code == 1  # not every safetensors error is a full disk
