"""llama.cpp's side of bench/vs_llamacpp.py: the F16 source file, llama.cpp's own quantizer
at its presets (with an importance matrix through ``params.imatrix``), and measuring any
GGUF in llama.cpp against the F16 file's next-token distributions."""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from coalora_edge.exporters.gguf import export as gguf_export
from coalora_edge.exporters.gguf.arch import Target
from coalora_edge.exporters.gguf.llamacpp import Artifact, llama_quantize, open_llama, runtime_logits
from coalora_edge.exporters.gguf.tensors import stored, write_model
from coalora_edge.exporters.gguf.vocab import read_vocab
from coalora_edge.model.loading import load_model
from coalora_edge.schemes.quantize import bits_per_weight, config_nbytes


# --- the F16 source and llama.cpp's presets ------------------------------------------------


def write_f16(model_dir: Path, out: Path) -> dict:
    """Every 2-D tensor in F16, vectors in F32, through the exporter's own tensor writer."""
    model = load_model(str(model_dir))
    target = Target.from_config(model.config)
    vocab = read_vocab(model_dir, model.config.vocab_size)
    tensors = [stored(target, name, "F16" if p.ndim == 2 else "F32", p.detach()) for name, p in model.named_parameters()]
    write_model(out, target, vocab, tensors, "F16 source")
    reader = gguf.GGUFReader(out)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    return {"file_bytes": out.stat().st_size, "tensor_bytes": tensor_bytes, "metadata_bytes": out.stat().st_size - tensor_bytes}


def quantize_preset(src: Path, dst: Path, preset: str, imatrix: dict[str, np.ndarray] | None) -> float:
    """llama.cpp's own quantizer at one preset (its default parameters); seconds."""
    started = time.perf_counter()
    llama_quantize(src, dst, preset, imatrix)
    return time.perf_counter() - started


def tensor_types(path: Path) -> dict[str, int]:
    """Elements per stored ggml type among the adapted matrices (blk.*, 2-D)."""
    counts: Counter = Counter()
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            counts[t.tensor_type.name] += int(t.n_elements)
    return dict(counts)


def embedding_type(path: Path) -> str:
    return next(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")


# --- measuring in llama.cpp ----------------------------------------------------------------


class Reference:
    """The F16 file's log-probabilities on the evaluation blocks, to measure KL against."""

    def __init__(self, f16: Path, blocks: torch.Tensor, threads: int):
        self.blocks, self.threads = blocks, threads
        self.logp = []
        with open_llama(Artifact.find(f16), n_ctx=blocks.shape[1], threads=threads) as llm:
            for block in blocks:
                self.logp.append(torch.log_softmax(runtime_logits(llm, block.tolist()), dim=-1))  # (T, V)
        self.f16 = self.measure_logp(self.logp)

    def measure_logp(self, logps) -> dict:
        nll, kl, top1, count = 0.0, 0.0, 0, 0
        for block, lp, ref in zip(self.blocks, logps, self.logp):
            nll -= lp[:-1].gather(1, block[1:, None]).double().sum().item()
            kl += (ref.exp() * (ref - lp)).sum(-1)[:-1].double().sum().item()
            top1 += (lp[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum().item()
            count += len(block) - 1
        return {"perplexity": math.exp(nll / count), "kl": kl / count, "top1": top1 / count, "tokens": count}

    def measure(self, path: Path) -> dict:
        started = time.perf_counter()
        logps = []
        with open_llama(Artifact.find(path), n_ctx=self.blocks.shape[1], threads=self.threads) as llm:
            for block in self.blocks:
                logps.append(torch.log_softmax(runtime_logits(llm, block.tolist()), dim=-1))
        out = self.measure_logp(logps)
        out["file_bytes"] = Artifact.find(path).model.stat().st_size
        out["eval_seconds"] = time.perf_counter() - started
        return out


def measure_export(restored, config: dict[str, str], folder: Path, size: dict, ref: Reference, method: str,
                   rounding: str) -> tuple[dict, dict]:
    """Export ``config`` merged (one GGUF, ``rounding`` nearest or feedback) into ``folder``,
    measure it in llama.cpp at the preset ``size``, drop the file; the result row and the export report."""
    started = time.perf_counter()
    report = gguf_export.export(restored, config, folder, adapter_mode="merged", force=True, rounding=rounding)
    export_seconds = time.perf_counter() - started
    shapes = {m.name: m.shape for m in restored.bundle.matrices}
    row = {"method": method, "preset": size["preset"], "budget_bits": size["bits"], "rounding": rounding,
           "bits_per_weight": bits_per_weight(config_nbytes(restored.wrapper.scheme, shapes, config),
                                              sum(a * b for a, b in shapes.values())),
           "types": dict(Counter(report["stored"].values())), "export_seconds": export_seconds, **ref.measure(folder)}
    row["size_vs_preset"] = row["file_bytes"] / size["file_bytes"] - 1
    print(f"{method:>18} {size['preset']:>7}: {row['file_bytes'] / 1e6:7.2f} MB ({100 * row['size_vs_preset']:+.2f} %) "
          f"ppl {row['perplexity']:.3f} KL {row['kl']:.4f}", flush=True)
    for f in folder.glob("*.gguf"):
        f.unlink()
    return row, report
