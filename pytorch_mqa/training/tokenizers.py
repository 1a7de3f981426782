"""Tokenizers behind one interface: GPT-2 BPE (tiktoken), a byte-level BPE trained locally, char, word.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eos_id`,
`save(directory)`; `load_tokenizer(directory)` reads any of them back. `get_tokenizer(kind,
corpus_text)` builds one for `--tokenizer {char,word,bpe,gpt2}`.

Nothing here downloads anything: the GPT-2 encoding is read from local files (gpt2_bpe.py: vocab.bpe +
encoder.json, a Hugging Face vocab.json + merges.txt, or tiktoken's cache), otherwise a clear error
says how to provide them.
"""

from __future__ import annotations

import base64
import collections
import heapq
import json
import os
import re

from pytorch_mqa.training.files import FileFormatError, read_json
from pytorch_mqa.training.gpt2_bpe import (_ranks_from_tiktoken_cache, gpt2_ranks_from_dir,
                                           has_hf_gpt2_tokenizer)
from pytorch_mqa.training.gpt2_bpe import (GPT2_FILES, GPT2_LAYOUTS, GPT2_SHA256, _gpt2_byte_decoder,  # noqa: F401
                                           _ranks_from_hf_gpt2, gpt2_cache_paths, tiktoken_cache_dir)  # re-exported

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer_mqa.json"  # not "tokenizer.json": a Hugging Face directory has one
RANKS_FILE = "tokenizer_mqa.tiktoken"
KINDS = ("char", "word", "bpe", "gpt2")

# GPT-2's pre-tokenizer (tiktoken's r50k_base / gpt2 pattern): words, numbers, punctuation, spaces.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

class Tokenizer:
    """Common interface. Subclasses set `kind` and implement encode/decode/_state."""

    kind = ""
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _state(self, directory: str) -> dict:
        return {}

    def check_text(self, text: str, what: str = "text") -> None:
        """Raise ValueError if `text` holds something this tokenizer cannot encode faithfully (byte-level BPE
        encodes everything; the word tokenizer maps unknown words to its documented [UNK])."""

    def save(self, directory: str) -> None:
        """Write `tokenizer_mqa.json` (and any side files) into `directory`."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, **self._state(directory)}, f, ensure_ascii=False)

    @staticmethod
    def load(directory: str) -> "Tokenizer":
        """Any tokenizer written by `save(directory)` (same as `load_tokenizer`)."""
        return load_tokenizer(directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# ----------------------------------------------------------------------------------------- char


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus; `<|endoftext|>` is id 0, unknown characters id 1."""

    kind = "char"
    UNK = "\ufffd"

    def __init__(self, chars: list[str]):
        self.itos = [EOT, self.UNK] + [c for c in chars if c not in (self.UNK,)]
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.eos_id, self.unk_id = 0, 1
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, self.unk_id) for c in text]

    def check_text(self, text: str, what: str = "text") -> None:
        """Characters the corpus never had would encode to the unknown id and decode as U+FFFD: refuse them."""
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            first = text.index(next(c for c in text if c not in self.stoi))
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ValueError(
                f"{what}: character {text[first]!r} (U+{ord(text[first]):04X}) at position {first} is not in this "
                f"char tokenizer's vocabulary of {self.vocab_size - 2} characters (unknown: {shown}); remove or "
                "replace it, or train on a corpus that contains it"
            )

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def _state(self, directory: str) -> dict:
        return {"chars": self.itos[2:]}

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "CharTokenizer":
        return cls(state["chars"])


# ----------------------------------------------------------------------------------------- word

WORD_PAT = re.compile(r"\w+|[^\w\s]|\s+")
WORD_SPLITS = ("whitespace", "punct")


class WordTokenizer(Tokenizer):
    """A word-level vocabulary of the `max_vocab` most frequent words; two ways to split text.

    - `split="whitespace"` (the default, the word-level tutorials' `text.split()`): a token is a run of
      non-space characters; decoding joins tokens with one space, so line breaks and repeated spaces
      are not kept, and punctuation stays attached to its word ("end." is one token).
    - `split="punct"`: words, single punctuation marks and whitespace runs are tokens of their own;
      text made only of known pieces round-trips exactly, but a context holds fewer words.

    Ids: `[PAD]` 0, `[UNK]` 1, `<|endoftext|>` 2. A word outside the vocabulary encodes to `[UNK]` and
    decodes as `UNK_SHOWN` ("⁇"), so generated text shows where a word was unknown without a literal
    "[UNK]" in it.
    """

    kind = "word"
    PAD, UNK = "[PAD]", "[UNK]"
    UNK_SHOWN = "\u2047"  # ⁇

    def __init__(self, words: list[str], split: str = "punct"):
        if split not in WORD_SPLITS:
            raise ValueError(f"split: expected one of {WORD_SPLITS}, got {split!r}")
        self.split = split
        self.itos = [self.PAD, self.UNK, EOT] + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.itos)

    @staticmethod
    def pieces(text: str, split: str) -> list[str]:
        return text.split() if split == "whitespace" else WORD_PAT.findall(text)

    @classmethod
    def train(cls, text: str, max_vocab: int = 8192, split: str = "whitespace") -> "WordTokenizer":
        if split not in WORD_SPLITS:
            raise ValueError(f"split: expected one of {WORD_SPLITS}, got {split!r}")
        counts = collections.Counter(cls.pieces(text, split))
        # Most frequent first, ties broken by the string itself so the vocabulary is deterministic.
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ordered[: max(0, max_vocab - 3)]], split)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(w, self.unk_id) for w in self.pieces(text, self.split)]

    def decode(self, ids: list[int]) -> str:
        words = [self.UNK_SHOWN if i == self.unk_id else self.itos[i] for i in ids if i != self.pad_id]
        return (" " if self.split == "whitespace" else "").join(words)

    def _state(self, directory: str) -> dict:
        return {"words": self.itos[3:], "split": self.split}

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "WordTokenizer":
        return cls(state["words"], state.get("split", "punct"))  # saved before splits were a choice: punct


# ---------------------------------------------------------------------------------- tiktoken BPE


def train_bpe_ranks(text: str, vocab_size: int, pat_str: str = GPT2_PAT) -> dict[bytes, int]:
    """Byte-level BPE: learn `vocab_size - 256` merges (fewer if the text runs out of pairs).

    Incremental: pair counts and the chunks each pair occurs in are kept up to date after every
    merge, and a lazy max-heap picks the most frequent pair, so only the chunks a merge touches
    are revisited (2k tokens on ~500 KB in a few seconds). Ties go to the smaller pair of ids.
    Returns tiktoken mergeable ranks: bytes 0..255 have rank = byte value, merges follow in order.
    """
    import regex

    if vocab_size < 256:
        raise ValueError(f"vocab_size: expected at least 256 for a byte-level BPE, got {vocab_size}")
    chunk_counts = collections.Counter(regex.findall(pat_str, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]

    pair_counts: dict[tuple[int, int], int] = collections.defaultdict(int)
    where: dict[tuple[int, int], set[int]] = collections.defaultdict(set)
    for wi, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    while len(token_bytes) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if -neg != count:  # stale entry: push the current count back and look again
            heapq.heappush(heap, (-count, pair))
            continue
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[pair[0]] + token_bytes[pair[1]])
        touched: dict[tuple[int, int], int] = collections.defaultdict(int)
        for wi in where.pop(pair):
            w, f = words[wi], freqs[wi]
            for p in zip(w, w[1:]):
                touched[p] -= f
            merged, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == pair[0] and w[i + 1] == pair[1]:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            words[wi] = merged
            for p in zip(merged, merged[1:]):
                touched[p] += f
                where[p].add(wi)
        for p, delta in touched.items():
            if delta:
                pair_counts[p] += delta
                if delta > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
        pair_counts.pop(pair, None)

    return {tok: rank for rank, tok in enumerate(token_bytes)}


def save_tiktoken_ranks(ranks: dict[bytes, int], path: str) -> None:
    """tiktoken's `.tiktoken` format: one `base64(token) rank` line per token, by rank."""
    with open(path, "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f.read().splitlines(), 1):
            if line:
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:  # also binascii.Error
                    raise FileFormatError(path, f"line {lineno} is not `<base64 token> <rank>`",
                                          "a .tiktoken ranks file written with the tokenizer") from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    """A `tiktoken.Encoding` with `<|endoftext|>` as its only special token.

    `encode` treats the text as ordinary text (a literal "<|endoftext|>" in it is not special);
    the end-of-text id is added explicitly where it is wanted (e.g. after a fine-tuning response).
    """

    kind = "bpe"

    def __init__(self, name: str, ranks: dict[bytes, int], pat_str: str = GPT2_PAT, eos_id: int | None = None):
        import tiktoken

        self.ranks, self.pat_str = ranks, pat_str
        self.eos_id = len(ranks) if eos_id is None else eos_id
        self.encoding = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens={EOT: self.eos_id})
        self.vocab_size = self.encoding.n_vocab

    @classmethod
    def train(cls, text: str, vocab_size: int = 2048) -> "TiktokenTokenizer":
        """Train on `text`; `vocab_size` counts the 256 bytes and the merges, plus one end-of-text id."""
        return cls("bpe", train_bpe_ranks(text, vocab_size - 1))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids))

    def _state(self, directory: str) -> dict:
        save_tiktoken_ranks(self.ranks, os.path.join(directory, RANKS_FILE))
        return {"ranks_file": RANKS_FILE, "pat_str": self.pat_str, "eos_id": self.eos_id}

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "TiktokenTokenizer":
        ranks = load_tiktoken_ranks(os.path.join(directory, state["ranks_file"]))
        return cls("bpe", ranks, state["pat_str"], state["eos_id"])


class GPT2Tokenizer(TiktokenTokenizer):
    """GPT-2's 50257-token BPE from local files; never downloads.

    `path` is a directory holding OpenAI's `vocab.bpe` + `encoder.json`, or Hugging Face's
    `vocab.json` + `merges.txt`, or tiktoken's cache (files named by the sha1 of their URL);
    None reads tiktoken's cache (TIKTOKEN_CACHE_DIR). In every layout the merges file is read
    and checked against the vocabulary: merge i must be the token with id 256 + i.
    """

    kind = "gpt2"

    def __init__(self, hf_dir: str | None = None, *, path: str | None = None):
        path = hf_dir if path is None else path
        ranks, eos_id = _ranks_from_tiktoken_cache() if path is None else gpt2_ranks_from_dir(path)
        super().__init__("gpt2", ranks, GPT2_PAT, eos_id=eos_id)

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "GPT2Tokenizer":
        # Saved with its ranks file, so a checkpoint loads without tiktoken's cache.
        self = cls.__new__(cls)
        ranks = load_tiktoken_ranks(os.path.join(directory, state["ranks_file"]))
        TiktokenTokenizer.__init__(self, "gpt2", ranks, state["pat_str"], state["eos_id"])
        return self


# -------------------------------------------------------------------------------------- factory

_CLASSES = {"char": CharTokenizer, "word": WordTokenizer, "bpe": TiktokenTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(kind: str, corpus_text: str | None = None, *, vocab_size: int | None = None,
                  path: str | None = None, word_split: str = "whitespace") -> Tokenizer:
    """Build a tokenizer for `--tokenizer kind`; char/word/bpe are trained on `corpus_text`.

    gpt2 reads its files from `path` (see GPT2Tokenizer) or, without it, from tiktoken's cache;
    `word_split` is the word tokenizer's split (WORD_SPLITS).
    """
    if kind not in KINDS:
        raise ValueError(f"tokenizer: expected one of {KINDS}, got {kind!r}")
    if kind == "gpt2":
        return GPT2Tokenizer(path=path)
    if corpus_text is None:
        raise ValueError(f"corpus_text: the {kind!r} tokenizer is trained on a corpus, got None")
    if kind == "char":
        return CharTokenizer.train(corpus_text)
    if kind == "word":
        return WordTokenizer.train(corpus_text, vocab_size or 8192, split=word_split)
    return TiktokenTokenizer.train(corpus_text, vocab_size or 2048)


def load_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
    """A tokenizer from files: `load_tokenizer(kind, path)` or, as before, `load_tokenizer(directory)`.

    - `load_tokenizer("gpt2", path=DIR)`: GPT-2's BPE from DIR (vocab.bpe + encoder.json, vocab.json +
      merges.txt, tiktoken's cache, or a tokenizer saved by pytorch-mqa); `load_tokenizer("gpt2")`
      reads tiktoken's cache. This is what `--tokenizer gpt2 [--tokenizer-dir DIR]` uses.
    - `load_tokenizer("char" | "word" | "bpe", path=DIR)`: the tokenizer saved in DIR by `save`, which
      must be of that kind.
    - `load_tokenizer(DIR)`: whatever `save(DIR)` wrote there, or GPT-2's of a Hugging Face directory.
    """
    if kind not in KINDS:
        if path is None:
            return _load_directory(kind)
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if kind == "gpt2":
        if path is not None and os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            tok = _load_directory(path)
        else:
            return GPT2Tokenizer(path=path)
    else:
        if path is None:
            raise ValueError(f"path: the {kind!r} tokenizer is read from the directory it was saved to, got None "
                             "(get_tokenizer trains a new one on a corpus)")
        tok = _load_directory(path)
    if tok.kind != kind:
        raise ValueError(f"kind: expected the tokenizer saved in {path!r} to be {kind!r}, got {tok.kind!r}")
    return tok


def _load_directory(directory: str) -> Tokenizer:
    """Read a tokenizer saved with `save(directory)`, or the GPT-2 one of a Hugging Face directory."""
    path = os.path.join(directory, TOKENIZER_FILE)
    expected = f'a {TOKENIZER_FILE} written by pytorch-mqa (a JSON object with "kind" one of {", ".join(KINDS)})'
    if os.path.isfile(path):
        state = read_json(path, expected)
        if not isinstance(state, dict) or state.get("kind") not in _CLASSES:
            got = state.get("kind") if isinstance(state, dict) else None
            raise FileFormatError(path, f"kind is {got!r}" if got is not None else "has no tokenizer kind", expected)
        try:
            return _CLASSES[state["kind"]]._from_state(state, directory)
        except FileFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FileFormatError(path, f"a {state['kind']} tokenizer with a missing or malformed field "
                                        f"({type(e).__name__}: {e})", expected) from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e.filename}: missing; the tokenizer {path} needs it beside it") from None
    if has_hf_gpt2_tokenizer(directory):
        return GPT2Tokenizer(path=directory)
    raise FileNotFoundError(
        f"directory: expected {TOKENIZER_FILE} (written by pytorch-mqa) or a GPT-2 vocab.json + merges.txt in "
        f"{directory!r}; found neither"
    )
