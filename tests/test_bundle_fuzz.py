"""Fuzzing bundle loading: whatever a damaged or hostile bundle holds, loading it and every
command's use of it ends in a one-line CoaloraError or works, never in another exception.

The mutations start from a valid bundle: any value of any JSON file replaced or removed
(its sha256 in the manifest updated, so the content checks are reached, not only the
hash), bytes truncated or flipped (with and without a matching hash), and the JSON
header of the safetensors files edited.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalora_edge.bundle.lookup import config_at_bpw
from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import CONFIGS, MANIFEST, PARETO, SENSITIVITY, load_bundle
from coalora_edge.cli.pareto import summary
from coalora_edge.errors import CoaloraError
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.resolver import resolve

# slow: builds bundles and artifacts of every kind, runs the CLI in subprocesses
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

JSON_FILES = (MANIFEST, CONFIGS, PARETO, SENSITIVITY)
TENSOR_FILES = ("adapter.safetensors", "imatrix.safetensors")
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "..", "../../etc/passwd", "/etc/passwd",
                                                                     "Q4_K", "coa", "gguf", "x" * 300]),
    st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=3), st.dictionaries(st.text(max_size=4), st.none(), max_size=2),
)
#: safetensors dtypes and their element sizes, to retype a tensor over the same bytes
DTYPES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, small_bundle):
    """A fresh copy of the bundle per example (hypothesis runs many in one test)."""
    root = tmp_path_factory.mktemp("fuzz")
    counter = itertools.count()

    def fresh() -> Path:
        return Path(shutil.copytree(small_bundle, root / f"b{next(counter)}"))

    return fresh


def use(path: Path, model: Path) -> None:
    """What the commands do with a bundle: load, read every file, restore, resolve, pick."""
    bundle = load_bundle(path)
    bundle.matrices, bundle.configs(), bundle.evaluated()
    summary(bundle)
    config_at_bpw(bundle, 99.0)
    resolve(bundle, load_profile("tiny-demo-llamacpp"), str(model))
    restored = restore(bundle, str(model))
    restored.use(bundle.configs()[0])


def survives(path: Path, model: Path) -> None:
    try:
        use(path, model)
    except CoaloraError as e:
        assert "\n" not in str(e), f"a multi-line error: {e}"


def rehash(bundle: Path, name: str) -> None:
    """Record ``name``'s current sha256 in the manifest, as a forger would."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@st.composite
def json_edit(draw, document: Any) -> Any:
    """``document`` with one value somewhere inside replaced by a hostile one, or removed."""
    if not isinstance(document, (dict, list)) or not document or draw(st.booleans()) and draw(st.booleans()):
        return draw(HOSTILE)
    keys = list(document) if isinstance(document, dict) else list(range(len(document)))
    key = draw(st.sampled_from(keys))
    edited = document.copy()
    if isinstance(edited, dict) and draw(st.integers(0, 5)) == 0:
        del edited[key]
    else:
        edited[key] = draw(json_edit(document[key]))
    return edited


@SETTINGS
@given(data=st.data(), name=st.sampled_from(JSON_FILES))
def test_edited_json_files(workspace, own_model, data, name):
    bundle = workspace()
    document = json.loads((bundle / name).read_text())
    (bundle / name).write_text(json.dumps(data.draw(json_edit(document))))
    if name != MANIFEST:
        rehash(bundle, name)
    survives(bundle, own_model)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(JSON_FILES + TENSOR_FILES), forge=st.booleans())
def test_damaged_bytes(workspace, own_model, data, name, forge):
    bundle = workspace()
    raw = bytearray((bundle / name).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for position in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4), label="flips"):
            raw[position] ^= 1 << data.draw(st.integers(0, 7))
    (bundle / name).write_bytes(bytes(raw))
    if forge and name != MANIFEST:
        rehash(bundle, name)
    survives(bundle, own_model)


@st.composite
def retyped(draw, header: dict) -> dict:
    """One tensor given another dtype and shape over the same bytes: a file safetensors
    reads without complaint, holding a tensor that is not what the bundle needs."""
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    start, end = header[name]["data_offsets"]
    dtype = draw(st.sampled_from([d for d, size in DTYPES.items() if (end - start) % size == 0]))
    numel = (end - start) // DTYPES[dtype]
    rows = draw(st.sampled_from([d for d in range(1, min(numel, 64) + 1) if numel % d == 0] or [1]))
    shape = draw(st.sampled_from([[numel], [rows, numel // rows], [numel // rows, rows, 1]]))
    return header | {name: {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(TENSOR_FILES), lie=st.booleans())
def test_edited_safetensors_headers(workspace, own_model, data, name, lie):
    """Headers that break the format, or describe the data as other tensors."""
    bundle = workspace()
    raw = (bundle / name).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + length])
    edited = json.dumps(data.draw(retyped(header) if lie else json_edit(header))).encode()
    (bundle / name).write_bytes(struct.pack("<Q", len(edited)) + edited + raw[8 + length:])
    rehash(bundle, name)
    survives(bundle, own_model)


def test_the_unedited_bundle_is_used_without_error(small_bundle, own_model):
    use(small_bundle, own_model)
