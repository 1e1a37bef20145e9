"""`coalora-edge demo`: the whole story on a model it builds itself, nothing downloaded.

    base model      a small Llama pretrained on the standard library's docstrings
                    (base_model.py, cached), or the user's --model / --data
    train           two CoA-LoRA bundles, one per runtime's formats (gguf, onnx),
                    with the Pareto search
    pareto          each bundle's front, plotted
    resolve         the configuration each demo device runs (profiles written as YAML)
    export          each device's files, verified in its runtime by the exporter
    measure         perplexity in PyTorch and in the runtime, a greedy sample
    report          report.md and report.json

Every step calls the same functions as the CLI commands, so the report's numbers are
what `train`, `resolve`, `export` and `run` give. Artifacts are written atomically one by
one; a demo that fails removes its partial output folder (the cached base model stays).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from coalora_edge.bundle.restore import Restored, restore
from coalora_edge.bundle.store import Bundle, PARETO, load_bundle, train_bundle
from coalora_edge.bundle.summary import summary, write_plot
from coalora_edge.demo.base_model import VALID_FRACTION, DemoModelSpec, build, model_folder, stdlib_corpus
from coalora_edge.demo.report import markdown
from coalora_edge.fileio import atomic_write_bytes, atomic_write_json, build_in_place
from coalora_edge.model.evaluate import lm_score
from coalora_edge.profiles import DeviceProfile, load_profile
from coalora_edge.progress import LoggedProgress
from coalora_edge.resolve.resolver import Resolver
from coalora_edge.runtimes import export_formats, get_runtime
from coalora_edge.schemes.quantize import bits_per_weight
from coalora_edge.search.rounds import SearchSettings
from coalora_edge.training.data import load_blocks
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings, progress_bar

DEFAULT_PROMPT = "Return a new"  # how many of the corpus' docstrings begin
RESERVED_BYTES = 1 << 20  # the demo devices' stand-in for an OS and host application


@dataclass(frozen=True)
class DemoDevice:
    """A make-believe device whose memory leaves about ``bits`` per adapted weight."""

    name: str
    runtime: str
    bits: float
    adapter_mode: str


DEVICES = (
    DemoDevice("llamacpp-small", "llama.cpp", 3.0, "sidecar"),
    DemoDevice("llamacpp-medium", "llama.cpp", 4.5, "merged"),
    DemoDevice("llamacpp-large", "llama.cpp", 6.5, "merged"),
    DemoDevice("onnx-small", "onnxruntime", 3.0, "sidecar"),
    DemoDevice("onnx-large", "onnxruntime", 5.0, "merged"),
)


@dataclass(frozen=True)
class DemoPlan:
    """How much work each step does; ``full`` fits about 10 minutes on 2 cores, ``quick`` 2."""

    base: DemoModelSpec
    steps: int  # CoA-LoRA optimizer steps per bundle
    batch_size: int
    seq_len: int
    eval_blocks: int  # held-out blocks every configuration and every export is measured on
    search_rounds: int
    ladder_step: float  # bits per weight between the ladder's budgets
    sample_tokens: int
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3


PLANS = {
    "full": DemoPlan(DemoModelSpec(), steps=150, batch_size=8, seq_len=128, eval_blocks=16, search_rounds=3,
                     ladder_step=0.25, sample_tokens=40),
    "quick": DemoPlan(DemoModelSpec(layers=2, steps=120, batch_size=8), steps=16, batch_size=4, seq_len=64,
                      eval_blocks=4, search_rounds=1, ladder_step=1.0, sample_tokens=16),
}


@dataclass
class DemoJob:
    """Inputs of one demo and the timings it collects."""

    plan: DemoPlan
    out: Path
    cache: Path
    model: str | None = None
    data: list[str] = field(default_factory=list)
    prompt: str = DEFAULT_PROMPT
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started
        return result


def default_cache() -> Path:
    """Where the pretrained base model is kept between runs (next to the environment)."""
    return Path(os.environ.get("COALORA_CACHE", Path.home() / ".cache" / "coalora-edge")) / "demo"


def corpus_file(cache: Path) -> Path:
    """The standard library's docstrings as one text file, named by its content."""
    import hashlib

    text = stdlib_corpus()
    path = cache / f"stdlib-docstrings-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode())
    return path


def device_profile(device: DemoDevice, resolver: Resolver, n_weights: int) -> DeviceProfile:
    """``device`` as a profile whose memory is what ``device.bits`` per weight needs on it, or
    the bundle's smallest configuration where that is more (a --model whose rows make
    llama.cpp fall back from 2- and 3-bit K-quants to 4-bit types)."""
    draft = DeviceProfile(name=device.name, runtime=device.runtime, memory_bytes=1 << 40, reserved_bytes=RESERVED_BYTES,
                          context_length=256, adapter_mode=device.adapter_mode, threads=1)
    weights = max(int(device.bits * n_weights / 8), resolver.space.smallest(None))
    needed = resolver.breakdown(draft, weights_bytes=weights).total
    return draft.model_copy(update={
        "memory_bytes": -(-needed // 1024) * 1024,
        "notes": f"Not a real device: the demo sized its memory for about {bits_per_weight(weights, n_weights):.2f} bits per adapted weight.",
    })


def write_profile(profile: DeviceProfile, path: Path) -> Path:
    """The profile as the YAML a user would write (and loaded back through the same parser)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, yaml.safe_dump(profile.model_dump(exclude_none=True), sort_keys=False).encode())
    return path


def train(job: DemoJob, base: str, data: Sequence[str], scheme: str) -> Bundle:
    p = job.plan
    out = job.out / f"bundle-{scheme}"
    train_bundle(TrainJob(
        model=base, data=list(data), out=out, scheme=scheme, seq_len=p.seq_len, valid_fraction=VALID_FRACTION,
        eval_blocks=p.eval_blocks, ladder_step=p.ladder_step,
        settings=TrainSettings(steps=p.steps, batch_size=p.batch_size, rank=p.rank, alpha=p.alpha, lr=p.lr),
        search=SearchSettings(mode="pareto", rounds=p.search_rounds),
    ))
    return load_bundle(out)


def bundle_summary(job: DemoJob, bundle: Bundle) -> dict[str, Any]:
    """The bundle's front and search figures, and its plot."""
    s = summary(bundle)
    plot = job.out / f"pareto-{bundle.scheme}.png"
    write_plot(plot, bundle.read_json(PARETO)["evaluations"], s, [])
    training = bundle.manifest.training
    return {
        "scheme": bundle.scheme, "path": bundle.path.name, "plot": plot.name, "steps": training.settings["steps"],
        "training_set": training.configs, "evaluated": s["evaluated"], "hypervolume": (s["hypervolume"] or {}).get("value"),
        "search_share": s["search_share"], "unquantized_perplexity": s["unquantized"]["perplexity"],
        "front": [{"bits_per_weight": e["bits_per_weight"], "perplexity": e["perplexity"]} for e in s["front"]],
    }


def ship(job: DemoJob, device: DemoDevice, restored: Restored, resolver: Resolver, blocks: torch.Tensor) -> dict[str, Any]:
    """Resolve, export and measure one device; the report's row for it."""
    n_weights = sum(r * c for r, c in (m.shape for m in restored.bundle.matrices))
    profile = load_profile(write_profile(device_profile(device, resolver, n_weights),
                                         job.out / "profiles" / f"{device.name}.yaml"))
    resolution = resolver.resolve(profile)
    folder = job.out / "exports" / device.name
    runtime = get_runtime(profile.runtime)
    exporter = runtime.hook("exporter")
    exported = job.timed("export", lambda: exporter.export(restored, resolution.config, folder,
                                                           adapter_mode=profile.adapter_mode, profile=profile))
    restored.use(resolution.config)
    with torch.no_grad():
        pytorch = lm_score(restored.wrapper, blocks).perplexity
        with restored.wrapper.without_adapter():
            no_adapter = lm_score(restored.wrapper, blocks).perplexity
    in_runtime = job.timed("measure", lambda: runtime.hook("perplexity")(folder, blocks, threads=None))
    text = job.timed("measure", lambda: "".join(runtime.hook("stream")(folder, job.prompt, job.plan.sample_tokens)))
    return {
        "device": device.name, "runtime": profile.runtime, "adapter_mode": profile.adapter_mode,
        "profile": f"profiles/{device.name}.yaml", "export": f"exports/{device.name}",
        "memory_bytes": profile.memory_bytes, "source": resolution.source,
        "bits_per_weight": resolution.bits_per_weight, "weights_bytes": resolution.nbytes,
        "formats": dict(Counter(resolution.stored.values())), "memory_total": resolution.memory.total,
        "headroom": resolution.headroom, "fits": resolution.memory.fits,
        "files": {name: f["bytes"] for name, f in exported["files"].items()},
        "sizes_match": exported["sizes"]["matches"], "tensor_bytes": exported["sizes"]["expected"],
        "perplexity": {"pytorch_no_adapter": no_adapter, "pytorch": pytorch, "runtime": in_runtime,
                       "predicted_by_resolver": resolution.perplexity},
        "verification": {k: v for k, v in exported["verification"].items() if k.endswith(("_vs_trained", "_vs_artifact"))}, "warnings": exported["warnings"], "sample": {"prompt": job.prompt, "text": text},
    }


def make_demo(job: DemoJob, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every step into ``job.out`` (which must not exist); returns report.json's content."""
    started = time.perf_counter()
    progress("base model")
    data = job.data or [str(corpus_file(job.cache))]
    base, cached = job.model, True
    if base is None:
        spec = job.plan.base
        folder = model_folder(job.cache, spec, data)
        cached = (folder / "config.json").exists()
        if not cached:
            bar, advance = progress_bar(spec.steps, spec.batch_size * spec.seq_len, label="pretraining")
            with bar:
                job.timed("base model", lambda: build(folder, spec, data, advance))
        base = str(folder)
    bundles: dict[str, Bundle] = {}
    for scheme in export_formats():
        progress(f"CoA-LoRA training with the Pareto search, {scheme} formats")
        bundles[scheme] = job.timed(f"train {scheme}", lambda: train(job, base, data, scheme))
    progress("Pareto fronts, resolving and exporting for each device")
    rows, summaries = [], {}
    bar = LoggedProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = bar.add_task("devices", total=len(DEVICES))
    with bar:
        for scheme, bundle in bundles.items():
            summaries[scheme] = bundle_summary(job, bundle)
            restored = restore(bundle)
            blocks = load_blocks(restored.tokenizer, data, job.plan.seq_len, VALID_FRACTION).valid[: job.plan.eval_blocks]
            resolver = Resolver.from_bundle(bundle)
            for device in DEVICES:
                if get_runtime(device.runtime).scheme == scheme:
                    bar.update(task, description=f"resolve, export, verify, measure: {device.name}")
                    rows.append(ship(job, device, restored, resolver, blocks))
                    bar.advance(task)
    job.seconds["total"] = time.perf_counter() - started
    report = {
        "plan": next((name for name, plan in PLANS.items() if plan == job.plan), "custom"), "settings": asdict(job.plan),
        "base_model": {"path": base, "cached": cached, "pretrained_by_demo": job.model is None,
                       **_base_facts(Path(base))},
        "data": data, "eval_blocks": job.plan.eval_blocks, "seq_len": job.plan.seq_len,
        "bundles": summaries, "devices": rows, "seconds": job.seconds, "machine": machine(),
    }
    atomic_write_json(job.out / "report.json", report)
    atomic_write_bytes(job.out / "report.md", markdown(report).encode())
    return report


def _base_facts(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    facts = {k: config.get(k) for k in keys}
    pretrained = folder / "demo_model.json"
    if pretrained.exists():
        facts["pretraining"] = json.loads(pretrained.read_text())
    return facts


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def demo(plan: DemoPlan, out: Path, *, model: str | None = None, data: Sequence[str] = (), prompt: str = DEFAULT_PROMPT,
         cache: Path | None = None, force: bool = False, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The demo into ``out``: built in place, removed again if anything fails."""
    with build_in_place(out, force=force) as folder:
        return make_demo(DemoJob(plan, folder, cache or default_cache(), model, list(data), prompt), progress)

