"""Calibration statistics and per-(matrix, format) sensitivity.

References are computed another way: layer inputs from the model's own hidden states
(no hooks), the activation-weighted error one token at a time, the Fisher from
``loss.backward()`` per batch, the quantized weights from the formats directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from coalora_edge.errors import DataError
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import QuantCache
from coalora_edge.search.sensitivity import (
    Sensitivity,
    activation_sensitivity,
    collect_fisher,
    collect_imatrix,
    fisher_sensitivity,
)

#: (scheme, formats of one family from fewest to most bits). On TinyStories-656K rows of
#: 128 and 384 are no multiple of 256, so gguf's Q2_K and Q4_K are stored as llama.cpp's
#: fallbacks Q4_0 and Q5_0; the K-quants themselves are checked on a 256-wide tiny model.
FAMILIES = {
    "gguf": ("Q2_K", "Q4_K", "Q8_0"),
    "onnx": ("int2_b32_asym", "int4_b32_asym", "int8_b32_asym"),
    "nf": ("nf2-s8-fp32-64x256", "nf4-s8-fp32-64x256", "nf8-s8-fp32-64x256"),
}


def random_batches(vocab: int, n: int = 2, shape: tuple[int, int] = (2, 16), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, shape, generator=g) for _ in range(n)]


def weights_of(model) -> dict[str, torch.Tensor]:
    return {m.name: model.get_submodule(m.name).weight.detach() for m in find_matrices(model)}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(str(tiny_model_dir("llama")))
    batches = random_batches(model.config.vocab_size)
    return model, batches, collect_imatrix(model, batches)


@pytest.fixture(scope="module", params=["own", "tinystories"])
def trained(request):
    """A model trained on text and its importance matrix: the session's own model of
    TinyStories-656K's shapes (needs no ../shared), and TinyStories-656K itself."""
    model_dir, text = ((request.getfixturevalue("own_model"), request.getfixturevalue("own_text"))
                       if request.param == "own" else
                       (request.getfixturevalue("tinystories_dir"), request.getfixturevalue("tinystories_text")))
    model = load_model(str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.read_text()[:20000], return_tensors="pt").input_ids[0, : 8 * 128]
    batches = list(ids.view(2, 4, 128))  # two batches of 4 x 128 real tokens
    return model, collect_imatrix(model, batches)


def layer_inputs(model, batches: list[torch.Tensor], layer: int) -> torch.Tensor:
    """What q/k/v of ``layer`` see, from the hidden states: (tokens, hidden)."""
    with torch.no_grad():
        xs = [
            model.model.layers[layer].input_layernorm(model(ids, output_hidden_states=True).hidden_states[layer])
            for ids in batches
        ]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def test_imatrix_has_one_value_per_input_column_and_counts_tokens(tiny):
    model, batches, imatrix = tiny
    n_tokens = sum(b.numel() for b in batches)
    assert imatrix.total_tokens == n_tokens
    for m in find_matrices(model):
        assert imatrix.values[m.name].shape == (m.shape[1],)
        assert imatrix.values[m.name].dtype == torch.float32
        assert imatrix.tokens[m.name] == n_tokens
        assert (imatrix.values[m.name] > 0).all()


@pytest.mark.parametrize("layer", [0, 1])
def test_imatrix_is_the_mean_square_of_the_layer_input(tiny, layer):
    model, batches, imatrix = tiny
    x = layer_inputs(model, batches, layer).double()  # (tokens, hidden)
    expected = x.square().mean(dim=0).float()
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert torch.allclose(imatrix.values[f"model.layers.{layer}.self_attn.{proj}"], expected, rtol=1e-6, atol=0)


def test_collection_leaves_the_model_as_it_was(tiny_model_dir):
    model = load_model(str(tiny_model_dir("llama"))).train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    collect_imatrix(model, random_batches(model.config.vocab_size))
    collect_fisher(model, random_batches(model.config.vocab_size))
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("collect", [collect_imatrix, collect_fisher])
def test_empty_calibration_data_is_refused(tiny, collect):
    with pytest.raises(DataError, match="calibration batches were empty"):
        collect(tiny[0], [])


@pytest.mark.parametrize("choice", ["Q4_0", "Q5_K", "Q8_0"])
def test_activation_error_equals_a_loop_over_tokens(tiny, choice):
    model, batches, imatrix = tiny
    scheme = get_scheme("gguf")
    sens = activation_sensitivity(QuantCache(scheme, weights_of(model), imatrix.values), imatrix, [choice])
    for layer, proj in [(0, "q_proj"), (1, "v_proj")]:
        name = f"model.layers.{layer}.self_attn.{proj}"
        w = model.get_submodule(name).weight.detach()
        fmt = scheme.storage(choice, tuple(w.shape))
        q = fmt.roundtrip(w, imatrix.values[name]) if fmt.uses_imatrix else fmt.roundtrip(w)
        delta2 = (w.double() - q.double()).square()  # (out, in)
        x = layer_inputs(model, batches, layer).double()  # (tokens, in)
        per_token = [float((delta2 * x[t].square()).sum()) for t in range(len(x))]
        expected = sum(per_token) / len(per_token)
        # the importance matrix is kept in fp32, as llama.cpp stores it: 7 digits
        assert sens.cost[sens.matrices.index(name), 0] == pytest.approx(expected, rel=1e-6)


def test_fisher_is_the_mean_squared_gradient_and_nonnegative(tiny):
    model, batches, _ = tiny
    fisher = collect_fisher(model, batches)
    name = "model.layers.1.mlp.down_proj"
    weight = model.get_submodule(name).weight
    expected = torch.zeros_like(weight)
    for ids in batches:
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        expected += weight.grad.square()
    model.zero_grad(set_to_none=True)
    assert torch.allclose(fisher[name], expected / len(batches), rtol=1e-5, atol=0)
    for m in find_matrices(model):
        assert fisher[m.name].shape == m.shape
        assert (fisher[m.name] >= 0).all() and fisher[m.name].sum() > 0
    sens = fisher_sensitivity(QuantCache(get_scheme("gguf"), weights_of(model)), fisher, ["Q4_0", "Q8_0"])
    assert sens.kind == "fisher"
    assert np.isfinite(sens.cost).all() and (sens.cost >= 0).all()
    assert (sens.cost[:, 0] > sens.cost[:, 1]).all()


@pytest.mark.parametrize("scheme_name", sorted(FAMILIES))
def test_more_bits_less_sensitivity_on_a_trained_model(trained, scheme_name):
    model, imatrix = trained
    cache = QuantCache(get_scheme(scheme_name), weights_of(model), imatrix.values)
    cost = activation_sensitivity(cache, imatrix, FAMILIES[scheme_name]).cost  # (14, 3)
    assert np.isfinite(cost).all() and (cost > 0).all()
    assert (cost[:, 0] > cost[:, 1]).all() and (cost[:, 1] > cost[:, 2]).all(), cost


def test_k_quants_order_on_rows_they_hold(tiny_model_dir):
    model = load_model(str(tiny_model_dir("llama", hidden=256, intermediate=512, layers=1)))
    imatrix = collect_imatrix(model, random_batches(model.config.vocab_size))
    scheme = get_scheme("gguf")
    stored = {scheme.storage(c, m.shape).name for m in find_matrices(model) for c in FAMILIES["gguf"]}
    assert stored == set(FAMILIES["gguf"])
    cost = activation_sensitivity(QuantCache(scheme, weights_of(model), imatrix.values), imatrix, FAMILIES["gguf"]).cost
    assert (cost[:, 0] > cost[:, 1]).all() and (cost[:, 1] > cost[:, 2]).all(), cost


def test_results_serialise(tiny, tmp_path):
    _, _, imatrix = tiny
    save_file(imatrix.values, tmp_path / "imatrix.safetensors")
    loaded = load_file(tmp_path / "imatrix.safetensors")
    assert loaded.keys() == imatrix.values.keys()
    assert all(torch.equal(loaded[k], v) for k, v in imatrix.values.items())

    sens = Sensitivity("activation", ("a", "b"), ("Q4_0", "Q8_0"), np.array([[0.1 + 0.2, np.inf], [1e-300, 7.0]]))
    back = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict(), allow_nan=False)))
    assert (back.kind, back.matrices, back.choices) == (sens.kind, sens.matrices, sens.choices)
    assert np.array_equal(back.cost, sens.cost)
