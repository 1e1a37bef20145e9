"""Bundle round trip, integrity checks, restoring the trained model and `eval`."""

import json
import shutil
import subprocess
import sys

import pytest

from coalora_edge.bundle.lookup import config_at_bpw
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import BundleError, load_bundle, train_bundle
from coalora_edge.model.evaluate import lm_score
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only


@pytest.fixture(scope="module")
def bundle_dir(own_model, own_text, tmp_path_factory):
    """A bundle of the session's own model: for the invariants (needs no ../shared)."""
    return _train(own_model, own_text, tmp_path_factory.mktemp("bundles") / "coa")


@pytest.fixture(scope="module")
def ts_bundle_dir(tinystories_dir, tinystories_text, tmp_path_factory):
    """A bundle of TinyStories-656K: for figures that need the real pretrained weights."""
    return _train(tinystories_dir, tinystories_text, tmp_path_factory.mktemp("bundles") / "ts")


def copy(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "b")


def _train(model, text, out, **settings):
    train_bundle(TrainJob(model=str(model), data=[str(text)], out=out, scheme="gguf", seq_len=32,
                 budgets=[4.5, 5.5, 8.5], eval_blocks=8, show_progress=False,
                 settings=TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2, **settings)))
    return out


def _assert_restored_reproduces_recorded_losses(bundle_dir, text) -> None:
    bundle = load_bundle(bundle_dir)
    restored = restore(bundle)
    blocks = load_blocks(restored.tokenizer, [str(text)], 32, 0.1)
    pareto = bundle.read_json("pareto.json")
    for record, config in zip(pareto["evaluations"], bundle.configs()):
        restored.use(config)
        assert lm_score(restored.wrapper, blocks.valid[:8], 4).loss == pytest.approx(record["loss"], abs=1e-6)


def test_restored_model_reproduces_the_recorded_validation_loss(bundle_dir, own_text):
    _assert_restored_reproduces_recorded_losses(bundle_dir, own_text)
    manifest = load_bundle(bundle_dir).manifest
    assert manifest.adapter.imatrix is True  # gguf quantized with the importance matrix
    assert manifest.adapter.config_model == "mlp"


def test_a_table_configuration_model_round_trips(own_model, own_text, tmp_path):
    """The table's rows are rebuilt from the bundle's matrices and choices: same order, same Ms."""
    out = _train(own_model, own_text, tmp_path / "table", config_model="table")
    assert load_bundle(out).manifest.adapter.config_model == "table"
    _assert_restored_reproduces_recorded_losses(out, own_text)


def test_bpw_picks_the_best_known_configuration_under_the_budget(bundle_dir):
    bundle = load_bundle(bundle_dir)
    evals = bundle.read_json("pareto.json")["evaluations"]
    config, record = config_at_bpw(bundle, 6.0)
    assert record["bits_per_weight"] <= 6.0
    assert record["loss"] == min(e["loss"] for e in evals if e["bits_per_weight"] <= 6.0)
    assert config == bundle.configs()[record["config"]]


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "adapter.safetensors").write_bytes(b"\0" * 64), "does not match its sha256"),
    (lambda b: (b / "configs.json").unlink(), "missing configs.json"),
    (lambda b: (b / "manifest.json").write_text("{truncated"), "corrupt"),
    (lambda b: (b / "manifest.json").unlink(), "not a coalora-edge bundle"),
    (lambda b: _edit_manifest(b, format_version=99), "format version 99"),
    (lambda b: _edit_manifest(b, files={"../../etc/passwd": "0" * 64, "adapter.safetensors": "x"}), "invalid file"),
])
def test_damaged_bundles_are_refused(bundle_dir, tmp_path, damage, message):
    b = copy(bundle_dir, tmp_path)
    damage(b)
    with pytest.raises(BundleError, match=message):
        load_bundle(b)


def _edit_manifest(bundle, **changes):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_bundle_refuses_another_base_model(bundle_dir, tiny_model_dir):
    with pytest.raises(BundleError, match="is not the base model"):
        restore(load_bundle(bundle_dir), model=str(tiny_model_dir("llama")))


def eval_cli(*args):
    return subprocess.run([sys.executable, "-m", "coalora_edge", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_eval_cli(ts_bundle_dir, tinystories_text, tmp_path):
    # The perplexities are a quality figure: on the real pretrained model.
    bundle_dir = ts_bundle_dir
    proc = eval_cli(bundle_dir, "--data", tinystories_text, "--bpw", "6", "--seq-len", "32", "--max-blocks", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bits_per_weight"] <= 6
    assert result["unquantized"]["perplexity"] < result["quantized_without_adapter"]["perplexity"]
    names = [m["name"] for m in json.loads((bundle_dir / "manifest.json").read_text())["matrices"]]
    config = tmp_path / "c.json"
    config.write_text(json.dumps(["Q8_0"] * len(names)))
    proc = eval_cli(bundle_dir, "--data", tinystories_text, "--config", config, "--seq-len", "32", "--max-blocks", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["config"].values()) == {"Q8_0"}


@pytest.mark.parametrize("args, message", [
    (["--data", "{text}"], "pass --profile P, --config FILE or --bpw X"),
    (["--data", "{text}", "--bpw", "9", "--config", "/c.json"], "at most one of --config FILE and --bpw X"),
    (["--data", "{text}", "--bpw", "1"], "no known configuration fits 1.0"),
    (["--data", "{text}", "--config", "/nonexistent.json"], "cannot read configuration file"),
    (["--data", "/nonexistent.txt", "--bpw", "9"], "not found"),
])
def test_eval_bad_input(bundle_dir, own_text, args, message):
    proc = eval_cli(bundle_dir, *[a.format(text=own_text) for a in args])
    assert proc.returncode == 3 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
