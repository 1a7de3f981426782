"""File checks that name the file and the format expected, and the atomic directory swap."""

import os
import struct

import pytest
import torch

from pytorch_mqa.training import files
from pytorch_mqa.training.data import check_split_lengths, load_corpus, load_instructions
from pytorch_mqa.training.files import FileFormatError
from pytorch_mqa.training.tokenizers import CharTokenizer, load_tiktoken_ranks


def test_utf8_error_gives_path_and_byte_offset(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes("héllo".encode() + b"\xc3(")
    with pytest.raises(FileFormatError, match=rf"^{p}: not UTF-8: byte 0xc3 at byte offset 6 .*expected a UTF-8"):
        load_corpus(str(p))
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        files.read_utf8(str(tmp_path))


def safetensors_bytes(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize("blob, needle", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 10**9) + b"{}", "header claims 1000000000 bytes"),
    (safetensors_bytes(b"not json", b""), "header is not JSON"),
    (safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\x00" * 8),
     "its header describes"),
])
def test_truncated_or_foreign_safetensors(tmp_path, blob, needle):
    p = tmp_path / "model.safetensors"
    p.write_bytes(blob)
    with pytest.raises(FileFormatError, match=needle) as e:
        files.check_safetensors(str(p))
    assert str(e.value).startswith(f"{p}: ") and "expected a complete .safetensors" in str(e.value)


def test_complete_safetensors_and_torch_files_pass(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "m.safetensors"))
    files.check_safetensors(str(tmp_path / "m.safetensors"))
    torch.save({"a": torch.ones(3)}, tmp_path / "s.pt")
    files.check_torch_file(str(tmp_path / "s.pt"), "x")
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[:-40])
    with pytest.raises(FileFormatError, match="s.pt: not a torch.save file"):
        files.check_torch_file(str(tmp_path / "s.pt"), "x")


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with files.atomic_directory(str(target)) as tmp:
        (open(os.path.join(tmp, "a"), "w")).close()
        assert not target.exists()  # nothing visible until the block finishes
    assert os.listdir(target) == ["a"]
    with pytest.raises(RuntimeError):
        with files.atomic_directory(str(target)) as tmp:
            (open(os.path.join(tmp, "b"), "w")).close()
            raise RuntimeError("killed")
    assert os.listdir(target) == ["a"] and sorted(os.listdir(tmp_path)) == ["ckpt"]
    with files.atomic_directory(str(target)) as tmp:
        (open(os.path.join(tmp, "b"), "w")).close()
    assert os.listdir(target) == ["b"] and sorted(os.listdir(tmp_path)) == ["ckpt"]  # no stale "a", no .old


def test_split_lengths_name_the_split():
    with pytest.raises(ValueError, match="the training split .* has 10 tokens, expected at least block_size"):
        check_split_lengths(10, 100, 32)
    with pytest.raises(ValueError, match="my.txt: the validation split \\(the last 10%\\) has 5 tokens"):
        check_split_lengths(100, 5, 32, source="my.txt")
    check_split_lengths(33, 33, 32)


def test_instruction_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    with pytest.raises(FileFormatError, match=rf"{p}: not valid JSON \(.* at line 2\)"):
        load_instructions(str(p))
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert len(load_instructions(str(p))) == 2
    p.write_text('[{"instruction": "a", "output": 3}]')
    with pytest.raises(FileFormatError, match="record 0"):
        load_instructions(str(p))


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer.train("abc ")
    tok.check_text("a cab")
    with pytest.raises(ValueError, match=r"prompt: character 'é' \(U\+00E9\) at position 2 .*unknown: 'x' \(U\+0078\), 'é'"):
        tok.check_text("abéx", "prompt")


def test_garbage_ranks_file(tmp_path):
    p = tmp_path / "r.tiktoken"
    p.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(FileFormatError, match=rf"{p}: line 2 is not"):
        load_tiktoken_ranks(str(p))
