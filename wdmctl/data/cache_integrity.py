"""Integrity of a latent cache's shards: the manifest records each shard's size and sha256 (`wdmctl cache`
writes them), training checks sizes and safetensors framing when it opens the cache (cheap), and
`wdmctl cache verify DIR` or `wdmctl train --verify` check the hashes too. A cache written before shards had
records gets the framing check only, which still catches a cut-short shard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from wdmctl.core.integrity import CorruptFile, file_problem, file_record

SHOWN_BAD_SHARDS = 5
REPAIR_HINT = ("rerun the `wdmctl cache` command that built it: it re-encodes only the bad shards "
               "(`wdmctl cache verify DIR` lists them)")


def shard_record(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a shard as written, for its manifest entry."""
    record = file_record(path)
    return {"bytes": record["bytes"], "sha256": record["sha256"]}


def recorded(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A manifest shard entry usable as an integrity record, or None (written before shards had records)."""
    return entry if entry is not None and "bytes" in entry and "sha256" in entry else None


def shard_problems(cache_dir: str | Path, shards: list[dict[str, Any]], full: bool = False) -> list[tuple[str, str]]:
    """(shard file, what is wrong) for each bad shard of the manifest's `shards` list."""
    found = ((entry["file"], file_problem(Path(cache_dir) / entry["file"], recorded(entry), full)) for entry in shards)
    return [(name, problem) for name, problem in found if problem is not None]


def require_intact_shards(cache_dir: str | Path, shards: list[dict[str, Any]], full: bool = False) -> None:
    """Raise one `CorruptFile` line naming the bad shards (the first few, then how many more)."""
    bad = shard_problems(cache_dir, shards, full)
    if not bad:
        return
    shown = ", ".join(f"{name}: {problem}" for name, problem in bad[:SHOWN_BAD_SHARDS])
    more = f" and {len(bad) - SHOWN_BAD_SHARDS} more" if len(bad) > SHOWN_BAD_SHARDS else ""
    which = f"{Path(cache_dir) / bad[0][0]}: {bad[0][1]}" if len(bad) == 1 else \
        f"{len(bad)} of {len(shards)} shards of {cache_dir} are bad: {shown}{more}"
    raise CorruptFile(f"{which}; {REPAIR_HINT}")


def verify_shards(cache_dir: str | Path, shards: list[dict[str, Any]], full: bool = True) -> dict[str, Any]:
    """Every shard of the manifest's `shards` list, hashes included with `full` (training's default is the
    cheap check). Returns what was checked ({"shards", "bytes", "hashed"}: hashed False when not `full` or for a
    cache whose manifest has no shard hashes)."""
    require_intact_shards(cache_dir, shards, full=full)
    return {"shards": len(shards), "bytes": sum((Path(cache_dir) / s["file"]).stat().st_size for s in shards),
            "hashed": full and all(recorded(s) is not None for s in shards)}


def recorded_shards(manifest_path: Path) -> dict[str, dict[str, Any]]:
    """{shard file: manifest entry} of the manifest at `manifest_path`, {} when there is none or it is unreadable
    (then a rerun trusts each shard's own header and framing, as before shards had records)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        return {entry["file"]: entry for entry in manifest.get("shards") or []}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
