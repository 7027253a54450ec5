"""runtime.tokenize: bucket padding, truncation, phrase maps, spans and bad prompts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.tokenize import PromptTokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "fiber" / "assets" / "tokenizer.json"
CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer(TOKENIZER, buckets=(16, 32, 64))


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return json.loads(TOKENIZER.read_text())["model"]["vocab"]


def test_ids_mask_and_phrase_map(tok, vocab):
    e = tok.encode("person. red mug")
    words = ["person", ".", "red", "mug"]
    want = [CLS] + [vocab[w] for w in words] + [SEP]
    assert e.input_ids.dtype == np.int64 and e.input_ids.shape == (1, 16)
    assert e.input_ids[0].tolist() == want + [PAD] * (16 - len(want))
    assert e.attention_mask[0].tolist() == [1] * len(want) + [0] * (16 - len(want))
    assert e.phrases == ("person", "red mug") and not e.truncated
    assert e.phrase_map.dtype == np.float32 and e.phrase_map.shape == (2, 16)
    assert np.flatnonzero(e.phrase_map[0]).tolist() == [1]
    assert np.flatnonzero(e.phrase_map[1]).tolist() == [3, 4]  # "." and specials belong nowhere


@pytest.mark.parametrize("names,bucket", [(3, 16), (10, 32), (25, 64)])
def test_smallest_bucket_that_fits(tok, names, bucket):
    e = tok.encode(". ".join(["cat"] * names))  # 2 tokens per name ("cat", "."), minus 1, + 2
    n = 2 * names + 1
    assert e.input_ids.shape == (1, bucket) and int(e.attention_mask.sum()) == n
    assert e.input_ids[0, n - 1] == SEP and len(e.phrases) == names
    assert e.phrase_map.sum(axis=1).tolist() == [1.0] * names


def test_long_prompt_is_truncated_with_a_warning(tok):
    prompt = ". ".join(f"thing{i}" for i in range(60))
    with pytest.warns(UserWarning, match=r"prompt of \d+ characters is \d+ tokens, over the 64"):
        e = tok.encode(prompt)
    assert e.truncated and e.input_ids.shape == (1, 64) and e.attention_mask.all()
    assert e.input_ids[0, 0] == CLS and e.input_ids[0, -1] == SEP
    assert len(e.phrases) == 60
    assert e.phrase_map[0].any() and not e.phrase_map[-1].any()  # cut-off phrases get no tokens


def test_caption_with_explicit_spans(tok, vocab):
    prompt = "A man walking a Dog near the man"
    spans = [[[2, 5], [29, 32]], [[16, 19]]]  # "man" (twice), "Dog"
    e = tok.encode(prompt, spans)
    assert e.phrases == ("man man", "Dog")
    toks = e.input_ids[0].tolist()
    man, dog = vocab["man"], vocab["dog"]
    assert [toks[t] for t in np.flatnonzero(e.phrase_map[0])] == [man, man]
    assert [toks[t] for t in np.flatnonzero(e.phrase_map[1])] == [dog]


def test_non_ascii_prompt(tok):
    prompt = "Grüße. 猫. éclair 🚲"
    e = tok.encode(prompt)
    assert e.phrases == ("Grüße", "猫", "éclair 🚲")
    assert all(e.phrase_map[p].any() for p in range(3))
    for s, t in e.offsets:  # offsets index the original string (characters, not bytes)
        assert 0 <= s <= t <= len(prompt)
    assert e.input_ids[0, np.flatnonzero(e.phrase_map[1])].tolist() == [100]  # [UNK]


def test_lowercase_keeps_offsets_valid():
    lower = PromptTokenizer(TOKENIZER, lowercase=True)
    plain = PromptTokenizer(TOKENIZER)
    prompt = "İstanbul CAT. Red Mug"  # "İ".lower() is two characters: left as is
    a, b = lower.encode(prompt), plain.encode(prompt)
    assert a.input_ids.tolist() == b.input_ids.tolist()
    assert a.phrases == ("İstanbul CAT", "Red Mug")
    assert np.array_equal(a.phrase_map, b.phrase_map)


@pytest.mark.parametrize("prompt", ["", "   ", ". . .", "."])
def test_empty_prompts_are_errors(tok, prompt):
    with pytest.raises(ValueError, match="empty|no phrases"):
        tok.encode(prompt)


@pytest.mark.parametrize("spans,match", [
    ([], "phrase_spans is empty"),
    ([[]], "no character spans"),
    ([[[3, 2]]], "outside the prompt"),
    ([[[0, 99]]], "outside the prompt"),
    ([[[0]]], "not a \\[start, end\\] pair"),
])
def test_bad_spans_are_errors(tok, spans, match):
    with pytest.raises(ValueError, match=match):
        tok.encode("a red mug", spans)


def test_bad_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a usable tokenizer.json"):
        PromptTokenizer(bad)
    with pytest.raises(ValueError, match="buckets"):
        PromptTokenizer(TOKENIZER, buckets=())


def test_tokenizers_of_one_file_are_loaded_once_and_reloaded_when_it_changes(tmp_path):
    """PromptTokenizers of one file share its parsed tokenizer (per truncation length); a file
    rewritten in place is read again, and the truncation of one never leaks into another."""
    path = tmp_path / "tokenizer.json"
    path.write_bytes(TOKENIZER.read_bytes())
    a, b, c = (PromptTokenizer(path, buckets=(16,)), PromptTokenizer(path, buckets=(16,)),
               PromptTokenizer(path, buckets=(8,)))
    assert a._tok is b._tok and a._tok_trunc is b._tok_trunc
    assert c._tok is a._tok and c._tok_trunc is not a._tok_trunc
    long = " ".join(["red mug"] * 10)
    with pytest.warns(UserWarning, match="truncated"):
        assert c.encode(long).input_ids.shape == (1, 8)
    with pytest.warns(UserWarning, match="truncated"):
        assert int(a.encode(long).attention_mask.sum()) == 16
    data = json.loads(path.read_text())
    data["model"]["vocab"]["mug"], data["model"]["vocab"]["red"] = data["model"]["vocab"]["red"], data["model"]["vocab"]["mug"]
    path.write_text(json.dumps(data))
    swapped = PromptTokenizer(path, buckets=(16,))
    assert swapped._tok is not a._tok
    assert swapped.encode("red").input_ids[0, 1] == a.encode("mug").input_ids[0, 1]
