"""wdmctl.core.integrity: records written with a folder, cheap and full checks, one-line errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wdmctl.core.hashing import sha256_file
from wdmctl.core.integrity import (INTEGRITY_FILE, CorruptFile, file_problem, file_record, folder_problems,
                                   require_intact, safetensors_problem, write_integrity)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A folder as a checkpoint is written: tensors, JSON, an opaque file, a sub-folder, then integrity.json."""
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32), "b": torch.zeros(0)}, str(root / "model.safetensors"))
    (root / "meta.json").write_text(json.dumps({"step": 4}))
    (root / "optimizer.bin").write_bytes(bytes(range(256)) * 4)
    save_file({"x": torch.ones(3, 3)}, str(root / "sub" / "weights.safetensors"))
    write_integrity(root)
    return root


def test_records_every_file_with_size_and_sha256(folder):
    records = json.loads((folder / INTEGRITY_FILE).read_text())["files"]
    assert [r["file"] for r in records] == ["meta.json", "model.safetensors", "optimizer.bin", "sub/weights.safetensors"]
    for record in records:
        assert record == file_record(folder / record["file"], record["file"])
    assert sha256_file(folder / "optimizer.bin") == records[2]["sha256"]
    assert folder_problems(folder, full=True) == []
    require_intact(folder, full=True)  # no error


def test_truncated_safetensors_is_caught_with_and_without_a_record(folder):
    path = folder / "model.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    assert folder_problems(folder) == [("model.safetensors", f"cut short ({size - 10} of {size} bytes)")]
    (folder / INTEGRITY_FILE).unlink()  # a folder from another tool: the header alone shows the cut
    assert folder_problems(folder, required=False) == [("model.safetensors", f"cut short ({size - 10} of {size} bytes)")]
    path.write_bytes(b"\x05\x00")
    assert "not even a safetensors header" in safetensors_problem(path)
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    assert "cut short or not safetensors" in safetensors_problem(path)
    path.write_bytes((4).to_bytes(8, "little") + b"nope")
    assert safetensors_problem(path) == "not safetensors (its header is not JSON)"


def test_without_integrity_json_a_folder_is_incomplete(folder):
    (folder / INTEGRITY_FILE).unlink()
    with pytest.raises(CorruptFile, match=r"ckpt/integrity.json: missing \(the save did not finish, or a wdmctl "
                                          r"without integrity records wrote it\); resume elsewhere"):
        require_intact(folder, hint="resume elsewhere")
    assert folder_problems(folder, required=False) == []  # every file is fine on its own framing


def test_invalid_json_same_size_and_changed_bytes(folder):
    meta = folder / "meta.json"
    meta.write_text("x" * meta.stat().st_size)  # same size: only parsing catches it cheaply
    (name, problem), = folder_problems(folder)
    assert name == "meta.json" and problem.startswith("invalid JSON")
    meta.write_text("{}" + " " * (meta.stat().st_size - 2))
    assert folder_problems(folder) == []  # valid JSON of the same size: only the hash tells
    assert folder_problems(folder, full=True) == [("meta.json", "changed since it was written (sha256 differs)")]


def test_missing_grown_and_several_bad_files_make_one_line(folder):
    (folder / "meta.json").unlink()
    with open(folder / "optimizer.bin", "ab") as f:
        f.write(b"junk")
    with open(folder / "sub" / "weights.safetensors", "ab") as f:
        f.write(b"junk")
    assert folder_problems(folder) == [("meta.json", "missing"), ("optimizer.bin", "1028 bytes, 1024 when it was written"),
                                       ("sub/weights.safetensors", "4 bytes of garbage after the tensors "
                                                                   f"({(folder / 'sub' / 'weights.safetensors').stat().st_size} "
                                                                   f"bytes, {(folder / 'sub' / 'weights.safetensors').stat().st_size - 4} expected)")]
    with pytest.raises(CorruptFile) as info:
        require_intact(folder)
    assert str(info.value).endswith("ckpt/meta.json: missing (and 2 more file(s))") and "\n" not in str(info.value)


def test_unreadable_integrity_json_is_itself_corrupt(folder):
    (folder / INTEGRITY_FILE).write_text("{not json")
    with pytest.raises(CorruptFile, match="integrity.json: unreadable"):
        folder_problems(folder)


def test_file_problem_of_a_single_file(tmp_path):
    path = tmp_path / "shard.safetensors"
    save_file({"x": torch.ones(4)}, str(path))
    record = file_record(path)
    assert file_problem(path, record, full=True) is None
    assert file_problem(tmp_path / "absent.safetensors", record) == "missing"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor data: same size, the framing is fine
    path.write_bytes(bytes(data))
    assert file_problem(path, record) is None
    assert file_problem(path, record, full=True) == "changed since it was written (sha256 differs)"


def test_a_sub_folders_records_are_taken_over_not_hashed_again(folder):
    """A checkpoint's pipeline/ has its own integrity.json, written just before the checkpoint's: the weights are
    hashed once. A record taken over from a stale sub-folder manifest fails the check rather than passing it."""
    sub = folder / "sub"
    write_integrity(sub)
    (inner,) = json.loads((sub / INTEGRITY_FILE).read_text())["files"]
    weights = sub / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # changed after sub/ recorded it: same size, valid framing
    weights.write_bytes(bytes(data))
    write_integrity(folder)
    records = {r["file"]: r for r in json.loads((folder / INTEGRITY_FILE).read_text())["files"]}
    assert records["sub/weights.safetensors"] == {**inner, "file": "sub/weights.safetensors"}  # not hashed again
    assert records["sub/integrity.json"] == file_record(sub / INTEGRITY_FILE, "sub/integrity.json")
    assert records["meta.json"] == file_record(folder / "meta.json")  # a file with no sub-folder record is hashed
    assert folder_problems(folder, full=True) == [("sub/weights.safetensors",
                                                   "changed since it was written (sha256 differs)")]
