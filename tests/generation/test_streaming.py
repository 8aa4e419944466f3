"""`TextStream`: the text streamed token by token is the answer's plain decode (`decode(ids,
skip_special_tokens=True)`) for a byte-level BPE tokenizer (alignkit's tiny one, as Qwen's), a
SentencePiece-style one with byte fallback (Llama 2's and Mistral's decoder, built in place) and, through the
whole-decode path, one that asks for tokenization spaces cleaned up: the streamed text is never ahead of a
decode of the tokens so far, and what is held back at the end is only cut characters (U+FFFD), which the
server's row sends with its final text; a character cut between tokens waits for the token that completes it."""

from __future__ import annotations

import random

import pytest

from alignkit.generation.streaming import TextStream

TEXT = "Hello  world, it's 12 + 7 = 19. Café naïve 日本語 🙂 the quick fox"


def _sentencepiece_like() -> object:
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    t.train_from_iterator(
        [TEXT, "the lazy dog jumps"] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=special)
    )
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tokenizer(kind: str) -> object:
    from alignkit.modeling.tiny import build_tokenizer

    if kind == "sentencepiece":
        return _sentencepiece_like()
    tok = build_tokenizer()
    if kind == "cleanup":
        tok.clean_up_tokenization_spaces = True  # (WordPiece's " ," -> ","): decoded whole each time
    return tok


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece", "cleanup"])
def test_streamed_text_is_the_plain_decode(kind: str) -> None:
    tok = _tokenizer(kind)
    assert (TextStream(tok)._stream is None) == (kind == "cleanup")  # the incremental path where it is exact
    rng = random.Random(0)
    cases = [tok(TEXT + " ,x" * k)["input_ids"] for k in range(3)]
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))] for _ in range(200)]  # any ids
    cases.append(tok(TEXT)["input_ids"] + tok("🙂")["input_ids"][:1])  # ends in a cut character
    for ids in cases:
        stream, sent = TextStream(tok), ""
        for n, i in enumerate(ids, 1):
            sent += stream.push([i])
            assert tok.decode(ids[:n], skip_special_tokens=True).startswith(sent)  # never ahead of a decode
        held = tok.decode(ids, skip_special_tokens=True)[len(sent) :]  # the serve row sends it at the end
        assert held == "" or held.endswith("\ufffd"), (ids, held)
        if kind != "cleanup":  # the incremental path holds back only the cut characters
            assert held.strip("\ufffd") == "", (ids, held)


def test_a_character_cut_between_tokens_waits_for_the_rest() -> None:
    tok = _tokenizer("byte_level")
    ids = tok("🙂")["input_ids"]
    assert len(ids) > 1  # one emoji, several byte tokens
    stream = TextStream(tok)
    assert [stream.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_a_decoder_that_rewrites_earlier_text_falls_back_to_whole_decodes() -> None:
    """The incremental decoder refuses a token that changes the text before it ("Invalid prefix"); the stream
    then decodes whole from that token on, instead of failing every row of the server's batch."""
    tok = _tokenizer("byte_level")
    stream = TextStream(tok)
    ids = tok("Hello world")["input_ids"]
    sent = stream.push(ids[:1])

    class Refusing:
        def step(self, *_: object) -> str:
            raise Exception("Invalid prefix encountered")

    stream._stream = Refusing()
    sent += stream.push(ids[1:])
    assert sent == "Hello world" and stream._stream is None
