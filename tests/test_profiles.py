"""Device profiles: shipped files, size parsing, one-line rejections, fuzzing, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalora_edge.errors import ProfileError
from coalora_edge.profiles import DeviceProfile, load_profile, parse_profile, shipped_names, validate_profile
from coalora_edge.units import format_size, parse_size

REQUIRED = {
    "raspberry-pi-5-8gb", "raspberry-pi-4-4gb", "jetson-orin-nano-8gb", "android-midrange-8gb", "iphone-6gb",
    "macbook-air-m1-8gb", "x86-laptop-16gb-onnx", "copilot-plus-npu-16gb", "tiny-demo-llamacpp", "tiny-demo-onnx",
}

VALID = """\
name: my-board
runtime: llama.cpp
memory_bytes: 8GiB
reserved_bytes: 2GiB
context_length: 2048
"""


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coalora_edge", *args], capture_output=True, text=True, timeout=120)


# -- shipped profiles ------------------------------------------------------------------


def test_the_required_profiles_are_shipped():
    assert REQUIRED <= set(shipped_names())


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_profile_validates_and_cites_its_numbers(name):
    profile = load_profile(name)
    assert profile.name == name  # the file name is the name users type
    assert 0 < profile.available_bytes < profile.memory_bytes
    text = resources.files("coalora_edge.profiles").joinpath(f"{name}.yaml").read_text()
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "memory" in comments and "reserved" in comments  # where the numbers come from


def test_the_npu_profile_only_allows_4_and_8_bit():
    npu = load_profile("copilot-plus-npu-16gb")
    assert npu.runtime == "onnxruntime" and npu.scheme == "onnx"
    assert npu.allows("int4_b32_asym") and npu.allows("int8_b128_sym")
    assert not npu.allows("int2_b32_asym")


def test_tiny_demo_profiles_are_in_the_mib_range():
    for name in ("tiny-demo-llamacpp", "tiny-demo-onnx"):
        assert load_profile(name).memory_bytes < 64 * 2**20


# -- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30),
    ("512MiB", 512 * 2**20),
    ("8GB", 8 * 10**9),
    ("1024", 1024),
    (1024, 1024),
    ("1.5GiB", 3 * 2**29),
    ("704KiB", 704 * 1024),
    ("2 gib", 2 * 2**30),
    ("100B", 100),
    ("0.5KB", 500),
    ("1TiB", 2**40),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "8G", "8 GiBs", "1e9", "", "GiB", "1" * 21, True, 8.5, None, [8]])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="must be a size like 8GiB"):
        parse_size(bad)


@pytest.mark.parametrize("absurd", ["17TiB", 10**30, pytest.param(-(10**5000), id="5000 digits")])
def test_parse_size_rejects_absurd_sizes(absurd):
    with pytest.raises(ValueError, match="must be at most 16 TiB"):
        parse_size(absurd)


@pytest.mark.parametrize("n, text", [(8 * 2**30, "8 GiB"), (3 * 2**29, "1.50 GiB"), (704 * 1024, "704 KiB"), (900, "900 B")])
def test_format_size(n, text):
    assert format_size(n) == text


# -- rejections: each a ProfileError of one line naming the file and the field ------------


def with_line(key: str, value: str) -> str:
    """VALID with ``key`` set to ``value`` (replaced if present, appended if not)."""
    lines = [line for line in VALID.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join([*lines, f"{key}: {value}"]) + "\n"


REJECTIONS = [
    ("negative memory", with_line("memory_bytes", "-8GiB"), "field `memory_bytes`: must be greater than 0"),
    ("zero memory", with_line("memory_bytes", "0"), "field `memory_bytes`: must be greater than 0"),
    ("absurd memory", with_line("memory_bytes", "1000TiB"), "field `memory_bytes`: must be at most 16 TiB (more is a typo or a unit mistake), got '1000TiB'"),
    ("words for a size", with_line("memory_bytes", "lots"), "field `memory_bytes`: must be a size like 8GiB, 512MiB, 8GB or a whole number of bytes, got 'lots'"),
    ("huge reserve", with_line("reserved_bytes", "9" * 4000), "field `reserved_bytes`: must be at most 16 TiB"),
    ("negative reserve", with_line("reserved_bytes", "-1"), "field `reserved_bytes`: must be greater than or equal to 0"),
    ("reserve = memory", with_line("reserved_bytes", "8GiB"), "field `reserved_bytes`: must be less than memory_bytes (8 GiB), got 8 GiB"),
    ("reserve > memory", with_line("reserved_bytes", "9GB"), "field `reserved_bytes`: must be less than memory_bytes"),
    ("unknown key", with_line("memory", "8GiB"), "unknown key `memory`; did you mean `memory_bytes`? (valid keys: name, runtime, memory_bytes,"),
    ("unknown key, no guess", with_line("ram", "8GiB"), "unknown key `ram` (valid keys: name, runtime, memory_bytes,"),
    ("context as text", with_line("context_length", "'2048'"), "field `context_length`: must be a valid integer, got '2048'"),
    ("context as float", with_line("context_length", "2048.5"), "field `context_length`: must be a valid integer, got 2048.5"),
    ("zero context", with_line("context_length", "0"), "field `context_length`: must be greater than 0"),
    ("bool batch", with_line("batch", "true"), "field `batch`: must be a valid integer, got True"),
    ("unknown runtime", with_line("runtime", "tflite"), "field `runtime`: must be 'llama.cpp' or 'onnxruntime', got 'tflite'"),
    ("bad adapter mode", with_line("adapter_mode", "fused"), "field `adapter_mode`: must be 'merged' or 'sidecar', got 'fused'"),
    ("bad kv dtype", with_line("kv_cache_dtype", "int8"), "field `kv_cache_dtype`: llama.cpp caches keys/values as one of f16, f32,"),
    ("q8_0 kv on onnxruntime", with_line("runtime", "onnxruntime") + "kv_cache_dtype: q8_0\n", "field `kv_cache_dtype`: onnxruntime caches keys/values as one of f32, f16; got 'q8_0'"),
    ("unknown format", with_line("allowed_formats", "[Q4_K, Q4K]"), "field `allowed_formats`: 'Q4K' matches no gguf format of llama.cpp"),
    ("onnx format on llama.cpp", with_line("allowed_formats", "['int4_*']"), "field `allowed_formats`: 'int4_*' matches no gguf format"),
    ("empty format list", with_line("allowed_formats", "[]"), "field `allowed_formats`: Tuple should have at least 1 item"),
    ("repeated format", with_line("allowed_formats", "[Q4_K, Q4_K]"), "field `allowed_formats`: lists an entry twice"),
    ("format not text", with_line("allowed_formats", "[4]"), "field `allowed_formats[0]`: must be a valid string, got 4"),
    ("name with spaces", with_line("name", "My Board"), "field `name`: must be a lowercase slug"),
    ("name as number", with_line("name", "5"), "field `name`: must be a valid string, got 5"),
    ("zero threads", with_line("threads", "0"), "field `threads`: must be greater than 0"),
    ("missing field", "\n".join(VALID.splitlines()[:-1]), "field `context_length`: required; add a line like `context_length: 2048`"),
    ("repeated key", VALID + "memory_bytes: 4GiB\n", "key `memory_bytes` is written twice"),
    ("python tag", VALID + "notes: !!python/object/apply:os.getcwd []\n", "tags such as !!python/object are refused"),
    ("not YAML", "name: [unclosed\n", "not valid YAML at line 2"),
    ("two documents", VALID + "---\n" + VALID, "not valid YAML"),
    ("non-text key", VALID + "1: 2\n", "keys must be text, got 1"),
    ("empty file", "", "is empty; write a mapping with at least name, runtime, memory_bytes"),
    ("comments only", "# nothing here\n", "is empty"),
    ("a list", "- name: x\n", "must be a mapping of keys such as `name: my-device`, got a list"),
    ("a string", "raspberry-pi-5-8gb\n", "must be a mapping of keys such as `name: my-device`, got a str"),
]


@pytest.mark.parametrize("case, text, message", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_bad_profiles_are_one_line_errors(tmp_path, case, text, message):
    path = tmp_path / "device.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    text = str(info.value)
    assert text.startswith(f"profile {path}: ") and "\n" not in text
    assert message in text


def test_numbers_too_long_to_print_are_still_one_line_errors():
    data = {**yaml.safe_load(VALID), "threads": 10**5000}
    with pytest.raises(ProfileError, match=r"field `threads`: must be less than or equal to 1024, got an int too long to show$"):
        validate_profile(data, "mine.yaml")


def test_python_tags_are_never_constructed(tmp_path):
    # If the tag were constructed, os.mkdir would run: the folder must not appear.
    target = tmp_path / "constructed"
    with pytest.raises(ProfileError, match="!!python/object are refused"):
        parse_profile(f"name: !!python/object/apply:os.mkdir ['{target}']\n", "evil.yaml")
    assert not target.exists()


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(VALID.encode() + "notes: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProfileError, match=r"is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8$"):
        load_profile(path)


def test_a_model_file_passed_by_mistake(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(2**20))
    with pytest.raises(ProfileError, match="too large for a device profile"):
        load_profile(path)


# -- what a valid profile means ------------------------------------------------------------


def test_defaults_and_what_they_mean():
    profile = parse_profile(VALID, "mine.yaml")
    assert profile == DeviceProfile(
        name="my-board", runtime="llama.cpp", memory_bytes=8 * 2**30, reserved_bytes=2 * 2**30,
        context_length=2048, kv_cache_dtype="f16", batch=1, allowed_formats=None, adapter_mode="merged",
    )
    assert profile.available_bytes == 6 * 2**30 and profile.scheme == "gguf" and profile.allows("IQ2_XXS")
    onnx = parse_profile(with_line("runtime", "onnxruntime"), "mine.yaml")
    assert onnx.kv_cache_dtype == "f32" and onnx.scheme == "onnx"


def test_patterns_in_allowed_formats():
    profile = parse_profile(with_line("allowed_formats", "['Q?_K', Q8_0]"), "mine.yaml")
    assert [f for f in ("Q2_K", "Q4_K", "Q4_0", "Q8_0", "IQ4_XS") if profile.allows(f)] == ["Q2_K", "Q4_K", "Q8_0"]


# -- finding profiles ----------------------------------------------------------------------


def test_a_users_file_wins_and_shipped_names_work_from_anywhere(tmp_path, monkeypatch):
    path = tmp_path / "raspberry-pi-5-8gb"
    path.write_text(VALID)
    assert load_profile(str(path)).name == "my-board"
    monkeypatch.chdir(tmp_path)
    assert load_profile("raspberry-pi-5-8gb").name == "my-board"  # an existing file, as documented
    monkeypatch.chdir("/")
    assert load_profile("raspberry-pi-5-8gb").memory_bytes == 8 * 2**30


@pytest.mark.parametrize("arg, message", [
    ("raspberry-pi-5", "profile raspberry-pi-5: is not a shipped profile; did you mean raspberry-pi-5-8gb? (shipped profiles: android-midrange-8gb,"),
    ("no/such/device.yaml", "profile no/such/device.yaml: file not found"),
    ("/", "profile /: is not a file"),
])
def test_unknown_profiles(arg, message):
    with pytest.raises(ProfileError) as info:
        load_profile(arg)
    assert message in str(info.value) and "\n" not in str(info.value)


# -- fuzzing: whatever the input, only ProfileError ----------------------------------------

FIELDS = list(DeviceProfile.model_fields)
TOKENS = list("abcdefgnru0123456789 :-_.,#'\"[]{}!&*?|>%@`\n\t\\GiBMK\x00\x85\u2028\ufeff") + FIELDS + [
    "llama.cpp", "8GiB", "!!python/object:os.system", "!!binary", "&a", "*a", "<<: ", "\n  ", "\n- ", "---\n", "...\n",
]
YAMLISH = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["8GiB", "512MiB", "-1", "llama.cpp", "onnxruntime", "f16", "q8_0", "merged", "sidecar", "int4_*", "Q4_K"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(), st.none())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_fuzz_yaml_text_only_raises_profile_error(text):
    try:
        parse_profile(text, "fuzz.yaml")
    except ProfileError as e:
        assert "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=8), st.booleans())
def test_fuzz_mappings_only_raise_profile_error(data, through_yaml):
    try:
        if through_yaml:
            parse_profile(yaml.safe_dump(data), "fuzz.yaml")
        else:
            validate_profile(data, "fuzz.yaml")
    except ProfileError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({
    "name": st.just("fuzzed"), "runtime": st.sampled_from(["llama.cpp", "onnxruntime", "x"]),
    "memory_bytes": SCALARS, "reserved_bytes": SCALARS, "context_length": SCALARS,
}, optional={"kv_cache_dtype": SCALARS, "batch": SCALARS, "allowed_formats": VALUES, "adapter_mode": SCALARS}))
def test_fuzz_near_valid_profiles(data):
    try:
        profile = validate_profile(data, "fuzz.yaml")
    except ProfileError as e:
        assert "\n" not in str(e)
    else:
        assert 0 <= profile.reserved_bytes < profile.memory_bytes


# -- the CLI, as users run it ----------------------------------------------------------------


@pytest.mark.slow  # a CLI subprocess
def test_cli_list_json():
    proc = run_cli("profiles", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {p["name"]: p for p in json.loads(proc.stdout)["profiles"]}
    assert REQUIRED <= set(listed)
    assert listed["raspberry-pi-5-8gb"]["memory_bytes"] == 8 * 2**30
    assert listed["copilot-plus-npu-16gb"]["allowed_formats"] == ["int4_*", "int8_*"]


@pytest.mark.slow  # a CLI subprocess
def test_cli_list_table():
    proc = run_cli("profiles", "list")
    assert proc.returncode == 0, proc.stderr
    assert "raspberry-pi-5-8gb" in proc.stdout and "int4_*" in proc.stdout


@pytest.mark.slow  # a CLI subprocess
def test_cli_show_shipped():
    proc = run_cli("profiles", "show", "raspberry-pi-5-8gb")
    assert proc.returncode == 0, proc.stderr
    assert "8 GiB" in proc.stdout and "llama.cpp" in proc.stdout and "6.50 GiB" in proc.stdout


@pytest.mark.slow  # a CLI subprocess
def test_cli_show_users_file_round_trips(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(with_line("allowed_formats", "[Q4_K, Q8_0]"))
    proc = run_cli("profiles", "show", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["name"] == "my-board" and shown["reserved_bytes"] == 2 * 2**30
    # The JSON is itself a valid profile, equal to the file's.
    assert validate_profile(shown, "shown.json") == load_profile(path)


@pytest.mark.slow  # a CLI subprocess
@pytest.mark.parametrize("arg, message", [
    ("raspberry-pi-5", "did you mean raspberry-pi-5-8gb?"),
    ("{bad}", "field `memory_bytes`: must be a size like 8GiB"),
])
def test_cli_bad_profile_is_one_line_and_nonzero(tmp_path, arg, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_line("memory_bytes", "lots"))
    proc = run_cli("profiles", "show", arg.format(bad=bad))
    assert proc.returncode == 3
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
