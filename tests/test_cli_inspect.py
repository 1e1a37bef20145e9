"""`coalora-edge inspect` end to end, as a user runs it (a subprocess: real exit codes and stderr)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coalora_edge", *args], capture_output=True, text=True, timeout=300)


#: the embedding weights: TinyStories-656K ties its 2048 x 128 embedding to the output, the
#: session's own model (same shapes otherwise) has two 512 x 128 ones
EMBEDDINGS = {"own_model": 2 * 512 * 128, "tinystories_dir": 2048 * 128}


@pytest.mark.parametrize("model", sorted(EMBEDDINGS))
@pytest.mark.parametrize("scheme", ["gguf", "onnx", "nf"])
def test_inspect_json_on_a_trained_model(request, model, scheme):
    proc = run_cli("inspect", str(request.getfixturevalue(model)), "--scheme", scheme, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["scheme"] == scheme
    assert report["parameters"] == EMBEDDINGS[model] + 2 * (2 * 128 + 128 * 128 * 2 + 64 * 128 * 2 + 3 * 384 * 128) + 128
    assert len(report["matrices"]) == 14
    smallest = sum(min(o["bytes"] for o in r["formats"]) for r in report["matrices"])
    assert report["smallest_config_bytes"] == smallest < report["largest_config_bytes"]


def test_inspect_shows_llamacpp_fallback_for_short_rows(own_model):
    # TinyStories-656K's rows (and own_model's) are 128 or 384 long: no 256-block K-quant fits,
    # llama.cpp falls back.
    proc = run_cli("inspect", str(own_model), "--scheme", "gguf", "--json")
    report = json.loads(proc.stdout)
    q4k = {o["stored_as"] for r in report["matrices"] for o in r["formats"] if o["choice"] == "Q4_K"}
    assert q4k == {"Q5_0"}
    assert ["Q4_K", "Q5_0"] in report["fallbacks"]
    table = run_cli("inspect", str(own_model), "--scheme", "gguf")
    assert table.returncode == 0 and "Q5_0 (fallback)" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "/no/such/model"], "not found"),
    (["inspect", "{model}", "--scheme", "int3"], "unknown scheme 'int3'"),
    (["inspect", "{model}", "--choices", "Q4_K,Q9_9"], "unknown gguf format 'Q9_9'"),
    (["inspect", "{odd}", "--scheme", "nf", "--choices", "nf4-s8-fp32-32x256"], "no nf format in"),
    (["inspect", "{model}/config.json"], "is a file"),
])
def test_bad_input_is_one_line_and_nonzero(own_model, tiny_model_dir, args, message):
    odd = tiny_model_dir("llama", hidden=48, heads=4, kv_heads=2)  # rows of 48: no 32-block fits
    proc = run_cli(*[a.format(model=own_model, odd=odd) for a in args])
    assert proc.returncode == 3
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
