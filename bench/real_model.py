"""The setting of bench/vs_llamacpp.py: the model, the texts, the presets and format
choices compared, and the small I/O helpers its parts share."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from coalora_edge.fileio import atomic_write_json
from coalora_edge.model.loading import load_tokenizer

from assets import SHARED

CACHE = Path(os.environ.get("COALORA_CACHE", Path.home() / ".cache" / "coalora-edge"))
MODEL = CACHE / "assets" / "SmolLM2-135M-Instruct"
TRAIN_TEXT = SHARED / "text" / "tinystories_dev.txt"
EVAL_TEXT = SHARED / "text" / "tinyshakespeare.txt"
RESULTS = Path(__file__).parent / "results"
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
#: the configuration space of our side: the default K-quant ladder plus the 4-bit
#: non-linear types (Q4_1 left out: the weights were dequantized from Q4_1)
CHOICES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "IQ4_NL")
DEFAULT_CHOICES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
#: bytes kept free under each preset's size for alignment padding differences
SIZE_MARGIN = 16 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tokenizer_of(model_dir: Path):
    return load_tokenizer(model_dir, json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def save(path: Path, result: dict) -> None:
    """Results are rewritten after every part: atomically, so a killed run keeps the last whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
