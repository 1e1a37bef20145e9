"""Malformed and hostile input to every command, through the real command line.

Each case must end with exactly one line on stderr that names the problem (checked by a
fragment of it), exit code 2, no traceback and nothing written: the folder the command
was told to write into is as it was. Commands run in-process (typer's CliRunner: a
traceback would surface as an uncaught exception), except the cases that hand damaged
files to llama.cpp or ONNX Runtime: a native crash there must fail the case, not pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from coalora_edge.cli.commands import app

# slow: builds bundles and artifacts of every kind, runs the CLI in subprocesses
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

#: cases whose command line does not parse (click's usage errors): exit code 2, not 3
USAGE = {"inspect-usage", "train-budget-not-number", "eval-zero-blocks", "eval-zero-batch", "export-accuracy-level-range",
         "run-zero-tokens", "train-budget-nan", "train-budget-inf", "train-budget-100", "train-budget-empty-item",
         "train-choices-empty", "inspect-choices-empty", "train-negative-budget", "run-threads-too-many"}
#: folder every case may write into; it must be unchanged after the case
OUT = "{work}/out"


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    message: str  # a fragment of the one error line
    native: bool  # reaches llama.cpp or ONNX Runtime with a damaged file: run in a process of its own
    code: int  # the exit code (cli/common.py EXIT_CODES): 2 the command line does not parse, 3 bad input


def case(id: str, *args: str, message: str, native: bool = False, code: int | None = None) -> Case:
    return Case(id, args, message, native, code if code is not None else 2 if id in USAGE else 3)


# -- the bad inputs, built once --------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _models(root: Path, base: Path) -> dict[str, Path]:
    """Folders that are no usable causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    made = {name: root / name for name in ("t5", "alien", "notjson", "noweights", "badweights", "gpt2", "binconfig",
                                           "listconfig", "wrongtype")}
    for path in made.values():
        path.mkdir()
    (made["t5"] / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (made["alien"] / "config.json").write_text(json.dumps({"model_type": "frobnicator-9000"}))
    (made["notjson"] / "config.json").write_text("{this is not json")
    (made["binconfig"] / "config.json").write_bytes(bytes(range(256)) * 4)
    (made["listconfig"] / "config.json").write_text("[1, 2]")
    config = json.loads((base / "config.json").read_text())
    (made["wrongtype"] / "config.json").write_text(json.dumps(config | {"hidden_size": "big"}))
    shutil.copy(base / "model.safetensors", made["wrongtype"])
    shutil.copy(base / "config.json", made["noweights"])
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, made["badweights"])
    weights = made["badweights"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # GPT-2 is a causal LM, but built from Conv1D: nothing the adapter can wrap.
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(made["gpt2"])
    return made


def _data(root: Path) -> dict[str, Path]:
    files = {
        "empty.txt": b"",
        "blank.txt": b"  \n\n\t\n",
        "binary.txt": bytes(range(256)) * 64,
        "latin1.txt": "Once upon a time, caf\xe9 and na\xefve stories.\n".encode("latin-1") * 50,
        "short.txt": b"Once upon a time.",
        "bad.jsonl": b'{"text": "fine"}\n{not json\n',
        "notext.jsonl": b'{"body": "no text field"}\n',
        "config-binary.json": bytes(range(256)),
        "config-unknown.json": json.dumps(["Q9_9"] * 14).encode(),
        "config-short.json": json.dumps(["Q4_K"] * 3).encode(),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return {name: root / name for name in files}


PROFILE = {"name": "tiny", "runtime": "llama.cpp", "memory_bytes": "64MiB", "reserved_bytes": 0, "context_length": 64}


def _yaml(fields: dict) -> str:
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())


def _profiles(root: Path) -> dict[str, Path]:
    """Profile files that must be refused; ``pwned`` is what a constructed object would create."""
    texts = {
        "python-object.yaml": f"!!python/object/apply:os.system [\"touch {root / 'pwned'}\"]\n",
        "python-name.yaml": "name: !!python/name:os.system\nruntime: llama.cpp\n",
        "malformed.yaml": "name: [unclosed\nruntime: llama.cpp\n",
        "list.yaml": "- name: tiny\n- runtime: llama.cpp\n",
        "empty.yaml": "",
        "wrong-type.yaml": _yaml(PROFILE | {"context_length": "lots"}),
        "negative.yaml": _yaml(PROFILE | {"memory_bytes": "-8GiB"}),
        "absurd.yaml": _yaml(PROFILE | {"memory_bytes": "999999TiB"}),
        "huge-context.yaml": _yaml(PROFILE | {"context_length": 10**30}),
        "unknown-key.yaml": _yaml(PROFILE | {"memroy_bytes": "8GiB"}),
        "unknown-format.yaml": _yaml(PROFILE | {"allowed_formats": ["Q9_9"]}),
        "reserved-all.yaml": _yaml(PROFILE | {"reserved_bytes": "64MiB"}),
        "too-small.yaml": _yaml(PROFILE | {"memory_bytes": "1MiB"}),
        "onnx-runtime.yaml": _yaml(PROFILE | {"runtime": "onnxruntime"}),
    }
    made = {name: root / name for name in texts}
    for name, text in texts.items():
        made[name].write_text(text)
    binary = {"binary.yaml": bytes(range(256)), "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
              "huge.yaml": b"# " + b"x" * (2 << 20)}
    for name, content in binary.items():
        (root / name).write_bytes(content)
        made[name] = root / name
    return made


def _bundles(root: Path, bundle: Path) -> dict[str, Path]:
    """Copies of a valid bundle, each damaged in one way."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(bundle, root / name))

    def edit_manifest(b: Path, **changes) -> None:
        manifest = json.loads((b / "manifest.json").read_text())
        manifest.update(changes)
        (b / "manifest.json").write_text(json.dumps(manifest))

    made = {}
    b = made["flipped"] = copy("flipped")
    data = bytearray((b / "adapter.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "adapter.safetensors").write_bytes(bytes(data))
    b = made["truncated"] = copy("truncated")
    (b / "adapter.safetensors").write_bytes((b / "adapter.safetensors").read_bytes()[:100])
    b = made["missing-file"] = copy("missing-file")
    (b / "pareto.json").unlink()
    b = made["manifest-garbage"] = copy("manifest-garbage")
    (b / "manifest.json").write_bytes(bytes(range(256)))
    b = made["escape"] = copy("escape")
    edit_manifest(b, files=json.loads((b / "manifest.json").read_text())["files"] | {"../../etc/passwd": "0" * 64})
    b = made["moved-model"] = copy("moved-model")
    manifest = json.loads((b / "manifest.json").read_text())
    edit_manifest(b, base_model=manifest["base_model"] | {"source": str(root / "no-such-model")})
    b = made["future"] = copy("future")
    edit_manifest(b, format_version=99)
    # Rewritten *with* a matching hash: only the content itself can give it away.
    b = made["rehashed-adapter"] = copy("rehashed-adapter")
    (b / "adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    edit_manifest(b, files=json.loads((b / "manifest.json").read_text())["files"]
                  | {"adapter.safetensors": _sha256(b / "adapter.safetensors")})
    b = made["matrices-wrong-type"] = copy("matrices-wrong-type")
    edit_manifest(b, matrices="all of them")
    b = made["no-adapter-settings"] = copy("no-adapter-settings")
    edit_manifest(b, adapter=None)
    return made


def _checkpoints(root: Path) -> dict[str, Path]:
    """Outputs whose resumable checkpoint (OUT.checkpoint/) is damaged; the key names OUT."""
    from safetensors.torch import save_file

    damage = {
        "not-json": {"state.json": b"\xff\x00{"},
        "bad-tensors": {"state.json": b'{"optimizer_param_groups": []}', "adapter.safetensors": b"\x08" * 9},
        "wrong-shapes": {"state.json": b'{"optimizer_param_groups": [], "settings": "fast", "run": []}'},
    }
    made = {}
    for name, files in damage.items():
        checkpoint = root / name / "out.checkpoint"
        checkpoint.mkdir(parents=True)
        for tensors in ("adapter.safetensors", "optimizer.safetensors"):
            save_file({}, checkpoint / tensors)
        for file, content in files.items():
            (checkpoint / file).write_bytes(content)
        made[name] = root / name / "out"
    return made


def _gguf(path: Path, **fields: int) -> Path:
    """A well-formed GGUF holding one tensor and only ``fields``: llama.cpp cannot run it."""
    writer = gguf.GGUFWriter(path, arch="llama")
    for key, value in fields.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _artifacts(root: Path) -> dict[str, Path]:
    """Corrupted GGUF files and ONNX export folders for `run`."""
    made = {"random.gguf": root / "random.gguf", "empty.gguf": root / "empty.gguf", "model.bin": root / "model.bin"}
    made["random.gguf"].write_bytes(bytes(range(256)) * 16)
    made["empty.gguf"].write_bytes(b"")
    made["model.bin"].write_bytes(b"\0" * 16)
    made["no-arch.gguf"] = _gguf(root / "no-arch.gguf")
    made["no-vocab.gguf"] = _gguf(root / "no-vocab.gguf", **{"llama.context_length": 64})
    whole = _gguf(root / "whole.gguf").read_bytes()
    made["truncated.gguf"] = root / "truncated.gguf"
    made["truncated.gguf"].write_bytes(whole[: len(whole) - 100])
    made["magic-only.gguf"] = root / "magic-only.gguf"
    made["magic-only.gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)

    def onnx_folder(name: str, model: bytes, recorded: str | None = None) -> Path:
        folder = root / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(model)
        digest = recorded or hashlib.sha256(model).hexdigest()
        (folder / "export.json").write_text(json.dumps({"format": "onnx", "files": {"model.onnx": {"sha256": digest}}}))
        return folder

    made["onnx-garbage"] = onnx_folder("onnx-garbage", bytes(range(256)) * 8)
    made["onnx-tampered"] = onnx_folder("onnx-tampered", b"\x08\x07" * 100, recorded="0" * 64)
    made["onnx-no-report"] = root / "onnx-no-report"
    made["onnx-no-report"].mkdir()
    (made["onnx-no-report"] / "model.onnx").write_bytes(b"\x08\x07")
    made["onnx-bad-report"] = onnx_folder("onnx-bad-report", b"\x08\x07")
    (made["onnx-bad-report"] / "export.json").write_bytes(bytes(range(256)))
    return made


@pytest.fixture(scope="module")
def paths(tmp_path_factory, own_model, own_text, small_bundle, tiny_model_dir) -> dict[str, str]:
    """Placeholder -> path for the case table: the session's own model and text (no ../shared)."""
    root = tmp_path_factory.mktemp("bad-input")
    found: dict[str, Path] = {"model": own_model, "text": own_text, "bundle": small_bundle,
                              "other_model": tiny_model_dir("llama"), "missing": root / "no" / "such" / "path",
                              "folder": root, "plain_folder": root / "plain-folder", "root": root}
    found["plain_folder"].mkdir()
    for group, build in (("models", lambda r: _models(r, own_model)), ("data", _data), ("profiles", _profiles),
                         ("bundles", lambda r: _bundles(r, small_bundle)), ("artifacts", _artifacts),
                         ("checkpoints", _checkpoints)):
        (root / group).mkdir()
        found |= {f"{group}/{name}": path for name, path in build(root / group).items()}
    return {k: str(v) for k, v in found.items()}


# -- the table ---------------------------------------------------------------------------------

TRAIN = ("train", "{model}", "--data", "{text}", "--out", OUT, "--seq-len", "32", "--steps", "1", "--budgets", "4.5")
EVAL = ("eval", "{bundle}", "--data", "{text}", "--seq-len", "32", "--max-blocks", "4")
EXPORT = ("export", "{bundle}", "--out", OUT)


def train(*args: str, model: str = "{model}", data: str = "{text}") -> tuple[str, ...]:
    base = list(TRAIN)
    base[1], base[3] = model, data
    return (*base, *args)


CASES = [
    # inspect: paths and models
    case("inspect-missing", "inspect", "{missing}", message="not found"),
    case("inspect-file", "inspect", "{text}", message="is a file"),
    case("inspect-empty-folder", "inspect", "{plain_folder}", message="has no config.json"),
    case("inspect-not-causal", "inspect", "{models/t5}", message="not a causal language model"),
    case("inspect-unknown-arch", "inspect", "{models/alien}", message="not a model config transformers knows"),
    case("inspect-config-not-json", "inspect", "{models/notjson}", message="not a model config transformers knows"),
    case("inspect-config-binary", "inspect", "{models/binconfig}", message="not a model config transformers knows"),
    case("inspect-config-list", "inspect", "{models/listconfig}", message="holds a JSON list, not a model config"),
    case("inspect-config-wrong-type", "inspect", "{models/wrongtype}", message="has hidden_size = 'big', which must be"),
    case("train-config-wrong-type", *train(model="{models/wrongtype}"), message="has hidden_size = 'big', which must be"),
    case("inspect-no-weights", "inspect", "{models/noweights}", message="no weights"),
    case("inspect-truncated-weights", "inspect", "{models/badweights}", message="could not load weights"),
    case("inspect-conv1d", "inspect", "{models/gpt2}", message="not supported"),
    case("inspect-unknown-scheme", "inspect", "{model}", "--scheme", "int3", message="unknown scheme 'int3'"),
    case("inspect-unknown-format", "inspect", "{model}", "--choices", "Q4_K,Q9_9", message="unknown gguf format 'Q9_9'"),
    case("inspect-usage", "inspect", "{model}", "--bogus", message="No such option"),
    # train: data
    case("train-missing-model", *train(model="{missing}"), message="not found"),
    case("train-not-causal", *train(model="{models/t5}"), message="not a causal language model"),
    case("train-conv1d", *train(model="{models/gpt2}"), message="not supported"),
    case("train-missing-data", *train(data="{missing}"), message="not found"),
    case("train-data-folder", *train(data="{folder}"), message="not a file"),
    case("train-empty-data", *train(data="{data/empty.txt}"), message="holds no text"),
    case("train-blank-data", *train(data="{data/blank.txt}"), message="holds no text"),
    case("train-binary-data", *train(data="{data/binary.txt}"), message="looks binary"),
    case("train-latin1-data", *train(data="{data/latin1.txt}"), message="not UTF-8"),
    case("train-short-data", *train(data="{data/short.txt}"), message="too few"),
    case("train-bad-jsonl", *train(data="{data/bad.jsonl}"), message="not valid JSON"),
    case("train-jsonl-no-text", *train(data="{data/notext.jsonl}"), message='string field "text"'),
    # train: options
    case("train-below-smallest", *train()[:-1], "0.5", message="raise the budget"),
    case("train-negative-budget", *train()[:-1], "-3", message="'--budgets': bits per weight must be above 0"),
    case("train-budget-not-number", *train()[:-1], "abc", message="'--budgets': expected numbers"),
    case("train-budget-nan", *train()[:-1], "nan", message="'--budgets': bits per weight must be above 0 and at most 32"),
    case("train-budget-inf", *train()[:-1], "4,inf", message="'--budgets': bits per weight must be above 0"),
    case("train-budget-100", *train()[:-1], "100", message="'--budgets': bits per weight must be above 0 and at most 32"),
    case("train-budget-empty-item", *train()[:-1], "3,,4", message="'--budgets': expected a comma-separated list without empty"),
    case("train-choices-empty", *train(), "--choices", "", message="'--choices': expected a comma-separated list"),
    case("inspect-choices-empty", "inspect", "{model}", "--choices", " , ", message="'--choices': expected a comma-separated"),
    case("train-unknown-scheme", *train("--scheme", "int3"), message="unknown scheme 'int3'"),
    case("train-unknown-format", *train("--choices", "Q4_K,Q9_9"), message="unknown gguf format 'Q9_9'"),
    case("train-unknown-method", *train("--method", "magic"), message="method must be one of"),
    case("train-unknown-objective", *train("--objective", "vibes"), message="objective must be one of"),
    case("train-unknown-search", *train("--search", "grid"), message="grid"),
    case("train-unknown-dtype", *train("--dtype", "int7"), message="unknown dtype"),
    case("train-unknown-device", *train("--device", "tpu"), message="device must be one of"),
    case("train-zero-rank", *train("--rank", "0"), message="rank must be at least 1"),
    case("train-absurd-rank", *train("--rank", "1000000"), message="pass --rank 64 or less"),
    case("train-negative-steps", *train("--steps", "-5"), message="steps must be >= 0"),
    case("train-zero-batch", *train("--batch-size", "0"), message="batch size must be at least 1"),
    case("train-seq-len-1", *train("--seq-len", "1"), message="at least 2 tokens"),
    case("train-huge-seq-len", *train("--seq-len", "100000000"), message="a smaller --batch-size or --seq-len", code=6),
    case("train-negative-lr", *train("--lr", "-1"), message="learning rate must be a positive number"),
    case("train-infinite-lr", *train("--lr", "inf"), message="learning rate must be a positive number, got inf"),
    case("train-nan-lr", *train("--lr", "nan"), message="learning rate must be a positive number, got nan"),
    case("train-zero-k", *train("--k", "0"), message="at least 1"),
    case("train-negative-eval-blocks", *train("--eval-blocks", "-1"), message="--eval-blocks must be at least 1"),
    case("train-zero-ladder-step", *train()[:-2], "--ladder-step", "0", message="ladder step must be positive"),
    case("train-negative-epochs", *train()[:-4], "--budgets", "4.5", "--epochs", "-1", message="--epochs must be positive"),
    case("train-negative-checkpoint-every", *train("--checkpoint-every", "-1"), message="checkpoint"),
    case("train-resume-nothing", *train("--resume"), message="nothing to resume"),
    *[case(f"train-resume-{damage}", *[f"{{checkpoints/{damage}}}" if a == OUT else a for a in train("--resume")],
           message="is damaged") for damage in ("not-json", "bad-tensors", "wrong-shapes")],
    case("train-out-in-a-file", *[("{text}/out" if a == OUT else a) for a in train()], message="cannot write"),
    # eval
    case("eval-missing-bundle", *EVAL[:1], "{missing}", *EVAL[2:], "--bpw", "9", message="not a coalora-edge bundle"),
    case("eval-plain-folder", *EVAL[:1], "{plain_folder}", *EVAL[2:], "--bpw", "9", message="not a coalora-edge bundle"),
    case("eval-flipped-bundle", *EVAL[:1], "{bundles/flipped}", *EVAL[2:], "--bpw", "9", message="does not match its sha256"),
    case("eval-truncated-bundle", *EVAL[:1], "{bundles/truncated}", *EVAL[2:], "--bpw", "9", message="does not match its sha256"),
    case("eval-other-base-model", *EVAL, "--bpw", "9", "--model", "{other_model}", message="is not the base model"),
    case("eval-moved-base-model", *EVAL[:1], "{bundles/moved-model}", *EVAL[2:], "--bpw", "9", message="not found"),
    case("eval-below-smallest", *EVAL, "--bpw", "1", message="no known configuration fits"),
    case("eval-negative-bpw", *EVAL, "--bpw", "-2", message="no known configuration fits"),
    case("eval-config-binary", *EVAL, "--config", "{data/config-binary.json}", message="cannot read configuration file"),
    case("eval-config-unknown-format", *EVAL, "--config", "{data/config-unknown.json}", message="Q9_9"),
    case("eval-config-wrong-length", *EVAL, "--config", "{data/config-short.json}", message="lists 3 formats"),
    case("eval-empty-data", *EVAL[:3], "{data/empty.txt}", *EVAL[4:], "--bpw", "9", message="holds no text"),
    case("eval-zero-blocks", *EVAL[:-1], "0", "--bpw", "9", message="--max-blocks"),
    case("eval-zero-batch", *EVAL, "--bpw", "9", "--batch-size", "0", message="--batch-size"),
    case("eval-python-profile", *EVAL, "--profile", "{profiles/python-object.yaml}", message="python/object"),
    # pareto
    case("pareto-missing", "pareto", "{missing}", message="not a coalora-edge bundle"),
    case("pareto-missing-file", "pareto", "{bundles/missing-file}", message="missing pareto.json"),
    case("pareto-manifest-garbage", "pareto", "{bundles/manifest-garbage}", message="corrupt"),
    case("pareto-path-escape", "pareto", "{bundles/escape}", message="invalid file"),
    case("pareto-future-version", "pareto", "{bundles/future}", message="format version 99"),
    case("pareto-matrices-wrong-type", "pareto", "{bundles/matrices-wrong-type}", message="matrices"),
    case("pareto-no-adapter-settings", "pareto", "{bundles/no-adapter-settings}", message="adapter"),
    case("pareto-plot-missing-folder", "pareto", "{bundle}", "--plot", "{missing}/front.png", message="does not exist"),
    case("pareto-compare-missing", "pareto", "{bundle}", "--compare", "{missing}", message="not a coalora-edge bundle"),
    # profiles
    case("profile-missing", "profiles", "show", "{missing}.yaml", message="file not found"),
    case("profile-unknown-name", "profiles", "show", "raspberry-pi-9", message="is not a shipped profile"),
    case("profile-folder", "profiles", "show", "{folder}", message="is not a file"),
    case("profile-python-object", "profiles", "show", "{profiles/python-object.yaml}", message="python/object"),
    case("profile-python-name", "profiles", "show", "{profiles/python-name.yaml}", message="python/name"),
    case("profile-malformed", "profiles", "show", "{profiles/malformed.yaml}", message="YAML"),
    case("profile-list", "profiles", "show", "{profiles/list.yaml}", message="mapping"),
    case("profile-empty", "profiles", "show", "{profiles/empty.yaml}", message="empty"),
    case("profile-binary", "profiles", "show", "{profiles/binary.yaml}", message="profile"),
    case("profile-latin1", "profiles", "show", "{profiles/latin1.yaml}", message="UTF-8"),
    case("profile-huge-file", "profiles", "show", "{profiles/huge.yaml}", message="too large"),
    case("profile-wrong-type", "profiles", "show", "{profiles/wrong-type.yaml}", message="context_length"),
    case("profile-negative", "profiles", "show", "{profiles/negative.yaml}", message="memory_bytes"),
    case("profile-absurd", "profiles", "show", "{profiles/absurd.yaml}", message="at most"),
    case("profile-huge-context", "profiles", "show", "{profiles/huge-context.yaml}", message="context_length"),
    case("profile-unknown-key", "profiles", "show", "{profiles/unknown-key.yaml}", message="memroy_bytes"),
    case("profile-unknown-format", "profiles", "show", "{profiles/unknown-format.yaml}", message="Q9_9"),
    case("profile-reserved-all", "profiles", "show", "{profiles/reserved-all.yaml}", message="reserved_bytes"),
    # resolve
    case("resolve-too-small", "resolve", "{bundle}", "--profile", "{profiles/too-small.yaml}", message="nothing fits"),
    case("resolve-other-runtime", "resolve", "{bundle}", "--profile", "{profiles/onnx-runtime.yaml}", message="onnx"),
    case("resolve-python-object", "resolve", "{bundle}", "--profile", "{profiles/python-object.yaml}", message="python/object"),
    case("resolve-flipped-bundle", "resolve", "{bundles/flipped}", "--profile", "tiny-demo-llamacpp", message="sha256"),
    case("resolve-rehashed-adapter", "resolve", "{bundles/rehashed-adapter}", "--profile", "tiny-demo-llamacpp",
         message="adapter.safetensors"),
    case("resolve-other-base-model", "resolve", "{bundle}", "--profile", "tiny-demo-llamacpp", "--model", "{other_model}",
         message="does not match"),
    # export
    case("export-unknown-format", *EXPORT, "--bpw", "9", "--format", "tflite", message="unknown --format 'tflite'"),
    case("export-other-format", *EXPORT, "--bpw", "9", "--format", "onnx", message="use --format gguf"),
    case("export-unknown-mode", *EXPORT, "--bpw", "9", "--adapter-mode", "fused", message="--adapter-mode must be one of"),
    case("export-no-configuration", *EXPORT, message="pass --profile"),
    case("export-two-configurations", *EXPORT, "--bpw", "9", "--config", "{data/config-short.json}", message="at most one"),
    case("export-below-smallest", *EXPORT, "--bpw", "1", message="no known configuration fits"),
    case("export-too-small", *EXPORT, "--profile", "{profiles/too-small.yaml}", message="nothing fits"),
    case("export-config-unknown-format", *EXPORT, "--config", "{data/config-unknown.json}", message="Q9_9"),
    case("export-accuracy-level-gguf", *EXPORT, "--bpw", "9", "--accuracy-level", "2", message="onnx only"),
    case("export-unknown-rounding", *EXPORT, "--bpw", "9", "--rounding", "best", message="unknown rounding 'best'"),
    case("export-feedback-sidecar", *EXPORT, "--bpw", "9", "--rounding", "feedback", "--adapter-mode", "sidecar",
         message="feedback rounding applies to merged exports"),
    case("export-calibration-nearest", *EXPORT, "--bpw", "9", "--rounding", "nearest", "--calibration", "{text}",
         message="--calibration is text for feedback rounding"),
    case("export-calibration-missing", *EXPORT, "--bpw", "9", "--calibration", "{work}/missing.txt",
         message="feedback rounding needs calibration text"),
    case("export-calibration-too-short", *EXPORT, "--bpw", "9", "--calibration", "{data/short.txt}",
         message="feedback rounding needs calibration text"),
    case("export-accuracy-level-range", *EXPORT, "--bpw", "9", "--accuracy-level", "9", message="accuracy-level"),
    case("export-other-base-model", *EXPORT, "--bpw", "9", "--model", "{other_model}", message="is not the base model"),
    case("export-rehashed-adapter", "export", "{bundles/rehashed-adapter}", "--out", OUT, "--bpw", "9",
         message="adapter.safetensors"),
    case("export-out-in-a-file", "export", "{bundle}", "--out", "{text}/out", "--bpw", "9", message="cannot write"),
    # run
    case("run-missing", "run", "{missing}.gguf", "--prompt", "hi", message="not found"),
    case("run-threads-too-many", "run", "{artifacts/random.gguf}", "--prompt", "hi", "--threads", "100000",
         message="less than or equal to 512"),  # found by tests/test_cli_fuzz.py: llama.cpp aborted
    case("run-unknown-suffix", "run", "{artifacts/model.bin}", "--prompt", "hi", message="known model files are"),
    case("run-empty-folder", "run", "{plain_folder}", "--prompt", "hi", message="holds no single model file"),
    case("run-random-gguf", "run", "{artifacts/random.gguf}", "--prompt", "hi", message="not a readable GGUF"),
    case("run-empty-gguf", "run", "{artifacts/empty.gguf}", "--prompt", "hi", message="not a readable GGUF"),
    case("run-magic-only-gguf", "run", "{artifacts/magic-only.gguf}", "--prompt", "hi", message="not a readable GGUF"),
    case("run-truncated-gguf", "run", "{artifacts/truncated.gguf}", "--prompt", "hi", message="not a readable GGUF"),
    case("run-gguf-no-arch", "run", "{artifacts/no-arch.gguf}", "--prompt", "hi", message="context_length"),
    case("run-gguf-no-vocab", "run", "{artifacts/no-vocab.gguf}", "--prompt", "hi", message="cannot load", native=True),
    case("run-onnx-garbage", "run", "{artifacts/onnx-garbage}", "--prompt", "hi", message="ONNX Runtime cannot load",
         native=True),
    case("run-onnx-tampered", "run", "{artifacts/onnx-tampered}", "--prompt", "hi", message="does not match its sha256"),
    case("run-onnx-no-report", "run", "{artifacts/onnx-no-report}", "--prompt", "hi", message="no readable export.json"),
    case("run-onnx-bad-report", "run", "{artifacts/onnx-bad-report}", "--prompt", "hi", message="no readable export.json"),
    case("run-zero-tokens", "run", "{artifacts/random.gguf}", "--prompt", "hi", "--max-tokens", "0", message="max-tokens"),
]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    crashed: BaseException | None  # an exception that escaped the command


def in_process(args: list[str]) -> Outcome:
    result = CliRunner().invoke(app, args)
    escaped = None if isinstance(result.exception, SystemExit) or result.exception is None else result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr, escaped)


def in_subprocess(args: list[str]) -> Outcome:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "coalora_edge", *args], capture_output=True, text=True, timeout=120, env=env)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, None)


def fill(args: tuple[str, ...], paths: dict[str, str], work: Path) -> list[str]:
    """Replace each ``{name}`` by its path (names hold dots and slashes: no str.format)."""
    known = paths | {"work": str(work)}
    return [re.sub(r"\{([^{}]+)\}", lambda m: known[m[1]], a) for a in args]


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def check(c: Case, paths: dict[str, str], tmp_path: Path, runner) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = fill(c.args, paths, work)
    before = listing(work)
    outcome = runner(args)
    lines = outcome.stderr.strip().splitlines()
    assert outcome.crashed is None, f"{c.id}: escaped {type(outcome.crashed).__name__}: {outcome.crashed}"
    assert outcome.code == c.code, f"{c.id}: exit code {outcome.code}, stderr {outcome.stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{c.id}: stderr {outcome.stderr!r}"
    assert "Traceback" not in outcome.stderr and c.message in lines[0], f"{c.id}: {lines[0]!r}"
    assert listing(work) == before, f"{c.id}: left output behind"
    assert not (Path(paths["root"]) / "profiles" / "pwned").exists(), "a YAML tag ran code"


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_bad_input(c, paths, tmp_path):
    check(c, paths, tmp_path, in_subprocess if c.native else in_process)


def test_existing_output_is_kept(paths, tmp_path):
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep")
    for args in (train(), (*EXPORT, "--bpw", "9")):
        outcome = in_process(fill(args, paths, tmp_path / "work"))
        assert outcome.code == 3 and "--force" in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1
        assert listing(out) == {"mine.txt": b"keep"}
