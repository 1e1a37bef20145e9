"""`coalora-edge demo --quick` end to end, as a user runs it: real pretraining, training with
the Pareto search, resolver, both exporters with their runtime verification, llama.cpp and
ONNX Runtime. One run (about 2 minutes) is shared by the checks of its report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coalora_edge.demo.base_model import model_folder
from coalora_edge.demo.pipeline import DEVICES, PLANS
from coalora_edge.errors import OutputExistsError
from coalora_edge.exporters.gguf import export as gguf_exporter
from coalora_edge.exporters.onnx import export as onnx_exporter
from coalora_edge.fileio import build_in_place

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only

THRESHOLDS = {"llama.cpp": (gguf_exporter.MAX_KL, gguf_exporter.MIN_TOP1),
              "onnxruntime": (onnx_exporter.MAX_KL, onnx_exporter.MIN_TOP1)}


def demo_cli(out: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COALORA_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "coalora_edge", "demo", "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=1800, env=env)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    proc = demo_cli(out, root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llamacpp-small" in proc.stdout  # the summary table
    return out, root / "cache" / "demo", json.loads((out / "report.json").read_text())


def test_every_device_gets_verified_files_that_fit(quick_demo):
    out, _, report = quick_demo
    assert [row["device"] for row in report["devices"]] == [d.name for d in DEVICES]
    for row in report["devices"]:
        folder = out / row["export"]
        export = json.loads((folder / "export.json").read_text())
        for name, size in row["files"].items():
            assert (folder / name).stat().st_size == size, name
        # the files hold exactly the bytes the resolver counted for the chosen configuration
        assert export["sizes"]["matches"] and row["sizes_match"]
        assert export["sizes"]["expected"]["adapted"] == row["weights_bytes"]
        assert row["fits"] and 0 <= row["headroom"] == row["memory_bytes"] - row["memory_total"]
        max_kl, min_top1 = THRESHOLDS[row["runtime"]]
        shipped = row["verification"]["runtime_vs_artifact"]
        assert shipped["kl"] <= max_kl and shipped["top1"] >= min_top1
        assert row["adapter_mode"] == export["adapter_mode"]
        # same blocks, same counting: the runtime's perplexity is the trained model's, up to
        # the runtime's 8-bit activations (and the fold, in merged mode)
        ppl = row["perplexity"]
        assert abs(math.log(ppl["runtime"] / ppl["pytorch"])) < 0.05, ppl
        assert row["sample"]["text"].strip()


def test_report_plots_and_profiles(quick_demo):
    out, _, report = quick_demo
    text = (out / "report.md").read_text()
    for row in report["devices"]:
        assert row["device"] in text
        assert (out / row["profile"]).read_text().startswith(f"name: {row['device']}")
    for summary in report["bundles"].values():
        assert (out / summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({summary['plot']})" in text
        assert summary["front"] and summary["evaluated"] >= len(summary["front"])
    assert {row["adapter_mode"] for row in report["devices"]} == {"merged", "sidecar"}


def test_pretrained_model_is_cached_and_output_never_overwritten(quick_demo):
    out, cache, report = quick_demo
    assert report["base_model"]["pretrained_by_demo"] and not report["base_model"]["cached"]
    assert Path(report["base_model"]["path"]) == model_folder(cache, PLANS["quick"].base, report["data"])
    before = (out / "report.json").read_bytes()
    proc = demo_cli(out, cache.parent)
    assert proc.returncode != 0 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (out / "report.json").read_bytes() == before


def test_failed_build_removes_partial_output_and_restores_the_old(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), build_in_place(target) as folder:
        (folder / "half").write_text("x")
        raise RuntimeError("killed halfway")
    assert not target.exists()
    target.mkdir()
    (target / "old").write_text("kept")
    with pytest.raises(OutputExistsError):
        with build_in_place(target):
            pass
    with pytest.raises(RuntimeError), build_in_place(target, force=True) as folder:
        (folder / "new").write_text("x")
        raise RuntimeError("killed halfway")
    assert [p.name for p in target.iterdir()] == ["old"]
    with build_in_place(target, force=True) as folder:
        (folder / "new").write_text("y")
    assert [p.name for p in target.iterdir()] == ["new"]


def test_killed_demo_leaves_nothing_behind(tmp_path):
    """SIGTERM (what `kill` and schedulers send) unwinds: no partial output, no partial cache."""
    import signal
    import time

    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "coalora_edge", "demo", "--quick", "--out", str(out)],
                            env=dict(os.environ, COALORA_CACHE=str(cache)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((cache / "demo").glob(".demo-base-*")) and time.monotonic() < deadline:  # pretraining began
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert not out.exists()
    assert not [p.name for p in (cache / "demo").iterdir() if p.name.startswith(".")]


def test_demo_on_your_own_model_and_text(tinystories_dir, tinystories_text, tmp_path):
    """--model/--data: no pretraining; devices are sized so that even a model whose rows make
    llama.cpp fall back to 4-bit types (TinyStories: 128) gets a configuration everywhere."""
    out = tmp_path / "out"
    proc = demo_cli(out, tmp_path / "cache", "--model", str(tinystories_dir), "--data", str(tinystories_text),
                    "--prompt", "Once upon a time")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert not report["base_model"]["pretrained_by_demo"] and report["data"] == [str(tinystories_text)]
    assert not (tmp_path / "cache").exists()
    assert all(row["fits"] and row["sizes_match"] for row in report["devices"])
    assert all(row["sample"]["prompt"] == "Once upon a time" for row in report["devices"])
