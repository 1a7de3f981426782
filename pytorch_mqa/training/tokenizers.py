"""Tokenizers behind one interface: GPT-2 BPE (tiktoken), a byte-level BPE trained locally, char, word.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`, `eos_id`,
`save(directory)`; `load_tokenizer(directory)` reads any of them back. `get_tokenizer(kind,
corpus_text)` builds one for `--tokenizer {char,word,bpe,gpt2}`.

Nothing here downloads anything: the GPT-2 encoding is used only when tiktoken's files are already
in its cache (or in a Hugging Face GPT-2 directory), otherwise a clear error says how to provide them.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import heapq
import json
import os
import re
import tempfile

from pytorch_mqa.training.files import FileFormatError, read_json

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer_mqa.json"  # not "tokenizer.json": a Hugging Face directory has one
RANKS_FILE = "tokenizer_mqa.tiktoken"
KINDS = ("char", "word", "bpe", "gpt2")

# GPT-2's pre-tokenizer (tiktoken's r50k_base / gpt2 pattern): words, numbers, punctuation, spaces.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The two files tiktoken.get_encoding("gpt2") reads, cached as $TIKTOKEN_CACHE_DIR/<sha1(url)>, and
# their sha256 (tiktoken_ext.openai_public): tiktoken deletes and re-downloads a cached file whose
# hash differs, so the hashes are checked here first.
GPT2_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


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


class WordTokenizer(Tokenizer):
    """Words, punctuation marks and whitespace runs; the `max_vocab` most frequent are kept.

    Ids: `[PAD]` 0, `[UNK]` 1, `<|endoftext|>` 2. Text made only of known pieces round-trips exactly.
    """

    kind = "word"
    PAD, UNK = "[PAD]", "[UNK]"

    def __init__(self, words: list[str]):
        self.itos = [self.PAD, self.UNK, EOT] + list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, text: str, max_vocab: int = 8192) -> "WordTokenizer":
        counts = collections.Counter(WORD_PAT.findall(text))
        # Most frequent first, ties broken by the string itself so the vocabulary is deterministic.
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ordered[: max(0, max_vocab - 3)]])

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(w, self.unk_id) for w in WORD_PAT.findall(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids if i != self.pad_id)

    def _state(self, directory: str) -> dict:
        return {"words": self.itos[3:]}

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "WordTokenizer":
        return cls(state["words"])


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
    """GPT-2's 50257-token BPE, from tiktoken's cache or a Hugging Face GPT-2 directory; never downloads."""

    kind = "gpt2"

    def __init__(self, hf_dir: str | None = None):
        if hf_dir is not None:
            ranks, eos_id = _ranks_from_hf_gpt2(hf_dir)
        else:
            ranks, eos_id = _ranks_from_tiktoken_cache(), 50256
        super().__init__("gpt2", ranks, GPT2_PAT, eos_id=eos_id)

    @classmethod
    def _from_state(cls, state: dict, directory: str) -> "GPT2Tokenizer":
        # Saved with its ranks file, so a checkpoint loads without tiktoken's cache.
        self = cls.__new__(cls)
        ranks = load_tiktoken_ranks(os.path.join(directory, state["ranks_file"]))
        TiktokenTokenizer.__init__(self, "gpt2", ranks, state["pat_str"], state["eos_id"])
        return self


def tiktoken_cache_dir() -> str | None:
    """Where tiktoken looks for cached files (None: caching disabled by TIKTOKEN_CACHE_DIR="")."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"] or None
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def gpt2_cache_paths() -> dict[str, str] | None:
    cache = tiktoken_cache_dir()
    if cache is None:
        return None
    return {name: os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for name, url in GPT2_FILES.items()}


def _ranks_from_tiktoken_cache() -> dict[bytes, int]:
    paths = gpt2_cache_paths()
    missing = list(GPT2_FILES) if paths is None else [n for n, p in paths.items() if not os.path.isfile(p)]
    if missing:
        where = (", ".join(f"{paths[n]} ({n} from {GPT2_FILES[n]})" for n in missing) if paths else
                 "tiktoken's cache (caching is disabled: TIKTOKEN_CACHE_DIR is empty)")
        raise FileNotFoundError(
            f"{where}: missing; the GPT-2 tokenizer reads tiktoken's cached GPT-2 files and downloads nothing. "
            "On a machine with network run `TIKTOKEN_CACHE_DIR=/some/dir python -c \"import tiktoken; "
            "tiktoken.get_encoding('gpt2')\"` and copy that directory here, setting TIKTOKEN_CACHE_DIR to it "
            "(or save each URL above under the sha1 hex digest of its URL); a Hugging Face GPT-2 directory with "
            "vocab.json and merges.txt works too; or use --tokenizer bpe/char/word, which need no files"
        )
    for name, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != GPT2_SHA256[name]:
            raise ValueError(
                f"{path}: the cached GPT-2 {name} is corrupt or a different file (sha256 {digest}, expected "
                f"{GPT2_SHA256[name]}); replace it with {GPT2_FILES[name]}"
            )
    # encoder.json maps GPT-2's byte symbols to ids, and the ids are the BPE ranks (tiktoken checks this
    # against vocab.bpe); reading it directly never goes near tiktoken's download path.
    ranks, _ = _ranks_from_vocab_json(paths["encoder.json"])
    return ranks


def _gpt2_byte_decoder() -> dict[str, int]:
    # GPT-2 stores bytes as printable unicode characters: printable bytes map to themselves,
    # the rest to 256, 257, ... in byte order.
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table, n = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


def _ranks_from_hf_gpt2(hf_dir: str) -> tuple[dict[bytes, int], int]:
    """Mergeable ranks (the token ids of vocab.json) and the end-of-text id of a Hugging Face GPT-2 tokenizer."""
    vocab_path = os.path.join(hf_dir, "vocab.json")
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"hf_dir: expected a GPT-2 tokenizer file {vocab_path}, which does not exist")
    return _ranks_from_vocab_json(vocab_path)


def _ranks_from_vocab_json(vocab_path: str) -> tuple[dict[bytes, int], int]:
    expected = "a GPT-2 vocab.json / encoder.json (a JSON object of byte-level tokens to ids)"
    vocab = read_json(vocab_path, expected)
    byte_of = _gpt2_byte_decoder()
    try:
        ranks = {bytes(byte_of[c] for c in tok): int(i) for tok, i in vocab.items() if tok != EOT}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise FileFormatError(vocab_path, "not a GPT-2 vocabulary", expected) from None
    return ranks, vocab.get(EOT, len(ranks))


def has_hf_gpt2_tokenizer(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "vocab.json")) and os.path.isfile(os.path.join(directory, "merges.txt"))


# -------------------------------------------------------------------------------------- factory

_CLASSES = {"char": CharTokenizer, "word": WordTokenizer, "bpe": TiktokenTokenizer, "gpt2": GPT2Tokenizer}


def get_tokenizer(kind: str, corpus_text: str | None = None, *, vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer for `--tokenizer kind`; char/word/bpe are trained on `corpus_text`."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer: expected one of {KINDS}, got {kind!r}")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if corpus_text is None:
        raise ValueError(f"corpus_text: the {kind!r} tokenizer is trained on a corpus, got None")
    if kind == "char":
        return CharTokenizer.train(corpus_text)
    if kind == "word":
        return WordTokenizer.train(corpus_text, vocab_size or 8192)
    return TiktokenTokenizer.train(corpus_text, vocab_size or 2048)


def load_tokenizer(directory: str) -> Tokenizer:
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
        return GPT2Tokenizer(hf_dir=directory)
    raise FileNotFoundError(
        f"directory: expected {TOKENIZER_FILE} (written by pytorch-mqa) or a GPT-2 vocab.json + merges.txt in "
        f"{directory!r}; found neither"
    )
