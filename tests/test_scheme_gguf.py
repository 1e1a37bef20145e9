"""The gguf scheme against the real runtimes: ggml, gguf-py, and llama.cpp's quantizer.

References: gguf-py's numpy (de)quantizers, written independently of ggml's C, and
``llama_model_quantize``, the function behind llama.cpp's ``llama-quantize`` tool.
"""

from __future__ import annotations


import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from coalora_edge.errors import SchemeError
from coalora_edge.schemes import get_scheme, ggml
from coalora_edge.schemes.gguf import FALLBACK, FORMATS, SCHEME, GGUFFormat
from coalora_edge.exporters.gguf.llamacpp import llama_quantize

ALL = list(FORMATS.values())
WITH_IMATRIX = [f for f in ALL if f.uses_imatrix]
SHAPE = (8, 512)  # a multiple of every block, two 256-superblocks per row

#: Bits per weight as llama.cpp documents them (RUNTIME_FACTS), independent of gguf-py's table.
DOCUMENTED_BPW = {
    "F16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K": 5.5, "Q5_0": 5.5,
    "Q4_1": 5.0, "Q4_K": 4.5, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25,
    "Q3_K": 3.4375, "Q2_K": 2.625,
}
#: Types gguf-py can quantize itself (it has no K- or IQ-quantizer).
GGUF_PY_QUANTIZES = ("F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def make_weight(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Gaussian weights with the awkward parts of real ones: outliers and zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    flat = w.view(-1)
    flat[torch.randint(w.numel(), (max(1, w.numel() // 200),), generator=g)] *= 100  # outliers
    w[0, :256] = 0  # a whole superblock of zeros: scale 0 must not divide by zero
    w[1, ::7] = 0
    w[2, 5] = -3.0  # a lone extreme value that sets its block's scale
    return w


def make_imatrix(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(1.5 * torch.randn(n, generator=g))  # positive, spread over decades


def as_bytes(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(shape)


def test_registry_returns_this_scheme():
    assert get_scheme("gguf") is SCHEME
    assert SCHEME.choices() == ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")


@pytest.mark.parametrize("fmt", ALL, ids=repr)
def test_sizes_match_ggml_and_documentation(fmt):
    blocks = fmt.quantize(make_weight(SHAPE))
    assert fmt.nominal_bits_per_weight == DOCUMENTED_BPW[fmt.name]
    assert fmt.nbytes(SHAPE) == blocks.nbytes == SHAPE[0] * ggml.row_size(fmt.type, SHAPE[1])
    assert blocks.dtype == np.uint8 and blocks.shape[0] == SHAPE[0]
    assert fmt.bits_per_weight(SHAPE) == fmt.nominal_bits_per_weight
    assert fmt.fields == {"type": fmt.name}


@pytest.mark.parametrize(
    "fmt,use_imatrix",
    [(f, False) for f in ALL] + [(f, True) for f in WITH_IMATRIX],
    ids=lambda p: repr(p) if isinstance(p, GGUFFormat) else ("imatrix" if p else "plain"),
)
def test_roundtrip_equals_gguf_py_dequantize(fmt, use_imatrix):
    w = make_weight(SHAPE)
    imatrix = make_imatrix(SHAPE[1]) if use_imatrix else None
    ours = fmt.roundtrip(w, imatrix)
    reference = gguf.quants.dequantize(fmt.quantize(w, imatrix), fmt.type)
    assert ours.dtype == torch.float32 and ours.shape == w.shape and ours.device == w.device
    assert np.array_equal(ours.numpy(), reference)
    assert not torch.equal(ours, w)  # it really quantized (F16 too: randn is not fp16-exact)


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_quantize_bytes_equal_gguf_py(name):
    fmt = FORMATS[name]
    w = make_weight(SHAPE)
    ours = fmt.quantize(w)
    assert np.array_equal(ours, as_bytes(gguf.quants.quantize(w.numpy(), fmt.type), ours.shape))


@pytest.mark.parametrize("use_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("fmt", ALL, ids=repr)
def test_threaded_chunks_equal_one_ggml_call(fmt, use_imatrix):
    shape = (300, 512)  # several chunks of uneven size
    assert shape[0] * shape[1] > 2 * ggml.MIN_CHUNK_WEIGHTS
    w = make_weight(shape).numpy()
    imatrix = make_imatrix(shape[1]).numpy() if use_imatrix else None
    threaded = ggml.quantize(fmt.type, w, imatrix, threads=4)
    assert np.array_equal(threaded, ggml.quantize_chunk(fmt.type, w, imatrix))


@pytest.mark.parametrize("fmt", ALL, ids=repr)
def test_imatrix_reaches_ggml_exactly_where_it_matters(fmt):
    w = make_weight(SHAPE).numpy()
    plain = ggml.quantize(fmt.type, w)
    weighted = ggml.quantize(fmt.type, w, make_imatrix(SHAPE[1]).numpy())
    # Formats that claim uses_imatrix must change; the others must be truly unaffected.
    assert np.array_equal(plain, weighted) != fmt.uses_imatrix


@pytest.mark.parametrize("fmt", [f for f in ALL if not f.uses_imatrix], ids=repr)
def test_imatrix_refused_where_ggml_ignores_it(fmt):
    with pytest.raises(SchemeError, match="imatrix=None"):
        fmt.roundtrip(make_weight(SHAPE), make_imatrix(SHAPE[1]))


def test_type_that_requires_an_imatrix_refuses_to_run_without_one():
    fmt = GGUFFormat("IQ2_XXS")  # not offered by the scheme, but ggml requires an imatrix for it
    w = make_weight((4, 256))
    with pytest.raises(SchemeError, match="importance matrix"):
        fmt.roundtrip(w)
    imatrix = make_imatrix(256)
    assert np.array_equal(
        fmt.roundtrip(w, imatrix).numpy(), gguf.quants.dequantize(fmt.quantize(w, imatrix), fmt.type)
    )


def test_bad_inputs_raise_instead_of_aborting_in_ggml():
    q4k = FORMATS["Q4_K"]
    with pytest.raises(SchemeError, match="multiple of 256"):
        q4k.roundtrip(make_weight((16, 96)))
    with pytest.raises(SchemeError, match="one value per input column"):
        q4k.roundtrip(make_weight(SHAPE), make_imatrix(SHAPE[1] - 1))
    with pytest.raises(SchemeError, match="NaN"):
        q4k.roundtrip(make_weight(SHAPE), torch.full((SHAPE[1],), float("nan")))


@pytest.mark.parametrize(
    "chosen,shape,stored",
    [
        ("Q4_K", (16, 512), "Q4_K"),
        ("Q4_K", (16, 96), "Q5_0"),
        ("Q5_K", (16, 96), "Q5_1"),
        ("Q6_K", (16, 96), "Q8_0"),
        ("Q2_K", (16, 96), "Q4_0"),
        ("Q3_K", (16, 96), "Q4_0"),
        ("IQ4_XS", (16, 96), "IQ4_NL"),
        ("Q4_K", (16, 80), "F16"),  # Q5_0's block does not divide 80 either
        ("IQ4_XS", (16, 80), "F16"),
        ("Q8_0", (16, 80), "F16"),  # a 32-block type goes straight to F16
        ("Q4_0", (16, 48), "F16"),
    ],
    ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else None,
)
def test_fallback_follows_llama_cpp(chosen, shape, stored):
    fmt = SCHEME.storage(chosen, shape)
    assert fmt.name == stored
    w = make_weight(shape)
    assert fmt.roundtrip(w).shape == w.shape


def test_every_large_block_type_has_a_fallback():
    # llama.cpp throws ("no tensor type fallback") for a block > 32 type missing from its table.
    assert all(f.name in FALLBACK for f in ALL if f.block > 32)
    assert all(t in FORMATS for t in FALLBACK.values())


# --- llama.cpp's own quantizer writes the same bytes ---------------------------------

N_EMBD = 512
N_FF = (96, 80)  # per layer: ffn_down rows that need one fallback, and two (-> F16)
BLOCKS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")


def _tensor_shapes() -> dict[str, tuple[int, int]]:
    shapes = {"token_embd.weight": (32, N_EMBD)}
    for layer, n_ff in enumerate(N_FF):
        for m in BLOCKS:
            shapes[f"blk.{layer}.{m}.weight"] = (n_ff, N_EMBD) if m in ("ffn_gate", "ffn_up") else (N_EMBD, N_EMBD)
        shapes[f"blk.{layer}.ffn_down.weight"] = (N_EMBD, n_ff)
    return shapes


SHAPES = _tensor_shapes()
#: Every format once on a row of 512, plus two K-quants on ffn_down that must fall back.
CHOSEN = dict(zip([n for n in SHAPES if "ffn_down" not in n], FORMATS))
CHOSEN.update({"blk.0.ffn_down.weight": "Q4_K", "blk.1.ffn_down.weight": "Q6_K"})
assert len(CHOSEN) == len(SHAPES) and set(CHOSEN.values()) >= set(FORMATS)


def _write_f32_llama(path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(len(N_FF))
    w.add_feed_forward_length(list(N_FF))
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    n_vocab = SHAPES["token_embd.weight"][0]
    w.add_token_list([f"<t{i}>" for i in range(n_vocab)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * n_vocab)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    for layer in range(len(N_FF)):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(N_EMBD, dtype=np.float32))
    for seed, (name, shape) in enumerate(SHAPES.items()):
        w.add_tensor(name, make_weight(shape, seed).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_quantize(src, dst, imatrix: bool) -> None:
    # any quantized preset: every tensor is overridden
    values = {n: make_imatrix(s[1], seed).numpy() for seed, (n, s) in enumerate(SHAPES.items())} if imatrix else None
    llama_quantize(src, dst, "Q8_0", values, overrides={name: FORMATS[chosen].type for name, chosen in CHOSEN.items()})


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "imatrix"])
def llama_cpp_quantized(request, tmp_path_factory):
    """(tensors of the GGUF llama.cpp quantized, whether it was given an imatrix)."""
    folder = tmp_path_factory.mktemp("llama")
    _write_f32_llama(folder / "f32.gguf")
    _llama_quantize(folder / "f32.gguf", folder / "q.gguf", request.param)
    reader = gguf.GGUFReader(str(folder / "q.gguf"))
    return {t.name: t for t in reader.tensors}, request.param


@pytest.mark.parametrize("name", list(SHAPES))
def test_llama_cpp_quantize_writes_our_bytes(llama_cpp_quantized, name):
    tensors, with_imatrix = llama_cpp_quantized
    seed = list(SHAPES).index(name)
    shape = SHAPES[name]
    fmt = SCHEME.storage(CHOSEN[name], shape)
    imatrix = make_imatrix(shape[1], seed) if with_imatrix and fmt.uses_imatrix else None
    ours = fmt.quantize(make_weight(shape, seed), imatrix)
    theirs = tensors[name]
    assert theirs.tensor_type == fmt.type
    assert np.array_equal(as_bytes(theirs.data, ours.shape), ours)
