"""CoA-LoRA adapter on tiny real transformers models: exact quantized forward, collapse to a
plain LoRA, merge round trips, gradients, features per architecture, state, cache reuse."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from coalora_edge.adapter.config_model import CONFIG_MODELS, ConfigTable, matrix_features
from coalora_edge.adapter.model import CoALoRALinear, CoALoRAModel
from coalora_edge.errors import CoaloraError, ModelError, SchemeError
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices
from coalora_edge.model.synthetic import build_tiny_model
from coalora_edge.schemes import get_scheme
from coalora_edge.schemes.quantize import QuantCache

RANK, ALPHA = 4, 8.0
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
#: leaf name -> module type, written out here so the check does not reuse models.MODULE_TYPES
LEAF_TYPES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
              "up_proj": "up", "down_proj": "down", "qkv_proj": "qkv", "gate_up_proj": "gate_up"}


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """Qwen2 with non-zero q/k/v biases (transformers initialises them to zero, which would
    hide a dropped bias)."""
    path = build_tiny_model(tmp_path_factory.mktemp("qwen2-bias"), "qwen2")
    model = load_model(str(path))
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def wrap(model_dir, scheme_, seed: int = 0, **kwargs) -> CoALoRAModel:
    torch.manual_seed(seed)
    return CoALoRAModel(load_model(str(model_dir)), scheme_, rank=kwargs.pop("rank", RANK), alpha=ALPHA, **kwargs)


def mixed(wrapper: CoALoRAModel, choices, offset: int = 0) -> dict[str, str]:
    """Neighbouring matrices get different formats."""
    return {m.name: choices[(i + offset) % len(choices)] for i, m in enumerate(wrapper.matrices)}


def hf_model_with(model_dir, weights: dict[str, torch.Tensor]):
    """The plain transformers model with the given weights put into its Linear layers."""
    model = load_model(str(model_dir))
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return model


def quantized_weights(model_dir, scheme_, config) -> dict[str, torch.Tensor]:
    model = load_model(str(model_dir))
    return QuantCache(scheme_, {n: model.get_submodule(n).weight.detach().clone() for n in config}).for_config(config)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(wrapper: CoALoRAModel, seed: int = 2, scale: float = 0.1, params=None) -> None:
    """Trained-looking parameters (default all): non-zero B, a configuration model far from M = I."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params or wrapper.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def current_M(wrapper: CoALoRAModel) -> torch.Tensor:
    return torch.stack([layer.M for layer in wrapper.layers.values()])  # (n, r, r)


def decode(wrapper: CoALoRAModel, encoded: torch.Tensor) -> list[dict]:
    """What the configuration model was given, back as feature dicts (either design)."""
    cm = wrapper.config_model
    if isinstance(cm, ConfigTable):
        keys = list(cm._index)
        return [dict(keys[i]) for i in encoded.tolist()]
    names = list(cm.vocabularies)
    return [{f: cm.vocabularies[f][i] for f, i in zip(names, row.tolist())} for row in encoded]


@pytest.mark.parametrize("scheme_name", ["gguf", "onnx", "nf"])
def test_fresh_adapter_equals_the_quantized_model_exactly(llama_dir, scheme_name):
    s = get_scheme(scheme_name)
    wrapper = wrap(llama_dir, s)
    config = mixed(wrapper, s.default_choices)
    assert len(set(config.values())) > 1
    wrapper.set_config(config)
    reference = hf_model_with(llama_dir, quantized_weights(llama_dir, s, config))
    assert torch.equal(logits(wrapper), logits(reference))


def test_adapter_equals_its_collapsed_lora_and_its_merged_weights(llama_dir):
    s = get_scheme("nf")
    wrapper = wrap(llama_dir, s)
    randomize(wrapper)
    config = mixed(wrapper, s.default_choices)
    wrapper.set_config(config)
    assert (current_M(wrapper) - torch.eye(RANK)).abs().max() > 0.1  # far from a plain LoRA
    adapted = logits(wrapper)

    collapsed = wrapper.collapsed_lora()
    plain = wrap(llama_dir, s, method="shared")
    plain.load_trainable_state(
        {f"{n}.{k}": t for n, (A, B) in collapsed.items() for k, t in (("lora_A", A), ("lora_B", B))}
    )
    plain.set_config(config)
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-5)

    quantized = quantized_weights(llama_dir, s, config)
    merged = {n: quantized[n] + wrapper.scaling * (B @ A) for n, (A, B) in collapsed.items()}
    reference = logits(hf_model_with(llama_dir, merged))
    torch.testing.assert_close(reference, adapted, rtol=1e-5, atol=1e-5)
    wrapper.merge()
    assert torch.equal(logits(wrapper), reference)
    wrapper.unmerge()
    assert torch.equal(logits(wrapper), adapted)
    wrapper.merge()
    assert torch.equal(logits(wrapper), reference)


def test_collapsed_lora_of_another_configuration_does_not_switch(llama_dir):
    s = get_scheme("nf")
    wrapper = wrap(llama_dir, s)
    randomize(wrapper)
    first, second = mixed(wrapper, s.default_choices), mixed(wrapper, s.default_choices, offset=5)
    wrapper.set_config(second)
    expected = wrapper.collapsed_lora()
    wrapper.set_config(first)
    got = wrapper.collapsed_lora(second)
    assert wrapper.config == first
    assert all(torch.equal(got[n][1], expected[n][1]) for n in got)
    assert any(not torch.equal(got[n][1], wrapper.collapsed_lora()[n][1]) for n in got)


@pytest.mark.parametrize("design", CONFIG_MODELS)
def test_M_starts_near_identity_is_one_batched_call_and_learns_formats_apart(llama_dir, design):
    s = get_scheme("gguf")
    wrapper = wrap(llama_dir, s, config_model=design, choices=("Q4_0", "F16"))
    calls = []
    wrapper.config_model.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    q4, f16 = ({m.name: fmt for m in wrapper.matrices} for fmt in ("Q4_0", "F16"))

    wrapper.set_config(q4)
    assert calls == [len(wrapper.matrices)]
    assert (current_M(wrapper) - torch.eye(RANK)).abs().max() < 0.05
    wrapper(input_ids=IDS)
    assert calls == [len(wrapper.matrices)] * 2

    optimizer = torch.optim.AdamW(wrapper.param_groups(0.01), lr=1e-2)
    for _ in range(3):
        for config in (q4, f16):
            wrapper.set_config(config)
            wrapper(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        wrapper.set_config(q4)
        m_q4 = current_M(wrapper)
        wrapper.set_config(f16)
        m_f16 = current_M(wrapper)
    assert all(not torch.equal(a, b) for a, b in zip(m_q4, m_f16))  # every matrix tells Q4_0 from F16


@pytest.mark.parametrize("design", CONFIG_MODELS)
def test_gradients_reach_every_trained_parameter_and_no_base_weight(llama_dir, design):
    s = get_scheme("nf")
    wrapper = wrap(llama_dir, s, config_model=design)
    randomize(wrapper)
    wrapper.set_config(mixed(wrapper, s.default_choices))
    wrapper(input_ids=IDS, labels=IDS).loss.backward()
    named = dict(wrapper.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    for name in trained:
        assert named[name].grad is not None and named[name].grad.abs().max() > 0, name
    if design == "mlp":
        assert {f"config_model.embeddings.{f}.weight" for f in wrapper.config_model.vocabularies} <= trained
        assert "config_model.sigma" in trained
    else:  # the rows of this configuration's (matrix, format) pairs, and no other
        rows = wrapper.config_model.encode([matrix_features(s, m, wrapper.config[m.name]) for m in wrapper.matrices])
        touched = named["config_model.delta"].grad.abs().amax(dim=(1, 2)) > 0
        assert touched.nonzero().flatten().tolist() == sorted(set(rows.tolist()))
    assert len(trained) == 2 * len(wrapper.matrices) + len(dict(wrapper.config_model.named_parameters()))
    assert all(p.grad is None for n, p in named.items() if n not in trained)


@pytest.mark.parametrize("design", CONFIG_MODELS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_layer_index_and_module_type_reach_the_configuration_model(tiny_model_dir, qwen2_dir, arch, design):
    model_dir = qwen2_dir if arch == "qwen2" else tiny_model_dir(arch, layers=3)
    s = get_scheme("nf")
    wrapper = wrap(model_dir, s, config_model=design)
    randomize(wrapper, params=list(wrapper.config_model.parameters()))  # the table starts at M = I everywhere
    seen = []
    wrapper.config_model.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    config = {m.name: "nf4-s8-fp32-64x256" for m in wrapper.matrices}
    wrapper.set_config(config)

    decoded = decode(wrapper, seen[0])
    expected = find_matrices(load_model(str(model_dir)))
    assert [(d["layer"], d["module"]) for d in decoded] == [(m.layer, m.module) for m in expected]
    for m, d in zip(expected, decoded):
        assert d["layer"] == int(re.search(r"\.layers\.(\d+)\.", m.name).group(1))
        assert d["module"] == LEAF_TYPES[m.name.rsplit(".", 1)[1]]
    assert len({d["layer"] for d in decoded}) > 1
    # the reference code's bug put every decoder layer at position 0: same type, other layer -> other M
    first = {d["module"]: i for i, d in reversed(list(enumerate(decoded)))}
    last = {d["module"]: i for i, d in enumerate(decoded)}
    M = current_M(wrapper)
    assert all(not torch.equal(M[first[t]], M[last[t]]) for t in first)

    reference = hf_model_with(model_dir, quantized_weights(model_dir, s, config))
    assert torch.equal(logits(wrapper), logits(reference))
    if arch == "qwen2":
        biased = [layer for layer in wrapper.layers.values() if layer.base_layer.bias is not None]
        assert len(biased) == 3 * 2 and all(layer.base_layer.bias.abs().max() > 0 for layer in biased)


@pytest.mark.parametrize("design", CONFIG_MODELS)
def test_features_describe_the_stored_format_after_fallback(llama_dir, design):
    s = get_scheme("gguf")
    wrapper = wrap(llama_dir, s, config_model=design)
    randomize(wrapper)
    seen = []
    wrapper.config_model.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    stored = {}
    for choice in ("Q2_K", "Q3_K", "Q4_K"):  # rows of 64 cannot hold 256-blocks
        wrapper.set_config({m.name: choice for m in wrapper.matrices})
        stored[choice] = current_M(wrapper)
    assert {d["format_type"] for d in decode(wrapper, seen[0])} == {"Q4_0"}
    assert {d["format_type"] for d in decode(wrapper, seen[2])} == {"Q5_0"}
    assert torch.equal(stored["Q2_K"], stored["Q3_K"])  # both are stored as Q4_0
    assert not torch.equal(stored["Q2_K"], stored["Q4_K"])


def test_shared_and_none_methods(llama_dir):
    s = get_scheme("nf")
    shared = wrap(llama_dir, s, method="shared")
    randomize(shared)
    config = mixed(shared, s.default_choices)
    shared.set_config(config)
    assert shared.config_model is None
    assert all(layer.M is None for layer in shared.layers.values())
    assert all(torch.equal(B, shared.layers[n].lora_B) for n, (A, B) in shared.collapsed_lora().items())
    assert all(n.endswith(("lora_A", "lora_B")) for n in shared.trainable_state())

    none = wrap(llama_dir, s, method="none")
    none.set_config(config)
    assert none.trainable_parameters() == [] and none.trainable_state() == {} and none.param_groups(0.1) == []
    assert torch.equal(logits(none), logits(hf_model_with(llama_dir, quantized_weights(llama_dir, s, config))))
    with pytest.raises(CoaloraError, match="none"):
        none.collapsed_lora()


def test_weight_decay_spares_sigma_embeddings_layernorm_and_biases(llama_dir):
    table = wrap(llama_dir, get_scheme("nf"), config_model="table")
    decayed = {id(p) for g in table.param_groups(0.05) if g["weight_decay"] for p in g["params"]}
    assert id(table.config_model.delta) not in decayed  # decay would pull every M towards I
    wrapper = wrap(llama_dir, get_scheme("nf"), config_model="mlp")
    decay, no_decay = wrapper.param_groups(0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in wrapper.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(spared)
    assert decayed | spared == {n for n, p in wrapper.named_parameters() if p.requires_grad}
    assert spared == {"config_model.sigma", "config_model.norm.weight", "config_model.norm.bias",
                      "config_model.hidden.bias", "config_model.out.bias"} | {
        f"config_model.embeddings.{f}.weight" for f in wrapper.config_model.vocabularies}
    assert {"config_model.hidden.weight", "config_model.out.weight"} <= decayed


def test_state_round_trips_through_safetensors_and_refuses_a_mismatch(llama_dir, tmp_path):
    s = get_scheme("nf")
    trained = wrap(llama_dir, s)
    randomize(trained)
    config = mixed(trained, s.default_choices)
    trained.set_config(config)
    save_file(trained.trainable_state(), tmp_path / "adapter.safetensors")

    fresh = wrap(llama_dir, s, seed=7)
    fresh.set_config(config)
    assert not torch.equal(logits(fresh), logits(trained))
    fresh.load_trainable_state(load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(fresh), logits(trained))

    state = trained.trainable_state()
    key = next(iter(state))
    with pytest.raises(CoaloraError, match=f"missing: {re.escape(key)}"):
        fresh.load_trainable_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(CoaloraError, match="unexpected: extra"):
        fresh.load_trainable_state({**state, "extra": torch.zeros(1)})
    with pytest.raises(CoaloraError, match="wrong shape"):
        wrap(llama_dir, s, rank=8).load_trainable_state(state)
    with pytest.raises(CoaloraError, match="missing: config_model"):
        fresh.load_trainable_state(wrap(llama_dir, s, method="shared").trainable_state())


def test_switching_back_reuses_the_cache(llama_dir):
    s = get_scheme("gguf")
    wrapper = wrap(llama_dir, s)
    first, second = mixed(wrapper, s.default_choices), mixed(wrapper, s.default_choices, offset=1)
    wrapper.set_config(first)
    after_first = len(wrapper.cache)
    wrapper.set_config(second)
    after_second = len(wrapper.cache)
    assert after_second > after_first
    wrapper.set_config(first)
    assert len(wrapper.cache) == after_second
    assert all(layer.quantized is wrapper.cache.get(n, first[n]) for n, layer in wrapper.layers.items())


def test_configuration_tensors_follow_dtype_and_device_moves(llama_dir):
    wrapper = wrap(llama_dir, get_scheme("nf"))
    randomize(wrapper)
    wrapper.set_config(mixed(wrapper, get_scheme("nf").default_choices))
    expected = logits(wrapper)
    wrapper.double()
    assert all(layer.quantized.dtype == torch.float64 for layer in wrapper.layers.values())
    torch.testing.assert_close(logits(wrapper), expected.double(), rtol=1e-5, atol=1e-5)


def test_adapting_a_subset_and_misuse(llama_dir):
    s = get_scheme("nf")
    names = [m.name for m in find_matrices(load_model(str(llama_dir))) if m.module == "q"]
    wrapper = wrap(llama_dir, s, matrices=names)
    assert [m.name for m in wrapper.matrices] == names
    assert sum(isinstance(m, CoALoRALinear) for m in wrapper.modules()) == len(names)
    with pytest.raises(CoaloraError, match="set_config"):
        wrapper(input_ids=IDS)
    with pytest.raises(SchemeError, match="no format for 1"):
        wrapper.set_config({n: "nf4-s8-fp32-64x256" for n in names[1:]})
    with pytest.raises(SchemeError, match="does not adapt"):
        wrapper.set_config({m.name: "nf4-s8-fp32-64x256" for m in find_matrices(load_model(str(llama_dir)))})
    with pytest.raises(CoaloraError, match="set_config"):
        wrapper.merge()
    with pytest.raises(SchemeError, match="unknown nf format"):
        wrapper.set_config({n: "Q4_K" for n in names})
    wrapper.set_config({n: "nf4-s8-fp32-64x256" for n in names})
    wrapper.merge()
    with pytest.raises(CoaloraError, match="unmerge"):
        wrapper.set_config({n: "nf8-s8-fp32-16x16" for n in names})
    with pytest.raises(ModelError, match="already wrapped"):
        CoALoRAModel(wrapper.model, s)
    with pytest.raises(ModelError, match="cannot adapt"):
        wrap(llama_dir, s, matrices=["model.layers.0.nope"])
    with pytest.raises(CoaloraError, match="unknown method"):
        wrap(llama_dir, s, method="per-config")


def test_unquantized_and_without_adapter_contexts(tiny_model_dir):
    from coalora_edge.model.loading import load_model
    from coalora_edge.adapter.model import CoALoRAModel
    from coalora_edge.schemes import get_scheme
    from coalora_edge.schemes.quantize import QuantCache

    path = str(tiny_model_dir("llama"))
    reference, model = load_model(path), load_model(path)
    wrapper = CoALoRAModel(model, get_scheme("onnx"), rank=4, alpha=8)
    config = {m.name: "int2_b32_asym" for m in wrapper.matrices}
    wrapper.set_config(config)
    for layer in wrapper.layers.values():
        torch.nn.init.normal_(layer.lora_B)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        adapted = wrapper(input_ids=ids).logits
        with wrapper.unquantized():
            assert torch.equal(wrapper(input_ids=ids).logits, reference(input_ids=ids).logits)
        with wrapper.without_adapter():
            quantized = wrapper(input_ids=ids).logits
        assert torch.equal(wrapper(input_ids=ids).logits, adapted)  # both contexts restore
        weights = QuantCache(get_scheme("onnx"), {n: l.base_layer.weight for n, l in wrapper.layers.items()}).for_config(config)
        for name, w in weights.items():
            reference.get_submodule(name).weight.copy_(w)
        assert torch.equal(quantized, reference(input_ids=ids).logits)


def test_configuration_model_can_learn_at_its_own_rate(tiny_model_dir):
    """--config-model-lr: the configuration model's parameters (and only they) get their own lr,
    with the weight-decay split kept."""
    wrapper = CoALoRAModel(load_model(str(tiny_model_dir("llama"))), get_scheme("onnx"), rank=4, alpha=8)
    groups = wrapper.param_groups(0.1, config_model_lr=1e-2)
    own = {id(p) for p in wrapper.config_model.parameters()}
    for g in groups:
        in_config = {id(p) in own for p in g["params"]}
        assert len(in_config) == 1 and (g.get("lr") == 1e-2) == in_config.pop()
    assert sum(len(g["params"]) for g in groups) == len(wrapper.trainable_parameters())
    assert {g["weight_decay"] for g in groups} == {0.1, 0.0}
    assert all("lr" not in g for g in wrapper.param_groups(0.1))


def test_table_holds_the_trained_formats_and_gives_others_the_shared_lora(llama_dir):
    s = get_scheme("onnx")
    wrapper = wrap(llama_dir, s, config_model="table", choices=s.default_choices[:2])
    assert wrapper.config_model.delta.shape == (len(wrapper.matrices) * 2, RANK, RANK)
    eye = torch.eye(RANK).expand(len(wrapper.matrices), -1, -1)
    wrapper.set_config(mixed(wrapper, s.default_choices[:2]))
    assert torch.equal(current_M(wrapper), eye)
    randomize(wrapper)
    wrapper.set_config(mixed(wrapper, s.default_choices[:2]))
    assert all(not torch.equal(M, torch.eye(RANK)) for M in current_M(wrapper))
    other = {m.name: s.default_choices[-1] for m in wrapper.matrices}  # a format the table does not hold
    wrapper.set_config(other)
    assert torch.equal(current_M(wrapper), eye)
    with pytest.raises(CoaloraError, match="unknown configuration model 'cnn'; choose one of: mlp, table"):
        wrap(llama_dir, s, config_model="cnn")
