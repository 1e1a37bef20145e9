"""What every exporter shares around the runtime-specific part: the bytes the files must
hold, and the check that the machine has room to write and verify them."""

from __future__ import annotations

from pathlib import Path

from coalora_edge import resources
from coalora_edge.exporters.layout import base_bytes
from coalora_edge.memory import sidecar_bytes
from coalora_edge.quantize import Configuration, config_nbytes
from coalora_edge.restore import Restored


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
