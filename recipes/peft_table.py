"""The paper's Table VII (PEFT methods under CMKD: accuracy per task, average, DSP(M)) as results.md + a plot.

One `PeftRow` per method; `write_table_vii` writes ``results.md`` in the table's layout (rows = methods, columns =
the tasks' target accuracy, their average and DSP(M) summed over the tasks, as the paper sums over Office-Home's 12
tasks) and ``accuracy_vs_dsp.png`` (one point per method, log DSP axis). Every accuracy names the rule that picked
its checkpoint, e.g. "last checkpoint" (label-free) or "oracle (uses target labels)".
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cmkd.peft_methods import PEFT_LABELS, PEFT_METHODS

__all__ = ["PLOT_NAME", "TABLE_NAME", "PeftRow", "render_table_vii", "write_table_vii"]

TABLE_NAME = "results.md"
PLOT_NAME = "accuracy_vs_dsp.png"


@dataclass(frozen=True)
class PeftRow:
    """One method's results over the tasks of a benchmark.

    Args:
        method: one of `cmkd.PEFT_METHODS`; the row is shown under its `cmkd.PEFT_LABELS` name.
        accuracy: task name (e.g. ``"Ar->Cl"``) -> target accuracy as a fraction in [0, 1] (mean over seeds).
        dsp: task name -> downstream parameters stored for that task (`cmkd.count_dsp`); same tasks as ``accuracy``.
        selection: the rule that picked the reported checkpoint, e.g. ``"last checkpoint"``, or
            ``"oracle (uses target labels)"`` when it used target labels.
        settings: the method's key settings for the footnote, e.g. ``"r=1"`` (`cmkd.peft_methods.describe`).
        std: task -> standard deviation of the accuracy over seeds (fraction), when ``seeds > 1``.
        seeds: number of training runs averaged per task.
    """

    method: str
    accuracy: Mapping[str, float]
    dsp: Mapping[str, int]
    selection: str
    settings: str = ""
    std: Mapping[str, float] | None = None
    seeds: int = 1
    tasks: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in PEFT_METHODS:
            raise ValueError(f"PeftRow.method {self.method!r} is not one of {', '.join(PEFT_METHODS)}.")
        if not self.accuracy:
            raise ValueError(f"PeftRow({self.method!r}) has no task accuracy; pass accuracy={{task: fraction}}.")
        if set(self.accuracy) != set(self.dsp):
            raise ValueError(
                f"PeftRow({self.method!r}): accuracy has tasks {sorted(self.accuracy)} but dsp has "
                f"{sorted(self.dsp)}; give both for the same tasks."
            )
        for task, acc in self.accuracy.items():
            if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
                raise ValueError(
                    f"PeftRow({self.method!r}) accuracy[{task!r}] = {acc!r} must be a fraction in [0, 1] "
                    "(pass 0.873, not 87.3)."
                )
        for task, n in self.dsp.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"PeftRow({self.method!r}) dsp[{task!r}] = {n!r} must be an int >= 0.")
        if not isinstance(self.selection, str) or not self.selection.strip():
            raise ValueError(
                f"PeftRow({self.method!r}) needs selection= naming the checkpoint rule, e.g. 'last checkpoint'."
            )
        if self.std is not None and set(self.std) != set(self.accuracy):
            raise ValueError(f"PeftRow({self.method!r}): std must have the same tasks as accuracy.")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"PeftRow({self.method!r}).seeds must be an int >= 1, got {self.seeds!r}.")
        object.__setattr__(self, "tasks", tuple(self.accuracy))

    @property
    def label(self) -> str:
        return PEFT_LABELS[self.method]

    @property
    def average(self) -> float:
        """Mean target accuracy over the tasks (the table's Avg. column)."""
        return statistics.fmean(self.accuracy.values())

    @property
    def dsp_total(self) -> int:
        """DSP summed over the tasks (the table's DSP(M) column, in units)."""
        return sum(self.dsp.values())


def _check_rows(rows: Sequence[PeftRow]) -> list[PeftRow]:
    rows = list(rows)
    if not rows:
        raise ValueError("write_table_vii needs at least one PeftRow.")
    if any(not isinstance(r, PeftRow) for r in rows):
        raise TypeError("write_table_vii takes PeftRow objects (recipes.peft_table.PeftRow).")
    methods = [r.method for r in rows]
    if len(set(methods)) != len(methods):
        raise ValueError(f"each method may appear once in Table VII, got {methods}.")
    tasks = rows[0].tasks
    for r in rows[1:]:
        if set(r.tasks) != set(tasks):
            raise ValueError(
                f"all rows must cover the same tasks: {rows[0].method} has {sorted(tasks)}, {r.method} has "
                f"{sorted(r.tasks)}."
            )
    return rows


def _pct(row: PeftRow, task: str) -> str:
    cell = f"{100 * row.accuracy[task]:.1f}"
    return cell + (f" ± {100 * row.std[task]:.1f}" if row.std is not None and row.seeds > 1 else "")


def _dsp_m(n: int) -> str:
    return f"{n / 1e6:.2f}" if n >= 1e6 else f"{n / 1e6:.6f}"


def render_table_vii(rows: Sequence[PeftRow], title: str | None = None) -> str:
    """Markdown of Table VII: one row per method in the given order, one column per task, Avg., DSP(M), checkpoint."""
    rows = _check_rows(rows)
    tasks = rows[0].tasks
    header = ["Method", *(t.replace("->", "→") for t in tasks), "Avg.", "DSP(M)", "Checkpoint"]
    lines = [f"# {title or 'Comparison with PEFT methods (paper Table VII)'}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|"]
    for r in rows:
        cells = [r.label, *(_pct(r, t) for t in tasks), f"{100 * r.average:.1f}", _dsp_m(r.dsp_total), r.selection]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r.seeds for r in rows})
    spread = " ± std over seeds" if seeds != [1] else ""
    notes = [
        "",
        f"Target accuracy (%){spread}, mean of {'/'.join(map(str, seeds))} seed(s) per task; Avg. = mean over the "
        f"{len(tasks)} task(s). DSP(M) = downstream parameters stored per task, summed over the tasks, in millions "
        "(RST: changed backbone entries; LoRA/AdaLoRA: adapter matrices at the kept ranks; BitFit: backbone biases; "
        "Fine-tuning: every parameter; each plus the task head). Checkpoint: the rule that picked the reported "
        "model.",
    ]
    settings = [f"{r.label}: {r.settings}" for r in rows if r.settings]
    if settings:
        notes.append("Settings: " + "; ".join(settings) + ".")
    return "\n".join(lines + notes) + "\n"


def _temp_beside(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


def _plot(rows: Sequence[PeftRow], path: str, title: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for r in rows:
        x, y = max(r.dsp_total, 1) / 1e6, 100 * r.average
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("DSP(M), summed over tasks (log scale)")
    ax.set_ylabel("average target accuracy (%)")
    rules = sorted({r.selection for r in rows})
    ax.set_title(f"{title or 'PEFT methods under CMKD'}\ncheckpoint: {'; '.join(rules)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    low, high = min(100 * r.average for r in rows), max(100 * r.average for r in rows)
    pad = max(1.0, (high - low) * 0.15)
    ax.set_ylim(math.floor(low - pad), math.ceil(high + pad))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def write_table_vii(rows: Sequence[PeftRow], output_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write ``results.md`` (Table VII layout) and ``accuracy_vs_dsp.png`` into ``output_dir``; returns both paths.

    Rows are checked before anything is written; both files are written to temp files first and renamed only once
    both are complete, so a refused or failed call leaves the folder as it was.
    """
    rows = _check_rows(rows)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    text = render_table_vii(rows, title)
    finals = [folder / TABLE_NAME, folder / PLOT_NAME]
    temps: list[Path] = []
    try:
        temps.append(_temp_beside(finals[0]))
        temps[0].write_text(text, encoding="utf-8")
        temps.append(_temp_beside(finals[1]))
        _plot(rows, str(temps[1]), title)
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return finals
