"""ggml's own quantizer and dequantizer, called through ctypes.

The GGUF scheme must produce the very bytes llama.cpp writes, including K-quants that no
Python package reimplements. So instead of reimplementing ggml we call it:
llama-cpp-python ships ``libggml-base.so``, which exports ``ggml_quantize_chunk`` (the
function ``llama_model_quantize`` itself calls) and each type's ``to_float``.

Types are ggml type ids (``gguf.constants.GGMLQuantizationType`` values). Rows are the
input dimension; every function here takes or returns whole rows.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from coalora_edge.errors import RuntimeLibraryError, SchemeError

#: File name of ggml's base library inside ``llama_cpp/lib``, per platform.
LIBRARY_NAMES = {"linux": "libggml-base.so", "darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}

#: A chunk below this many weights is not worth a thread of its own.
MIN_CHUNK_WEIGHTS = 1 << 16
#: Chunks per worker thread, so that uneven chunks still keep every thread busy.
CHUNKS_PER_THREAD = 4

_FloatPtr = ctypes.POINTER(ctypes.c_float)
# void (*ggml_to_float_t)(const void * x, float * y, int64_t k)
_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _FloatPtr, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` from ggml.h; the field order is the C layout."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", _ToFloat),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """Where llama-cpp-python keeps ggml; found without importing (and loading) llama.cpp."""
    fix = "install it with `pip install llama-cpp-python`"
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeLibraryError(f"the GGUF scheme needs ggml from llama-cpp-python; {fix}")
    name = LIBRARY_NAMES.get(sys.platform, LIBRARY_NAMES["linux"])
    path = Path(next(iter(spec.submodule_search_locations))) / "lib" / name
    if not path.is_file():
        raise RuntimeLibraryError(
            f"llama-cpp-python is installed but {path} is missing; reinstall it with "
            "`pip install --force-reinstall llama-cpp-python`"
        )
    return path


@functools.cache
def library() -> ctypes.CDLL:
    path = library_path()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeLibraryError(
            f"cannot load {path} ({e}); reinstall with `pip install --force-reinstall llama-cpp-python`"
        ) from None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, _FloatPtr, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _FloatPtr,
    ]  # type, src, dst, start, nrows, n_per_row, imatrix
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def traits(ggml_type: int) -> _TypeTraits:
    return library().ggml_get_type_traits(ggml_type).contents


def requires_imatrix(ggml_type: int) -> bool:
    return bool(library().ggml_quantize_requires_imatrix(ggml_type))


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights (``n_per_row`` must be a block multiple)."""
    _check_row(ggml_type, n_per_row)
    return int(library().ggml_row_size(ggml_type, n_per_row))


def _check_row(ggml_type: int, n_per_row: int) -> None:
    # ggml asserts (aborting the process) instead of returning an error, so check first.
    t = traits(ggml_type)
    if n_per_row <= 0 or n_per_row % t.blck_size:
        raise SchemeError(
            f"ggml type {t.type_name.decode()} stores rows in blocks of {t.blck_size}, got rows of "
            f"{n_per_row}; use the scheme's storage() to pick the fallback type"
        )


def _float_rows(x: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(x, dtype=np.float32)
    if rows.ndim != 2:
        raise SchemeError(f"expected a matrix [rows, in] to quantize, got shape {rows.shape}")
    return rows


def _checked_imatrix(ggml_type: int, imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    name = traits(ggml_type).type_name.decode()
    if imatrix is None:
        if requires_imatrix(ggml_type):
            raise SchemeError(f"ggml type {name} needs an importance matrix; pass imatrix=[in] values")
        return None
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    if imatrix.shape != (n_per_row,):
        raise SchemeError(
            f"imatrix must hold one value per input column ({n_per_row}), got shape {imatrix.shape}"
        )
    if not np.isfinite(imatrix).all():
        # llama.cpp refuses such an imatrix too ("imatrix contains non-finite value").
        raise SchemeError("imatrix contains NaN or infinity; recompute it")
    return imatrix


def quantize_chunk(ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """One ``ggml_quantize_chunk`` call over all ``rows [nrows, n_per_row]`` -> uint8 [nrows, row_size]."""
    rows = _float_rows(rows)
    return _quantize(ggml_type, rows, imatrix, chunks=[(0, rows.shape[0])], threads=1)


def quantize(
    ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """``rows [nrows, n_per_row]`` float32 -> ggml blocks uint8 [nrows, row_size].

    Rows are quantized independently, so chunks of rows go to a thread pool (ctypes drops
    the GIL during the call); the bytes equal one call over all rows.
    """
    rows = _float_rows(rows)
    nrows, n_per_row = rows.shape
    threads = threads or _usable_cpus()
    chunk_rows = max(-(-MIN_CHUNK_WEIGHTS // n_per_row), -(-nrows // (threads * CHUNKS_PER_THREAD)))
    chunks = [(r, min(chunk_rows, nrows - r)) for r in range(0, nrows, chunk_rows)]
    return _quantize(ggml_type, rows, imatrix, chunks, threads)


def _usable_cpus() -> int:
    # The affinity mask, not the machine's core count: containers and CI pin processes.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _quantize(
    ggml_type: int,
    rows: np.ndarray,
    imatrix: np.ndarray | None,
    chunks: list[tuple[int, int]],
    threads: int,
) -> np.ndarray:
    nrows, n_per_row = rows.shape
    imatrix = _checked_imatrix(ggml_type, imatrix, n_per_row)
    out = np.empty((nrows, row_size(ggml_type, n_per_row)), dtype=np.uint8)
    lib = library()
    # ggml_quantize_chunk does this too; once up front, the workers do not queue on ggml's
    # lock while it builds the IQ lookup tables.
    lib.ggml_quantize_init(ggml_type)
    src = rows.ctypes.data_as(_FloatPtr)
    dst = out.ctypes.data_as(ctypes.c_void_p)
    imp = imatrix.ctypes.data_as(_FloatPtr) if imatrix is not None else None

    def run(chunk: tuple[int, int]) -> int:
        first, count = chunk
        # ``start`` counts weights: ggml offsets both src and dst by it.
        return lib.ggml_quantize_chunk(ggml_type, src, dst, first * n_per_row, count, n_per_row, imp)

    if threads == 1 or len(chunks) == 1:
        written = sum(map(run, chunks))
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
            written = sum(pool.map(run, chunks))
    if written != out.nbytes:
        raise RuntimeLibraryError(
            f"ggml wrote {written} bytes for a {nrows}x{n_per_row} matrix, expected {out.nbytes}; "
            "the installed llama-cpp-python does not match this ggml binding"
        )
    return out


def dequantize(ggml_type: int, blocks: np.ndarray, n_per_row: int) -> np.ndarray:
    """ggml blocks uint8 [nrows, row_size] -> float32 [nrows, n_per_row], via the type's ``to_float``."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    size = row_size(ggml_type, n_per_row)
    if blocks.ndim != 2 or blocks.shape[1] != size:
        raise SchemeError(
            f"expected blocks of shape [rows, {size}] for rows of {n_per_row}, got {blocks.shape}"
        )
    out = np.empty((blocks.shape[0], n_per_row), dtype=np.float32)
    traits(ggml_type).to_float(blocks.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(_FloatPtr), out.size)
    return out
