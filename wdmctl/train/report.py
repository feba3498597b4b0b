"""Training output on the main process: a progress bar or plain lines, log.txt, stats.jsonl, the loss plot."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from wdmctl.core.io import write_text_atomic
from wdmctl.train.plot import plot_loss


class Reporter:
    """Main-process output. A rich progress bar when stdout is a terminal, plain lines otherwise; every line
    also goes to log.txt. Other processes stay silent."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = run_dir, enabled
        self.log_path = run_dir / "log.txt"
        self.stats_path = run_dir / "stats.jsonl"
        self.interactive = enabled and sys.stdout.isatty()
        self.progress = None
        self._plot_note_given = False

    def start_bar(self, first_step: int, total_steps: int) -> None:
        """The progress bar starts after a resume, so its speed and ETA count only this session's steps."""
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), refresh_per_second=4)
            self.task = self.progress.add_task("train", total=total_steps, completed=first_step, status="")
            self.progress.start()

    def line(self, text: str, stream=None) -> None:
        """One line to log.txt and the console (stdout, or `stream`)."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a") as f:
            f.write(f"{stamp} {text}\n")
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=stream or sys.stdout, flush=True)

    def warn(self, text: str) -> None:
        """`warning: text`: something is wrong but training goes on; on stderr, where warnings are looked for."""
        self.line(f"warning: {text}", stream=sys.stderr)

    def step(self, step: int, status: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def record(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.stats_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_stats(self, step: int) -> None:
        """Drop records after `step` (logged after the checkpoint we resume from, so about to be redone)."""
        if not self.enabled or not self.stats_path.exists():
            return
        kept = [line for line in self.stats_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.stats_path, "".join(line + "\n" for line in kept))

    def records(self) -> list[dict[str, Any]]:
        if not self.stats_path.exists():
            return []
        return [json.loads(line) for line in self.stats_path.read_text().splitlines() if line.strip()]

    def plot(self) -> None:
        """loss.png from stats.jsonl; without matplotlib (the `plot` extra) a note, once, instead."""
        if not self.enabled:
            return
        records = [r for r in self.records() if "loss" in r]   # FID records (`[fid] every`) carry no loss
        drawn = plot_loss([r["step"] for r in records], [r["loss"] for r in records], self.run_dir / "loss.png",
                          title=f"{self.run_dir.name}: training loss (mean per log interval)")
        if not drawn and not self._plot_note_given:
            self.line("note: no loss.png: matplotlib is not installed (pip install 'wdmctl[plot]')")
            self._plot_note_given = True

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
