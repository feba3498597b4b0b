"""Issue 16's scaling table from `bench train` / `bench sample` rows: each WD-Mamba row beside its same-size
U-ViT measured in the same run at the same size and mode (speed ratio, peak memory of both), and per preset
and mode the sequence length at which WD-Mamba overtakes U-ViT."""

from __future__ import annotations

import math
from typing import Any

from wdmctl.models.presets import SAME_SIZE_UVIT

OUT_OF_MEMORY = "out of memory"


def versus_uvit(rows: list[dict], rate: str, batch: str, modes: tuple[str, ...]) -> list[dict[str, Any]]:
    """For every WD-Mamba row with a same-size U-ViT row of the same resolution, batch (the row key `batch`)
    and `modes` values (e.g. cuda_graph, compile, cfg): both speeds (`rate`, a row key), their ratio and both
    peak memories. The ratio is "U-ViT out of memory" where only U-ViT ran out, None where WD-Mamba did."""
    def key(row, preset):
        return (preset, row.get("resolution"), row.get(batch), *(row.get(m) for m in modes))

    by_key = {key(row, row["preset"]): row for row in rows}
    table = []
    for row in rows:
        uvit = by_key.get(key(row, SAME_SIZE_UVIT.get(row["preset"])))
        if uvit is None:
            continue
        mamba_rate, uvit_rate = row.get(rate), uvit.get(rate)
        if mamba_rate and uvit_rate:
            ratio = round(mamba_rate / uvit_rate, 3)
        else:
            ratio = f"U-ViT {OUT_OF_MEMORY}" if mamba_rate and uvit.get("error") == OUT_OF_MEMORY else None
        table.append({"preset": row["preset"], "uvit": uvit["preset"], "backend": row.get("backend", row.get("scan_backend")),
                      "resolution": row.get("resolution"), "tokens": row.get("tokens", uvit.get("tokens")),
                      "batch": row.get(batch), **{m: row.get(m) for m in modes}, rate: mamba_rate, f"uvit_{rate}": uvit_rate, "ratio": ratio,
                      "peak_memory_gib": row.get("peak_memory_gib"), "uvit_peak_memory_gib": uvit.get("peak_memory_gib")})
    return table


def crossover(table: list[dict], modes: tuple[str, ...], vae_factor: int = 8) -> list[dict]:
    """Per preset, backend and mode (whatever the batch at each length): where the ratio reaches 1 along the
    tested sequence lengths. Between two
    lengths that bracket it, interpolated linearly in log(ratio) against log(tokens) (the ratio of two power
    laws); "below the smallest" or "not reached" otherwise. U-ViT out of memory counts as reached."""
    groups: dict[tuple, list[dict]] = {}
    for entry in table:
        if entry["ratio"] is not None and entry.get("tokens"):
            groups.setdefault((entry["preset"], entry["backend"], *(entry[m] for m in modes)), []).append(entry)
    out = []
    for (preset, backend, *mode_values), entries in groups.items():
        entries.sort(key=lambda e: e["tokens"])
        result: dict[str, Any] = {"preset": preset, "backend": backend, **dict(zip(modes, mode_values)),
                                  "ratios": {e["tokens"]: e["ratio"] for e in entries}}
        reached = [i for i, e in enumerate(entries) if isinstance(e["ratio"], str) or e["ratio"] >= 1]
        if not reached:
            result["crossover"] = f"not reached by {entries[-1]['tokens']} tokens"
        elif reached[0] == 0:
            result["crossover"] = f"at or below {entries[0]['tokens']} tokens"
        else:
            low, high = entries[reached[0] - 1], entries[reached[0]]
            if isinstance(high["ratio"], str):   # U-ViT ran out of memory: somewhere in between
                result["crossover"] = f"between {low['tokens']} and {high['tokens']} tokens ({high['ratio']})"
            else:
                slope = (math.log(high["ratio"]) - math.log(low["ratio"])) / math.log(high["tokens"] / low["tokens"])
                tokens = low["tokens"] * math.exp(-math.log(low["ratio"]) / slope)
                side = low["resolution"] * math.sqrt(tokens / low["tokens"])   # tokens grow with the side squared
                result["crossover"] = {"tokens": round(tokens), "latent_side": round(side, 1),
                                       "pixels_through_sd_vae": round(side * vae_factor)}
        out.append(result)
    return out


def scaling_summary(rows: list[dict], rate: str, batch: str, modes: tuple[str, ...]) -> dict[str, Any]:
    """{"versus_uvit": [...], "crossover": [...]} for a benchmark's rows (empty lists without U-ViT rows)."""
    table = versus_uvit(rows, rate, batch, modes)
    return {"versus_uvit": table, "crossover": crossover(table, modes)}
