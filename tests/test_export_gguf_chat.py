"""llama.cpp's own chat on our GGUF exports: the file carries the model's chat template and
special tokens, llama-cpp-python's create_chat_completion formats a conversation with it
as transformers does and generates, and the README's llama.cpp snippets run as written."""

from __future__ import annotations

import shutil

import llama_cpp
import pytest
from transformers import AutoTokenizer

from conftest import readme_snippet, run_snippet
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.demo.base_model import train_tokenizer
from coalora_edge.exporters.gguf import export as gguf_export
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains a bundle, exports in llama.cpp, runs snippets in subprocesses

VOCAB = 2048
CHOICES = ["Q4_0", "Q8_0"]  # 32-weight blocks: a 64-wide model holds them
#: a chat template over the tokenizer's own specials, as an instruct model's tokenizer_config has one
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me a story about a dog."}]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def chat_exports(tiny_model_dir, own_text, tmp_path_factory):
    """mode -> a GGUF export of a tiny trained Llama whose tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("gguf-chat")
    model = shutil.copytree(tiny_model_dir("llama", vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2), root / "llama")
    tokenizer = train_tokenizer(own_text.read_text()[:200_000], VOCAB)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    bundle = train_bundle(TrainJob(model=str(model), data=[str(own_text)], out=root / "bundle", scheme="gguf",
                                   seq_len=32, budgets=[6.0], choices=CHOICES, calib_blocks=4, eval_blocks=4,
                                   show_progress=False,
                                   settings=TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2)))
    restored = restore(load_bundle(bundle.path))
    config = {m.name: CHOICES[i % len(CHOICES)] for i, m in enumerate(restored.wrapper.matrices)}
    found = {}
    for mode in ("merged", "sidecar"):
        found[mode] = root / mode
        gguf_export.export(restored, config, found[mode], adapter_mode=mode)
    return model, found


@pytest.mark.parametrize("mode", ["merged", "sidecar"])
def test_create_chat_completion_uses_the_models_template(chat_exports, mode):
    model_dir, exports = chat_exports
    folder = exports[mode]
    adapter = folder / "adapter.gguf"
    llm = llama_cpp.Llama(model_path=str(folder / "model.gguf"), lora_path=str(adapter) if adapter.exists() else None,
                          n_ctx=256, n_threads=1, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert llm.chat_format == "chat_template.default"  # the file's template, not a guessed format
    reply = llm.create_chat_completion(messages=MESSAGES, max_tokens=16, temperature=0.0)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    # llama.cpp formatted the conversation into the tokens transformers' template gives
    expected = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert reply["usage"]["prompt_tokens"] == len(expected)
    assert llm.token_eos() == AutoTokenizer.from_pretrained(model_dir).eos_token_id


def test_readme_llamacpp_python_snippet(chat_exports, tmp_path):
    (tmp_path / "gguf-export").symlink_to(chat_exports[1]["sidecar"])  # it opens adapter.gguf too
    printed = run_snippet(readme_snippet("llama.cpp"), tmp_path)
    assert printed.strip(), printed


@pytest.mark.skipif(shutil.which("llama-completion") is None, reason="llama.cpp's llama-completion is not on PATH "
                    "(llama-cpp-python ships the library only)")
def test_readme_llamacpp_cli_snippet(chat_exports, tmp_path):
    (tmp_path / "gguf-export").symlink_to(chat_exports[1]["sidecar"])
    printed = run_snippet(readme_snippet("llama.cpp", "bash"), tmp_path, "bash")
    assert printed.count("Once upon a time") == 2, printed  # the completions echo their prompt
