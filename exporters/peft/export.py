"""Export a trained configuration for PyTorch: Hugging Face PEFT's LoRA layout, beside the
base weights exactly as they were trained.

    OUT/adapter_config.json        PEFT's LoraConfig: the adapted matrices by full module name
                                   (target_modules), rank r, lora_alpha (PEFT's scaling
                                   alpha / r is ours), no dropout
    OUT/adapter_model.safetensors  the configuration's collapsed LoRA: lora_A = A (r, in),
                                   lora_B = B' = B M (out, r), fp32
    OUT/base/                      a Hugging Face model folder: every adapted weight as the
                                   trained model computed with it, Q_c(W) (quantized and
                                   dequantized in its format), the rest as loaded; the config,
                                   generation config and tokenizer
    OUT/export.json                bundle, configuration, files, verification figures

so that ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("OUT/base"), "OUT")``
computes ``x Q_c(W)^T + b + s x A^T B'^T``, the trained model at that configuration, in
PyTorch. Nothing is folded or re-quantized, so there is no rounding choice and no merged
mode: the base is dense fp32 (Q_c(W) has no packed PyTorch form), as large as the original.

Verification loads the folder the way a user does (transformers' own loader, then peft)
and compares its logits with the trained model's, with the adapter and without it (the
base alone must be Q_c(W)); both must agree to float rounding, or the export fails and
leaves nothing behind. ``base_model_name_or_path`` records where ``base/`` was written, for
peft's AutoPeftModelForCausalLM; it is stale once the folder moves, PeftModel's two-step
load is not.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from coalora_edge import resources
from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import RuntimeLibraryError, SchemeError
from coalora_edge.exporters.common.exact import exact_figures
from coalora_edge.exporters.common.report import header, keep, trained_logits
from coalora_edge.exporters.common.tokenizer import keep_decoder_inputs
from coalora_edge.fileio import atomic_dir, atomic_write_json, sha256_file
from coalora_edge.model.loading import load_model
from coalora_edge.profiles import DeviceProfile
from coalora_edge.resolve.memory import sidecar_bytes
from coalora_edge.schemes.quantize import Configuration

RUNTIME = "peft"
BASE_DIR = "base"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's state-dict prefix (PeftModel wraps the model as base_model.model)
PREFIX = "base_model.model."
#: max |logit difference| / max |logit| against the trained model: float rounding only (the
#: collapsed B' = B M is multiplied out once instead of per token). Measured 3.5e-7 .. 3.7e-7
#: on a tiny Llama (gguf scheme) and a tiny Qwen2 (onnx scheme) after 4 training steps, whose
#: adapters themselves move the logits by 1.2 .. 1.4 on that scale; the base alone: 0 (equal).
EXACT_TOLERANCE = 1e-5
VERIFY_PROMPTS = (
    "Once upon a time, a little bird lived in a tall tree by the river.",
    "The children went to the park. They played on the swings until the sun went down.",
)


def export(restored: Restored, config: Configuration, out: Path, *, adapter_mode: str = "sidecar",
           profile: DeviceProfile | None = None, force: bool = False, rounding: str | None = None,
           calibration: Path | None = None) -> dict[str, Any]:
    """Write and verify ``OUT`` (see the module docstring); returns export.json's content.
    ``profile`` is recorded only: PyTorch has no device memory model here."""
    started = time.perf_counter()
    _check_request(restored, adapter_mode, rounding, calibration)
    _check_resources(restored, out)
    restored.use(config)
    wrapper = restored.wrapper
    lora = wrapper.collapsed_lora(config)
    plain = load_model(str(restored.model_dir))  # the base with plain nn.Linear layers, to save
    with torch.no_grad():
        for name, layer in wrapper.layers.items():
            plain.get_submodule(name).weight.copy_(layer.quantized)  # Q_c(W) (out, in), as trained
    ids = [restored.tokenizer(p, return_tensors="pt").input_ids for p in VERIFY_PROMPTS]
    with atomic_dir(out, force=force) as tmp:
        plain.save_pretrained(tmp / BASE_DIR, safe_serialization=True)
        restored.tokenizer.save_pretrained(tmp / BASE_DIR)
        keep_decoder_inputs(tmp / BASE_DIR)  # generate(**tokenizer(...)) refuses token_type_ids
        del plain
        save_file({f"{PREFIX}{name}.lora_{part}.weight": t.float().contiguous()
                   for name, (A, B) in lora.items() for part, t in (("A", A), ("B", B))},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, adapter_config(restored, Path(out).absolute() / BASE_DIR))
        written = time.perf_counter()
        verification = verify(tmp, restored, ids)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        report = {
            **header("peft", RUNTIME, restored, config, "sidecar", profile, []),
            # paths relative to OUT: base/config.json and the adapter's files side by side
            "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
            "stored": {name: config[name] for name in wrapper.layers},
            "sizes": {"adapter_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
                      "base_bytes": sum(p.stat().st_size for p in files if p.parent.name == BASE_DIR)},
            "verification": verification, "warnings": [],
            "seconds": {"write": written - started, "verify": time.perf_counter() - written},
        }
        return keep(tmp, out, report, [])  # verify() raised already if anything differs


def adapter_config(restored: Restored, base: Path) -> dict[str, Any]:
    """PEFT's adapter_config.json for the wrapper's LoRA; peft fills the fields left out."""
    wrapper = restored.wrapper
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": wrapper.rank, "lora_alpha": wrapper.alpha, "lora_dropout": 0.0, "bias": "none",
        # full names: a short name ("q_proj") would also adapt same-named layers left out of training
        "target_modules": sorted(wrapper.layers), "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def verify(folder: Path, restored: Restored, ids: list[torch.Tensor]) -> dict[str, Any]:
    """The folder loaded as a user loads it against the trained model, with and without the
    adapter; raises ExportError unless both agree to float rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(folder / BASE_DIR)  # not load_model: what users call
    model = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        loaded = torch.cat([model(input_ids=i).logits[0].float() for i in ids])  # (positions, V)
        with model.disable_adapter():
            base_only = torch.cat([model(input_ids=i).logits[0].float() for i in ids])
    trained, quantized = trained_logits(restored, ids)
    return {"prompts": len(ids),
            "peft_vs_trained": exact_figures(trained, loaded, EXACT_TOLERANCE, "the PEFT model"),
            # the base alone must be Q_c(W): the adapter cannot be hiding a wrong base
            "base_vs_quantized": exact_figures(quantized, base_only, EXACT_TOLERANCE,
                                               "the PEFT model's base, adapter disabled,")}


def _check_request(restored: Restored, adapter_mode: str, rounding: str | None, calibration: Path | None) -> None:
    if importlib.util.find_spec("peft") is None:
        raise RuntimeLibraryError("--format peft verifies the folder with peft, which is not installed; "
                                  "pip install 'peft>=0.21'")
    if restored.wrapper.method == "none":
        raise SchemeError("this bundle was trained with --method none: it has no LoRA for PEFT to load; "
                          "export it as gguf or onnx")
    if restored.wrapper.merge_aware:
        raise SchemeError("this bundle was trained merge-aware: only a merged gguf/onnx file holds what it learned, "
                          "and PEFT applies the LoRA beside the base; export it as gguf or onnx")
    if adapter_mode != "sidecar":
        raise SchemeError(f"a PEFT export keeps the LoRA beside the base, for PEFT to apply (sidecar); got "
                          f"--adapter-mode {adapter_mode}: drop it, or export gguf/onnx for a merged file")
    if rounding is not None or calibration is not None:
        raise SchemeError("--rounding and --calibration choose how merged gguf/onnx files are re-quantized; a PEFT "
                          "export re-quantizes nothing: drop them")


def _check_resources(restored: Restored, out: Path) -> None:
    """Refuse an export the machine cannot hold or store, before anything is written."""
    wrapper = restored.wrapper
    params = sum(p.numel() for p in wrapper.model.parameters())
    lora = sidecar_bytes([m.shape for m in wrapper.matrices], wrapper.rank)
    resources.check(resources.export_need("peft", params=params, adapted=sum(m.numel for m in wrapper.matrices),
                                          artifact_bytes=params * resources.F32 + lora), out)

