"""GPT-2's real BPE files (../shared/data/gpt2: vocab.bpe + encoder.json) in every layout the loader reads."""

import json
import os
import shutil

import pytest

import pytorch_mqa
from pytorch_mqa.training import gpt2_bpe
from pytorch_mqa.training import tokenizers as T
from pytorch_mqa.training.data import default_corpus
from pytorch_mqa.training.files import FileFormatError
from shared_data import shared_path

# Known GPT-2 ids (tiktoken's "gpt2" encoding, the reference implementation's).
KNOWN = {
    "Hello world": [15496, 995],
    " the": [262],
    "The quick brown fox": [464, 2068, 7586, 21831],
    "hello, world!": [31373, 11, 995, 0],
}


@pytest.fixture(scope="module")
def gpt2_dir():
    return shared_path("gpt2")


@pytest.fixture(scope="module")
def tok(gpt2_dir):
    return pytorch_mqa.load_tokenizer("gpt2", path=gpt2_dir)


def test_known_ids(tok):
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    for text, ids in KNOWN.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text


def test_round_trip_over_the_embedded_corpus(tok):
    text = default_corpus()
    ids = tok.encode(text)
    assert len(ids) < len(text) / 3  # real merges, not bytes
    assert tok.decode(ids) == text


def test_files_are_the_ones_tiktoken_verifies(gpt2_dir):
    import hashlib

    for name, digest in gpt2_bpe.GPT2_SHA256.items():
        with open(os.path.join(gpt2_dir, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest


def test_hf_layout_reads_merges(tmp_path, gpt2_dir, tok):
    shutil.copy(os.path.join(gpt2_dir, "encoder.json"), tmp_path / "vocab.json")
    shutil.copy(os.path.join(gpt2_dir, "vocab.bpe"), tmp_path / "merges.txt")
    hf = T.load_tokenizer("gpt2", path=str(tmp_path))
    assert hf.encode("Hello world") == [15496, 995]
    assert T.load_tokenizer(str(tmp_path)).encode(" the") == [262]  # the directory form finds it too
    # merges.txt is read: swapping two merges no longer matches the vocabulary's ids, and is refused.
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(FileFormatError, match="merge 1"):
        T.load_tokenizer("gpt2", path=str(tmp_path))


def test_tiktoken_cache_layout_and_tiktoken_agree(tmp_path, gpt2_dir, tok, monkeypatch):
    for name, url in gpt2_bpe.GPT2_FILES.items():
        import hashlib

        shutil.copy(os.path.join(gpt2_dir, name), tmp_path / hashlib.sha1(url.encode()).hexdigest())
    cached = T.load_tokenizer("gpt2", path=str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert T.get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    import tiktoken

    ref = tiktoken.get_encoding("gpt2")  # reads the cache just written; would download otherwise
    text = default_corpus()[:20000]
    assert cached.encode(text) == ref.encode_ordinary(text) == tok.encode(text)


def test_saved_gpt2_tokenizer_loads_by_kind(tmp_path, tok):
    tok.save(str(tmp_path))
    again = T.load_tokenizer("gpt2", path=str(tmp_path))
    assert again.encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="kind"):
        T.load_tokenizer("char", path=str(tmp_path))


def test_missing_directory_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        T.load_tokenizer("gpt2", path=str(tmp_path))


def test_tiny_shakespeare_round_trips(tok):
    path = shared_path("tinyshakespeare.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert len(text) == 1115394 and text.startswith("First Citizen:")
    assert tok.decode(tok.encode(text[:100000])) == text[:100000]
    char = T.get_tokenizer("char", text)
    assert char.vocab_size == 65 + 2  # the tutorial's 65 characters, plus end-of-text and unknown
    assert char.decode(char.encode(text)) == text
    word = T.get_tokenizer("word", text, vocab_size=50000)
    assert word.encode("First Citizen:") == [word.stoi["First"], word.stoi["Citizen:"]]


def test_json_is_a_gpt2_vocabulary(gpt2_dir):
    with open(os.path.join(gpt2_dir, "encoder.json"), encoding="utf-8") as f:
        assert len(json.load(f)) == 50257
