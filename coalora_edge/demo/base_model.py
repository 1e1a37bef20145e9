"""The demo's own base model: a small Llama pretrained on text every Python install has.

Nothing is downloaded. The corpus is the docstrings of the Python standard library
(read with ``ast``, nothing imported), real English prose about real code. The
tokenizer is a byte-fallback BPE in the layout of Llama / TinyStories tokenizers, so the
GGUF exporter treats it like a user's Llama. Dimensions are multiples of 256, so every
ggml format (K-quants included) can hold every matrix, as in a real 1-8B model.

Pretraining is a fixed number of steps from a fixed seed, cached under a key of
everything that shapes the result (sizes, steps, corpus, library versions): later
runs load it in a second.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from coalora_edge.fileio import atomic_dir
from coalora_edge.model.synthetic import tiny_config
from coalora_edge.training.data import load_blocks, read_source

#: stdlib folders that are tests, GUIs or vendored code rather than documented modules
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip"})
MIN_DOCSTRING = 80  # characters: one-liners teach little
VALID_FRACTION = 0.1  # the held-out tail, as `train` splits it (TrainJob.valid_fraction)


@dataclass(frozen=True)
class DemoModelSpec:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    vocab: int = 1024
    seq_len: int = 128
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    def key(self, data: Sequence[str]) -> str:
        """Everything that shapes the pretrained model: sizes, steps, the data, the libraries."""
        import tokenizers
        import transformers

        parts = [json.dumps(asdict(self)), *(hashlib.sha256(d.encode()).hexdigest() for d in data),
                 torch.__version__, transformers.__version__, tokenizers.__version__]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def stdlib_corpus() -> str:
    """Docstrings of the standard library's modules, classes and functions, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING:
                    docs.append(doc)
    return "\n\n".join(docs)


def train_tokenizer(text: str, vocab_size: int):
    """A Llama-style byte-fallback BPE ("▁" for spaces, <0xNN> byte tokens, <s> </s> <unk>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", add_bos_token=True)


def pretrain(spec: DemoModelSpec, data: Sequence[str], out: Path, on_step: Callable[[int, float], None] | None = None) -> None:
    """Train tokenizer and model from scratch on ``data`` (files); write a Hugging Face folder to ``out``.

    The model never sees the tail of the data that ``train`` and ``eval`` hold out (the
    same :func:`load_blocks` split), so the demo's perplexities are on unseen text.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    texts = [doc for source in data for doc in read_source(source)]
    tokenizer = train_tokenizer("\n\n".join(texts), spec.vocab)
    blocks = load_blocks(tokenizer, data, spec.seq_len, VALID_FRACTION).train  # (n, T)
    config = tiny_config("llama", hidden=spec.hidden, layers=spec.layers, heads=spec.heads, kv_heads=spec.kv_heads,
                         intermediate=spec.intermediate, vocab=len(tokenizer), context=4 * spec.seq_len)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, spec.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, spec.steps) / spec.steps)))
    g = torch.Generator().manual_seed(spec.seed)
    model.train()
    for step in range(spec.steps):
        ids = blocks[torch.randint(len(blocks), (spec.batch_size,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step:
            on_step(step + 1, loss.item())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "demo_model.json").write_text(json.dumps({"spec": asdict(spec), "final_loss": loss.item(),
                                                     "data": [str(d) for d in data],
                                                     "python": sys.version.split()[0]}, indent=2))


def model_folder(cache: Path, spec: DemoModelSpec, data: Sequence[str]) -> Path:
    """Where the model pretrained by ``spec`` on ``data`` is cached (it may not exist yet)."""
    texts = ["\n\n".join(read_source(source)) for source in data]
    return Path(cache) / f"demo-base-{spec.key(texts)}"


def build(folder: Path, spec: DemoModelSpec, data: Sequence[str], on_step: Callable[[int, float], None] | None = None) -> None:
    """Pretrain into ``folder`` atomically: a killed run leaves no half-written model behind."""
    with atomic_dir(folder, force=True) as tmp:
        pretrain(spec, data, tmp, on_step)
