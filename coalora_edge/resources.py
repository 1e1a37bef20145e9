"""Memory and disk a job needs, checked before it starts instead of failing halfway.

The estimates are pure functions of sizes, and lower bounds: they count the large
buffers a job is known to hold at once (named in each estimate), not every small one.
:func:`check` compares one with what the machine reports:

    memory   CPU: MemAvailable in /proc/meminfo, or the cgroup's limit less its use if
             that is less (containers); CUDA: the device's free memory
    disk     free bytes of the file system the output goes to

``COALORA_MEMORY_AVAILABLE`` and ``COALORA_DISK_FREE`` (bytes, or sizes such as 2GiB)
replace what the machine reports: for machines that report wrongly, and for tests.
Where nothing is reported (no /proc), the memory check is skipped.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Iterable, Mapping

from safetensors import SafetensorError, safe_open

from coalora_edge.errors import CoaloraError, ResourceError
from coalora_edge.fileio import existing_parent
from coalora_edge.units import format_size, parse_size

MEMORY_ENV = "COALORA_MEMORY_AVAILABLE"
DISK_ENV = "COALORA_DISK_FREE"
F32 = 4
#: Adam keeps a gradient and two moments beside each trained fp32 value
ADAM_COPIES = 4
#: fp32 logits, their log-softmax and its gradient over the whole batch: the largest
#: activations of a model with a big vocabulary
LOGIT_COPIES = 3
#: hidden-size activations each layer keeps per token for the backward pass (norms, q, k,
#: v, attention output, residuals; the MLP's are counted apart). Low on purpose: a bound.
LAYER_ACTIVATIONS = 8
#: per token and layer with --gradient-checkpointing: the layer input alone
CHECKPOINTED_ACTIVATIONS = 1


@dataclass(frozen=True)
class Need:
    """What a job needs at least: memory by part (bytes), and disk for its output."""

    what: str  # "training", "the gguf export": the start of the error message
    memory: Mapping[str, int] = field(default_factory=dict)
    disk: int = 0
    advice: str = ""  # how to need less

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.values())


# -- estimates ---------------------------------------------------------------------------------

def weight_count(model_dir: Path) -> int:
    """Parameters in a model folder's weight files, from the safetensors headers alone.

    A ``.bin`` file cannot be read without unpickling it: counted as fp16 values, its
    size over two, which is what most such checkpoints hold.
    """
    count = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                count += sum(prod(f.get_slice(key).get_shape()) for key in f.keys())
        except (SafetensorError, OSError):
            pass  # a damaged file: loading it reports the problem properly
    return count + sum(p.stat().st_size for p in Path(model_dir).glob("*.bin")) // 2


def load_need(source: str, params: int, dtype_bytes: int) -> Need:
    return Need(f"loading {source}", {"weights": params * dtype_bytes},
                advice="use a machine with more memory or a smaller model")


def training_need(*, adapted: int, shapes: Iterable[tuple[int, int]], rank: int, dtype_bytes: int, formats: int,
                  batch_tokens: int, hidden: int, intermediate: int, layers: int, vocab: int,
                  gradient_checkpointing: bool, table_entries: int = 0) -> Need:
    """What training holds beside the loaded model.

    Every (matrix, format) the training set visits stays dequantized in the base dtype
    (the quantization cache: switching configuration every step is then a look-up), so
    up to ``formats`` copies of the adapted weights. The ``table`` configuration model
    holds an (r, r) matrix per ``table_entries`` (matrix, format) pairs.
    """
    lora = rank * sum(out + inp for out, inp in shapes) + table_entries * rank * rank
    per_token_layer = (CHECKPOINTED_ACTIVATIONS * hidden if gradient_checkpointing
                       else LAYER_ACTIVATIONS * hidden + 3 * intermediate)
    return Need(
        "training",
        {
            "quantized copies of the adapted weights": formats * adapted * dtype_bytes,
            "adapter and optimizer": lora * F32 * ADAM_COPIES,
            "logits": batch_tokens * vocab * F32 * LOGIT_COPIES,
            "activations": batch_tokens * layers * per_token_layer * dtype_bytes,
        },
        # the checkpoint (adapter and Adam's two moments) and the bundle's adapter, side by side
        disk=lora * F32 * 4,
        advice="train fewer formats (--choices), a smaller --batch-size or --seq-len, or use --gradient-checkpointing",
    )


def export_need(fmt: str, *, params: int, adapted: int, artifact_bytes: int) -> Need:
    """What an export holds beside the restored fp32 model, and writes.

    Every exporter quantizes the configuration (one dequantized copy of the adapted
    weights) and loads what it wrote in the runtime to verify it. llama.cpp's
    verification also sets the whole model to the file's values (a second fp32 copy).
    ONNX export loads a second, plain fp32 model for optimum, whose fp32 graph is then
    loaded as well (and is on disk until replaced by the quantized one).
    """
    quantized = adapted * F32
    if fmt == "gguf":
        memory = {"quantized configuration": quantized, "tensors written": artifact_bytes,
                  "model with the file's values": params * F32, "llama.cpp": artifact_bytes}
        disk = artifact_bytes
    elif fmt == "peft":  # the plain model saved, then loaded again as users load it, with peft
        memory = {"quantized configuration": quantized, "plain fp32 model": params * F32,
                  "model loaded by peft": params * F32}
        disk = artifact_bytes
    else:
        memory = {"quantized configuration": quantized, "plain fp32 model": params * F32,
                  "fp32 ONNX graph": params * F32, "ONNX Runtime sessions": 2 * artifact_bytes}
        disk = params * F32 + 2 * artifact_bytes  # optimum's graph, then the model and its verification copy
    return Need(f"the {fmt} export", memory, disk, advice="use a machine with more memory or export a smaller model")


# -- what the machine has ----------------------------------------------------------------------

def _override(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise CoaloraError(f"{name}={value!r}: {e}") from None


def _meminfo_available() -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    value = fields.get("MemAvailable", "").split()
    return int(value[0]) * 1024 if value else None  # kB


def _cgroup_available() -> int | None:
    """cgroup v2: the limit less what the group uses ("max": no limit)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


def available_memory(device: str = "cpu") -> int | None:
    """Bytes a new allocation on ``device`` can take; None if the machine does not say."""
    override = _override(MEMORY_ENV)
    if override is not None:
        return override
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device).index)[0])  # index None: the current device
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return min(known) if known else None


def available_disk(out: Path) -> int:
    """Free bytes where ``out`` will be written (the nearest folder that exists)."""
    override = _override(DISK_ENV)
    return override if override is not None else shutil.disk_usage(existing_parent(out)).free


def check(need: Need, out: Path | None = None, device: str = "cpu") -> None:
    """Raise ResourceError if ``need`` exceeds the memory of ``device`` or the disk of ``out``."""
    memory = available_memory(device)
    if memory is not None and need.memory_bytes > memory:
        parts = " + ".join(f"{name} {format_size(n)}" for name, n in need.memory.items() if n)
        raise ResourceError(f"{need.what} needs at least {format_size(need.memory_bytes)} of memory ({parts}), "
                            f"{format_size(memory)} available; {need.advice}")
    if out is not None and need.disk:
        free = available_disk(out)
        if need.disk > free:
            raise ResourceError(f"{need.what} needs at least {format_size(need.disk)} of disk for {out}, "
                                f"{format_size(free)} free; free some space or write elsewhere")
