"""ONNX exports in the tools users already run, unchanged: onnxruntime-genai's Model and
Generator (greedy tokens equal to `coalora-edge run`'s), and optimum's documented
ORTModelForCausalLM snippet, whose ``generate(**tokenizer(...))`` failed on token_type_ids.

The tiny Llama carries the demo's kind of tokenizer (demo/base_model.py), a plain
PreTrainedTokenizerFast: the kind whose default model_input_names include token_type_ids."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest
from transformers import AutoTokenizer

from conftest import demo_kind_exports, readme_snippet, run_snippet
from coalora_edge.exporters.common.tokenizer import DECODER_INPUTS
from coalora_edge.exporters.onnx import session as ort
from coalora_edge.exporters.onnx.export import MODEL_FILE, export
from coalora_edge.exporters.onnx.generate import generate, text_decoder
from coalora_edge.exporters.onnx.genai import CONFIG_FILE

pytestmark = pytest.mark.slow  # trains a bundle, exports in ONNX Runtime, runs snippets in subprocesses

#: optimum's snippet generates to max_length=20 tokens in all: its prompt must take fewer
VOCAB = 2048
CHOICES = ["int2_b32_asym", "int4_b32_asym", "int8_b32_asym"]
PROMPT = "Once upon a time"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exports(one_torch_thread, tiny_model_dir, own_text, tmp_path_factory):
    """mode -> the folder of an ONNX export of a tiny trained Llama, merged and sidecar."""
    tiny = tiny_model_dir("llama", vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2)
    return demo_kind_exports(tmp_path_factory.mktemp("onnx-stack"), tiny, own_text, export, "onnx", CHOICES, 4.5,
                             threads=1)[1]


def _genai_greedy(folder, prompt_ids: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]


@pytest.mark.parametrize("mode", ["merged", "sidecar"])
def test_genai_generates_what_coalora_run_does(exports, mode):
    folder = exports[mode]
    assert json.loads((folder / "export.json").read_text())["files"][CONFIG_FILE]  # listed, so `run` checks it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # transformers' ids: onnxruntime-extensions' tokenizer splits this BPE differently (and adds no BOS)
    prompt_ids = tokenizer(PROMPT).input_ids
    tokens = _genai_greedy(folder, prompt_ids, NEW_TOKENS)
    expected = ort.greedy(ort.open_session(folder / MODEL_FILE, 1), prompt_ids, NEW_TOKENS, tokenizer.eos_token_id)
    # genai leaves the end-of-sequence token out of the sequence; our runner returns it (measured on SmolLM2)
    assert tokens == (expected[:-1] if expected[-1:] == [tokenizer.eos_token_id] else expected), (tokens, expected)
    text = generate(folder, PROMPT, max_tokens=NEW_TOKENS, threads=1)  # what `coalora-edge run` prints
    decode = text_decoder(tokenizer)  # as `run` decodes
    assert decode(prompt_ids + tokens)[len(decode(prompt_ids)):] == text


def test_genai_readme_snippet(exports, tmp_path):
    (tmp_path / "onnx-export").symlink_to(exports["sidecar"])
    printed = run_snippet(readme_snippet("ONNX Runtime GenAI"), tmp_path)
    assert PROMPT in printed and len(printed.strip()) > len(PROMPT) + 8, printed


def test_optimum_documented_snippet(exports, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(exports["merged"])
    assert list(tokenizer(PROMPT, return_tensors="pt")) == list(DECODER_INPUTS)  # no token_type_ids
    (tmp_path / "onnx-export").symlink_to(exports["merged"])
    # as written: it exits 0 only if generate(**inputs) ran (its result is an expression, as in a doctest)
    run_snippet(readme_snippet("optimum (ONNX Runtime from transformers)"), tmp_path)
