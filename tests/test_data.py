import json

import pytest
from transformers import AutoTokenizer

from coalora_edge.errors import DataError
from coalora_edge.training.data import load_blocks, read_source


@pytest.fixture(scope="module")
def tokenizer(own_model):
    return AutoTokenizer.from_pretrained(own_model)


def test_text_file_blocks_and_tail_validation(tokenizer, own_text):
    blocks = load_blocks(tokenizer, [str(own_text)], seq_len=64, valid_fraction=0.1)
    stream = tokenizer(own_text.read_text())["input_ids"]
    n = len(stream) // 64
    assert blocks.train.shape == (n - round(n * 0.1), 64) and blocks.valid.shape == (round(n * 0.1), 64)
    # Blocks are the stream in order; validation is its tail, disjoint from training.
    assert blocks.train.flatten().tolist() == stream[: blocks.train.numel()]
    assert blocks.valid.flatten().tolist() == stream[blocks.train.numel(): n * 64]


def test_jsonl_records_get_eos_between_them(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"Story number {i}. The cat sat."}) for i in range(40)) + "\n\n")
    blocks = load_blocks(tokenizer, [str(path)], seq_len=16, valid_fraction=0.25)
    flat = blocks.train.flatten().tolist()
    assert flat[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in flat


def test_local_hf_dataset_folder(tokenizer, tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"Tim had {i} red balls."}) for i in range(30)))
    docs = read_source(f"hf:{folder}")
    assert docs[3] == "Tim had 3 red balls."


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.txt", "not found"),
    (b"", "empty.txt", "holds no text"),
    (b"   \n\n", "blank.txt", "holds no text"),
    (b"\x00\x01\x02binary", "blob.txt", "looks binary"),
    ("caf\xe9".encode("latin-1"), "latin.txt", "not UTF-8"),
    (b'{"text": "ok"}\n{oops}\n', "bad.jsonl", "bad.jsonl:2: not valid JSON"),
    (b'{"body": "no text field"}\n', "nofield.jsonl", "string field \"text\""),
])
def test_bad_data_is_a_clear_error(tokenizer, tmp_path, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_blocks(tokenizer, [str(path)], seq_len=8)


def test_too_little_text_for_the_block_size(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Once upon a time.")
    with pytest.raises(DataError, match="too few"):
        load_blocks(tokenizer, [str(path)], seq_len=64)
