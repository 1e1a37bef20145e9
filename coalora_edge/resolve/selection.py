"""Which configuration a command works on (`eval`, `export`): one rule for all.

``--config FILE`` or ``--bpw X`` (at most one of them) names it; without either, the one
the resolver picks for ``--profile P``; with none of the three there is nothing to pick.
"""

from __future__ import annotations

from pathlib import Path

from coalora_edge.bundle.lookup import config_at_bpw, read_config_file
from coalora_edge.bundle.store import Bundle
from coalora_edge.errors import CoaloraError
from coalora_edge.profiles import DeviceProfile
from coalora_edge.resolve.resolver import resolve
from coalora_edge.schemes.quantize import Configuration


def select_config(bundle: Bundle, *, config: Path | None = None, bpw: float | None = None,
                  profile: DeviceProfile | None = None, model: str | None = None) -> Configuration:
    if config is not None and bpw is not None:
        raise CoaloraError("pass at most one of --config FILE and --bpw X")
    if config is not None:
        return read_config_file(bundle, config)
    if bpw is not None:
        return config_at_bpw(bundle, bpw)[0]
    if profile is None:
        raise CoaloraError("pass --profile P, --config FILE or --bpw X to say which configuration to use")
    return resolve(bundle, profile, model).config
