"""The JRT/Based FDA protocol's window and prompt (lmlab.eval.fda), with hand-computed expectations.

A word-level tokenizer that adds BOS (as fla-hub's Llama tokenizers do) makes token positions countable
by hand: ids = [BOS, w0, w1, ...], so the id at index i is word i-1.
"""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lmlab.eval.fda import keep_doc, prompt, window_texts

WORDS = [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<s>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS + ["APPLICANT", "acme"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")


def window_text(tokenizer, text, needles, window):
    """One document's window, as window_texts gives it in a batch of one."""
    return window_texts(tokenizer, [text], [needles], window)[0]


def words(*indices):
    return " ".join(WORDS[i] if isinstance(i, int) else i for i in indices)


def test_key_found(tokenizer):
    text = words(*range(10), "APPLICANT", *range(10, 20))
    # the key starts after 10 words: anchor = len([BOS, w0..w9]) = 11; start = 11 - 6 // 2 = 8 -> word 7
    out = window_text(tokenizer, text, ["applicant", "acme"], window=6)
    assert out == words(7, 8, 9, "APPLICANT", 10, 11)


def test_value_found_before_key(tokenizer):
    text = words(0, 1, 2, 3, "acme", *range(4, 12), "APPLICANT", *range(12, 20))
    # the value (4 words in) comes first: anchor 5, start 5 - 2 = 3 -> ids[3:7] = w2 w3 acme w4
    out = window_text(tokenizer, text, ["applicant", "acme"], window=4)
    assert out == words(2, 3, "acme", 4)


def test_none_found_keeps_about_the_last_half_window(tokenizer):
    text = words(*range(20))
    # anchor = len(tokens of text[:-1]) = 21 ("w1" for "w19" still one token); start 21 - 3 = 18 -> w17..w19
    assert window_text(tokenizer, text, ["applicant", "acme"], window=6) == words(17, 18, 19)


def test_text_shorter_than_window_is_kept_whole_and_stripped(tokenizer):
    text = "  " + words(0, 1, "APPLICANT", 2) + "\n"
    assert window_text(tokenizer, text, ["applicant", "acme"], window=100) == words(0, 1, "APPLICANT", 2)


def test_window_at_the_start(tokenizer):
    text = words("APPLICANT", *range(10))
    # anchor = len([BOS]) = 1, start 0: BOS counts as one of the 4 window tokens, decoding skips it
    assert window_text(tokenizer, text, ["applicant"], window=4) == words("APPLICANT", 0, 1)


def test_a_batch_gives_each_document_its_own_window(tokenizer):
    texts = [words(*range(10), "APPLICANT", *range(10, 20)), words(0, 1, 2, 3, "acme", *range(4, 12)),
             words(*range(20)), "  " + words(0, 1, "APPLICANT", 2) + "\n", words("APPLICANT", *range(10))]
    needles = [["applicant", "acme"], ["applicant", "acme"], ["applicant"], ["acme"], ["applicant"]]
    alone = [window_text(tokenizer, text, mentions, 6) for text, mentions in zip(texts, needles)]
    assert window_texts(tokenizer, texts, needles, 6) == alone
    # the fourth has no "acme": the window ends the text (anchor = len(tokens of text[:-1]) = 5, start 2)
    assert alone[1] == words(1, 2, 3, "acme", 4, 5) and alone[3] == words(1, "APPLICANT", 2)


@pytest.mark.parametrize("text, key, expected", [
    ("Device name: fox meter", "device name", "Device name: fox meter. Device name:"),
    ("\nfoo bar.\n", "applicant", "foo bar. Applicant:"),
    # trailing "key:" removed (case-insensitive, repeatedly); the remaining " " stops the "." strip
    ("Some text. Applicant:applicant:", "applicant", "Some text. . Applicant:"),
    ("..dots..", "k", "dots. K:"),
])
def test_prompt(text, key, expected):
    assert prompt(text, key) == expected


def test_short_values_are_dropped():
    assert not keep_doc({"value": ""})
    assert not keep_doc({"value": "a"})
    assert keep_doc({"value": "ab"})
