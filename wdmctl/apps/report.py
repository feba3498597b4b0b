"""`wdmctl report RUN...`: loss and FID curves of one or more training runs, and a markdown table.

Reads each run's stats.jsonl (loss records every `[log] every` steps, FID records every `[fid] every` steps)
and recipe.toml, and writes, atomically, into the output folder:
    loss.png          training loss against step, one line per run
    fid-images.png    FID during training against images seen
    fid-time.png      the same against training time (minutes of the run's training steps, excluding
                      checkpoints, grids and the FID measurements themselves)
    report.md         one row per run: model, steps, images seen, training minutes, last loss, FIDs, and the
                      stripe score measured with the last FID (wdmctl/fid/stripes.py), where recorded
Training time is summed from the loss records' seconds per step, so it needs no clock of its own and is the
same after a resume.

Runs that shared one GPU (arms side by side under MPS) did not have the GPU to themselves, so their wall time
is not their GPU time. `solo_speed` names one or more `wdmctl bench train --out` JSONs timed on the idle GPU (arms
added in a later session bring their own; PRESET=FILE takes only that preset from a file): each run's time axis
then becomes GPU-minutes at its preset's solo speed, images seen / (its preset's images/s) / 60.
"""

from __future__ import annotations

import io
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wdmctl.core.io import write_bytes_atomic, write_text_atomic
from wdmctl.errors import WdmError
from wdmctl.runs import find_run
from wdmctl.train.plot import log_y_axis, matplotlib_pyplot

OUTPUTS = ("loss.png", "fid-images.png", "fid-time.png", "report.md")


@dataclass
class RunCurves:
    """What one run's stats.jsonl says, as arrays."""

    path: Path
    label: str
    model: str
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    images_seen: list[int] = field(default_factory=list)
    minutes: list[float] = field(default_factory=list)        # cumulative training time at each loss record
    fid_steps: list[int] = field(default_factory=list)
    fid_images: list[int] = field(default_factory=list)
    fid_minutes: list[float] = field(default_factory=list)
    fids: list[float] = field(default_factory=list)
    stripes: list[float] = field(default_factory=list)          # stripe score beside each FID (when recorded)
    fid_num: int | None = None


def read_run(path: Path, label: str) -> RunCurves:
    stats_path = path / "stats.jsonl"
    if not stats_path.is_file():
        raise WdmError(f"{path} has no stats.jsonl; is it a wdmctl run folder?")
    model = "?"
    try:
        recipe = tomllib.loads((path / "recipe.toml").read_text())
        model = str(recipe.get("model", {}).get("preset", "?"))
    except (OSError, tomllib.TOMLDecodeError):
        pass
    curves = RunCurves(path, label, model)
    previous_step, minutes = 0, 0.0
    fid_records = []
    for number, line in enumerate(stats_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise WdmError(f"{stats_path}:{number}: not a JSON record") from None
        if "fid" in record:
            fid_records.append(record)
        elif "loss" in record:
            step = int(record["step"])
            minutes += float(record.get("sec_per_step") or 0.0) * (step - previous_step) / 60
            previous_step = step
            curves.steps.append(step)
            curves.losses.append(float(record["loss"]))
            curves.images_seen.append(int(record.get("images_seen", 0)))
            curves.minutes.append(minutes)
    for record in fid_records:
        curves.fid_steps.append(int(record["step"]))
        curves.fid_images.append(int(record["images_seen"]))
        curves.fids.append(float(record["fid"]))
        if "stripes" in record:
            curves.stripes.append(float(record["stripes"]))
        curves.fid_num = int(record.get("fid_num") or 0) or curves.fid_num
    # an FID is measured at a step boundary; its training time is read off the loss records' clock
    if curves.steps:
        curves.fid_minutes = list(np.interp(curves.fid_steps, [0] + curves.steps, [0.0] + curves.minutes))
    else:
        curves.fid_minutes = [math.nan] * len(curves.fid_steps)
    return curves


def solo_speed_source(entry: str | Path) -> tuple[Path, list[str] | None]:
    """One --solo-speed entry: FILE (every preset it times), or PRESET[,PRESET...]=FILE (only those: a file
    that also times a preset another session timed again, e.g. UViT-S/2 timed before a later equal-time run)."""
    text = str(entry)
    if "=" in text and not Path(text).exists():
        presets, path = text.split("=", 1)
        wanted = [p.strip() for p in presets.split(",") if p.strip()]
        if not wanted:
            raise WdmError(f"--solo-speed {text}: name the presets before '=' (PRESET[,PRESET]=FILE)")
        return Path(path), wanted
    return Path(text), None


def solo_speeds(entries: list[str | Path]) -> dict[str, float]:
    """Preset -> training images/s from `wdmctl bench train --out` JSONs (the fastest row of each preset),
    each entry a file or PRESET[,PRESET]=FILE (solo_speed_source). A preset taken from two of them is an
    error: which of two sessions' speeds counts is the caller's call."""
    speeds: dict[str, float] = {}
    source: dict[str, Path] = {}
    for path, wanted in map(solo_speed_source, entries):
        try:
            rows = json.loads(path.read_text()).get("results", [])
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise WdmError(f"{path}: not a `wdmctl bench train --out` JSON ({error})") from None
        found: dict[str, float] = {}
        for row in rows if isinstance(rows, list) else []:
            speed = row.get("images_per_s") if isinstance(row, dict) else None
            if isinstance(speed, (int, float)) and speed > 0 and row.get("preset"):
                found[row["preset"]] = max(float(speed), found.get(row["preset"], 0.0))
        if not found:
            raise WdmError(f"{path} holds no `bench train` rows with images_per_s")
        if wanted is not None:
            missing = [preset for preset in wanted if preset not in found]
            if missing:
                raise WdmError(f"{path} has no row for {', '.join(missing)} (it times {', '.join(sorted(found))})")
            found = {preset: found[preset] for preset in wanted}
        for preset, speed in found.items():
            if preset in source:
                raise WdmError(f"{preset} is timed in both {source[preset]} and {path}; pass one of them, or "
                               f"take presets from a file with PRESET=FILE")
            speeds[preset], source[preset] = speed, path
    return speeds


def at_solo_speed(curves: RunCurves, speeds: dict[str, float], source: str) -> None:
    """Replace the run's training minutes by GPU-minutes at its preset's solo speed."""
    if curves.model not in speeds:
        known = ", ".join(sorted(speeds))
        raise WdmError(f"{curves.label}: its model {curves.model} has no row in {source} (they have {known})")
    per_minute = speeds[curves.model] * 60
    curves.minutes = [images / per_minute for images in curves.images_seen]
    curves.fid_minutes = [images / per_minute for images in curves.fid_images]


def unique_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing path of each run that tells it from the others (run folders of different
    experiments often share their own name)."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _figure(plt, series: list[tuple[str, list[float], list[float]]], xlabel: str, ylabel: str, title: str,
            log_y: bool) -> bytes:
    fig, ax = plt.subplots(figsize=(7.2, 4.5), dpi=100)
    try:
        for label, xs, ys in series:
            points = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y) and (y > 0 or not log_y)]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], label=label, linewidth=1.5,
                        marker="o" if len(points) < 30 else None, markersize=3)
        if log_y:
            log_y_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=8)
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        return png.getvalue()
    finally:
        plt.close(fig)


def _markdown(runs: list[RunCurves], time_name: str) -> str:
    def number(value, digits=2):
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"

    fid_name = "FID-" + str(next((r.fid_num for r in runs if r.fid_num), "K"))
    lines = [f"| run | model | steps | images seen | {time_name} | last loss | "
             f"{fid_name} best (step) | {fid_name} last | stripe score last |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        best = min(range(len(r.fids)), key=r.fids.__getitem__) if r.fids else None
        lines.append(
            f"| {r.label} | {r.model} | {r.steps[-1] if r.steps else 0} | {r.images_seen[-1] if r.images_seen else 0} | "
            f"{number(r.minutes[-1] if r.minutes else None, 1)} | {number(r.losses[-1] if r.losses else None, 4)} | "
            + (f"{r.fids[best]:.2f} ({r.fid_steps[best]})" if best is not None else "-") + " | "
            + (f"{r.fids[-1]:.2f}" if r.fids else "-") + " | "
            + (f"{100 * r.stripes[-1]:.2f}%" if r.stripes else "-") + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: list[str], out: str | Path, overwrite: bool = False,
                 solo_speed: str | Path | list[str | Path] | None = None) -> dict[str, Any]:
    """Curves and table of `runs` (run folders or names) into `out`; returns the paths and the table. With
    `solo_speed` (bench train JSONs) time is GPU-minutes at each preset's solo speed (module docstring)."""
    plt = matplotlib_pyplot()
    if plt is None:
        raise WdmError("wdmctl report draws with matplotlib, which is not installed: pip install 'wdmctl[plot]'")
    if not runs:
        raise WdmError("name at least one run folder")
    out = Path(out)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise WdmError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    paths = [Path(find_run(run)) for run in runs]
    curves = [read_run(path, label) for path, label in zip(paths, unique_labels(paths))]
    time_axis, time_name = "training time (minutes)", "training min"
    if solo_speed:
        files = [solo_speed] if isinstance(solo_speed, (str, Path)) else list(solo_speed)
        speeds = solo_speeds(files)
        for run_curves in curves:
            at_solo_speed(run_curves, speeds, ", ".join(map(str, files)))
        time_axis, time_name = "GPU minutes at solo speed (images seen / bench train images/s)", "GPU min (solo)"
    fid_label = "FID-" + str(next((r.fid_num for r in curves if r.fid_num), "K"))
    figures = {
        "loss.png": _figure(plt, [(r.label, r.steps, r.losses) for r in curves], "step", "loss (mean per log interval)",
                            "training loss", log_y=True),
        "fid-images.png": _figure(plt, [(r.label, r.fid_images, r.fids) for r in curves if r.fids], "images seen",
                                  fid_label, f"{fid_label} of the EMA weights during training", log_y=True),
        "fid-time.png": _figure(plt, [(r.label, r.fid_minutes, r.fids) for r in curves if r.fids],
                                time_axis, fid_label,
                                f"{fid_label} of the EMA weights against training time", log_y=True),
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        write_bytes_atomic(out / name, png)
    table = _markdown(curves, time_name)
    write_text_atomic(out / "report.md", f"# Training report\n\n{table}\n" + "".join(
        f"![{name}]({name})\n" for name in figures))
    return {"out": str(out), "files": [str(out / name) for name in OUTPUTS], "table": table}
