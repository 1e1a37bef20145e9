"""Export a trained configuration to llama.cpp (GGUF), and prove the files compute it.

    OUT/model.gguf     the base architecture with its tokenizer; the adapted matrices in
                       the configuration's ggml types, the rest in resolve/non_adapted.py's
      merged:            W + s B'A quantized with ggml (one self-contained file), to
                         nearest or (--rounding feedback) for the layers' outputs
      sidecar:           W quantized exactly as in training (the same bytes), and
    OUT/adapter.gguf   the configuration's collapsed LoRA (A, B') in F32, which llama.cpp
                       adds at run time: it computes what was trained
    OUT/export.json    bundle, profile, configuration, sizes, verification figures

Verification loads the files in llama.cpp (CPU) and compares next-token distributions on
fixed prompts and about 512 positions of calibration text (exporters/common/calibration.py)
with two PyTorch models: the *artifact* (the very values the files hold, dequantized by
ggml) and the *trained* model. llama.cpp rounds activations to 8 bits and keeps an F16 KV
cache, so the artifact comparison is statistical: its mean KL, and its top-1 agreement
where the top token is not a near-tie, must stay within thresholds measured on correct
exports, or the export fails
and leaves nothing behind. Folding (merged) re-quantizes ``W + s B'A``, which loses some
of what the adapter learned: it is measured in PyTorch against the trained model and
reported, with a warning to ship sidecar when it undoes much of the adapter.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import CoaloraError, ExportError, SchemeError
from coalora_edge.exporters.common.report import (
    ADAPTER_MODES, DECISIVE_MARGIN, Check, agreement, agreement_checks, check_resources, expected_sizes, fold_figures,
    header, keep, logits, memory_check, memory_figures, trained_logits,
)
from coalora_edge.exporters.common import merge
from coalora_edge.exporters.common.calibration import verification_ids
from coalora_edge.exporters.gguf import llamacpp
from coalora_edge.exporters.gguf.arch import Target
from coalora_edge.exporters.gguf.tensors import (
    RUNTIME, Stored, adapted_tensors, hf_parameters, lora_tensors, other_tensors, write_adapter, write_model,
)
from coalora_edge.exporters.gguf.vocab import read_vocab
from coalora_edge.fileio import atomic_dir
from coalora_edge.profiles import DeviceProfile
from coalora_edge.resolve.resolver import predicted_decode_ratio
from coalora_edge.schemes.quantize import Configuration

#: fixed prompts of ordinary text, so that the folding loss is measured where it matters
VERIFY_PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "Tom had a big red ball. One day, the ball rolled into the garden and he ran after it.",
    "The cat sat on the mat and looked at the bird. The bird sang a happy song.",
)
VERIFY_MAX_TOKENS = 64
#: llama.cpp against the artifact's exact PyTorch values: mean KL per position, and top-1
#: agreement at the decisive positions (report.DECISIVE_MARGIN), measured on correct exports
#: over the prompts and calibration text (560-670 positions), both adapter modes:
#:   SmolLM2-135M, no adapter, 4.5-6 bits                  KL 4.7e-3, decisive top-1 1.0 (410 positions)
#:   TinyStories-656K (legacy 32-blocks, rows of 128)        KL 6.5e-4, decisive top-1 1.0 (334)
#:   tiny random Llama/Qwen2/Mistral/Qwen3                   KL 5e-7 .. 1.5e-5, decisive top-1 1.0 (0-106)
#: (all positions: top-1 0.96-0.999, where 66 positions once gave 0.833 on a correct SmolLM2
#: export) and, over the prompts alone, TinyStories-656K without the q/k row permutation:
#: KL 0.67, top-1 0.65.
MAX_KL = 0.02
MIN_TOP1 = 0.95


@dataclass(frozen=True)
class Tensors:
    """Everything the files hold."""

    adapted: list[Stored]
    other: list[Stored]
    lora: list[Stored]  # sidecar only


def check_request(restored: Restored, adapter_mode: str) -> None:
    if restored.bundle.scheme != "gguf":
        raise SchemeError(f"bundle {restored.bundle.path} holds {restored.bundle.scheme} formats; llama.cpp runs gguf bundles")
    if adapter_mode not in ADAPTER_MODES:
        raise CoaloraError(f"unknown adapter mode {adapter_mode!r}; choose one of: {', '.join(ADAPTER_MODES)}")
    if adapter_mode == "sidecar" and restored.wrapper.method == "none":
        raise CoaloraError("this bundle was trained with --method none: it has no LoRA to ship beside the model; export merged")


def build(restored: Restored, target: Target, config: Configuration, adapter_mode: str,
          calibration: torch.Tensor | None) -> Tensors:
    wrapper = restored.wrapper
    return Tensors(
        # method none has nothing to fold: its merged file is the quantized base
        adapted=adapted_tensors(target, restored, config, merged=adapter_mode == "merged" and wrapper.method != "none",
                                calibration=calibration),
        other=other_tensors(target, wrapper),
        lora=lora_tensors(target, wrapper, config) if adapter_mode == "sidecar" else [],
    )


def export(restored: Restored, config: Configuration, out: Path, *, adapter_mode: str = "merged",
           profile: DeviceProfile | None = None, force: bool = False, rounding: str | None = None,
           calibration: Path | None = None, prompts: Sequence[str] = VERIFY_PROMPTS) -> dict[str, Any]:
    """Write and verify ``OUT/model.gguf`` (+ ``adapter.gguf``) and ``export.json``; its content is returned.

    ``rounding`` of a merged file (exporters/common/merge.py): ``nearest`` (the default) or
    ``feedback``; ``calibration`` text for feedback (default: the training data)."""
    started = time.perf_counter()
    check_request(restored, adapter_mode)
    rounding = merge.checked_rounding(restored, adapter_mode, rounding, calibration)
    check_resources(restored, config, out, "gguf", RUNTIME, sidecar=adapter_mode == "sidecar")
    restored.use(config)
    model = restored.wrapper.model
    target = Target.from_config(model.config)
    vocab = read_vocab(restored.model_dir, model.config.vocab_size)
    blocks = merge.calibration_blocks(restored, calibration) if rounding == "feedback" else None
    tensors = build(restored, target, config, adapter_mode, blocks)
    name = f"{Path(restored.bundle.path).name} ({adapter_mode})"
    with atomic_dir(out, force=force) as tmp:
        artifact = llamacpp.Artifact(tmp / llamacpp.MODEL_FILE, tmp / llamacpp.ADAPTER_FILE if tensors.lora else None)
        write_model(artifact.model, target, vocab, tensors.adapted + tensors.other, name)
        if artifact.adapter:
            write_adapter(artifact.adapter, target, tensors.lora, restored.wrapper.alpha, name)
        written = time.perf_counter()
        sizes = check_sizes(restored, config, artifact)
        verification = verify(restored, tensors, artifact, adapter_mode, prompts, calibration)
        memory = memory_figures(restored, profile, adapter_mode, weights=sizes["expected"]["adapted"],
                                non_adapted=sizes["model_tensor_bytes"] - sizes["expected"]["adapted"],
                                lora=sizes["adapter_tensor_bytes"])
        report = {
            **header("gguf", RUNTIME, restored, config, adapter_mode, profile, artifact.files()),
            "rounding": rounding,
            "stored": {t.hf_name.removesuffix(".weight"): t.type for t in tensors.adapted},
            "sizes": sizes, "memory": memory, "verification": verification,
            # predicted from the measured kernel costs, as the resolver does (search/speed.py)
            "decode": {"predicted_ratio": predicted_decode_ratio(restored.bundle, config, profile),
                       "min_ratio": profile.min_decode_ratio if profile else None},
            "warnings": [w for w in [(verification["fold"] or {}).get("warning")] if w],
            "seconds": {"write": written - started, "verify": time.perf_counter() - written},
        }
        return keep(tmp, out, report, _checks(verification, sizes, memory))


def check_sizes(restored: Restored, config: Configuration, artifact: llamacpp.Artifact) -> dict[str, Any]:
    """The files' tensor bytes against the resolver's arithmetic (same functions)."""
    expected = expected_sizes(restored, config, RUNTIME, sidecar=artifact.adapter is not None)
    model_tensors = sum(t.n_bytes for t in llamacpp.read_gguf(artifact.model).tensors)
    adapter_tensors = sum(t.n_bytes for t in llamacpp.read_gguf(artifact.adapter).tensors) if artifact.adapter else 0
    model_file = artifact.model.stat().st_size
    return {
        "expected": expected,
        "model_tensor_bytes": model_tensors,
        "adapter_tensor_bytes": adapter_tensors,
        "model_file_bytes": model_file,
        "metadata_bytes": model_file - model_tensors,  # header, tokenizer, alignment padding
        "matches": model_tensors == expected["adapted"] + expected["non_adapted"] and adapter_tensors == expected["sidecar"],
    }


@contextlib.contextmanager
def as_artifact(restored: Restored, tensors: Tensors, adapter_mode: str, adapted_only: bool = False) -> Iterator[None]:
    """Inside: the PyTorch model computes with exactly the values the files hold
    (``adapted_only``: only the adapted matrices' values, the rest as trained)."""
    wrapper = restored.wrapper
    params = hf_parameters(wrapper)
    others = [] if adapted_only else tensors.other
    saved = {t.hf_name: params[t.hf_name].data for t in others}
    stored = {t.hf_name.removesuffix(".weight"): t for t in tensors.adapted}
    quantized = {name: layer.quantized for name, layer in wrapper.layers.items()}
    try:
        for t in others:
            p = params[t.hf_name]
            p.data = t.dequantized().reshape(p.shape).to(p.dtype)
        if adapter_mode == "merged":
            for name, layer in wrapper.layers.items():
                layer.quantized = stored[name].dequantized().to(layer.quantized.dtype)
        with wrapper.without_adapter() if adapter_mode == "merged" else contextlib.nullcontext():
            yield
    finally:
        for name, data in saved.items():
            params[name].data = data
        for name, layer in wrapper.layers.items():
            layer.quantized = quantized[name]


def verify(restored: Restored, tensors: Tensors, artifact: llamacpp.Artifact, adapter_mode: str,
           prompts: Sequence[str], calibration: Path | None = None) -> dict[str, Any]:
    """Next-token agreement of llama.cpp with the artifact and the trained model on the
    prompts and calibration text, what the stored values and folding lose, and whether
    llama.cpp tokenizes the prompts as transformers does."""
    wrapper, tokenizer = restored.wrapper, restored.tokenizer
    ids, text_blocks = verification_ids(restored, prompts, calibration, VERIFY_MAX_TOKENS)
    reader = llamacpp.read_gguf(artifact.model)
    unspellable = sorted({c for p in prompts for c in llamacpp.unencodable(reader, p)})
    if unspellable:
        raise ExportError(f"the model's vocabulary cannot spell {''.join(unspellable)!r}; verify with other prompts")
    sequences = [torch.tensor([i]) for i in ids]
    trained, quantized = trained_logits(restored, sequences)
    with as_artifact(restored, tensors, adapter_mode, adapted_only=True):
        folded = logits(wrapper, sequences)
    with as_artifact(restored, tensors, adapter_mode):
        simulated = logits(wrapper, sequences)
    with llamacpp.open_llama(artifact, n_ctx=max(map(len, ids))) as llm:
        runtime = torch.cat([llamacpp.runtime_logits(llm, i) for i in ids])
        tokenizer_agrees = all(llm.tokenize(p.encode(), add_bos=True, special=False) == tokenizer(p)["input_ids"]
                               for p in prompts)
        loaded = llamacpp.model_bytes(llm)
    adapter_effect = agreement(trained, quantized)
    return {
        "prompts": len(prompts), "calibration_blocks": text_blocks,
        "runtime_vs_artifact": agreement(simulated, runtime).as_dict(),
        "runtime_vs_trained": agreement(trained, runtime).as_dict(),
        "artifact_vs_trained": agreement(trained, simulated).as_dict(),
        "adapter_effect_kl": adapter_effect.kl,  # trained vs the same configuration without adapter
        # method none folds nothing: what its rounding costs is artifact_vs_trained
        "fold": fold_figures(agreement(trained, folded), adapter_effect)
        if adapter_mode == "merged" and wrapper.method != "none" else None,
        "tokenizer_agrees": tokenizer_agrees,
        "loaded_model_bytes": loaded,
        "thresholds": {"max_kl": MAX_KL, "min_top1": MIN_TOP1, "decisive_margin": DECISIVE_MARGIN},
    }


def _checks(verification: dict[str, Any], sizes: dict[str, Any], memory: dict[str, Any] | None) -> list[Check]:
    return [
        *agreement_checks("llama.cpp", verification["runtime_vs_artifact"], MAX_KL, MIN_TOP1),
        (verification["tokenizer_agrees"], "llama.cpp tokenizes the verification prompts differently from transformers"),
        (sizes["matches"], f"tensor bytes {sizes['model_tensor_bytes']} + {sizes['adapter_tensor_bytes']} differ from "
                           f"the expected {sizes['expected']}"),
        (verification["loaded_model_bytes"] == sizes["model_tensor_bytes"],
         f"llama.cpp loaded {verification['loaded_model_bytes']} bytes of weights, the file holds {sizes['model_tensor_bytes']}"),
        memory_check(memory),
    ]
