import json

import pytest
import torch
from transformers import AutoTokenizer

from coalora_edge.errors import ModelError
from coalora_edge.model.loading import load_model
from coalora_edge.model.matrices import find_matrices, module_type
from coalora_edge.model.synthetic import ARCH_EXTRAS

CANONICAL = {"q", "k", "v", "o", "gate", "up", "down"}


def test_tinystories_loads_with_its_tied_embedding_and_predicts_text(tinystories_dir, tinystories_text):
    model = load_model(str(tinystories_dir))
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(tinystories_dir)
    ids = tok(tinystories_text.read_text()[:8000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    # A real pretrained model: about 31 here; random weights give ~ln(2048) = 7.6 nats.
    assert torch.exp(loss) < 60


def test_matrices_of_tinystories_shapes(own_model):
    matrices = find_matrices(load_model(str(own_model)))  # TinyStories-656K's shapes, untied embeddings
    assert [m.layer for m in matrices] == [0] * 7 + [1] * 7
    assert {m.module for m in matrices} == CANONICAL
    shapes = {m.module: m.shape for m in matrices if m.layer == 1}
    assert shapes == {"q": (128, 128), "k": (64, 128), "v": (64, 128), "o": (128, 128),
                      "gate": (384, 128), "up": (384, 128), "down": (128, 384)}


@pytest.mark.parametrize("arch", sorted(ARCH_EXTRAS))
def test_every_family_gets_layer_index_and_module_type(tiny_model_dir, arch):
    model = load_model(str(tiny_model_dir(arch, layers=3)))
    matrices = find_matrices(model)
    per_layer = len(matrices) // 3
    assert [m.layer for m in matrices] == [i for i in range(3) for _ in range(per_layer)]
    expected = {"qkv", "o", "gate_up", "down"} if arch == "phi3" else CANONICAL
    assert {m.module for m in matrices} == expected
    for m in matrices:
        assert tuple(model.get_submodule(m.name).weight.shape) == m.shape


@pytest.mark.parametrize("path, expected", [
    ("self_attn.q_proj", "q"), ("self_attention.query_key_value", "qkv"), ("self_attention.dense", "o"),
    ("mlp.dense", "down"), ("attn.c_proj", "o"), ("mlp.c_proj", "down"), ("mlp.dense_h_to_4h", "up"),
    ("block_sparse_moe.experts.3.w1", "gate"), ("mlp.shared_expert.down_proj", "down"), ("mixer.in_proj", "in_proj"),
])
def test_module_types(path, expected):
    assert module_type(path) == expected


def test_bad_model_inputs(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        load_model(str(tmp_path / "file.bin"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="not a causal language model"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_model_dir("llama") / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(weightless))
