"""llama.cpp's own chat on our GGUF exports: the file carries the model's chat template and
special tokens, llama-cpp-python's create_chat_completion formats a conversation with it
as transformers does and generates, and the README's llama.cpp snippets run as written."""

from __future__ import annotations

import shutil

import llama_cpp
import pytest
from transformers import AutoTokenizer

from conftest import demo_kind_exports, readme_snippet, run_snippet
from coalora_edge.exporters.gguf import export as gguf_export

pytestmark = pytest.mark.slow  # trains a bundle, exports in llama.cpp, runs snippets in subprocesses

VOCAB = 2048
CHOICES = ["Q4_0", "Q8_0"]  # 32-weight blocks: a 64-wide model holds them
#: a chat template over the tokenizer's own specials, as an instruct model's tokenizer_config has one
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me a story about a dog."}]


@pytest.fixture(scope="module")
def chat_exports(one_torch_thread, tiny_model_dir, own_text, tmp_path_factory):
    """(model folder, mode -> GGUF export) of a tiny trained Llama whose tokenizer has a chat template."""
    tiny = tiny_model_dir("llama", vocab=VOCAB, hidden=64, layers=2, heads=4, kv_heads=2)
    return demo_kind_exports(tmp_path_factory.mktemp("gguf-chat"), tiny, own_text, gguf_export.export, "gguf", CHOICES,
                             6.0, chat_template=CHAT_TEMPLATE)


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
