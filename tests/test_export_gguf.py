"""GGUF export for llama.cpp: the files hold the trained bytes, llama.cpp loads them and
computes the trained configuration, tokenizes as transformers does; `export` and `run`.

Tiny Llama and Qwen2 models have K-quant-sized matrices (256 / 768) and are exported with
a mix of four ggml types. The Llama gets own_model's sentencepiece-style tokenizer (byte
fallback), the Qwen2 a byte-level BPE with Qwen2's pre-tokenizer, trained here on own_text,
so both of llama.cpp's vocabulary kinds are exercised end to end without ../shared.
TinyStories-656K itself goes through the command line at the end.
"""

import json
import shutil

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from coalora_edge.bundle.restore import restore
from coalora_edge.bundle.store import load_bundle, train_bundle
from coalora_edge.cli.commands import app
from coalora_edge.exporters.common.report import REPORT_FILE
from coalora_edge.exporters.gguf import export as gguf_export
from coalora_edge.exporters.gguf.arch import Target, rope_row_order
from coalora_edge.exporters.gguf.llamacpp import Artifact, generate, read_gguf, stream, unencodable
from coalora_edge.model.loading import load_model
from coalora_edge.profiles import load_profile
from coalora_edge.resolve.non_adapted import base_tensors
from coalora_edge.resolve.resolver import resolve
from coalora_edge.schemes.gguf import FORMATS
from coalora_edge.training.job import TrainJob
from coalora_edge.training.trainer import TrainSettings

pytestmark = pytest.mark.slow  # trains bundles or runs the CLI in subprocesses: `make test` only

MIXED = ("Q3_K", "Q4_K", "Q6_K", "Q8_0")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TRICKY = ["Hello  world", " leading space", "two\nlines\n\nand a blank", "Tom's dog isn't here, I'll go!",
          "3 33 333 3.14", "tabs\tand   spaces", "CAPS and MiXeD", "café, naïve, 東京"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The test machines are small and shared: OpenMP's spinning threads slow tiny models
    # down tenfold whenever another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bundle(model_dir, out, text, budgets, choices=None):
    return train_bundle(TrainJob(model=str(model_dir), data=[str(text)], out=out, scheme="gguf", seq_len=32, budgets=budgets,
                        choices=choices, calib_blocks=4, eval_blocks=4, show_progress=False,
                        settings=TrainSettings(steps=2, batch_size=4, rank=4, alpha=8, lr=1e-2)))


def byte_level_tokenizer(lines, vocab_size):
    """A Qwen2-style tokenizer (GPT-2 byte level, Qwen2's split regex, ChatML specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_dirs(tiny_model_dir, own_model, own_text, tmp_path_factory):
    """arch -> a tiny model folder with a tokenizer (copies: the session's models stay bare)."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    dirs = {"llama": shutil.copytree(tiny_model_dir("llama", hidden=256, intermediate=768, vocab=512), root / "llama"),
            "qwen2": shutil.copytree(tiny_model_dir("qwen2", hidden=256, intermediate=768, vocab=2048), root / "qwen2")}
    for name in TOKENIZER_FILES:
        shutil.copy(own_model / name, dirs["llama"] / name)
    lines = own_text.read_text().splitlines()[:2000]
    byte_level_tokenizer(lines, 2048).save_pretrained(dirs["qwen2"])
    return dirs


@pytest.fixture(scope="module")
def tiny_bundles(tiny_dirs, own_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-gguf-bundles")
    return {arch: make_bundle(d, root / arch, own_text, [4.5], choices=list(MIXED)).path
            for arch, d in tiny_dirs.items()}


@pytest.fixture(scope="module")
def exports(tiny_bundles, tmp_path_factory):
    """(arch, mode) -> (restored, config, out, report), exported once per module."""
    root = tmp_path_factory.mktemp("gguf-exports")
    done = {}

    def get(arch, mode, rounding=None):
        if (arch, mode, rounding) not in done:
            restored = restore(load_bundle(tiny_bundles[arch]))
            # Every matrix in one of four types, cycled, so neighbours differ.
            config = {m.name: MIXED[i % len(MIXED)] for i, m in enumerate(restored.bundle.matrices)}
            out = root / f"{arch}-{mode}-{rounding}"
            done[(arch, mode, rounding)] = (restored, config, out, gguf_export.export(
                restored, config, out, adapter_mode=mode, rounding=rounding))
        return done[(arch, mode, rounding)]

    return get


CASES = [(arch, mode) for arch in ("llama", "qwen2") for mode in gguf_export.ADAPTER_MODES]


@pytest.mark.parametrize("arch, mode", CASES)
def test_export_verifies_in_llamacpp(exports, arch, mode):
    _, config, out, report = exports(arch, mode)
    v = report["verification"]
    assert v["runtime_vs_artifact"]["kl"] <= gguf_export.MAX_KL
    assert v["runtime_vs_artifact"]["top1"] >= gguf_export.MIN_TOP1
    assert v["tokenizer_agrees"] and report["sizes"]["matches"]
    assert v["loaded_model_bytes"] == report["sizes"]["model_tensor_bytes"]
    if mode == "sidecar":
        # llama.cpp applies the adapter: without it the gap would be the adapter's whole effect.
        assert v["runtime_vs_artifact"]["kl"] < v["adapter_effect_kl"] / 10
        assert v["fold"] is None
    else:
        assert v["fold"]["kl"] > 0  # re-quantizing W + s B'A is not Q(W) + s B'A
    assert sorted(p.name for p in out.iterdir()) == sorted([*report["files"], REPORT_FILE])
    assert json.loads((out / REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    assert set(report["stored"].values()) == set(MIXED) and report["config"] == config


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_families_export(tiny_model_dir, own_model, own_text, tmp_path, arch):
    model_dir = shutil.copytree(tiny_model_dir(arch, hidden=256, intermediate=768, vocab=512), tmp_path / arch)
    for name in TOKENIZER_FILES:
        shutil.copy(own_model / name, model_dir / name)
    restored = restore(make_bundle(model_dir, tmp_path / "bundle", own_text, [4.5], choices=list(MIXED)))
    config = {m.name: MIXED[i % len(MIXED)] for i, m in enumerate(restored.bundle.matrices)}
    report = gguf_export.export(restored, config, tmp_path / "out", adapter_mode="sidecar")
    assert report["verification"]["runtime_vs_artifact"]["kl"] < report["verification"]["adapter_effect_kl"] / 10
    assert report["sizes"]["matches"]


def _unpermuted(tensor, target):
    """A GGUF tensor's bytes (rows, row_bytes) in the Hugging Face row order."""
    data = np.asarray(tensor.data).reshape(int(tensor.shape[-1]), -1)
    order = target.row_order(tensor.name, data.shape[0])
    return data if order is None else data[np.argsort(order)]


@pytest.mark.parametrize("arch, mode", CASES)
def test_files_hold_the_trained_bytes(exports, arch, mode):
    restored, config, out, report = exports(arch, mode)
    assert report["rounding"] == "nearest"
    wrapper = restored.wrapper
    target = Target.from_config(wrapper.model.config)
    tensors = {t.name: t for t in read_gguf(out / "model.gguf").tensors}
    lora = wrapper.collapsed_lora(config)
    for m in wrapper.matrices:
        fmt = wrapper.scheme.storage(config[m.name], m.shape)
        written = tensors[target.tensor_name(f"{m.name}.weight")]
        assert written.tensor_type.name == fmt.name
        got = _unpermuted(written, target)  # (out, row_bytes)
        weight = wrapper.layers[m.name].base_layer.weight.detach()
        imatrix = wrapper.cache.imatrix[m.name] if fmt.uses_imatrix else None
        if mode == "sidecar":  # exactly what training computed with
            assert torch.equal(fmt.dequantize(got, m.shape[1]), wrapper.cache.get(m.name, config[m.name]))
            assert np.array_equal(got, fmt.quantize(weight, imatrix))
        else:
            A, B = lora[m.name]
            assert np.array_equal(got, fmt.quantize(weight + wrapper.scaling * (B @ A), imatrix))
    for t in base_tensors(wrapper.model, [m.name for m in wrapper.matrices], "llama.cpp"):
        assert tensors[target.tensor_name(t.name)].tensor_type.name == t.type
    if mode == "sidecar":
        adapter = {t.name: t for t in read_gguf(out / "adapter.gguf").tensors}
        for name, (A, B) in lora.items():
            base = target.tensor_name(f"{name}.weight")
            assert np.array_equal(np.asarray(adapter[f"{base}.lora_a"].data), A.numpy())
            order = target.row_order(base, B.shape[0])
            assert np.array_equal(np.asarray(adapter[f"{base}.lora_b"].data), B.numpy()[order] if order is not None else B.numpy())


def test_feedback_rounding_keeps_more_of_the_adapter(exports, tiny_dirs, own_text, tmp_path):
    """A merged file rounded for the layers' outputs (--rounding feedback, exporters/common/merge.py): its
    bytes are ggml's, and on text like the calibration text (own_text's held-out tail, the
    bundle's training data) it loses less of the adapter than nearest rounding. 32-weight
    blocks: 8 per row of 256 to feed errors forward (a 256-wide K-quant row has one)."""
    assert exports("llama", "merged")[3]["rounding"] == "nearest"  # the default
    bundle = make_bundle(tiny_dirs["llama"], tmp_path / "b", own_text, [4.5], choices=["Q4_0", "Q5_0", "Q8_0"])
    restored = restore(load_bundle(bundle.path))
    config = {m.name: "Q4_0" for m in restored.bundle.matrices}
    held_out = [line for line in own_text.read_text().splitlines()[-400:] if len(line) > 60][:4]
    folders = {rounding: tmp_path / rounding for rounding in ("feedback", "nearest")}
    folds = {rounding: gguf_export.export(restored, config, folder, rounding=rounding, prompts=held_out)["verification"]["fold"]
             for rounding, folder in folders.items()}
    assert folds["feedback"]["kl"] < 0.95 * folds["nearest"]["kl"]  # measured 0.88x
    target = Target.from_config(restored.wrapper.model.config)
    files = {r: {t.name: t for t in read_gguf(folder / "model.gguf").tensors} for r, folder in folders.items()}
    for m in restored.wrapper.matrices:
        name = target.tensor_name(f"{m.name}.weight")
        written, rounded = (_unpermuted(files[r][name], target) for r in folders)
        assert files["feedback"][name].tensor_type.name == "Q4_0"
        assert torch.isfinite(FORMATS["Q4_0"].dequantize(written, m.shape[1])).all()
        assert not np.array_equal(written, rounded)


@pytest.mark.parametrize("type_name", sorted(n for n, f in FORMATS.items() if f.block <= 256))
def test_rope_permutation_commutes_with_quantization(type_name):
    fmt = FORMATS[type_name]
    torch.manual_seed(0)
    weight = torch.randn(128, 512)
    imatrix = torch.rand(512) if fmt.uses_imatrix else None
    order = rope_row_order(128, heads=4)
    assert sorted(order) == list(range(128)) and not np.array_equal(order, np.arange(128))
    assert np.array_equal(fmt.quantize(weight[order], imatrix), fmt.quantize(weight, imatrix)[order])


@pytest.fixture(scope="module")
def vocab_only(exports):
    """arch -> the exported GGUF's vocabulary loaded in llama.cpp."""
    loaded = {arch: llama_cpp.Llama(str(exports(arch, "merged")[2] / "model.gguf"), vocab_only=True, verbose=False)
              for arch in ("llama", "qwen2")}
    yield loaded
    for llm in loaded.values():
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llamacpp_tokenizes_like_transformers(exports, vocab_only, own_text, arch):
    restored, _, out, _ = exports(arch, "merged")
    reader = read_gguf(out / "model.gguf")
    text = [line for line in own_text.read_text().splitlines() if line][-300:]
    lines = [line for line in text + TRICKY if not unencodable(reader, line)]
    assert len(lines) > 250
    llm, tokenizer = vocab_only[arch], restored.tokenizer
    mismatches = [line for line in lines
                  if llm.tokenize(line.encode(), add_bos=True, special=False) != tokenizer(line)["input_ids"]]
    assert mismatches == []
    assert llm.detokenize(tokenizer(lines[0], add_special_tokens=False)["input_ids"]).decode().strip() == lines[0].strip()


def test_vocabulary_metadata(exports):
    llama = read_gguf(exports("llama", "merged")[2] / "model.gguf")
    qwen2 = read_gguf(exports("qwen2", "merged")[2] / "model.gguf")
    field = lambda r, k: r.get_field(k).contents()  # noqa: E731
    assert field(llama, "tokenizer.ggml.model") == "llama" and field(llama, "tokenizer.ggml.add_bos_token")
    assert field(llama, "tokenizer.ggml.bos_token_id") == 1 and field(llama, "tokenizer.ggml.eos_token_id") == 2
    assert field(qwen2, "tokenizer.ggml.model") == "gpt2" and field(qwen2, "tokenizer.ggml.pre") == "qwen2"
    assert len(field(qwen2, "tokenizer.ggml.merges")) > 1000 and not field(qwen2, "tokenizer.ggml.add_bos_token")
    assert field(qwen2, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert field(qwen2, "tokenizer.ggml.tokens")[2] == "<|im_end|>" and field(qwen2, "tokenizer.ggml.eos_token_id") == 2
    assert len(field(qwen2, "tokenizer.ggml.tokens")) == 2048  # padded to the embedding's rows
    # byte-level BPE spells anything (TinyStories' vocabulary cannot: test_unspellable_prompt_is_refused)
    assert unencodable(qwen2, "café @home") == []
    # so does byte fallback, also where the tokenizer lists its <0xNN> pieces as special added tokens
    tokens, types = field(llama, "tokenizer.ggml.tokens"), field(llama, "tokenizer.ggml.token_type")
    assert {types[tokens.index(f"<0x{b:02X}>")] for b in range(256)} == {gguf.TokenType.BYTE}
    assert unencodable(llama, "café @home") == []


def test_base_tensors_of_a_wrapped_model_are_the_plain_models(exports, tiny_dirs):
    restored, _, _, _ = exports("qwen2", "merged")  # Qwen2: adapted q/k/v keep their biases
    names = [m.name for m in restored.wrapper.matrices]
    plain = base_tensors(load_model(str(tiny_dirs["qwen2"])), names, "llama.cpp")
    assert base_tensors(restored.wrapper.model, names, "llama.cpp") == plain
    assert any(t.name.endswith("q_proj.bias") for t in plain)


# -- TinyStories through the command line ---------------------------------------------------

@pytest.fixture(scope="module")
def ts_bundle(tinystories_dir, tinystories_text, tmp_path_factory):
    return make_bundle(tinystories_dir, tmp_path_factory.mktemp("ts-gguf") / "bundle", tinystories_text, [4.5, 8.5]).path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ts_export(ts_bundle, tmp_path_factory):
    """TinyStories' bundle exported for the profile sized for it: (folder, the command's result)."""
    out = tmp_path_factory.mktemp("ts-gguf-export") / "ts"
    return out, cli("export", ts_bundle, "--profile", "tiny-demo-llamacpp", "--format", "gguf", "--out", out, "--json")


def test_tinystories_exports_for_a_profile_and_generates(ts_bundle, ts_export):
    out, result = ts_export
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    resolution = resolve(load_bundle(ts_bundle), load_profile("tiny-demo-llamacpp"))
    assert report["config"] == resolution.config and report["memory"]["fits"]
    # the resolver's speed prediction (llama.cpp's default floor) travels with the files
    assert report["decode"] == {"predicted_ratio": pytest.approx(resolution.decode_ratio), "min_ratio": 0.95}
    assert resolution.decode_ratio >= 0.95
    sizes = report["sizes"]
    assert sizes["model_tensor_bytes"] == resolution.nbytes + resolution.memory.non_adapted
    # verified on hundreds of positions of the training text besides the fixed prompts (issue 15)
    verification = report["verification"]
    assert verification["prompts"] == 3 and verification["calibration_blocks"] >= 2
    assert verification["runtime_vs_artifact"]["positions"] >= 500
    assert verification["runtime_vs_artifact"]["decisive_positions"] >= 100
    # Nothing in the file but the header, the tensors and ggml's alignment padding.
    reader = read_gguf(out / "model.gguf")
    padded = sum(-(-t.n_bytes // reader.alignment) * reader.alignment for t in reader.tensors)
    assert report["files"]["model.gguf"]["bytes"] == reader.data_offset + padded
    result = cli("run", out, "--prompt", "Once upon a time", "--max-tokens", "40", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    words = json.loads(result.stdout)["text"].split()
    assert len(words) >= 15 and sum(w.strip('.,!?"').lower() in {"the", "a", "was", "to", "and", "she", "he"} for w in words) >= 3


def test_sidecar_run_applies_the_adapter(exports):
    _, _, out, _ = exports("llama", "sidecar")
    result = cli("run", out / "model.gguf", "--prompt", "Once upon a time", "--max-tokens", "8", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    assert Artifact.find(out / "model.gguf").adapter == out / "adapter.gguf"


def test_a_failed_verification_leaves_nothing(small_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_export, "MAX_KL", -1.0)
    result = cli("export", small_bundle, "--bpw", "8.5", "--out", tmp_path / "out")
    assert result.exit_code == 4 and "failed verification" in result.stderr  # cli/common.py EXIT_CODES
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.gguf").write_bytes((d / "model.gguf").read_bytes()[:-1000]), "cannot reshape"),
    (lambda d: (d / "model.gguf").write_bytes((d / "model.gguf").read_bytes()[:5000]), "not a readable GGUF"),
    (lambda d: (d / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4), "not a readable GGUF"),
    (lambda d: (d / "adapter.gguf").write_bytes(b"\0" * 100), "not a readable GGUF"),
    (lambda d: (d / "model.gguf").unlink(), "no single model file"),
])
def test_damaged_artifacts_are_one_line_errors(exports, tmp_path, damage, message):
    folder = shutil.copytree(exports("llama", "sidecar")[2], tmp_path / "a")
    damage(folder)
    result = cli("run", folder, "--prompt", "Once upon a time", "--max-tokens", "4")
    assert result.exit_code == 3 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_unspellable_prompt_is_refused(ts_export):
    # TinyStories' vocabulary has no '@', no 'é' and no byte tokens to fall back on
    out, exported = ts_export
    assert exported.exit_code == 0, exported.output
    assert unencodable(read_gguf(out / "model.gguf"), "café @home") == ["@", "é"]
    result = cli("run", out, "--prompt", "Once upon a café", "--max-tokens", "4")
    assert result.exit_code == 3 and "cannot spell 'é'" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--format", "nope"], "unknown --format"),
    ([], "pass --profile P"),
    (["--bpw", "8.5", "--adapter-mode", "both"], "--adapter-mode must be one of"),
])
def test_export_bad_options(small_bundle, tmp_path, args, message):
    result = cli("export", small_bundle, "--out", tmp_path / "o", *args)
    assert result.exit_code == 3 and message in result.stderr, result.output


def test_run_keeps_to_the_context(exports, own_model):
    """One policy for every runner (exporters/common/generation.py): a prompt past the context
    is refused in one line, generation stops at the context, the prompt must be UTF-8."""
    from transformers import AutoTokenizer

    restored, _, out, _ = exports("llama", "sidecar")
    context = restored.wrapper.model.config.max_position_embeddings
    tokenizer = AutoTokenizer.from_pretrained(own_model)
    long = " ".join(["the little dog ran home"] * context)
    result = cli("run", out, "--prompt", long, "--max-tokens", "4")
    assert result.exit_code == 3 and f"and the model's context is {context}" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    prompt = "Once upon a time"
    text = json.loads(cli("run", out, "--prompt", prompt, "--max-tokens", "100000", "--json").stdout)["text"]
    assert len(tokenizer(prompt + text).input_ids) <= context + 1
    result = cli("run", out, "--prompt", "caf\udce9")
    assert result.exit_code == 3 and "not valid UTF-8" in result.stderr

    # ... and streams: the pieces come one by one and add up to the text `run` prints
    pieces = list(stream(out, prompt, 12, threads=1))
    assert len(pieces) >= 2 and "".join(pieces) == generate(out, prompt, 12, threads=1)
    printed = cli("run", out, "--prompt", prompt, "--max-tokens", "12", "--threads", "1")
    assert printed.exit_code == 0 and printed.stdout == prompt + "".join(pieces) + "\n"
