"""Merge-aware training (`train --merge-aware`): the forward computes Q_c(W + s B M A), what a
merged export stores, so the merged ONNX and GGUF files are the trained model bit for bit;
gradients reach A, B and M straight through the rounding; combinations that would ship
other weights than the trained ones are one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from coalora_edge.adapter.layer import fold
from coalora_edge.adapter.model import CoALoRAModel
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.cli.commands import app
from coalora_edge.errors import CoaloraError
from coalora_edge.exporters.gguf import export as gguf_export
from coalora_edge.exporters.gguf.arch import Target
from coalora_edge.exporters.gguf.llamacpp import read_gguf
from coalora_edge.exporters.onnx import export as onnx_export
from coalora_edge.model.loading import load_model
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.onnx import dequantize
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

ONNX_CHOICES = ("int2_b32_asym", "int4_b32_asym", "int8_b32_asym")
GGUF_CHOICES = ("Q3_K", "Q4_K", "Q6_K", "Q8_0")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SETTINGS = TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2, merge_aware=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _bundle(model, text, out, scheme: str, choices, budget: float):
    return train_bundle(TrainJob(model=str(model), data=[str(text)], out=out, scheme=scheme, seq_len=32,
                                 budgets=[budget], choices=list(choices), calib_blocks=4, eval_blocks=4,
                                 show_progress=False, settings=SETTINGS))


def _mixed(restored, choices) -> dict[str, str]:
    return {m.name: choices[i % len(choices)] for i, m in enumerate(restored.wrapper.matrices)}


@pytest.fixture(scope="module")
def onnx_bundle(own_model, own_text, tmp_path_factory):
    return _bundle(own_model, own_text, tmp_path_factory.mktemp("merge-aware-onnx") / "bundle", "onnx",
                   ONNX_CHOICES, 3.5).path


@pytest.mark.slow
def test_merged_onnx_file_is_the_trained_model(onnx_bundle, tmp_path):
    restored = restore(load_bundle(onnx_bundle))
    wrapper = restored.wrapper
    assert restored.bundle.manifest.adapter.merge_aware and wrapper.merge_aware
    config = _mixed(restored, ONNX_CHOICES)
    report = onnx_export.export(restored, config, tmp_path / "out", accuracy_level=0, threads=1)
    # the weights the trained forward computed with are the merged file's, bit for bit
    planned = onnx_export.plan(restored, config, "merged")
    with torch.no_grad():
        for name, layer in wrapper.layers.items():
            assert torch.equal(layer.merge_aware_weight(), dequantize(planned[name].quant)), name
    verification = report["verification"]
    assert verification["fold"]["kl"] == 0.0 and verification["fold"]["warning"] is None
    assert verification["fold"]["adapter_effect_kl"] > 0
    # ONNX Runtime at level 0 against the trained wrapper itself, not only the folded PyTorch model
    assert verification["runtime_vs_trained"]["kl"] < 1e-9
    assert verification["exact"]["relative"] <= onnx_export.EXACT_TOLERANCE


@pytest.mark.slow
def test_merge_aware_bundle_refuses_other_artifacts(onnx_bundle, tmp_path):
    restored = restore(load_bundle(onnx_bundle))
    config = _mixed(restored, ONNX_CHOICES)
    for options, message in [({"adapter_mode": "sidecar"}, "--adapter-mode merged"),
                             ({"rounding": "feedback"}, "would change the trained weights")]:
        with pytest.raises(CoaloraError, match=message):
            onnx_export.export(restored, config, tmp_path / "o", threads=1, **options)
    result = CliRunner().invoke(app, ["export", str(onnx_bundle), "--out", str(tmp_path / "o"), "--bpw", "8",
                                      "--rounding", "feedback"])
    assert result.exit_code != 0 and "would change the trained weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.slow
def test_merged_gguf_file_holds_the_trained_weights(tiny_model_dir, own_model, own_text, tmp_path):
    model = shutil.copytree(tiny_model_dir("llama", hidden=256, intermediate=768, vocab=512), tmp_path / "llama")
    for name in TOKENIZER_FILES:
        shutil.copy(own_model / name, model / name)
    bundle = _bundle(model, own_text, tmp_path / "bundle", "gguf", GGUF_CHOICES, 4.5)
    restored = restore(load_bundle(bundle.path))
    wrapper = restored.wrapper
    assert restored.bundle.manifest.adapter.imatrix  # Q3_K/Q4_K round with the importance matrix
    config = _mixed(restored, GGUF_CHOICES)
    report = gguf_export.export(restored, config, tmp_path / "out")
    target = Target.from_config(wrapper.model.config)
    tensors = {t.name: t for t in read_gguf(tmp_path / "out" / "model.gguf").tensors}
    for m in wrapper.matrices:
        fmt = wrapper.scheme.storage(config[m.name], m.shape)
        written = tensors[target.tensor_name(f"{m.name}.weight")]
        data = np.asarray(written.data).reshape(m.shape[0], -1)
        order = target.row_order(written.name, m.shape[0])
        got = data if order is None else data[np.argsort(order)]  # (out, row_bytes), Hugging Face row order
        with torch.no_grad():
            trained = wrapper.layers[m.name].merge_aware_weight()
        assert torch.equal(fmt.dequantize(got, m.shape[1]), trained), m.name
    fold_kl = report["verification"]["fold"]["kl"]
    assert fold_kl == 0.0, fold_kl


def _wrapped(tiny_model_dir, scheme: str = "onnx") -> CoALoRAModel:
    model = load_model(str(tiny_model_dir("llama")))
    torch.manual_seed(0)
    return CoALoRAModel(model, get_scheme(scheme), rank=4, alpha=8, merge_aware=True,
                        choices=["int2_b32_asym", "int4_b32_asym"])


def test_gradients_reach_a_b_and_m_straight_through(tiny_model_dir):
    wrapper = _wrapped(tiny_model_dir)
    config = {m.name: "int2_b32_asym" for m in wrapper.matrices}
    wrapper.set_config(config)
    layer = next(iter(wrapper.layers.values()))
    with torch.no_grad():  # the forward weight is the format's rounding of the folded weight, exactly
        A, B = layer.collapsed()
        assert torch.equal(layer.merge_aware_weight(), wrapper.cache.quantizer(
            next(iter(wrapper.layers)), config[next(iter(wrapper.layers))])(fold(layer.base_layer.weight, A, B, layer.scaling)))
    ids = torch.randint(0, wrapper.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(wrapper.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = wrapper(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    changed = {n for n, p in wrapper.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.endswith("lora_A") for n in changed) and any(n.endswith("lora_B") for n in changed)
    assert any(n.startswith("config_model.") for n in changed)  # M's gradient
    assert losses[-1] < losses[0], losses


def test_bad_combinations_are_one_line_errors(tiny_model_dir, tmp_path):
    with pytest.raises(CoaloraError, match="--method none"):
        TrainSettings(method="none", merge_aware=True)
    with pytest.raises(CoaloraError, match="method 'none' has none"):
        CoALoRAModel(load_model(str(tiny_model_dir("llama"))), get_scheme("onnx"), method="none", merge_aware=True)
    result = CliRunner().invoke(app, ["train", str(tiny_model_dir("llama")), "--data", str(tmp_path / "t.txt"),
                                      "--out", str(tmp_path / "b"), "--method", "none", "--merge-aware"])
    assert result.exit_code != 0 and "--merge-aware" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
