"""Export a trained configuration to ONNX Runtime, and prove the files compute it.

    OUT/model.onnx       optimum's text-generation-with-past graph of the fp32 base (KV
                         cache), each adapted MatMul replaced by MatMulNBits holding the
                         onnx scheme's codes, scales and zero points
      merged:  W + s B'A folded, then quantized in the chosen format: to nearest
               (default), or with error feedback for the layers' outputs
      sidecar: Q(W) exactly as trained, plus the collapsed LoRA as two fp32 MatMuls
    OUT/model.onnx_data  the weights, once they pass 2 GiB (protobuf's limit)
    OUT/config.json, generation_config.json, tokenizer files: optimum's ORTModelForCausalLM
                         loads the folder and generates
    OUT/genai_config.json  onnxruntime-genai's Model and Generator run the folder (genai.py)
    OUT/export.json      bundle, profile, configuration, sizes, verification figures

Verification reads the written model back. Its MatMulNBits initializers must equal the
scheme's packing byte for byte, and a copy at accuracy level 0 (where ORT dequantizes
exactly) must reproduce PyTorch's logits, through prefill and one cached decode step, to
float rounding; otherwise the export fails and leaves nothing behind. The shipped level
(4 by default: int8 activations, the only level at which 2- and 8-bit nodes decode as fast
as 4-bit ones) is compared statistically against thresholds. Folding (merged) re-quantizes
``W + s B'A``, which loses some of what the adapter learned: measured and reported.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import onnx
import torch

from coalora_edge.adapter.layer import fold
from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import ExportError, SchemeError
from coalora_edge.exporters.common import merge
from coalora_edge.exporters.common.calibration import verification_ids
from coalora_edge.exporters.common.exact import exact_figures
from coalora_edge.exporters.common.report import (
    ADAPTER_MODES, DECISIVE_MARGIN, Check, agreement, agreement_checks, check_resources, expected_sizes, fold_figures,
    header, keep, logits, memory_check, memory_figures, trained_logits,
)
from coalora_edge.exporters.common.tokenizer import keep_decoder_inputs
from coalora_edge.exporters.onnx import genai
from coalora_edge.exporters.onnx import session as ort
from coalora_edge.exporters.onnx.graph import (
    LoraBranch, find_adapted_matmuls, fuse_transposed_weights, initializer_bytes, nbits_nodes, quantize_matmul,
    set_accuracy_level, use_ms_domain,
)
from coalora_edge.fileio import atomic_dir
from coalora_edge.model.loading import load_model
from coalora_edge.profiles import DeviceProfile
from coalora_edge.runtimes import get_runtime
from coalora_edge.schemes.feedback import GroupQuantizer
from coalora_edge.schemes.onnx import BlockQuant, MatMulNBitsInitializers, OnnxFormat, dequantize, join, pack, quantize
from coalora_edge.schemes.quantize import Configuration

RUNTIME = "onnxruntime"
MODEL_FILE = get_runtime("onnxruntime").artifact
DATA_FILE = "model.onnx_data"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
#: protobuf cannot serialise a message of 2 GiB or more: larger models keep weights beside it
EXTERNAL_DATA_BYTES = 2**31 - 1
#: Level 0 against PyTorch: max |logit difference| / max |logit|, float rounding only.
#: Measured 2.8e-7 .. 9.9e-7 on correct exports (tiny Llama and Qwen2, TinyStories-656K,
#: both modes, uniform 2- and 4-bit and 2/4/8-bit sym/asym mixes); the same comparison
#: with the adapter left out of the reference gives 1e-3 and more.
EXACT_TOLERANCE = 1e-5
#: The shipped level against the same PyTorch model (mean KL per position, top-1 at the
#: decisive positions, report.DECISIVE_MARGIN), measured at level 4 on the same exports over
#: the prompts and calibration text (545-670 positions): TinyStories-656K KL 9e-4 .. 2.6e-3,
#: decisive top-1 1.0 (295-326 positions); tiny random Llama/Qwen2 KL 1e-7 .. 5e-6, decisive
#: top-1 1.0 (0-102 positions: their distributions are nearly flat).
MAX_KL = 0.02
MIN_TOP1 = 0.95
#: Ordinary text, so that the folding loss is measured where it matters.
VERIFY_PROMPTS = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun.",
    "Tom had a big red ball. One day, the ball rolled into the garden and he ran after it.",
)


@dataclass(frozen=True)
class Planned:
    """What one adapted matrix becomes in the file."""

    fmt: OnnxFormat
    quant: BlockQuant  # of the base weight (sidecar) or of the folded one (merged)
    lora: LoraBranch | None  # sidecar only

    @cached_property  # written into the graph, then compared with what the file holds
    def packed(self) -> MatMulNBitsInitializers:
        return pack(self.quant)


def plan(restored: Restored, config: Configuration, adapter_mode: str,
         calibration: torch.Tensor | None = None) -> dict[str, Planned]:
    """Every adapted matrix's quantization (and side-car branch) for ``config``; merged with
    ``calibration`` blocks: rounded with error feedback (exporters/common/merge.py)."""
    wrapper = restored.wrapper
    lora = wrapper.collapsed_lora(config) if wrapper.method != "none" else {}
    if adapter_mode == "sidecar" and not lora:
        raise SchemeError("this bundle was trained with --method none: it has no LoRA to keep as a side-car; export merged")
    if calibration is not None:
        formats = {m.name: wrapper.scheme.storage(config[m.name], m.shape) for m in wrapper.matrices}
        parts = merge.feedback_rounded(restored, config, formats, {n: _group_quantizer(f) for n, f in formats.items()},
                                       calibration)
        return {n: Planned(formats[n], join(p), None) for n, p in parts.items()}
    planned = {}
    for m in wrapper.matrices:
        fmt = wrapper.scheme.storage(config[m.name], m.shape)
        weight = wrapper.layers[m.name].base_layer.weight.detach().float()  # (out, in)
        branch = None
        if m.name in lora:
            A, B = lora[m.name]  # (r, in), (out, r)
            if adapter_mode == "merged":
                weight = fold(weight, A, B, wrapper.scaling)
            else:
                branch = LoraBranch(A.T.float().contiguous().numpy(), (wrapper.scaling * B).T.float().contiguous().numpy())
        planned[m.name] = Planned(fmt, quantize(weight, fmt), branch)
    return planned


def _group_quantizer(fmt: OnnxFormat) -> GroupQuantizer:
    def quantize_group(columns: torch.Tensor, first: int) -> tuple[BlockQuant, torch.Tensor]:
        quant = quantize(columns, fmt)
        return quant, dequantize(quant)

    return quantize_group


def export(
    restored: Restored,
    config: Configuration,
    out: Path,
    *,
    adapter_mode: str = "merged",
    profile: DeviceProfile | None = None,
    force: bool = False,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    rounding: str | None = None,
    calibration: Path | None = None,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    threads: int = 0,
) -> dict[str, Any]:
    """Write and verify ``OUT`` (see the module docstring); returns export.json's content.
    ``rounding``/``calibration`` as for GGUF (exporters/common/merge.py); ``threads`` 0 lets
    ONNX Runtime choose."""
    started = time.perf_counter()
    _check_options(restored, adapter_mode, accuracy_level)
    rounding = merge.checked_rounding(restored, adapter_mode, rounding, calibration)
    check_resources(restored, config, out, "onnx", RUNTIME, sidecar=adapter_mode == "sidecar")
    restored.use(config)
    blocks = merge.calibration_blocks(restored, calibration) if rounding == "feedback" else None
    planned = plan(restored, config, adapter_mode, blocks)
    plain = load_model(str(restored.model_dir))  # the fp32 base, plain nn.Linear layers
    token_ids, text_blocks = verification_ids(restored, VERIFY_PROMPTS, calibration)
    ids = [torch.tensor([i]) for i in token_ids]
    with atomic_dir(out, force=force) as tmp:
        _export_fp32(plain, restored.tokenizer, tmp)
        model = onnx.load(str(tmp / MODEL_FILE))
        keep_decoder_inputs(tmp)  # optimum's generate(**tokenizer(...)) refuses token_type_ids
        genai.write_config(tmp, model, MODEL_FILE, plain.config, restored.tokenizer)  # the graph's names stay
        sites = find_adapted_matmuls(model, {n: l.base_layer.weight.detach().float().numpy()
                                             for n, l in restored.wrapper.layers.items()})
        use_ms_domain(model)
        fuse_transposed_weights(model)
        for name, p in planned.items():
            quantize_matmul(model.graph, name, sites[name], p.fmt, p.packed, p.quant.in_features, accuracy_level, p.lora)
        weights_bytes = initializer_bytes(model)
        save_model(model, tmp, external_data_bytes)
        del model
        written = time.perf_counter()
        trained, quantized = trained_logits(restored, ids)
        reference = trained if adapter_mode == "sidecar" else _folded_logits(plain, planned, ids)
        verification, shipped = verify(tmp, planned, ids, reference, accuracy_level, threads)
        verification.update(prompts=len(VERIFY_PROMPTS), calibration_blocks=text_blocks)
        verification["runtime_vs_trained"] = agreement(trained, shipped).as_dict()
        verification["fold"] = (fold_figures(agreement(trained, reference), agreement(trained, quantized))
                                if adapter_mode == "merged" and restored.wrapper.method != "none" else None)
        sizes = check_sizes(restored, config, adapter_mode, weights_bytes, tmp)
        expected = sizes["expected"]
        memory = memory_figures(restored, profile, adapter_mode, weights=expected["adapted"], lora=expected["sidecar"],
                                non_adapted=sizes["initializer_bytes"] - expected["adapted"] - expected["sidecar"])
        report = {
            **header("onnx", RUNTIME, restored, config, adapter_mode, profile, sorted(tmp.iterdir())),
            "accuracy_level": accuracy_level,
            "rounding": rounding,
            "stored": {name: p.fmt.name for name, p in planned.items()},
            "sizes": sizes, "memory": memory, "verification": verification,
            "warnings": _warnings(planned, verification, sizes, accuracy_level),
            "seconds": {"write": written - started, "verify": time.perf_counter() - written},
        }
        return keep(tmp, out, report, _checks(verification, sizes, memory))


def _check_options(restored: Restored, adapter_mode: str, accuracy_level: int) -> None:
    if restored.bundle.scheme != "onnx":
        raise SchemeError(f"bundle {restored.bundle.path} holds {restored.bundle.scheme} formats, which ONNX Runtime "
                          "does not compute; export it as gguf, or train with --scheme onnx")
    if adapter_mode not in ADAPTER_MODES:
        raise SchemeError(f"unknown adapter mode {adapter_mode!r}; choose one of: {', '.join(ADAPTER_MODES)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise SchemeError(f"MatMulNBits accuracy level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")


def _export_fp32(plain: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """optimum's export of the loaded model (optimum's own from_pretrained would hit the
    tied-embedding bug load_model works around): graph, config, generation config, tokenizer."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        # The tracer's notes on Python branches in transformers' mask and cache code, and
        # torch's on exporting index ops: true of any trace, and verify() checks this one.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        onnx_export_from_model(plain, folder, task="text-generation-with-past", do_validation=False,
                               preprocessors=[tokenizer])
    if not (folder / MODEL_FILE).exists():
        raise ExportError(f"optimum wrote no {MODEL_FILE} (files: {sorted(p.name for p in folder.iterdir())})")


def save_model(model: onnx.ModelProto, folder: Path, external_data_bytes: int) -> None:
    """``model.onnx``, with the weights in ``model.onnx_data`` once they pass the threshold."""
    for stale in folder.glob(f"{MODEL_FILE}*"):  # optimum's fp32 graph and its external data
        stale.unlink()
    external = initializer_bytes(model) > external_data_bytes
    onnx.save_model(model, str(folder / MODEL_FILE), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=DATA_FILE)


def _folded_logits(plain: torch.nn.Module, planned: Mapping[str, Planned], ids: list[torch.Tensor]) -> torch.Tensor:
    """What the merged file computes: the base with each weight replaced by its dequantized
    folded weight (``plain`` is modified; it has been exported already)."""
    with torch.no_grad():
        for name, p in planned.items():
            plain.get_submodule(name).weight.copy_(dequantize(p.quant))
    return logits(plain, ids)


def verify(folder: Path, planned: Mapping[str, Planned], ids: list[torch.Tensor], reference: torch.Tensor,
           accuracy_level: int, threads: int = 0) -> tuple[dict[str, Any], torch.Tensor]:
    """The written model in ONNX Runtime against ``reference`` ``(positions, V)``, what it
    should compute; raises ExportError unless it does at accuracy level 0. Returns the
    figures and the shipped level's logits."""
    model = onnx.load(str(folder / MODEL_FILE))
    _check_initializers(model, planned)
    set_accuracy_level(model, 0)
    with tempfile.TemporaryDirectory(dir=folder.parent) as copy:
        save_model(model, Path(copy), EXTERNAL_DATA_BYTES)
        del model
        exact = _runtime_logits(ort.open_session(Path(copy) / MODEL_FILE, threads), ids)
    exactness = exact_figures(reference, exact, EXACT_TOLERANCE, "ONNX Runtime at accuracy level 0",
                              "the PyTorch model")
    shipped = exact if accuracy_level == 0 else _runtime_logits(ort.open_session(folder / MODEL_FILE, threads), ids)
    figures = {
        "initializers_equal_scheme": True,
        "exact": exactness,
        "runtime_vs_artifact": agreement(reference, shipped).as_dict(),
        "thresholds": {"max_kl": MAX_KL, "min_top1": MIN_TOP1, "decisive_margin": DECISIVE_MARGIN},
    }
    return figures, shipped


def _runtime_logits(session: Any, ids: list[torch.Tensor]) -> torch.Tensor:
    """``(positions, V)``: each prompt through prefill and one cached decode step."""
    return torch.cat([torch.from_numpy(ort.logits_through_cache(session, i.numpy()))[0] for i in ids])


def _check_initializers(model: onnx.ModelProto, planned: Mapping[str, Planned]) -> None:
    """The file's MatMulNBits initializers are the scheme's packing, byte for byte."""
    found = nbits_nodes(model)
    if found.keys() != planned.keys():
        raise ExportError(f"the written model has MatMulNBits for {len(found)} matrices, expected {len(planned)}")
    for name, p in planned.items():
        packed = p.packed
        expected = {"b": packed.b, "scales": packed.scales, "zero_points": packed.zero_points}
        for role, array in found[name].items():
            want = expected[role]
            if want is None or array.dtype != want.dtype or array.shape != want.shape or array.tobytes() != want.tobytes():
                raise ExportError(f"{name}: the written MatMulNBits {role} differs from the scheme's packing")


def check_sizes(restored: Restored, config: Configuration, adapter_mode: str, weights: int,
                folder: Path) -> dict[str, Any]:
    """The file's ``weights`` (initializer bytes) against the resolver's arithmetic (same functions)."""
    expected = expected_sizes(restored, config, RUNTIME, sidecar=adapter_mode == "sidecar")
    files = sum(p.stat().st_size for p in folder.glob(f"{MODEL_FILE}*"))
    return {
        "expected": expected,
        "initializer_bytes": weights,
        "model_file_bytes": files,
        "graph_bytes": files - weights,  # nodes, names, shapes, protobuf framing
        "matches": weights == sum(expected.values()),
    }


def _warnings(planned: Mapping[str, Planned], verification: dict[str, Any], sizes: dict[str, Any],
              accuracy_level: int) -> list[str]:
    slow = sorted({p.fmt.bits for p in planned.values()} - {4})
    expected = sum(sizes["expected"].values())
    warnings = [
        (verification["fold"] or {}).get("warning"),
        (f"{'/'.join(map(str, slow))}-bit MatMulNBits nodes decode several times slower than 4-bit ones at accuracy "
         f"level {accuracy_level}; ship level 4 unless exact fp32 arithmetic matters more") if slow and accuracy_level < 4 else None,
        (f"the file holds {expected - sizes['initializer_bytes']:,} fewer weight bytes than counted: the ONNX exporter "
         "stored identical tensors once") if sizes["initializer_bytes"] < expected else None,
    ]
    return [w for w in warnings if w]


def _checks(verification: dict[str, Any], sizes: dict[str, Any], memory: dict[str, Any] | None) -> list[Check]:
    expected = sum(sizes["expected"].values())
    return [
        *agreement_checks("ONNX Runtime at the shipped level", verification["runtime_vs_artifact"], MAX_KL, MIN_TOP1),
        (sizes["initializer_bytes"] <= expected,
         f"the file holds {sizes['initializer_bytes']:,} bytes of weights, more than the {expected:,} counted"),
        memory_check(memory),
    ]
