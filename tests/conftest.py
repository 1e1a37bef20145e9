"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent) and
tiny models built from configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coalora_edge.model.synthetic import build_tiny_model

OWN_TEXT_CHARS = 300_000
SHARED = Path(os.environ.get("COALORA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
README = Path(__file__).resolve().parents[1] / "README.md"


def shared_asset(relative: str) -> Path:
    path = SHARED / "assets" / relative
    if not path.exists():
        pytest.skip(f"{path} not found: real-model tests need the project's shared/ folder beside the checkout "
                    "(or COALORA_SHARED pointing at it)")
    return path


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
    return shared_asset("models/TinyStories-656K")


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return shared_asset("text/tinystories_dev.txt")


@pytest.fixture(scope="session")
def own_text(tmp_path_factory) -> Path:
    """English prose that needs no ../shared: docstrings of Python's standard library."""
    from coalora_edge.demo.base_model import stdlib_corpus

    path = tmp_path_factory.mktemp("own-text") / "stdlib-docstrings.txt"
    path.write_text(stdlib_corpus()[:OWN_TEXT_CHARS])
    return path


@pytest.fixture(scope="session")
def own_model(own_text, tmp_path_factory) -> Path:
    """A Llama built by the session, with a tokenizer: TinyStories-656K's shapes (hidden 128,
    2 layers, 8 heads, 4 KV heads, MLP 384) and a byte-fallback BPE, pretrained briefly on
    ``own_text``. For the invariants that hold for any trained-from-text model."""
    from coalora_edge.demo.base_model import DemoModelSpec, build

    spec = DemoModelSpec(hidden=128, layers=2, heads=8, kv_heads=4, intermediate=384, vocab=512, seq_len=64,
                         steps=30, batch_size=8, lr=3e-3)
    folder = tmp_path_factory.mktemp("own-model") / "llama"
    build(folder, spec, [str(own_text)])
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Build (once per session) a tiny model folder of the given architecture."""
    built: dict[tuple, Path] = {}

    def build(arch: str = "llama", **sizes) -> Path:
        key = (arch, tuple(sorted(sizes.items())))
        if key not in built:
            built[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **sizes)
        return built[key]

    return build


@pytest.fixture(scope="session")
def small_bundle(own_model, own_text, tmp_path_factory) -> Path:
    """A valid gguf bundle of ``own_model``, trained for two steps (about 4 s): for tests that
    only need some bundle (bad input, fuzzing), never for results. Needs no ../shared."""
    from coalora_edge.bundle.store import train_bundle
    from coalora_edge.training.job import TrainJob
    from coalora_edge.training.trainer import TrainSettings

    out = tmp_path_factory.mktemp("small-bundle") / "bundle"
    train_bundle(TrainJob(model=str(own_model), data=[str(own_text)], out=out, scheme="gguf", seq_len=32,
                 budgets=[4.5, 8.5], calib_blocks=4, eval_blocks=4, show_progress=False,
                 settings=TrainSettings(steps=2, batch_size=4, rank=4, alpha=8, lr=1e-2)))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models on small shared machines: a second thread only waits
    (OpenMP's spinning threads slow them tenfold when another process holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def readme_snippet(heading: str, lang: str = "python") -> str:
    """The first ```lang block under the README's ``### heading``: the user's snippet, which
    tests run as written (only the folder names it opens are made to exist)."""
    text = README.read_text()
    start = text.find(f"\n### {heading}\n")
    if start < 0:
        raise LookupError(f"README.md has no section '### {heading}'")
    found = re.search(rf"```{lang}\n(.*?)```", text[start:], re.S)
    if found is None:
        raise LookupError(f"README.md's '### {heading}' has no {lang} block")
    return found.group(1)


def run_snippet(code: str, cwd: Path, lang: str = "python", timeout: float = 600) -> str:
    """Run ``code`` in a fresh process in ``cwd`` (one thread); its stdout, or fail with its stderr. A tiny
    random model may print bytes that are not UTF-8: they are replaced."""
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-c", code]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=timeout)
    assert done.returncode == 0, f"the README's snippet failed:\n{code}\n{done.stderr[-3000:]}"
    return done.stdout


def demo_kind_exports(root: Path, tiny_llama: Path, text: Path, exporter, scheme: str, choices: list[str],
                      budget: float, chat_template: str | None = None, **options) -> tuple[Path, dict[str, Path]]:
    """A copy of ``tiny_llama`` with the demo's kind of tokenizer (demo/base_model.py: a plain
    PreTrainedTokenizerFast, byte-fallback BPE), trained on ``text`` for a few steps, and its
    merged and sidecar exports by ``exporter`` of one configuration cycling ``choices``:
    (model folder, {mode: export folder})."""
    from coalora_edge.bundle.restore import restore
    from coalora_edge.bundle.store import load_bundle, train_bundle
    from coalora_edge.demo.base_model import train_tokenizer
    from coalora_edge.training.job import TrainJob
    from coalora_edge.training.trainer import TrainSettings

    model = shutil.copytree(tiny_llama, root / "llama")
    tokenizer = train_tokenizer(text.read_text()[:200_000], json.loads((model / "config.json").read_text())["vocab_size"])
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(model)
    bundle = train_bundle(TrainJob(model=str(model), data=[str(text)], out=root / "bundle", scheme=scheme, seq_len=32,
                                   budgets=[budget], choices=choices, calib_blocks=4, eval_blocks=4, show_progress=False,
                                   settings=TrainSettings(steps=4, batch_size=4, rank=4, alpha=8, lr=1e-2)))
    restored = restore(load_bundle(bundle.path))
    config = {m.name: choices[i % len(choices)] for i, m in enumerate(restored.wrapper.matrices)}
    for mode in ("merged", "sidecar"):
        exporter(restored, config, root / mode, adapter_mode=mode, **options)
    return model, {mode: root / mode for mode in ("merged", "sidecar")}
