"""Results JSON, Markdown tables in the paper's layouts and an accuracy-vs-DSP plot; every file written atomically.

Results are a plain dict (it is also the JSON on disk)::

    {"benchmark": "office_home", "display_name": "Office-Home", "metric": "accuracy",
     "table_layout": "tasks", "tasks": ["Ar->Cl", ...], "domains": ["Ar", ...],
     "methods": {"CMKD+RST": {"Ar->Cl": {"accuracy": 0.789, "dsp": 85341, "per_class": {...}}, ...}},
     "meta": {...}}

``accuracy`` is a fraction in [0, 1] (the benchmark's metric: plain or mean per-class accuracy); ``dsp`` is the
number of parameters stored for that task (DSP, paper Sec. IV.A: non-zero RST entries + head, or the whole model).
Tables show accuracy in percent with one decimal and DSP summed over tasks in millions with two, like the paper.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peft_rst.files import atomic_write_bytes, atomic_write_text

from .config import TASK_SEPARATOR, BenchmarkConfig

RESULTS_FILENAME = "results.json"  # written last by a finished run: the folder holds a finished run

MARKDOWN_FILENAME = "results.md"
PLOT_FILENAME = "accuracy_vs_dsp.png"
ARROW = "→"
MISSING = "–"


# --------------------------------------------------------------------------------------------------------------------
# Results dict
# --------------------------------------------------------------------------------------------------------------------


def new_results(benchmark: BenchmarkConfig, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An empty results dict for ``benchmark`` with its task order, domains and table layout."""
    return {
        "benchmark": benchmark.name,
        "display_name": benchmark.display_name,
        "metric": benchmark.metric,
        "table_layout": benchmark.table_layout,
        "tasks": benchmark.task_names(),
        "domains": list(benchmark.domains),
        "methods": {},
        "meta": dict(meta or {}),
    }


def add_result(
    results: dict[str, Any],
    method: str,
    task: str,
    accuracy: float | None,
    dsp: int,
    per_class: Mapping[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Record one (method, task) result; tasks outside the benchmark's list are appended as extra columns.

    ``accuracy`` None: the target had no labels (unsupervised run), the cell shows "–" and the average skips it.
    """
    if TASK_SEPARATOR not in task:
        raise ValueError(f"task {task!r} must look like 'SRC{TASK_SEPARATOR}TGT'")
    if accuracy is not None:
        accuracy = float(accuracy)
        if not 0.0 <= accuracy <= 1.0 or math.isnan(accuracy):
            raise ValueError(f"accuracy must be a fraction in [0, 1] (got {accuracy}); divide percentages by 100")
    if int(dsp) != dsp or dsp < 0:
        raise ValueError(f"dsp must be a non-negative parameter count, got {dsp}")
    entry: dict[str, Any] = {"accuracy": accuracy, "dsp": int(dsp)}
    if per_class is not None:
        for name, value in per_class.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"per-class accuracy of {name!r} must be in [0, 1], got {value}")
        entry["per_class"] = {str(k): float(v) for k, v in per_class.items()}
    entry.update(extra)
    if task not in results["tasks"]:
        results["tasks"].append(task)
    results["methods"].setdefault(method, {})[task] = entry
    return results


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    for key in ("tasks", "methods"):
        if key not in results:
            raise ValueError(f"{path} is not a results file (missing {key!r})")
    return results


def summarize(results: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Average accuracy (percent, over the tasks present), DSP in millions (summed) and task coverage of a method."""
    rows = results["methods"][method]
    done = [t for t in results["tasks"] if t in rows]
    accs = [rows[t]["accuracy"] * 100 for t in done if rows[t]["accuracy"] is not None]
    return {
        "avg": sum(accs) / len(accs) if accs else float("nan"),
        "dsp_m": sum(rows[t]["dsp"] for t in rows) / 1e6,
        "done": len(done),
        "total": len(results["tasks"]),
        "unlabeled": len(done) - len(accs),  # finished without target labels: no accuracy, left out of avg
    }


# --------------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------------


def format_task(task: str) -> str:
    return task.replace(TASK_SEPARATOR, ARROW)


def _pct(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.1f}"


def _dsp_cell(millions: float) -> str:
    """DSP in millions as the paper prints it (2 decimals), with 4 significant digits below 0.01 M (small models)."""
    return f"{millions:.2f}" if millions == 0 or millions >= 0.01 else f"{millions:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _avg_cell(summary: Mapping[str, Any]) -> str:
    cell = _pct(summary["avg"])
    cell = cell + "*" if summary["done"] and summary["done"] < summary["total"] else cell
    return cell + "†" if summary.get("unlabeled") else cell


def _footnote(results: Mapping[str, Any]) -> str:
    partial = [m for m in results["methods"] if 0 < summarize(results, m)["done"] < len(results["tasks"])]
    notes = f"\n\n\\* average over the tasks finished so far ({', '.join(partial)})." if partial else ""
    unlabeled = [m for m in results["methods"] if summarize(results, m).get("unlabeled")]
    if unlabeled:
        notes += (
            f"\n\n† average over the tasks with target labels; – = no target labels given ({', '.join(unlabeled)})."
        )
    return notes


def _acc(entry: Mapping[str, Any]) -> float | None:
    return None if entry.get("accuracy") is None else entry["accuracy"] * 100


def render_selection_table(results: Mapping[str, Any]) -> str:
    """Per task and method: accuracy of the last checkpoint, of the label-free pick, of the oracle (uses target
    labels) and the gap oracle - pick, in points; empty when no run recorded a selection with target labels."""
    from cmkd.validators import ORACLE_NAME

    rows = []
    for method, per_task in results["methods"].items():
        for task in results["tasks"]:
            sel = (per_task.get(task) or {}).get("selection")
            if not sel:
                continue
            if sel.get("oracle") is None:
                rows.append([method, format_task(task), sel["metric"], MISSING, MISSING, MISSING, MISSING])
                continue
            rows.append(
                [
                    method,
                    format_task(task),
                    sel["metric"],
                    _pct(100 * sel["last"]["accuracy"]),
                    _pct(100 * sel["accuracy"]),
                    _pct(100 * sel["oracle"]["accuracy"]),
                    f"{100 * sel['gap']:.1f}",
                ]
            )
    if not rows:
        return ""
    header = ["Method", "Task", "Selection", "Last", "Label-free pick", ORACLE_NAME, "Gap (points)"]
    return "Checkpoint selection (target accuracy, %):\n\n" + _table(header, rows)


def render_task_table(results: Mapping[str, Any]) -> str:
    """Paper Table I layout: rows = methods, columns = tasks (``Ar→Cl``), then ``Avg.`` and ``DSP(M)``."""
    tasks = list(results["tasks"])
    header = ["Method", *(format_task(t) for t in tasks), "Avg.", "DSP(M)"]
    rows = []
    for method, per_task in results["methods"].items():
        s = summarize(results, method)
        cells = [_pct(_acc(per_task[t])) if t in per_task else MISSING for t in tasks]
        rows.append([method, *cells, _avg_cell(s), _dsp_cell(s["dsp_m"])])
    return _table(header, rows) + _footnote(results)


def render_per_class_table(results: Mapping[str, Any], task: str | None = None) -> str:
    """Paper Table V layout (VisDA-2017): rows = methods, columns = classes, then ``Avg.`` (the mean per-class
    accuracy) and ``DSP(M)``; one task."""
    task = task or results["tasks"][0]
    classes: list[str] = list(results.get("classes") or [])
    for per_task in results["methods"].values():
        for name in per_task.get(task, {}).get("per_class", {}):
            if name not in classes:
                classes.append(name)
    header = ["Method", *classes, "Avg.", "DSP(M)"]
    rows = []
    for method, per_task in results["methods"].items():
        entry = per_task.get(task)
        if entry is None:
            rows.append([method, *([MISSING] * len(classes)), MISSING, MISSING])
            continue
        per_class = entry.get("per_class", {})
        cells = [_pct(per_class[c] * 100) if c in per_class else MISSING for c in classes]
        rows.append([method, *cells, _pct(_acc(entry)), _dsp_cell(entry["dsp"] / 1e6)])
    return f"Task: {format_task(task)}\n\n" + _table(header, rows)


def render_matrix_tables(results: Mapping[str, Any]) -> str:
    """Paper Table VI layout (DomainNet): per method a source x target matrix with row/column averages."""
    domains = list(results.get("domains") or [])
    blocks = []
    for method, per_task in results["methods"].items():
        s = summarize(results, method)
        rows, col_vals = [], {d: [] for d in domains}
        for src in domains:
            row, vals = [src], []
            for tgt in domains:
                if src == tgt:
                    row.append(MISSING)
                    continue
                entry = per_task.get(f"{src}{TASK_SEPARATOR}{tgt}")
                value = _acc(entry) if entry else None
                row.append(_pct(value))
                if value is not None:
                    vals.append(value)
                    col_vals[tgt].append(value)
            row.append(_pct(sum(vals) / len(vals)) if vals else MISSING)
            rows.append(row)
        avg_row = ["Avg."] + [_pct(sum(v) / len(v)) if v else MISSING for v in col_vals.values()] + [_avg_cell(s)]
        rows.append(avg_row)
        blocks.append(f"**{method}** (DSP(M) {_dsp_cell(s['dsp_m'])})\n\n" + _table([method, *domains, "Avg."], rows))
    return "\n\n".join(blocks) + _footnote(results)


def render_markdown(results: Mapping[str, Any], title: str | None = None) -> str:
    """The benchmark's table in the paper's layout (tasks / per-class / matrix), with a heading."""
    layout = results.get("table_layout", "tasks")
    metric = "mean per-class accuracy" if results.get("metric") == "mean_class_accuracy" else "accuracy"
    heading = title or f"{results.get('display_name', results.get('benchmark', 'Results'))}: {metric} (%)"
    if not results["methods"]:
        body = "_no results yet_"
    elif layout == "per_class":
        body = render_per_class_table(results)
    elif layout == "matrix":
        body = render_matrix_tables(results) + "\n\n" + render_task_table(results)
    else:
        body = render_task_table(results)
    selection = render_selection_table(results) if results["methods"] else ""
    if selection:
        body += "\n\n" + selection
    return f"## {heading}\n\n{body}\n"


# --------------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------------


def plot_accuracy_vs_dsp(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG of average accuracy against DSP(M) per method (symlog x axis so zero-shot's DSP 0 fits), like Fig. 4."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for method in results["methods"]:
        s = summarize(results, method)
        if math.isnan(s["avg"]):
            continue
        ax.scatter([s["dsp_m"]], [s["avg"]], s=40, zorder=3)
        ax.annotate(f"{method} ({s['avg']:.1f})", (s["dsp_m"], s["avg"]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("DSP (M parameters stored, summed over tasks)")
    metric = "mean per-class accuracy" if results.get("metric") == "mean_class_accuracy" else "accuracy"
    ax.set_ylabel(f"average {metric} (%)")
    ax.set_title(f"{results.get('display_name', results.get('benchmark', ''))}: accuracy vs DSP")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(results: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the Markdown table, the plot and finally ``results.json`` (the finished-run marker) to ``output_dir``."""
    out = Path(output_dir)
    paths = {
        "markdown": atomic_write_text(out / MARKDOWN_FILENAME, render_markdown(results)),
        "plot": plot_accuracy_vs_dsp(results, out / PLOT_FILENAME),
    }
    paths["json"] = save_results(results, out / RESULTS_FILENAME)
    return paths
