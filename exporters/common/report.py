"""What every exporter shares around its runtime-specific part: the resource check before
anything is written, the bytes the files must hold, how next-token distributions are
compared, and ``export.json`` (written last, only when every check passed).

Thresholds stay with each exporter: they are measured per runtime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from coalora_edge import resources
from coalora_edge.bundle.restore import Restored
from coalora_edge.errors import VerificationError
from coalora_edge.fileio import atomic_write_json, sha256_file
from coalora_edge.model.dims import ModelDims
from coalora_edge.profiles import DeviceProfile
from coalora_edge.resolve.memory import estimate_memory, sidecar_bytes
from coalora_edge.resolve.non_adapted import base_bytes
from coalora_edge.schemes.quantize import Configuration, config_nbytes

REPORT_FILE = "export.json"
ADAPTER_MODES = ("merged", "sidecar")
#: Warn that folding undoes the adapter when it moves the trained distribution by more than
#: this fraction of what the adapter itself moves it (both KL from the trained model).
FOLD_WARN_FRACTION = 0.5
#: a check: whether it passed, and what to say if not
Check = tuple[bool, str]


def expected_sizes(restored: Restored, config: Configuration, runtime: str, sidecar: bool) -> dict[str, int]:
    """Tensor bytes of the files by part, from the resolver's arithmetic (the same functions)."""
    wrapper = restored.wrapper
    shapes = {m.name: m.shape for m in wrapper.matrices}
    return {
        "adapted": config_nbytes(wrapper.scheme, shapes, config),
        "non_adapted": base_bytes(wrapper.model, shapes, runtime),
        "sidecar": sidecar_bytes(shapes.values(), wrapper.rank) if sidecar else 0,
    }


def check_resources(restored: Restored, config: Configuration, out: Path, fmt: str, runtime: str,
                    sidecar: bool) -> None:
    """Refuse an export the machine cannot hold or store, before anything is written."""
    wrapper = restored.wrapper
    need = resources.export_need(
        fmt, params=sum(p.numel() for p in wrapper.model.parameters()),
        adapted=sum(m.numel for m in wrapper.matrices),
        artifact_bytes=sum(expected_sizes(restored, config, runtime, sidecar).values()),
    )
    resources.check(need, out)


#: a position is decisive when the reference's top token leads the next by this many nats
#: (log-probability): float-level differences between correct runtimes do not flip it
DECISIVE_MARGIN = 0.5


@dataclass(frozen=True)
class Agreement:
    """Next-token distributions of a runtime against a reference, over all positions."""

    kl: float  # mean KL(reference || runtime), nats
    kl_max: float
    top1: float  # share of positions whose most likely token agrees
    positions: int
    decisive_top1: float  # the same over the decisive positions (1.0 when there are none)
    decisive_positions: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def agreement(reference: torch.Tensor, runtime: torch.Tensor) -> Agreement:
    """Compare logits ``(..., V)`` position by position, softmax in fp64 so KL is not rounding."""
    ref = reference.reshape(-1, reference.shape[-1]).double()
    got = runtime.reshape(-1, runtime.shape[-1]).double()
    log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (positions,)
    agrees = ref.argmax(-1) == got.argmax(-1)
    top2 = log_p.topk(min(2, log_p.shape[-1]), dim=-1).values
    decisive = top2[:, 0] - top2[:, -1] >= DECISIVE_MARGIN
    return Agreement(float(kl.mean()), float(kl.max()), float(agrees.double().mean()), ref.shape[0],
                     float(agrees[decisive].double().mean()) if decisive.any() else 1.0, int(decisive.sum()))


def logits(model: torch.nn.Module, ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(positions, V)`` fp32 over every sequence of ``ids`` (each ``(1, T)``)."""
    with torch.no_grad():
        return torch.cat([model(input_ids=i).logits[0].float() for i in ids])


def trained_logits(restored: Restored, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained model's logits, and the same configuration's without the adapter."""
    trained = logits(restored.wrapper, ids)
    with restored.wrapper.without_adapter():
        return trained, logits(restored.wrapper, ids)


def fold_figures(fold: Agreement, adapter_effect: Agreement) -> dict[str, Any]:
    """What folding the adapter into the weights loses (folded vs trained), beside what the
    adapter changes at all (the same configuration without it vs trained)."""
    undoes = fold.kl > FOLD_WARN_FRACTION * adapter_effect.kl
    return {
        **fold.as_dict(), "adapter_effect_kl": adapter_effect.kl,
        "warning": (f"folding the adapter into the weights moves the model by {fold.kl:.3g} nats (KL), "
                    f"{fold.kl / max(adapter_effect.kl, 1e-30):.0%} of what the adapter itself changes; "
                    "export with --adapter-mode sidecar to run exactly what was trained") if undoes else None,
    }


def memory_figures(restored: Restored, profile: DeviceProfile | None, adapter_mode: str, *, weights: int,
                   non_adapted: int, lora: int) -> dict[str, Any] | None:
    """The profile's memory model with the files' actual bytes; None without a profile."""
    if profile is None:
        return None
    breakdown = estimate_memory(
        profile.model_copy(update={"adapter_mode": adapter_mode}), ModelDims.from_config(restored.wrapper.model.config),
        weights_bytes=weights, non_adapted_bytes=non_adapted, lora_bytes=lora,
    )
    return breakdown.as_dict()


def header(fmt: str, runtime: str, restored: Restored, config: Configuration, adapter_mode: str,
           profile: DeviceProfile | None, files: Iterable[Path]) -> dict[str, Any]:
    """The fields every export.json starts with; ``files`` with their sizes and sha256."""
    return {
        "format": fmt, "runtime": runtime, "bundle": str(restored.bundle.path),
        "profile": profile.name if profile else None, "adapter_mode": adapter_mode, "config": dict(config),
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    }


def agreement_checks(runtime: str, figures: Mapping[str, float], max_kl: float, min_top1: float) -> list[Check]:
    """Mean KL, and top-1 agreement where it is stable: at the decisive positions."""
    return [
        (figures["kl"] <= max_kl, f"next-token KL of {runtime} {figures['kl']:.3g} > {max_kl:g} "
                                  f"over {figures['positions']} positions"),
        (figures["decisive_top1"] >= min_top1,
         f"top-1 agreement of {runtime} {figures['decisive_top1']:.3f} < {min_top1} over the "
         f"{figures['decisive_positions']} of {figures['positions']} positions where the top token leads by "
         f">= {DECISIVE_MARGIN} nats"),
    ]


def memory_check(memory: Mapping[str, Any] | None) -> Check:
    return (memory is None or memory["fits"],
            f"the model needs {memory and memory['total']} bytes, more than the profile's memory")


def keep(folder: Path, out: Path, report: dict[str, Any], checks: Iterable[Check]) -> dict[str, Any]:
    """Write ``report`` into the export's temporary ``folder`` if every check passed; else
    raise, and the folder (never renamed to ``out``) goes."""
    failures = [message for ok, message in checks if not ok]
    if failures:
        raise VerificationError(f"export to {out} failed verification, nothing was written: {'; '.join(failures)}")
    atomic_write_json(folder / REPORT_FILE, report)
    return report
