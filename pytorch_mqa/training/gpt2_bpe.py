"""GPT-2's BPE files read locally: OpenAI's vocab.bpe + encoder.json, Hugging Face's vocab.json +
merges.txt, or tiktoken's cache. Nothing here downloads anything; the merges are always read and
checked against the vocabulary's ids (tiktoken uses a token's rank as its id)."""

from __future__ import annotations

import hashlib
import os
import tempfile

from pytorch_mqa.training.files import FileFormatError, read_json

EOT = "<|endoftext|>"

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


def _ranks_from_tiktoken_cache(cache: str | None = None) -> tuple[dict[bytes, int], int]:
    paths = gpt2_cache_paths() if cache is None else {
        name: os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for name, url in GPT2_FILES.items()}
    missing = list(GPT2_FILES) if paths is None else [n for n, p in paths.items() if not os.path.isfile(p)]
    if missing:
        where = (", ".join(f"{paths[n]} ({n} from {GPT2_FILES[n]})" for n in missing) if paths else
                 "tiktoken's cache (caching is disabled: TIKTOKEN_CACHE_DIR is empty)")
        raise FileNotFoundError(
            f"{where}: missing; the GPT-2 tokenizer reads tiktoken's cached GPT-2 files and downloads nothing. "
            "On a machine with network run `TIKTOKEN_CACHE_DIR=/some/dir python -c \"import tiktoken; "
            "tiktoken.get_encoding('gpt2')\"` and copy that directory here, setting TIKTOKEN_CACHE_DIR to it "
            "(or save each URL above under the sha1 hex digest of its URL); a directory with vocab.bpe + "
            "encoder.json, or a Hugging Face GPT-2 directory with vocab.json and merges.txt, works too "
            "(--tokenizer-dir DIR); or use --tokenizer bpe/char/word, which need no files"
        )
    for name, path in paths.items():
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != GPT2_SHA256[name]:
            raise ValueError(
                f"{path}: the cached GPT-2 {name} is corrupt or a different file (sha256 {digest}, expected "
                f"{GPT2_SHA256[name]}); replace it with {GPT2_FILES[name]}"
            )
    # Read directly (never through tiktoken's download path), merges checked against the ids.
    return _ranks_from_vocab_and_merges(paths["encoder.json"], paths["vocab.bpe"])


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


GPT2_LAYOUTS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def gpt2_ranks_from_dir(directory: str) -> tuple[dict[bytes, int], int]:
    """Mergeable ranks and the end-of-text id from a directory of GPT-2 tokenizer files (any layout)."""
    for vocab_name, merges_name in GPT2_LAYOUTS:
        vocab, merges = os.path.join(directory, vocab_name), os.path.join(directory, merges_name)
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return _ranks_from_vocab_and_merges(vocab, merges)
    cached = {n: os.path.join(directory, hashlib.sha1(u.encode()).hexdigest()) for n, u in GPT2_FILES.items()}
    if all(os.path.isfile(p) for p in cached.values()):
        return _ranks_from_tiktoken_cache(directory)
    raise FileNotFoundError(
        f"path: expected a GPT-2 tokenizer directory holding vocab.bpe + encoder.json, vocab.json + merges.txt, "
        f"or tiktoken's cached GPT-2 files, got {directory!r} with none of them"
    )


def _ranks_from_hf_gpt2(hf_dir: str) -> tuple[dict[bytes, int], int]:
    """Mergeable ranks (the token ids of vocab.json, checked against merges.txt) and the end-of-text id."""
    vocab_path = os.path.join(hf_dir, "vocab.json")
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"hf_dir: expected a GPT-2 tokenizer file {vocab_path}, which does not exist")
    return _ranks_from_vocab_and_merges(vocab_path, os.path.join(hf_dir, "merges.txt"))


def _read_merges(path: str) -> list[tuple[str, str]]:
    """The merges of a GPT-2 `vocab.bpe` / `merges.txt`: `#version` header, then `left right` per line."""
    expected = "a GPT-2 merges file (vocab.bpe / merges.txt): an optional #version line, then `left right` lines"
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise FileFormatError(path, f"line {lineno} is not `left right`: {line[:60]!r}", expected)
        out.append((parts[0], parts[1]))
    return out


def _ranks_from_vocab_and_merges(vocab_path: str, merges_path: str) -> tuple[dict[bytes, int], int]:
    """Ranks from the merges (byte tokens first, merge i = rank 256 + i), checked against the vocabulary's ids.

    tiktoken uses a token's rank as its id, so the vocabulary must give every merged token the id of
    its merge; GPT-2's files do. A vocabulary that does not is refused, naming the first mismatch.
    """
    ranks, eos_id = _ranks_from_vocab_json(vocab_path)
    if not os.path.isfile(merges_path):
        raise FileNotFoundError(f"merges: expected {merges_path} beside {vocab_path}, which does not exist")
    byte_of = _gpt2_byte_decoder()
    merges = _read_merges(merges_path)
    expected = f"a vocabulary whose ids follow {os.path.basename(merges_path)}: merge i has id 256 + i"
    for i, (left, right) in enumerate(merges):
        try:
            tok = bytes(byte_of[c] for c in left + right)
        except KeyError:
            raise FileFormatError(merges_path, f"merge {i + 1} ({left} {right}) has a character outside GPT-2's "
                                               "byte alphabet", expected) from None
        if ranks.get(tok) != 256 + i:
            raise FileFormatError(vocab_path, f"merge {i + 1} of {merges_path} ({left} {right}) has id "
                                              f"{ranks.get(tok)}, expected {256 + i}", expected)
    if len(ranks) != 256 + len(merges):
        raise FileFormatError(vocab_path, f"{len(ranks)} ordinary tokens for {len(merges)} merges (expected "
                                          f"{256 + len(merges)}: the 256 bytes plus one per merge)", expected)
    return ranks, eos_id


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
    """Whether `directory` holds GPT-2 tokenizer files (vocab.json + merges.txt, or vocab.bpe + encoder.json)."""
    return any(all(os.path.isfile(os.path.join(directory, n)) for n in pair) for pair in GPT2_LAYOUTS)
