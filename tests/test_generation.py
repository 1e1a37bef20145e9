"""What every runner shares (exporters/common/generation.py): text streamed piece by piece."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from coalora_edge.exporters.common.generation import text_pieces

TEXT = "Once upon a time, a café served 😀 and ☕ to Lily."


def _byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE (GPT-2's kind, SmolLM2's): a character of several bytes spans tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(["Once upon a time, Lily and a cat served tea."] * 20, trainer)
    return tokenizer


def test_pieces_add_up_to_the_text_and_never_split_a_character():
    tokenizer = _byte_level_tokenizer()
    ids = tokenizer.encode(TEXT).ids
    assert any("\ufffd" in tokenizer.decode(ids[:k]) for k in range(len(ids)))  # some prefix ends inside a character
    prompt = ids[:4]
    pieces = list(text_pieces(tokenizer.decode, prompt, ids[4:]))
    assert "".join(pieces) == TEXT[len(tokenizer.decode(prompt)):]
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > 5


def test_onnx_text_keeps_byte_pieces_and_drops_control_tokens(own_model):
    """own_model's tokenizer is the demo's kind: byte pieces registered as special tokens."""
    from transformers import AutoTokenizer

    from coalora_edge.exporters.onnx.generate import text_decoder

    tokenizer = AutoTokenizer.from_pretrained(own_model)
    ids = tokenizer("Once upon a time, a café served ☕.").input_ids + [tokenizer.eos_token_id]
    assert "café" not in tokenizer.decode(ids, skip_special_tokens=True)  # what `run` printed before
    assert text_decoder(tokenizer)(ids).strip() == "Once upon a time, a café served ☕."
