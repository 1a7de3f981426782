"""Tokenizer round trips, the locally trained BPE and its .tiktoken file, and GPT-2's offline error."""

import hashlib
import os

import pytest

from pytorch_mqa.training import tokenizers as T

TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n"
    "Numbers like 12345 and symbols such as {braces} and <tags> appear too.\n"
    "Accents: café, naïve, Zürich; and a snowman \u2603.\n"
) * 20


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_round_trip_and_save_load(kind, tmp_path):
    tok = T.get_tokenizer(kind, TEXT, vocab_size=300, word_split="punct")
    ids = tok.encode(TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert 0 <= tok.eos_id < tok.vocab_size and tok.eos_id not in ids
    tok.save(str(tmp_path))
    back = T.Tokenizer.load(str(tmp_path))
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size and back.eos_id == tok.eos_id
    assert back.encode(TEXT) == ids


def test_char_unknown_characters():
    tok = T.CharTokenizer.train("abc")
    assert tok.encode("abz") == [tok.stoi["a"], tok.stoi["b"], tok.unk_id]
    assert tok.decode([tok.eos_id]) == T.EOT


def test_word_unknown_and_pad():
    tok = T.WordTokenizer.train("the cat sat on the mat. the end", split="punct")
    ids = tok.encode("the dog sat")
    assert ids[2] == tok.unk_id and tok.decode(ids) == "the \u2047 sat"  # shown as ⁇, not a literal [UNK]
    assert tok.decode([tok.pad_id] + tok.encode("the cat")) == "the cat"
    # The most frequent pieces get the smallest ids, after [PAD], [UNK] and <|endoftext|>.
    assert tok.itos[:3] == ["[PAD]", "[UNK]", T.EOT] and tok.itos[3] == " "


def test_word_whitespace_split_is_the_default_and_saved(tmp_path):
    tok = T.WordTokenizer.train("the cat sat on the mat.\nthe end  of it")
    assert tok.split == "whitespace" and " " not in tok.stoi and "mat." in tok.stoi
    ids = tok.encode("the dog sat on\nthe mat.")
    assert len(ids) == 6 and ids[1] == tok.unk_id
    assert tok.decode(ids) == "the \u2047 sat on the mat."  # one space between words
    tok.save(str(tmp_path))
    back = T.load_tokenizer("word", path=str(tmp_path))
    assert back.split == "whitespace" and back.encode("the mat.") == tok.encode("the mat.")
    with pytest.raises(ValueError, match="split"):
        T.WordTokenizer.train("a b", split="spaces")


def test_word_vocab_limit():
    tok = T.WordTokenizer.train(TEXT, max_vocab=10)
    assert tok.vocab_size == 10
    assert tok.unk_id in tok.encode(TEXT)


def test_bpe_merges_are_frequent_pairs_and_compress(tmp_path):
    ranks = T.train_bpe_ranks(TEXT, 300)
    assert len(ranks) == 300 and sorted(ranks.values()) == list(range(300))
    assert all(ranks[bytes([b])] == b for b in range(256))
    # Every merged token is the concatenation of two earlier tokens.
    by_rank = sorted(ranks, key=ranks.get)
    for tok in by_rank[256:]:
        assert any(tok[:i] in ranks and tok[i:] in ranks and ranks[tok[:i]] < ranks[tok] and ranks[tok[i:]] < ranks[tok]
                   for i in range(1, len(tok)))
    # The first merge is the most frequent adjacent byte pair within a pre-token.
    import collections

    import regex

    pairs = collections.Counter()
    for chunk in regex.findall(T.GPT2_PAT, TEXT):
        b = chunk.encode()
        pairs.update(zip(b, b[1:]))
    best = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
    assert by_rank[256] == bytes(best)
    tok = T.TiktokenTokenizer("bpe", ranks)
    assert len(tok.encode(TEXT)) < 0.7 * len(TEXT.encode())


def test_tiktoken_file_format(tmp_path):
    ranks = T.train_bpe_ranks(TEXT, 280)
    path = tmp_path / "x.tiktoken"
    T.save_tiktoken_ranks(ranks, str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 280 and lines[65].split() == ["QQ==", "65"]  # base64(b"A") rank 65
    assert T.load_tiktoken_ranks(str(path)) == ranks


def test_bpe_training_is_deterministic():
    assert T.train_bpe_ranks(TEXT, 290) == T.train_bpe_ranks(TEXT, 290)


def test_bpe_eos_is_special_not_ordinary():
    tok = T.TiktokenTokenizer.train(TEXT, 300)
    assert tok.eos_id == 299 and tok.vocab_size == 300
    assert tok.eos_id not in tok.encode("a " + T.EOT)
    assert tok.decode([tok.eos_id]) == T.EOT


def test_gpt2_without_cached_files_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR") as err:
        T.get_tokenizer("gpt2")
    url = T.GPT2_FILES["vocab.bpe"]
    assert hashlib.sha1(url.encode()).hexdigest() in str(err.value)
    assert not os.listdir(tmp_path)  # nothing was fetched or written


def test_gpt2_cache_paths_and_hashes_match_tiktoken():
    import inspect

    import tiktoken_ext.openai_public as openai_public

    src = inspect.getsource(openai_public.gpt2)
    assert all(url in src for url in T.GPT2_FILES.values())
    assert all(h in src for h in T.GPT2_SHA256.values())


def test_gpt2_with_corrupt_cached_files_raises_without_touching_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for path in T.gpt2_cache_paths().values():
        with open(path, "w") as f:
            f.write("{}")
    with pytest.raises(ValueError, match="sha256"):
        T.GPT2Tokenizer()
    assert len(os.listdir(tmp_path)) == 2  # tiktoken would have deleted them and downloaded again


def test_gpt2_from_hf_style_vocab(tmp_path):
    # A miniature GPT-2 vocab.json: the 256 byte symbols plus two merges, in GPT-2's byte alphabet.
    import json

    byte_of = T._gpt2_byte_decoder()
    char_of = {b: c for c, b in byte_of.items()}
    vocab = {c: i for i, c in enumerate(byte_of)}  # GPT-2's byte order: printable bytes first
    vocab[char_of[ord(" ")] + "t"] = 256
    vocab[char_of[ord(" ")] + "th"] = 257
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n\u0120 t\n\u0120t h\n", encoding="utf-8")
    vocab[T.EOT] = 258
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    ranks, eos = T._ranks_from_hf_gpt2(str(tmp_path))
    assert ranks[b" t"] == 256 and ranks[b" th"] == 257 and len(ranks) == 258 and eos == 258
    assert sorted(ranks.values()) == list(range(258))
    tok = T.load_tokenizer(str(tmp_path))  # a Hugging Face directory: vocab.json + merges.txt
    assert isinstance(tok, T.GPT2Tokenizer) and tok.eos_id == 258 and tok.vocab_size == 259
    assert tok.encode(" the") == [257, ranks[b"e"]] and tok.decode(tok.encode("naïve ☃")) == "naïve ☃"
    tok.save(str(tmp_path / "saved"))
    assert T.load_tokenizer(str(tmp_path / "saved")).encode(" the x") == tok.encode(" the x")


def test_unknown_kind():
    with pytest.raises(ValueError, match="tokenizer"):
        T.get_tokenizer("sentencepiece", TEXT)
