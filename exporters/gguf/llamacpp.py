"""Running GGUF artifacts in llama.cpp (llama-cpp-python, CPU), for verification and `run`.

llama.cpp aborts the whole process on some malformed inputs instead of returning an
error, so everything that reaches it is checked first: the files are parsed with
gguf-py's reader (which also fails on tensors that run past the end), and prompt characters that a vocabulary
without byte tokens cannot encode are refused (llama.cpp's sentencepiece-style tokenizer
throws an uncaught C++ exception on them).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import gguf
import numpy as np
import torch

from coalora_edge.exporters.common.generation import new_tokens
from coalora_edge.errors import ExportError, RuntimeLibraryError
from coalora_edge.exporters.gguf.vocab import SPACE
from coalora_edge.runtimes import get_runtime

MODEL_FILE = get_runtime("llama.cpp").artifact
ADAPTER_FILE = "adapter.gguf"


@dataclass(frozen=True)
class Artifact:
    """A model GGUF and, for sidecar exports, the LoRA adapter GGUF llama.cpp applies."""

    model: Path
    adapter: Path | None

    @classmethod
    def find(cls, path: Path) -> Artifact:
        """A .gguf file (its folder's adapter.gguf applies) or a folder with model.gguf."""
        path = Path(path)
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise ExportError(f"{model} not found; pass a .gguf file or the folder `coalora-edge export` wrote")
        adapter = model.parent / ADAPTER_FILE
        return cls(model, adapter if adapter.is_file() and adapter != model else None)

    def files(self) -> list[Path]:
        return [self.model] + ([self.adapter] if self.adapter else [])


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Parse ``path`` completely, or raise ExportError (never let llama.cpp see a bad file)."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct/IndexError, numpy errors on damage
        raise ExportError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-export it") from None


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def unencodable(reader: gguf.GGUFReader, text: str) -> list[str]:
    """Characters of ``text`` llama.cpp's tokenizer would crash on for this vocabulary.

    A sentencepiece-style vocabulary spells unknown characters as byte tokens
    (``<0x41>``); one without byte tokens needs every character as a token of its own.
    """
    if field(reader, "tokenizer.ggml.model") != "llama":
        return []
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    if gguf.TokenType.BYTE in types:
        return []
    known = set(tokens)
    return sorted({c for c in text.replace(" ", SPACE) if c not in known})


def check_artifact(artifact: Artifact) -> gguf.GGUFReader:
    """Parse every file of the artifact; the model's reader is returned."""
    reader = read_gguf(artifact.model)
    if artifact.adapter:
        adapter = read_gguf(artifact.adapter)
        if field(adapter, "general.type") != gguf.GGUFType.ADAPTER:
            raise ExportError(f"{artifact.adapter} is not a LoRA adapter GGUF (general.type is not 'adapter')")
    if field(reader, "general.type") == gguf.GGUFType.ADAPTER:
        raise ExportError(f"{artifact.model} is a LoRA adapter, not a model; pass the model GGUF or its folder")
    return reader


@contextlib.contextmanager
def open_llama(artifact: Artifact, n_ctx: int, threads: int | None = 1, logits_all: bool = True) -> Iterator:
    """The artifact loaded in llama.cpp (the adapter applied at scale 1), closed on exit."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeLibraryError("running GGUF models needs llama-cpp-python; install it with `pip install llama-cpp-python`") from None
    check_artifact(artifact)
    try:
        with _quiet_stderr():
            llm = llama_cpp.Llama(
                model_path=str(artifact.model), lora_path=str(artifact.adapter) if artifact.adapter else None,
                n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                verbose=False,
            )
    except ValueError as e:  # llama.cpp refused the file: llama-cpp-python reports it as ValueError
        raise ExportError(f"llama.cpp cannot load {artifact.model}: {e}") from None
    try:
        yield llm
    finally:
        llm.close()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence llama.cpp's stderr: it logs LoRA buffer fallbacks and context warnings even when
    not verbose, in C (file descriptor 2) and through llama-cpp-python's log callback (Python's
    sys.stderr, which a caller may have replaced). Its real failures still reach the caller, as
    the ValueError llama-cpp-python raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            with contextlib.redirect_stderr(null):
                yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def runtime_logits(llm, ids: Sequence[int]) -> torch.Tensor:
    """llama.cpp's next-token logits ``(T, V)`` after each of ``ids`` (one prompt, from the start)."""
    llm.reset()
    llm.eval(list(ids))
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def model_bytes(llm) -> int:
    """Bytes of every tensor llama.cpp loaded for the model (its weights in memory)."""
    import llama_cpp

    return int(llama_cpp.llama_model_size(llm.model))


def stream(path: Path, prompt: str, max_tokens: int, threads: int | None = None) -> Iterator[str]:
    """Greedy continuation of ``prompt`` by the artifact at ``path`` (adapter applied if
    present), piece by piece as llama.cpp generates it; the files and prompt are checked before."""
    artifact = Artifact.find(path)
    reader = check_artifact(artifact)
    bad = unencodable(reader, prompt)
    if bad:
        raise ExportError(f"the model's vocabulary cannot spell {''.join(bad)!r} in the prompt; leave those characters out")
    key = f"{field(reader, 'general.architecture')}.context_length"
    trained = field(reader, key)
    if not isinstance(trained, int):
        raise ExportError(f"{artifact.model} records no {key}, which llama.cpp needs; re-export the model")
    # Room for the prompt (at most a token per byte, plus BOS) and the continuation.
    n_ctx = min(len(prompt.encode()) + 1 + max_tokens, trained)
    opened = contextlib.ExitStack()
    llm = opened.enter_context(open_llama(artifact, n_ctx=n_ctx, threads=threads, logits_all=False))
    try:
        budget = new_tokens(len(llm.tokenize(prompt.encode(), add_bos=True)), max_tokens, trained)
    except BaseException:
        opened.close()
        raise
    return _pieces(opened, llm, prompt, budget)


def _pieces(opened: contextlib.ExitStack, llm, prompt: str, budget: int) -> Iterator[str]:
    """llama.cpp's streamed completion; the model closes when it ends or is abandoned."""
    with opened:
        for chunk in llm.create_completion(prompt, max_tokens=budget, temperature=0.0, stream=True):
            yield chunk["choices"][0]["text"]


def generate(path: Path, prompt: str, max_tokens: int, threads: int | None = None) -> str:
    """The whole continuation of ``stream``."""
    return "".join(stream(path, prompt, max_tokens, threads))


def llama_quantize(src: Path, dst: Path, ftype: str, imatrix: Mapping[str, np.ndarray] | None = None,
                   overrides: Mapping[str, int] | None = None, threads: int = 2) -> None:
    """llama.cpp's own whole-file quantizer (what ``llama-quantize`` runs): ``src`` GGUF to
    ``dst`` at preset ``ftype`` ("Q4_K_M", "Q8_0", ...), with an importance matrix per
    tensor name and per-tensor ggml types (``overrides``: exact tensor name -> type id)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    # The ctypes arrays and the numpy buffers they point into must live until the call returns.
    values = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in (imatrix or {}).items()}
    if values:
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
        for e, (name, v) in zip(entries, values.items()):
            e.name, e.data, e.size = name.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        params.imatrix = entries
    if overrides:
        types = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for o, (name, type_id) in zip(types, overrides.items()):
            o.pattern, o.type = f"^{name.replace('.', '[.]')}$".encode(), type_id
        params.tt_overrides = types
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise ExportError(f"llama.cpp could not quantize {src} to {ftype}")
