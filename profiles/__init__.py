"""Device profiles: what a target device offers a model, read from YAML and validated.

A profile is a small YAML mapping (see the shipped ``*.yaml`` files beside this module,
which cite where their numbers come from)::

    name: raspberry-pi-5-8gb
    runtime: llama.cpp            # or onnxruntime
    memory_bytes: 8GiB            # what the device has
    reserved_bytes: 1.5GiB        # OS and host application; must be < memory_bytes
    context_length: 2048          # tokens per sequence
    kv_cache_dtype: f16           # optional: runtime default (llama.cpp f16, onnxruntime f32)
    batch: 1                      # optional: sequences decoded together
    allowed_formats: [Q4_K, Q8_0] # optional: default every format of the runtime's scheme
    adapter_mode: merged          # optional: or sidecar (the runtime applies the LoRA)
    min_decode_ratio: 0.95        # optional: see below
    threads: 4                    # optional
    notes: free text              # optional

Decisions, so that users can predict what is accepted:

* Sizes are a whole number of bytes or a number with a unit: decimal ``KB MB GB TB``
  (``8GB`` = 8e9) or binary ``KiB MiB GiB TiB`` (``8GiB`` = 8 * 2^30), any letter case,
  fractions allowed (``1.5GiB``) and rounded down to whole bytes.
* ``kv_cache_dtype`` takes what the runtime can cache keys/values in: for llama.cpp the
  ``--cache-type-k/-v`` types (f16, f32, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl;
  quantized V caches need flash attention); for ONNX Runtime the dtype of the exported
  model's ``past_key_values`` (f32 as coalora-edge exports, or f16).
* ``allowed_formats`` entries are format names of the runtime's scheme (gguf names such
  as ``Q4_K`` for llama.cpp, onnx names such as ``int4_b32_asym`` for ONNX Runtime) or
  shell-style patterns over them (``int4_*``, ``Q?_K``; case-sensitive). Each entry must
  match at least one format, so a typo is an error rather than an empty device. Quote
  patterns in YAML (`["int4_*"]`): an unquoted `*` or `?` can start other YAML syntax.
* ``min_decode_ratio``: the slowest configuration the resolver may pick, as its predicted
  decode speed over that of the uniform-format configuration of its size (search/speed.py).
  A number from 0 to 1; 0 turns the check off. Default 0.95 for llama.cpp, whose kernels
  differ in speed per type; 0 for ONNX Runtime, which has no measured costs (at accuracy
  level 4 its mixed models decode as fast as uniform ones).
* YAML is read with ``yaml.safe_load`` only: tags such as ``!!python/object`` are errors,
  never constructed. Unknown keys, repeated keys and wrong types are errors too.
* Every problem is a :class:`ProfileError` with one line naming the file, the field, the
  problem and what is accepted.
"""

from __future__ import annotations

import difflib
import re
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from coalora_edge.errors import ProfileError
from coalora_edge.runtimes import RUNTIMES, Runtime
from coalora_edge.units import format_size, parse_size, short as _short


#: Beyond these a value is a typo or a unit mistake, not a device.
MAX_CONTEXT = 1 << 24
MAX_BATCH = 4096
MAX_THREADS = 1024
#: A profile is a few hundred bytes; a bigger file is most likely a model passed by mistake.
MAX_FILE_BYTES = 1 << 20

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
def parse_ratio(value: Any) -> float:
    """A plain number from 0 to 1 (no text, no booleans: ``yes`` is not a ratio)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"must be a number from 0 to 1 (0 turns the check off), got {_short(value)}")
    return float(value)


Size = Annotated[int, BeforeValidator(parse_size)]


class DeviceProfile(BaseModel):
    """One device: its runtime, its memory and what it accepts. Build with :func:`load_profile`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(description="lowercase slug naming the device")
    runtime: StrictStr = Field(description="the runtime that executes the model (coalora_edge.runtimes)")
    memory_bytes: Size = Field(gt=0, description="memory the device has")
    reserved_bytes: Size = Field(ge=0, description="memory the OS and host application keep")
    context_length: StrictInt = Field(gt=0, le=MAX_CONTEXT, description="tokens per sequence")
    kv_cache_dtype: StrictStr | None = Field(None, validate_default=True, description="key/value cache element type")
    batch: StrictInt = Field(1, gt=0, le=MAX_BATCH, description="sequences decoded together")
    allowed_formats: tuple[StrictStr, ...] | None = Field(None, min_length=1, description="format names or patterns")
    adapter_mode: Literal["merged", "sidecar"] = Field("merged", description="LoRA merged into weights or applied by the runtime")
    min_decode_ratio: Annotated[float | None, BeforeValidator(lambda v: v if v is None else parse_ratio(v))] = Field(
        None, validate_default=True, description="lowest predicted decode speed relative to uniform formats of the same size")
    threads: StrictInt | None = Field(None, gt=0, le=MAX_THREADS, description="CPU threads the runtime uses")
    notes: StrictStr | None = None

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"must be a lowercase slug like my-device-8gb (a-z, 0-9, '.', '_', '-'; at most 64), got {_short(name)}")
        return name

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, runtime: str) -> str:
        if runtime not in RUNTIMES:  # looked up now, not at import: runtimes may be registered later
            raise ValueError(f"must be {' or '.join(map(repr, RUNTIMES))}, got {_short(runtime)}")
        return runtime

    @field_validator("reserved_bytes")
    @classmethod
    def _below_memory(cls, reserved: int, info: ValidationInfo) -> int:
        memory = info.data.get("memory_bytes")
        if memory is not None and reserved >= memory:
            raise ValueError(
                f"must be less than memory_bytes ({format_size(memory)}), got {format_size(reserved)}; "
                "it is what the OS and application keep, not what the device has"
            )
        return reserved

    @field_validator("kv_cache_dtype", "min_decode_ratio")
    @classmethod
    def _runtime_field(cls, value: Any, info: ValidationInfo) -> Any:
        """Fields whose default and accepted values are the runtime's."""
        runtime = RUNTIMES.get(info.data.get("runtime"))
        if runtime is None:
            return value
        if value is None:
            return getattr(runtime, info.field_name)
        problem = RUNTIME_FIELD_CHECKS[info.field_name](value, runtime)
        if problem:
            raise ValueError(f"{runtime.name} {problem}")
        return value

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, patterns: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        runtime = RUNTIMES.get(info.data.get("runtime"))
        if runtime is None or patterns is None:
            return patterns
        if len(set(patterns)) != len(patterns):
            raise ValueError(f"lists an entry twice, got {_short(list(patterns))}; list each once")
        names = scheme_format_names(runtime.scheme)
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                raise ValueError(
                    f"{_short(pattern)} matches no {runtime.scheme} format of {info.data['runtime']}; "
                    f"use names or patterns such as {runtime.format_examples} (known: {', '.join(names)})"
                )
        return patterns

    @property
    def scheme(self) -> str:
        """Name of the quantization scheme whose formats this device's runtime executes."""
        return RUNTIMES[self.runtime].scheme

    @property
    def available_bytes(self) -> int:
        """Memory left for the model once the OS and host application have theirs."""
        return self.memory_bytes - self.reserved_bytes

    def allows(self, format_name: str) -> bool:
        """Whether the device can run a matrix stored as ``format_name``."""
        return self.allowed_formats is None or any(fnmatchcase(format_name, p) for p in self.allowed_formats)


def _kv_dtype_problem(dtype: str, runtime: Runtime) -> str | None:
    if dtype not in runtime.kv_cache_dtypes:
        return f"caches keys/values as one of {', '.join(runtime.kv_cache_dtypes)}; got {_short(dtype)}"
    return None


def _decode_ratio_problem(ratio: float, runtime: Runtime) -> str | None:
    if ratio > 0 and not scheme_decode_cost(runtime.scheme):
        return "has no measured decode costs to predict speed from; use 0 or leave it out"
    return None


RUNTIME_FIELD_CHECKS = {"kv_cache_dtype": _kv_dtype_problem, "min_decode_ratio": _decode_ratio_problem}


def scheme_format_names(scheme: str) -> list[str]:
    # Imported late: schemes load torch, which profile files that list no formats never need.
    from coalora_edge.schemes import get_scheme

    return list(get_scheme(scheme).formats)


def scheme_decode_cost(scheme: str) -> Any:
    from coalora_edge.schemes import get_scheme

    return get_scheme(scheme).decode_cost


#: How a missing field is written, for the "add ..." hint.
EXAMPLES = {
    "name": "my-device-8gb", "runtime": "llama.cpp", "memory_bytes": "8GiB",
    "reserved_bytes": "2GiB", "context_length": "2048",
}


def _describe(error: ErrorDetails) -> str:
    """One pydantic error as ``field `x`: problem, got value``."""
    loc = error["loc"]
    field = str(loc[0]) + "".join(f"[{i}]" for i in loc[1:])
    kind = error["type"]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(field, DeviceProfile.model_fields, n=1)
        maybe = f"; did you mean `{close[0]}`?" if close else ""
        return f"unknown key `{field}`{maybe} (valid keys: {', '.join(DeviceProfile.model_fields)})"
    if kind == "invalid_key":
        return f"keys must be text, got {_short(loc[0])}"
    if kind == "missing":
        return f"field `{field}`: required; add a line like `{field}: {EXAMPLES.get(field, '...')}`"
    message = error["msg"].removeprefix("Value error, ")
    message = re.sub(r"^Input should", "must", message)
    if "got " not in message:
        message += f", got {_short(error['input'])}"
    return f"field `{field}`: {message}"


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e)
    hint = "; profiles are plain YAML, tags such as !!python/object are refused" if isinstance(e, yaml.constructor.ConstructorError) else ""
    return f"not valid YAML{where}: {problem}{hint}"


def _repeated_key(text: str) -> str | None:
    """The first top-level key written twice (safe_load would silently keep the last)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return None
    keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
    return next((k for i, k in enumerate(keys) if k in keys[:i]), None)


def _fail(source: str, detail: str) -> ProfileError:
    return ProfileError(" ".join(f"profile {source}: {detail}".split()))


def validate_profile(data: Any, source: str) -> DeviceProfile:
    """A profile from already-parsed YAML (a mapping), or a ProfileError naming ``source``."""
    if data is None:
        raise _fail(source, f"is empty; write a mapping with at least {', '.join(EXAMPLES)}")
    if not isinstance(data, dict):
        raise _fail(source, f"must be a mapping of keys such as `name: my-device`, got a {type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise _fail(source, "; ".join(_describe(err) for err in e.errors())) from None


def parse_profile(raw: bytes | str, source: str) -> DeviceProfile:
    """A profile from YAML text or bytes (UTF-8), or a ProfileError naming ``source``."""
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise _fail(source, f"is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8") from None
    try:
        repeated = _repeated_key(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _fail(source, _yaml_problem(e)) from None
    except ValueError as e:  # PyYAML's int() of a number with thousands of digits
        raise _fail(source, f"not valid YAML: {e}") from None
    except RecursionError:
        raise _fail(source, "is nested too deeply; a profile is a flat mapping") from None
    if repeated is not None:
        raise _fail(source, f"key `{repeated}` is written twice; keep one")
    return validate_profile(data, source)


def _shipped() -> dict[str, Any]:
    """Shipped profile name -> its file (package data, so also inside wheels and zips)."""
    folder = resources.files(__name__)
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def shipped_names() -> list[str]:
    return sorted(_shipped())


def shipped_profiles() -> list[DeviceProfile]:
    return [load_profile(name) for name in shipped_names()]


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A user's YAML file if ``name_or_path`` is an existing file, else a shipped profile's name."""
    path = Path(name_or_path)
    if path.is_file():
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise _fail(str(path), f"cannot be read ({e.strerror})") from None
        if len(raw) > MAX_FILE_BYTES:
            raise _fail(str(path), f"is over {format_size(MAX_FILE_BYTES)}, too large for a device profile; is it the right file?")
        return parse_profile(raw, str(path))
    if path.exists():
        raise _fail(str(path), "is not a file; pass a profile YAML file or a shipped profile name")
    shipped = _shipped()
    key = str(name_or_path)
    if key in shipped:
        return parse_profile(shipped[key].read_bytes(), shipped[key].name)
    looks_like_file = path.suffix in (".yaml", ".yml") or len(path.parts) > 1
    close = difflib.get_close_matches(key, shipped, n=1)
    maybe = f"; did you mean {close[0]}?" if close else ""
    what = "file not found" if looks_like_file else "is not a shipped profile"
    raise _fail(key, f"{what}{maybe} (shipped profiles: {', '.join(sorted(shipped))}; or pass a YAML file)")


__all__ = [
    "DeviceProfile", "load_profile", "parse_profile", "shipped_names", "shipped_profiles",
    "validate_profile",
]
