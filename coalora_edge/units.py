"""Sizes in bytes as people write them (``8GiB``, ``512MB``) and as they read them."""

from __future__ import annotations

import re
import reprlib
from decimal import Decimal
from typing import Any

SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
# Digits are capped: more than 20 is never a size, and huge numbers only hide the mistake.
_SIZE = re.compile(r"\s*(-?\d{1,20}(?:\.\d{1,20})?)\s*([a-z]*)\s*", re.IGNORECASE)
SIZE_HINT = "a size like 8GiB, 512MiB, 8GB or a whole number of bytes"

#: Beyond this a value is a typo or a unit mistake, not a device.
MAX_SIZE = 16 * 2**40

_repr = reprlib.Repr()  # keyword arguments need Python 3.12
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = 4
_repr.maxlevel = 2


def short(value: Any) -> str:
    """A value quoted in an error: short, one line, and never an error itself (huge ints)."""
    try:
        return _repr.repr(value)
    except ValueError:
        return "an int too long to show"  # the only repr that raises: str(int) stops at 4300 digits


def parse_size(value: Any) -> int:
    """``"8GiB"`` -> 8589934592, ``"8GB"`` -> 8000000000, ``1024`` -> 1024."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        unit = SIZE_UNITS.get(match[2].lower() or "b") if match else None
        if unit is None:
            raise ValueError(f"must be {SIZE_HINT}, got {short(value)}")
        size = int(Decimal(match[1]) * unit)
    # Signs are left to each field's own bound; magnitude is checked here for all sizes.
    if abs(size) > MAX_SIZE:
        raise ValueError(f"must be at most {format_size(MAX_SIZE)} (more is a typo or a unit mistake), got {short(value)}")
    return size


def format_size(n: int) -> str:
    """Bytes for people: ``8 GiB``, ``1.50 GiB``, ``512 MiB``, ``900 B``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = SIZE_UNITS[unit.lower()]
        if abs(n) >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.2f} {unit}"
    return f"{n} B"
