"""Files the training commands read and write: format checks that name the file, and atomic checkpoints.

Every reader here either returns what the file holds or raises `FileFormatError` (a ValueError)
whose message starts with the path and says which format was expected, so a garbage, truncated
or foreign file is reported as such instead of as a library's internal error.

Checkpoints are written into a temporary directory beside the target, every file fsynced, then
swapped in with renames (`atomic_directory`): a crash at any point leaves either the previous
checkpoint or the new one, complete, never a mixture (`recover_directory` finishes an
interrupted swap).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import secrets
import struct
import zipfile

OLD_SUFFIX = ".old"  # the previous checkpoint, kept until the new one is in place
TMP_PREFIX = ".tmp-"  # a checkpoint being written: <parent>/.tmp-<name>-XXXX


class FileFormatError(ValueError):
    """A file that exists but is not in the format expected: message `<path>: <problem>; expected <format>`."""

    def __init__(self, path: str, problem: str, expected: str):
        self.path, self.problem, self.expected = path, problem, expected
        super().__init__(f"{path}: {problem}; expected {expected}")


def require_file(path: str, what: str) -> None:
    """FileNotFoundError naming `path` unless it is a readable regular file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file; expected the {what} there (check the path)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory; expected the {what} as a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: not readable (the {what}); check its permissions")


def read_utf8(path: str, what: str = "corpus") -> str:
    """The text of a UTF-8 file; a decoding error names the path and the byte offset."""
    require_file(path, what)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(
            path, f"not UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} is not valid UTF-8 ({e.reason})",
            f"a UTF-8 {what} (convert it first, e.g. `iconv -f latin1 -t utf-8`)") from None


def read_json(path: str, expected: str):
    """Parsed JSON of `path`; a syntax error names the file, the line and the column."""
    text = read_utf8(path, expected)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", expected) from None


def check_safetensors(path: str) -> None:
    """Refuse a truncated or foreign .safetensors file before a loader reports it in its own words."""
    expected = "a complete .safetensors file (8-byte header length, JSON header, tensor data)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(path, f"truncated: {size} bytes, shorter than the 8-byte header length", expected)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FileFormatError(path, f"truncated or not safetensors: its header claims {n} bytes of metadata "
                                        f"but the file has {size} bytes", expected)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FileFormatError(path, "not safetensors: its header is not JSON", expected) from None
    if not isinstance(header, dict):
        raise FileFormatError(path, "not safetensors: its header is not a JSON object", expected)
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise FileFormatError(path, f"truncated: its header describes {need} bytes, the file has {size}", expected)


def check_torch_file(path: str, expected: str) -> None:
    """Refuse what cannot be a `torch.save` file (a zip archive since torch 1.6) or is a truncated one."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x80\x02":  # the legacy (pre-1.6) pickle format, e.g. older Hugging Face .bin files
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise FileFormatError(path, "not a torch.save file (garbage, truncated or another format)", expected) from None
    if bad is not None:
        raise FileFormatError(path, f"damaged: member {bad!r} fails its CRC check", expected)


def fsync_tree(directory: str) -> None:
    """fsync every file under `directory`, then the directories themselves."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_directory(target: str) -> None:
    """Finish a swap that a crash interrupted: restore `<target>.old` when `target` is missing."""
    old = target + OLD_SUFFIX
    if not os.path.exists(target) and os.path.isdir(old):
        os.replace(old, target)
    elif os.path.isdir(target) and os.path.isdir(old):
        shutil.rmtree(old)  # the new one was complete when it was renamed into place


@contextlib.contextmanager
def atomic_directory(target: str):
    """Yield a fresh temporary directory; when the block succeeds, it replaces `target` atomically.

    The temporary directory sits beside `target` (same file system, so renames are atomic). On
    success: fsync every file, rename `target` to `target.old`, rename the new one to `target`,
    fsync the parent, delete `target.old`. If the block raises, the temporary directory is removed
    and `target` is untouched.
    """
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    recover_directory(target)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.path.basename(target)}-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)  # not mkdtemp: the checkpoint gets the usual permissions (umask), not 0700
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target + OLD_SUFFIX
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(parent)
    if os.path.exists(old):
        shutil.rmtree(old)


def stale_temporaries(parent: str) -> list[str]:
    """Temporary checkpoint directories a killed process left in `parent`."""
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(TMP_PREFIX))


MODEL_EXPECTED = ("a model checkpoint: a directory with config.json and model.safetensors (written by pytorch-mqa "
                  "train/finetune or Hugging Face), or a .safetensors / .bin weights file")


def check_model_files(path: str) -> None:
    """Refuse a garbage or truncated checkpoint before the weights loader meets it (`path`: directory or file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory or weights file")
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg) and not isinstance(read_json(cfg, "a model config.json (a JSON object)"), dict):
            raise FileFormatError(cfg, "not a JSON object", "a model config.json (a JSON object)")
        weights = [os.path.join(path, n) for n in ("model.safetensors", "pytorch_model.bin")]
        weights = [w for w in weights if os.path.isfile(w)]
        if not weights and not any(os.path.isfile(os.path.join(path, n)) for n in
                                   ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
            raise FileNotFoundError(f"{path}: holds no model.safetensors or pytorch_model.bin; expected {MODEL_EXPECTED}")
        path = weights[0] if weights else None
    if path is None:
        return
    if path.endswith(".safetensors"):
        check_safetensors(path)
    else:
        check_torch_file(path, MODEL_EXPECTED)


__all__ = ["FileFormatError", "check_model_files", "MODEL_EXPECTED",
           "require_file", "read_utf8", "read_json", "check_safetensors", "check_torch_file",
           "atomic_directory", "recover_directory", "fsync_tree", "stale_temporaries"]
