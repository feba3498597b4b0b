"""Integrity of the files wdmctl writes: the size and sha256 of each recorded when it is written, checked
when it is read, and a one-line error naming the file and what is wrong with it.

A folder that is written as a whole (a checkpoint, a saved pipeline) gets `integrity.json`, listing every
file under it. It is written last: a folder without one was never finished. Two levels of checking:

- cheap (always): every recorded file exists with its recorded size; a safetensors file's header parses and
  its tensors end exactly at the end of the file (so a cut-short file is caught even where no size was
  recorded); a JSON file parses.
- full (where the bytes are read anyway, and under `--verify`): the sha256 of every file as well, which also
  catches bytes changed in place (a bad disk, a copy gone wrong).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable

from wdmctl.core.hashing import sha256_file
from wdmctl.core.io import write_json_atomic
from wdmctl.errors import WdmError, first_line

INTEGRITY_FILE = "integrity.json"
FORMAT = "wdmctl-integrity/1"
# a safetensors header is JSON of a few hundred bytes per tensor; anything near this is not a header
_MAX_SAFETENSORS_HEADER = 100 << 20


class CorruptFile(WdmError):
    """A file is missing, cut short, or changed since it was written; the message names it and what is wrong."""


def file_record(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """{"file", "bytes", "sha256"} of a file as written now; `name` is how the record names it."""
    path = Path(path)
    return {"file": name or path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, or None: the 8-byte header length, the JSON header,
    and the tensor data, which must end exactly at the end of the file (safetensors leaves no gaps)."""
    size = path.stat().st_size
    if size < 8:
        return f"cut short ({size} bytes: not even a safetensors header)"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"cut short or not safetensors (header of {header_len} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "not safetensors (its header is not JSON)"
    if not isinstance(header, dict):
        return "not safetensors (its header is not a JSON object)"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or []) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"cut short ({size} of {expected} bytes)"
    if size > expected:
        return f"{size - expected} bytes of garbage after the tensors ({size} bytes, {expected} expected)"
    return None


def json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"invalid JSON ({first_line(err, 80)})"
    return None


def file_problem(path: str | Path, record: dict[str, Any] | None = None, full: bool = False) -> str | None:
    """What is wrong with one file, in a few words, or None when it is intact. `record` (from `file_record`)
    adds the size check, and with `full` the sha256 check; without one only the file's own framing is checked."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    # the file's own framing first: "invalid JSON" says more than a size that differs
    if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
        return problem
    if path.suffix == ".json" and (problem := json_problem(path)):
        return problem
    if record is None:
        return None
    size, written = path.stat().st_size, int(record["bytes"])
    if size < written:
        return f"cut short ({size} of {written} bytes)"
    if size > written:
        return f"{size} bytes, {written} when it was written"
    if full and sha256_file(path) != record["sha256"]:
        return "changed since it was written (sha256 differs)"
    return None


# ---- folders written as a whole -------------------------------------------------------------------------

def write_integrity(folder: str | Path) -> Path:
    """Record every file under `folder` in `folder/integrity.json`. Call it last, after everything else in
    the folder is written: its presence is what says the folder is complete."""
    folder = Path(folder)
    path = folder / INTEGRITY_FILE
    # a sub-folder written as a whole just before (a checkpoint's pipeline/) has its own integrity.json: its
    # records are taken over rather than hashing gigabytes of weights twice (a stale one fails the check)
    known: dict[str, dict[str, Any]] = {}
    for nested in sorted(p for p in folder.rglob(INTEGRITY_FILE) if p != path):
        prefix = nested.parent.relative_to(folder).as_posix()
        for record in read_integrity(nested.parent) or []:
            known.setdefault(f"{prefix}/{record['file']}", record)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != path)  # a sub-folder's own is covered
    records = []
    for file in files:
        name = file.relative_to(folder).as_posix()
        records.append({**known[name], "file": name} if name in known else file_record(file, name))
    write_json_atomic(path, {"format": FORMAT, "files": records})
    return path


def read_integrity(folder: str | Path) -> list[dict[str, Any]] | None:
    """The records of `folder/integrity.json`; None when there is none. A manifest that is unreadable is
    itself a corrupt file."""
    path = Path(folder) / INTEGRITY_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        records = data["files"]
        if data.get("format") != FORMAT or not all({"file", "bytes", "sha256"} <= set(r) for r in records):
            raise ValueError(f"not a {FORMAT} manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path}: unreadable ({first_line(err, 80)})") from None
    return records


def folder_problems(folder: str | Path, full: bool = False, required: bool = True) -> list[tuple[str, str]]:
    """(file, what is wrong) for each bad file of `folder`, [] when it is intact. Without integrity.json a
    folder is incomplete when `required`; otherwise (a folder from an older wdmctl or another tool) each
    safetensors and JSON file under it is checked on its own framing."""
    folder = Path(folder)
    records = read_integrity(folder)
    if records is None:
        if required:
            return [(INTEGRITY_FILE, "missing (the save did not finish, or a wdmctl without integrity records wrote it)")]
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))
        found = ((p.relative_to(folder).as_posix(), file_problem(p)) for p in files)
    else:
        found = ((r["file"], file_problem(folder / r["file"], r, full)) for r in records)
    return [(name, problem) for name, problem in found if problem is not None]


def describe_problems(folder: str | Path, problems: Iterable[tuple[str, str]]) -> str:
    """One line for a folder's bad files: the first in full, then how many more."""
    problems = list(problems)
    name, problem = problems[0]
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
    return f"{Path(folder) / name}: {problem}{more}"


def require_intact(folder: str | Path, full: bool = False, required: bool = True, hint: str = "") -> None:
    """Raise `CorruptFile` naming the first bad file of `folder` (see `folder_problems`); `hint` says what to do."""
    problems = folder_problems(folder, full, required)
    if problems:
        raise CorruptFile(describe_problems(folder, problems) + (f"; {hint}" if hint else ""))
