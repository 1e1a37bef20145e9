"""Training: methods, objectives, determinism and resume after SIGKILL, multi-process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from coalora_edge.errors import CoaloraError
from coalora_edge.training.trainer import TrainSettings, batch_indices, distill_loss, sample_configs

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only

FAST = ["--seq-len", "32", "--batch-size", "4", "--rank", "4", "--lr", "1e-2", "--budgets", "3,4"]


def train_cli(model, text, out, *extra, env=None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "coalora_edge", "train", str(model), "--data", str(text), "--out", str(out),
            "--scheme", "onnx", "--json", *FAST, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def test_batches_cover_each_epoch_once_and_are_pure_functions_of_step():
    first_epoch = torch.cat([batch_indices(10, 5, s, seed=3) for s in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 5, 7, seed=3), batch_indices(10, 5, 7, seed=3))
    assert not torch.equal(batch_indices(10, 5, 0, seed=3), batch_indices(10, 5, 0, seed=4))
    picks = sample_configs(5, 2, step=4, seed=0)
    assert len(set(picks)) == 2 and picks == sample_configs(5, 2, step=4, seed=0)


def test_distill_loss_is_kl_to_the_teacher():
    logits = torch.randn(2, 5, 11)
    assert distill_loss(logits, logits).abs() < 1e-6
    other = torch.randn(2, 5, 11)
    p, q = other.log_softmax(-1), logits.log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert torch.allclose(distill_loss(logits, other), expected, atol=1e-6)


def test_bad_settings_name_the_fix():
    with pytest.raises(CoaloraError, match="method must be one of"):
        TrainSettings(method="qlora")
    with pytest.raises(CoaloraError, match="K .* at least 1"):
        TrainSettings(k_configs=0)


@pytest.mark.parametrize("method", ["coa", "shared", "per-config", "none"])
def test_methods_write_bundles(own_model, own_text, tmp_path, method):
    out = tmp_path / "b"
    proc = train_cli(own_model, own_text, out, "--method", method, "--steps", "3")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    state = load_file(out / "adapter.safetensors")
    manifest = json.loads((out / "manifest.json").read_text())
    n_configs = summary["configs"]
    assert n_configs == 2 and len(summary["evaluations"]["evaluations"]) == 2
    if method == "none":
        assert state == {}
    elif method == "per-config":
        assert {k.split(".")[0] for k in state} == {"cfg0", "cfg1"}
        assert not any("config_model" in k for k in state)
    else:
        assert any(k.startswith("config_model.") for k in state) == (method == "coa")
    assert manifest["adapter"]["method"] == method
    assert not (tmp_path / "b.checkpoint").exists()


def test_training_reduces_the_loss_of_the_quantized_model(tinystories_dir, tinystories_text, tmp_path):
    # A quality figure: on the real pretrained model.
    none = train_cli(tinystories_dir, tinystories_text, tmp_path / "none", "--method", "none")
    coa = train_cli(tinystories_dir, tinystories_text, tmp_path / "coa", "--steps", "25", "--objective", "distill")
    assert none.returncode == coa.returncode == 0, coa.stderr
    before = {e["config"]: e["loss"] for e in json.loads(none.stdout)["evaluations"]["evaluations"]}
    after = {e["config"]: e["loss"] for e in json.loads(coa.stdout)["evaluations"]["evaluations"]}
    assert all(after[c] < before[c] for c in before), (before, after)


def test_divergence_stops_in_one_line_and_keeps_the_last_good_checkpoint(own_model, own_text, tmp_path):
    out = tmp_path / "b"
    run = train_cli(own_model, own_text, out, "--steps", "40", "--lr", "1e30", "--checkpoint-every", "1")
    assert run.returncode == 3, run.stderr
    assert "training diverged at step" in run.stderr and "lower --lr (e.g. 1e+29)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not out.exists()
    state = json.loads((tmp_path / "b.checkpoint" / "state.json").read_text())
    assert 1 <= state["step"] < 40 and all(math.isfinite(h["loss"]) for h in state["history"])

    # a resumed run may not end before the checkpoint it starts from
    fewer = train_cli(own_model, own_text, out, "--steps", "0", "--lr", "1e30", "--checkpoint-every", "1", "--resume")
    assert fewer.returncode == 3 and f"is at step {state['step']}, past --steps 0" in fewer.stderr, fewer.stderr
    assert not out.exists()


def test_sigkill_then_resume_equals_an_uninterrupted_run(own_model, own_text, tmp_path):
    opts = ["--steps", "8", "--checkpoint-every", "2"]
    straight = train_cli(own_model, own_text, tmp_path / "straight", *opts)
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "coalora_edge", "train", str(own_model), "--data", str(own_text),
            "--out", str(out), "--scheme", "onnx", "--json", *FAST, *opts]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out.with_name("killed.checkpoint") / "state.json"
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= 4) and time.time() < deadline:
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a bundle"

    resumed = train_cli(own_model, own_text, out, *opts, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "straight" / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "straight" / "manifest.json").read_text())["training"]["history"]
    hb = json.loads((out / "manifest.json").read_text())["training"]["history"]
    assert ha == hb


def test_existing_bundle_is_not_overwritten_without_force(own_model, own_text, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = train_cli(own_model, own_text, out, "--steps", "1")
    assert proc.returncode == 3 and "--force" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"


def test_two_process_ddp_matches_one_process(own_model, own_text, tmp_path):
    pytest.importorskip("accelerate")
    single = train_cli(own_model, own_text, tmp_path / "one", "--steps", "3", "--device", "cpu")
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --multi_gpu selects accelerate's torchrun launcher; --device cpu then makes it gloo on CPUs.
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "coalora_edge", "train", str(own_model),
            "--data", str(own_text), "--out", str(tmp_path / "two"), "--scheme", "onnx", "--json", *FAST,
            "--steps", "3", "--device", "cpu"]
    ddp = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
    a, b = load_file(tmp_path / "one" / "adapter.safetensors"), load_file(tmp_path / "two" / "adapter.safetensors")
    # Each process averages half the batch and DDP averages the halves: the same gradient up
    # to float summation order, which Adam's normalised steps carry into ~1e-5 differences.
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)
    losses = [[h["loss"] for h in json.loads((tmp_path / d / "manifest.json").read_text())["training"]["history"]] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_two_process_ddp_runs_the_pareto_search(own_model, own_text, tmp_path):
    """The search runs on the main process and broadcasts the new training set. Its first
    round measures the same adapter as one process does (to float summation order); later
    rounds may propose other configurations, since the acquisition's argmax is discrete."""
    pytest.importorskip("accelerate")
    search = ["--scheme", "onnx", "--seq-len", "32", "--batch-size", "4", "--rank", "4", "--lr", "1e-2",
              "--search", "pareto", "--search-rounds", "2", "--ladder-step", "1.0", "--eval-blocks", "4",
              "--candidates", "2", "--steps", "4", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for name, launcher in (("one", [sys.executable]), ("two", launch)):
        proc = subprocess.run([*launcher, "-m", "coalora_edge", "train", str(own_model), "--data", str(own_text),
                               "--out", str(tmp_path / name), *search], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "pareto.json").read_text()) for name in ("one", "two"))
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["training"]["processes"] == 2
    assert [r["step"] for r in one["search"]["rounds"]] == [r["step"] for r in two["search"]["rounds"]] == [2, 4]
    def first_round(name: str, doc: dict) -> dict[str, float]:
        evaluated = json.loads((tmp_path / name / "configs.json").read_text())["evaluated"]
        return {json.dumps(evaluated[e["config"]]): e["loss"] for e in doc["evaluations"] if e["step"] == 2}

    a, b = first_round("one", one), first_round("two", two)
    common = a.keys() & b.keys()  # the ladder, measured by both before anything was proposed
    assert len(common) >= 9 and all(abs(a[k] - b[k]) < 1e-4 for k in common)
