"""The PEFT export against the real peft: PeftModel.from_pretrained(base, folder) computes
the trained model at the exported configuration, for bundles of either scheme, and the
README's snippet runs on it as written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import readme_snippet, run_snippet
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.cli.commands import app
from coalora_edge.errors import ExportError
from coalora_edge.exporters.common.report import REPORT_FILE
from coalora_edge.exporters.peft import export as peft_export
from coalora_edge.fileio import sha256_file
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains bundles and runs the CLI and a subprocess: `make test` only

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TEXT = "The little dog ran to the garden, and the sun was warm on the grass."
#: what the test accepts as float rounding (relative to the largest logit)
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def bundles(one_torch_thread, tiny_model_dir, own_model, own_text, tmp_path_factory):
    """A gguf bundle of a tiny Llama and an onnx bundle of a tiny Qwen2 (biases on q/k/v),
    own_model's tokenizer, trained for a few steps so that B M is far from zero."""
    root = tmp_path_factory.mktemp("peft-bundles")
    found = {}
    for arch, scheme, choices in (("llama", "gguf", ["Q3_K", "Q4_K", "Q8_0"]),
                                  ("qwen2", "onnx", ["int2_b32_asym", "int4_b32_asym", "int8_b32_asym"])):
        model = shutil.copytree(tiny_model_dir(arch, hidden=256, intermediate=768, vocab=512), root / arch)
        for name in TOKENIZER_FILES:
            shutil.copy(own_model / name, model / name)
        found[scheme] = train_bundle(TrainJob(
            model=str(model), data=[str(own_text)], out=root / f"b-{arch}", scheme=scheme, seq_len=32,
            budgets=[4.5], choices=choices, calib_blocks=4, eval_blocks=4, show_progress=False,
            settings=TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2))).path
    return found


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _relative(reference: torch.Tensor, got: torch.Tensor) -> float:
    return float((reference - got).abs().max() / reference.abs().max())


@pytest.mark.parametrize("scheme", ["gguf", "onnx"])
def test_peft_computes_the_trained_configuration(bundles, tmp_path, scheme):
    restored = restore(load_bundle(bundles[scheme]))
    choices = restored.bundle.choices
    config = {m.name: choices[i % len(choices)] for i, m in enumerate(restored.wrapper.matrices)}  # a mix
    out = tmp_path / "peft-export"
    report = peft_export.export(restored, config, out)

    base = AutoModelForCausalLM.from_pretrained(out / "base")
    model = PeftModel.from_pretrained(base, out).eval()
    ids = AutoTokenizer.from_pretrained(out / "base")(TEXT, return_tensors="pt").input_ids
    restored.use(config)
    trained = _logits(restored.wrapper, ids)
    with restored.wrapper.without_adapter():
        quantized = _logits(restored.wrapper, ids)
    peft_logits = _logits(model, ids)
    error = _relative(trained, peft_logits)
    print(f"{scheme}: PEFT vs trained, max |diff| / max |logit| = {error:.3g}; "
          f"the adapter's own effect {_relative(trained, quantized):.3g}")
    assert error <= ROUNDING
    assert _relative(trained, quantized) > 100 * ROUNDING  # the adapter matters: the check is not vacuous
    with model.disable_adapter():  # the base alone is Q_c(W), bit for bit
        assert torch.equal(_logits(model, ids), quantized)
    for name, layer in restored.wrapper.layers.items():
        assert torch.equal(base.get_submodule(name).base_layer.weight, layer.quantized)
    merged = model.merge_and_unload()  # PEFT's own merge of B'A into the dense base
    assert _relative(trained, _logits(merged, ids)) <= ROUNDING

    adapter = json.loads((out / peft_export.CONFIG_FILE).read_text())
    assert adapter["r"] == restored.wrapper.rank and adapter["lora_alpha"] == restored.wrapper.alpha
    assert sorted(adapter["target_modules"]) == sorted(restored.wrapper.layers)
    assert report["verification"]["peft_vs_trained"]["relative"] <= peft_export.EXACT_TOLERANCE
    assert report == json.loads((out / REPORT_FILE).read_text())
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {REPORT_FILE}
    assert files == set(report["files"]) and "base/model.safetensors" in files
    assert all(sha256_file(out / n) == f["sha256"] for n, f in report["files"].items())


def test_readme_snippet_and_command_line(bundles, tmp_path):
    done = CliRunner().invoke(app, ["export", str(bundles["gguf"]), "--format", "peft", "--bpw", "8.5",
                                    "--out", str(tmp_path / "peft-export"), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["format"] == "peft"
    text = run_snippet(readme_snippet("PEFT (PyTorch)"), tmp_path)
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time") + 8, text


@pytest.mark.parametrize("args, message", [
    (["--adapter-mode", "merged"], "a PEFT export keeps the LoRA beside the base"),
    (["--rounding", "feedback"], "a PEFT export re-quantizes nothing"),
])
def test_bad_options_are_one_line(bundles, tmp_path, args, message):
    done = CliRunner().invoke(app, ["export", str(bundles["gguf"]), "--format", "peft", "--bpw", "8.5",
                                    "--out", str(tmp_path / "o"), *args])
    assert done.exit_code == 3 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.output
    assert not (tmp_path / "o").exists()


def test_a_failed_verification_leaves_nothing(bundles, tmp_path, monkeypatch):
    monkeypatch.setattr(peft_export, "EXACT_TOLERANCE", 0.0)  # float rounding itself now fails the check
    restored = restore(load_bundle(bundles["gguf"]))
    with pytest.raises(ExportError, match="does not compute what was trained"):
        peft_export.export(restored, restored.bundle.configs()[0], tmp_path / "peft-export")
    assert list(tmp_path.iterdir()) == []
