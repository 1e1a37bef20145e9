"""The ONNX exporter against ONNX Runtime itself: the weights MatMulNBits computes with are
the ones trained, the logits agree with PyTorch, optimum loads and generates the folder."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.cli.commands import app
from coalora_edge.errors import ExportError, OutputExistsError
from coalora_edge.exporters.common import merge
from coalora_edge.exporters.common.report import REPORT_FILE, trained_logits
from coalora_edge.exporters.onnx import export as onnx_export
from coalora_edge.exporters.onnx.export import DATA_FILE, MODEL_FILE, export, verify
from coalora_edge.exporters.onnx.generate import generate, stream
from coalora_edge.exporters.onnx.graph import MS_DOMAIN, NBITS_OP, initializer_bytes
from coalora_edge.exporters.onnx.session import open_session
from coalora_edge.model.synthetic import build_tiny_model
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.memory import sidecar_bytes
from coalora_edge.resolve.non_adapted import base_bytes
from coalora_edge.resolve.resolver import resolve
from coalora_edge.schemes.onnx import FORMATS, dequantize
from coalora_edge.schemes.quantize import config_nbytes
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only

#: every bit width, both symmetries, blocks from 16 to 256 (past K = 64: padded)
MIX = ("int2_b16_sym", "int4_b32_asym", "int8_b64_sym", "int2_b128_asym", "int4_b256_sym", "int8_b16_asym")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: what training explores (few, for speed); the exported configurations may use any onnx format
CHOICES = ("int2_b32_asym", "int4_b32_asym", "int8_b32_asym")
#: what ORT adds by folding constant subgraphs (rotary frequencies, masks): 0.7 KB measured
FOLDED_CONSTANTS = 4096
SETTINGS = TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds waiting (and the CI box is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_model(path: Path, arch: str, tokenizer_dir: Path) -> Path:
    """A tiny model with own_model's tokenizer (vocabulary 512) whose norms and biases are
    random: initialised ones (all 1, all 0) would be deduplicated by the ONNX export."""
    from transformers import AutoModelForCausalLM

    build_tiny_model(path, arch, vocab=512, hidden=64, layers=2, heads=4, kv_heads=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def _train(model: Path, text: Path, out: Path) -> Path:
    train_bundle(TrainJob(model=str(model), data=[str(text)], out=out, scheme="onnx", seq_len=32, budgets=[3.5, 6.0],
                 choices=list(CHOICES), eval_blocks=8, show_progress=False, settings=SETTINGS))
    return out


@pytest.fixture(scope="module")
def bundles(own_model, own_text, tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama and Qwen2 bundles with own_model's tokenizer, trained on own_text (no ../shared)."""
    root = tmp_path_factory.mktemp("onnx-export")
    found = {}
    for arch in ("llama", "qwen2"):
        model = _tiny_model(root / arch, arch, own_model)
        found[arch] = _train(model, own_text, root / f"b-{arch}")
    return found


@pytest.fixture(scope="module")
def ts_bundle(tinystories_dir, tinystories_text, tmp_path_factory) -> Path:
    """TinyStories-656K's bundle: its tied embedding, its text and the profile sized for it."""
    return _train(tinystories_dir, tinystories_text, tmp_path_factory.mktemp("onnx-export-ts") / "b-tinystories")


def _bundle(request, arch: str) -> Path:
    return request.getfixturevalue("ts_bundle") if arch == "tinystories" else request.getfixturevalue("bundles")[arch]


def _mixed_config(restored) -> dict[str, str]:
    return {m.name: MIX[i % len(MIX)] for i, m in enumerate(restored.wrapper.matrices)}


def _nbits_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name.removesuffix(f".{NBITS_OP}"): n for n in model.graph.node if n.op_type == NBITS_OP}


def _attributes(node: onnx.NodeProto) -> dict[str, int]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ort_dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> torch.Tensor:
    """The weights ORT computes ``node`` with, ``(N, K)``: the node alone, fed the identity."""
    attrs = _attributes(node)
    k, n = attrs["K"], attrs["N"]
    inits = [i for i in model.graph.initializer if i.name in node.input[1:]]
    alone = helper.make_node(NBITS_OP, ["A", *node.input[1:]], ["Y"], domain=MS_DOMAIN, **{**attrs, "accuracy_level": 0})
    graph = helper.make_graph([alone], "alone", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    (w_t,) = session.run(None, {"A": np.eye(k, dtype=np.float32)})  # (K, N)
    return torch.from_numpy(w_t.T.copy())


def _runtime_initializer_bytes(model: Path, optimized: Path) -> int:
    """Weight bytes of the graph ONNX Runtime runs, after its load-time optimisations."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return initializer_bytes(onnx.load(str(optimized)))


@pytest.mark.parametrize("mode, rounding", [("merged", "feedback"), ("merged", "nearest"), ("sidecar", None)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "tinystories"])
def test_matmulnbits_computes_with_the_trained_weights(request, tmp_path, arch, mode, rounding):
    restored = restore(load_bundle(_bundle(request, arch)))
    config = _mixed_config(restored)
    report = export(restored, config, tmp_path / "out", adapter_mode=mode, rounding=rounding, threads=1)
    assert report["rounding"] == (rounding or "nearest")
    model = onnx.load(str(tmp_path / "out" / MODEL_FILE))
    nodes = _nbits_nodes(model)
    wrapper = restored.wrapper
    assert nodes.keys() == wrapper.layers.keys()
    lora = wrapper.collapsed_lora(config)
    if rounding == "feedback":
        feedback = onnx_export.plan(restored, config, "merged", merge.calibration_blocks(restored))
    for name, layer in wrapper.layers.items():
        fmt = FORMATS[config[name]]
        out_features, in_features = layer.base_layer.weight.shape
        assert _attributes(nodes[name]) == {"K": in_features, "N": out_features, "bits": fmt.bits,
                                            "block_size": fmt.block, "accuracy_level": 4}
        assert len(nodes[name].input) == (3 if fmt.symmetric else 4)
        if mode == "sidecar":  # Q_c(W) exactly as training computed with it
            expected = layer.quantized
        elif rounding == "feedback":  # rounded for the trained layer's outputs, block by block
            expected = dequantize(feedback[name].quant)
        else:  # the folded weight, quantized by the scheme
            A, B = lora[name]
            expected = fmt.roundtrip(layer.base_layer.weight + wrapper.scaling * (B @ A))
        assert torch.equal(_ort_dequantized(model, nodes[name]), expected), name
    assert report["verification"]["exact"]["relative"] <= onnx_export.EXACT_TOLERANCE

    # the weights in the file are the bytes the resolver counts for this configuration
    shapes = {m.name: m.shape for m in wrapper.matrices}
    expected_bytes = config_nbytes(wrapper.scheme, shapes, config) + base_bytes(wrapper.model, shapes, "onnxruntime")
    if mode == "sidecar":
        expected_bytes += sidecar_bytes(shapes.values(), wrapper.rank)
    assert initializer_bytes(model) == expected_bytes == report["sizes"]["initializer_bytes"]
    # ... and what ONNX Runtime holds once it has optimised the graph: a tied embedding once
    held = _runtime_initializer_bytes(tmp_path / "out" / MODEL_FILE, tmp_path / "optimized.onnx")
    assert 0 <= held - expected_bytes < FOLDED_CONSTANTS
    if arch == "qwen2":  # the q/k/v biases are kept, as fp32 initializers of their Add
        arrays = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer]
        bias = wrapper.layers["model.layers.0.self_attn.k_proj"].base_layer.bias.detach().numpy()
        assert sum(np.array_equal(a, bias) for a in arrays) == 1


def test_feedback_rounding_keeps_more_of_the_adapter(bundles, own_text, tmp_path, monkeypatch):
    """On text like the calibration text (own_text's held-out tail, the bundle's training
    data), the feedback-rounded file is closer to the trained model than nearest rounding."""
    held_out = [line for line in own_text.read_text().splitlines()[-400:] if len(line) > 60][:4]
    monkeypatch.setattr(onnx_export, "VERIFY_PROMPTS", tuple(held_out))
    restored = restore(load_bundle(bundles["llama"]))
    config = _mixed_config(restored)
    folds = {rounding: export(restored, config, tmp_path / rounding, rounding=rounding, threads=1)["verification"]["fold"]
             for rounding in ("nearest", "feedback")}
    assert folds["feedback"]["kl"] < folds["nearest"]["kl"]


def test_verification_fails_when_the_runtime_computes_something_else(bundles, tmp_path):
    """The checks can fail: the model without its adapter, or other codes, are not in the file."""
    restored = restore(load_bundle(bundles["llama"]))
    config = _mixed_config(restored)
    export(restored, config, tmp_path / "out", adapter_mode="sidecar", accuracy_level=0, threads=1)
    planned = onnx_export.plan(restored, config, "sidecar")
    ids = [restored.tokenizer(p, return_tensors="pt").input_ids for p in onnx_export.VERIFY_PROMPTS]
    trained, quantized_only = trained_logits(restored, ids)
    figures, _ = verify(tmp_path / "out", planned, ids, trained, 0, threads=1)
    assert figures["exact"]["relative"] <= onnx_export.EXACT_TOLERANCE
    assert float((trained - quantized_only).abs().max() / trained.abs().max()) > 100 * onnx_export.EXACT_TOLERANCE
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        verify(tmp_path / "out", planned, ids, quantized_only, 0, threads=1)
    other = onnx_export.plan(restored, {n: "int4_b32_asym" for n in config}, "sidecar")
    with pytest.raises(ExportError, match="differs from the scheme's packing"):
        verify(tmp_path / "out", other, ids, trained, 0, threads=1)


def test_a_failed_export_leaves_nothing_and_an_existing_one_is_kept(bundles, tmp_path, monkeypatch):
    restored = restore(load_bundle(bundles["llama"]))
    config = _mixed_config(restored)
    monkeypatch.setattr(onnx_export, "EXACT_TOLERANCE", 0.0)  # no float rounding allowed: must fail
    with pytest.raises(ExportError):
        export(restored, config, tmp_path / "out", threads=1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export(restored, config, tmp_path / "out", threads=1)
    with pytest.raises(OutputExistsError):
        export(restored, config, tmp_path / "out", threads=1)


@pytest.mark.parametrize("external", [False, True])
def test_tinystories_generates_in_onnxruntime_as_in_pytorch(ts_bundle, tmp_path, external):
    """Sidecar at level 0 is the trained model: optimum's generate gives PyTorch's greedy tokens."""
    from optimum.onnxruntime import ORTModelForCausalLM

    restored = restore(load_bundle(ts_bundle))
    config = load_bundle(ts_bundle).configs()[-1]
    out = tmp_path / "out"
    export(restored, config, out, adapter_mode="sidecar", accuracy_level=0, threads=1,
                external_data_bytes=1000 if external else onnx_export.EXTERNAL_DATA_BYTES)
    assert (out / DATA_FILE).exists() == external
    prompt = restored.tokenizer("Once upon a time, there was a little dog", return_tensors="pt")
    with torch.no_grad():
        expected = restored.wrapper.model.generate(**prompt, max_new_tokens=24, do_sample=False)
    runtime = ORTModelForCausalLM.from_pretrained(out)
    tokens = runtime.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(tokens, expected)
    text = generate(out, "Once upon a time, there was a little dog", max_tokens=24, threads=1)
    assert text == restored.tokenizer.decode(expected[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    assert {"the", "was"} & set(text.lower().split()), text


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_export_and_run_from_the_command_line(bundles, tmp_path):
    out = tmp_path / "tiny-demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = cli("export", bundles["llama"], "--profile", "tiny-demo-onnx", "--format", "onnx", "--out", out, "--json")
    assert done.exit_code == 0, done.stderr
    assert not [w for w in caught if issubclass(w.category, (torch.jit.TracerWarning, UserWarning))], \
        [str(w.message) for w in caught]  # a user sees only our report
    report = json.loads(done.stdout)
    assert report == json.loads((out / REPORT_FILE).read_text())
    resolution = resolve(load_bundle(bundles["llama"]), load_profile("tiny-demo-onnx"))
    assert report["config"] == resolution.config and report["accuracy_level"] == 4
    assert report["sizes"]["matches"] and report["memory"]["fits"]
    memory = {k: report["memory"][k] for k in ("weights", "non_adapted", "sidecar")}
    assert memory == {"weights": resolution.memory.weights, "non_adapted": resolution.memory.non_adapted, "sidecar": 0}

    done = cli("run", out, "--prompt", "Once upon a time", "--max-tokens", "16", "--json")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["text"] == generate(out, "Once upon a time", max_tokens=16, threads=1)

    data = bytearray((out / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / MODEL_FILE).write_bytes(bytes(data))
    done = cli("run", out, "--prompt", "Once upon a time")
    assert done.exit_code == 3 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "does not match its sha256" in done.stderr


def test_a_file_onnxruntime_cannot_load_is_one_clear_error(tmp_path):
    (tmp_path / MODEL_FILE).write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="ONNX Runtime cannot load"):
        open_session(tmp_path / MODEL_FILE)


def test_run_keeps_to_the_context(bundles, tmp_path):
    """The ONNX runner's limits are the GGUF runner's (exporters/common/generation.py)."""
    out = tmp_path / "out"
    restored = restore(load_bundle(bundles["llama"]))
    export(restored, _mixed_config(restored), out, threads=1)
    context = restored.wrapper.model.config.max_position_embeddings
    long = " ".join(["the little dog ran home"] * context)
    result = cli("run", out, "--prompt", long, "--max-tokens", "4")
    assert result.exit_code == 3 and f"and the model's context is {context}" in result.stderr, result.output
    prompt_ids = restored.tokenizer("Once upon a time").input_ids
    # a piece per new token at most (a character spanning tokens comes as one piece)
    pieces = list(stream(out, "Once upon a time", max_tokens=100000, threads=1))
    assert 0 < len(pieces) <= context - len(prompt_ids)
    result = cli("run", out, "--prompt", "caf\udce9")
    assert result.exit_code == 3 and "not valid UTF-8" in result.stderr

    # ... and streams: the pieces come one by one and add up to the text `run` prints
    pieces = list(stream(out, "Once upon a time", max_tokens=12, threads=1))
    assert len(pieces) >= 2 and "".join(pieces) == generate(out, "Once upon a time", max_tokens=12, threads=1)
    printed = cli("run", out, "--prompt", "Once upon a time", "--max-tokens", "12", "--threads", "1")
    assert printed.exit_code == 0 and printed.stdout == "Once upon a time" + "".join(pieces) + "\n"
