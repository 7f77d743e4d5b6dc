"""Results JSON, Markdown tables in the paper's layouts and an accuracy-vs-DSP plot; every file written atomically.

Results are a plain dict, also the JSON on disk: ``{"benchmark", "display_name", "metric", "table_layout", "tasks":
["Ar->Cl", ...], "domains", "methods": {"CMKD+RST": {"Ar->Cl": {"accuracy": 0.789, "dsp": 85341, "per_class": {...}}}},
"meta"}``. ``accuracy`` is a fraction (the benchmark's metric), None without target labels; ``dsp`` the parameters
stored for the task (DSP, paper Sec. IV.A). Tables print accuracy in percent (1 decimal), DSP summed in millions.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cmkd.benchmarks import TASK_SEPARATOR, BenchmarkConfig
from peft_rst.files import atomic_write_bytes, atomic_write_text

RESULTS_FILENAME = "results.json"  # written last by a finished run; its presence marks the folder as finished
MARKDOWN_FILENAME, PLOT_FILENAME = "results.md", "accuracy_vs_dsp.png"
ARROW, MISSING = "→", "–"


def new_results(benchmark: BenchmarkConfig, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An empty results dict for ``benchmark`` with its task order, domains and table layout."""
    b = benchmark
    names = {"benchmark": b.name, "display_name": b.display_name, "metric": b.metric, "table_layout": b.table_layout}
    return {**names, "tasks": b.task_names(), "domains": list(b.domains), "methods": {}, "meta": dict(meta or {})}


def add_result(results: dict, method: str, task: str, accuracy: float | None, dsp: int, per_class=None, **extra):
    """Record one (method, task) result; tasks outside the benchmark's list are appended as extra columns.
    ``accuracy`` None: the target had no labels (unsupervised run), the cell shows "–" and the average skips it."""
    if TASK_SEPARATOR not in task:
        raise ValueError(f"task {task!r} must look like 'SRC{TASK_SEPARATOR}TGT'")
    if accuracy is not None and not 0.0 <= (accuracy := float(accuracy)) <= 1.0:  # NaN fails too
        raise ValueError(f"accuracy must be a fraction in [0, 1] (got {accuracy}); divide percentages by 100")
    if int(dsp) != dsp or dsp < 0:
        raise ValueError(f"dsp must be a non-negative parameter count, got {dsp}")
    entry: dict[str, Any] = {"accuracy": accuracy, "dsp": int(dsp)}
    if per_class is not None:
        if bad := [(k, v) for k, v in per_class.items() if not 0.0 <= float(v) <= 1.0]:
            raise ValueError(f"per-class accuracy of {bad[0][0]!r} must be in [0, 1], got {bad[0][1]}")
        entry["per_class"] = {str(k): float(v) for k, v in per_class.items()}
    if task not in results["tasks"]:
        results["tasks"].append(task)
    results["methods"].setdefault(method, {})[task] = {**entry, **extra}
    return results


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    return atomic_write_text(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    if missing := [key for key in ("tasks", "methods") if key not in results]:
        raise ValueError(f"{path} is not a results file (missing {missing[0]!r})")
    return results


def summarize(results: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Average accuracy (percent, over the tasks present), DSP in millions (summed) and task coverage of a method."""
    rows, total = results["methods"][method], len(results["tasks"])
    done = [t for t in results["tasks"] if t in rows]
    accs = [rows[t]["accuracy"] * 100 for t in done if rows[t]["accuracy"] is not None]
    avg, dsp_m = sum(accs) / len(accs) if accs else float("nan"), sum(rows[t]["dsp"] for t in rows) / 1e6
    return {"avg": avg, "dsp_m": dsp_m, "done": len(done), "total": total, "unlabeled": len(done) - len(accs)}


def _pct(value: float | None | Iterable[float | None]) -> str:
    """A percentage cell; of an iterable, the mean of its values (None: missing)."""
    if isinstance(value, Iterable):
        value = [v for v in value if v is not None]
        value = sum(value) / len(value) if value else None
    return MISSING if value is None or math.isnan(value) else f"{value:.1f}"


def _acc(entry: Mapping[str, Any] | None) -> float | None:
    return None if not entry or entry.get("accuracy") is None else entry["accuracy"] * 100


def _dsp(millions: float) -> str:
    """DSP in millions as the paper prints it (2 decimals), with 4 significant digits below 0.01 M (small models)."""
    return f"{millions:.2f}" if millions == 0 or millions >= 0.01 else f"{millions:.4g}"


def _avg(s: Mapping[str, Any]) -> str:
    """The Avg. cell: * when tasks are missing, † when some had no target labels (see `_footnote`)."""
    return _pct(s["avg"]) + ("*" if 0 < s["done"] < s["total"] else "") + ("†" if s["unlabeled"] else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _footnote(results: Mapping[str, Any]) -> str:
    summaries = {m: summarize(results, m) for m in results["methods"]}
    partial = ", ".join(m for m, s in summaries.items() if 0 < s["done"] < s["total"])
    unlabeled = ", ".join(m for m, s in summaries.items() if s["unlabeled"])
    text = f"\n\n\\* average over the tasks finished so far ({partial})." if partial else ""
    note = f"\n\n† average over the tasks with target labels; – = no target labels given ({unlabeled})."
    return text + (note if unlabeled else "")


def render_selection_table(results: Mapping[str, Any]) -> str:
    """Per task and method: accuracy of the last checkpoint, of the label-free pick, of the oracle (uses target
    labels) and the gap oracle - pick, in points; empty when no run recorded a selection."""
    from cmkd.validators import ORACLE_NAME

    rows = []
    for method, per_task in results["methods"].items():
        for task in results["tasks"]:
            if not (sel := (per_task.get(task) or {}).get("selection")):
                continue
            picks = (sel["last"], sel, sel["oracle"]) if sel.get("oracle") is not None else ()
            cells = (
                [*(_pct(100 * p["accuracy"]) for p in picks), f"{100 * sel['gap']:.1f}"] if picks else [MISSING] * 4
            )
            rows.append([method, task.replace(TASK_SEPARATOR, ARROW), sel["metric"], *cells])
    header = ["Method", "Task", "Selection", "Last", "Label-free pick", ORACLE_NAME, "Gap (points)"]
    return "Checkpoint selection (target accuracy, %):\n\n" + _table(header, rows) if rows else ""


def render_task_table(results: Mapping[str, Any]) -> str:
    """Paper Table I layout: rows = methods, columns = tasks (``Ar→Cl``), then ``Avg.`` and ``DSP(M)``."""
    rows = []
    for method, per_task in results["methods"].items():
        s = summarize(results, method)
        rows.append([method, *(_pct(_acc(per_task.get(t))) for t in results["tasks"]), _avg(s), _dsp(s["dsp_m"])])
    tasks = [t.replace(TASK_SEPARATOR, ARROW) for t in results["tasks"]]
    return _table(["Method", *tasks, "Avg.", "DSP(M)"], rows) + _footnote(results)


def render_per_class_table(results: Mapping[str, Any], task: str | None = None) -> str:
    """Paper Table V layout (VisDA-2017): rows = methods, columns = classes, then ``Avg.`` (the mean per-class
    accuracy) and ``DSP(M)``; one task."""
    task = task or results["tasks"][0]
    entries = {m: per_task.get(task) for m, per_task in results["methods"].items()}
    names = [*(results.get("classes") or []), *(c for e in entries.values() for c in (e or {}).get("per_class", {}))]
    classes, rows = list(dict.fromkeys(names)), []
    for method, entry in entries.items():
        per_class = (entry or {}).get("per_class", {})
        cells = [_pct(per_class[c] * 100) if c in per_class else MISSING for c in classes]
        rows.append([method, *cells, *([_pct(_acc(entry)), _dsp(entry["dsp"] / 1e6)] if entry else [MISSING] * 2)])
    return f"Task: {task.replace(TASK_SEPARATOR, ARROW)}\n\n" + _table(["Method", *classes, "Avg.", "DSP(M)"], rows)


def render_matrix_tables(results: Mapping[str, Any]) -> str:
    """Paper Table VI layout (DomainNet): per method a source x target matrix with row/column averages."""
    domains, blocks = list(results.get("domains") or []), []
    for method, per_task in results["methods"].items():
        acc = {(a, b): _acc(per_task.get(f"{a}{TASK_SEPARATOR}{b}")) for a in domains for b in domains if a != b}
        rows = [
            [a, *(_pct(acc.get((a, b))) for b in domains), _pct(acc[a, b] for b in domains if b != a)] for a in domains
        ]
        s = summarize(results, method)
        rows.append(["Avg.", *(_pct(acc[a, b] for a in domains if a != b) for b in domains), _avg(s)])
        blocks.append(f"**{method}** (DSP(M) {_dsp(s['dsp_m'])})\n\n" + _table([method, *domains, "Avg."], rows))
    return "\n\n".join(blocks) + _footnote(results)


def render_markdown(results: Mapping[str, Any], title: str | None = None) -> str:
    """The benchmark's table in the paper's layout (tasks / per-class / matrix), with a heading."""
    metric = "mean per-class accuracy" if results.get("metric") == "mean_class_accuracy" else "accuracy"
    heading = title or f"{results.get('display_name', results.get('benchmark', 'Results'))}: {metric} (%)"
    if not results["methods"]:
        return f"## {heading}\n\n_no results yet_\n"
    layout = results.get("table_layout", "tasks")
    body = render_per_class_table(results) if layout == "per_class" else render_task_table(results)
    body = render_matrix_tables(results) + "\n\n" + body if layout == "matrix" else body
    selection = render_selection_table(results)
    return f"## {heading}\n\n{body}" + (f"\n\n{selection}" if selection else "") + "\n"


def plot_accuracy_vs_dsp(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG of average accuracy against DSP(M) per method (symlog x axis so zero-shot's DSP 0 fits), like Fig. 4."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    for method in results["methods"]:
        if not math.isnan((s := summarize(results, method))["avg"]):
            ax.scatter([s["dsp_m"]], [s["avg"]], s=40, zorder=3)
            ax.annotate(
                f"{method} ({s['avg']:.1f})", (s["dsp_m"], s["avg"]), textcoords="offset points", xytext=(5, 4)
            )
    metric = "mean per-class accuracy" if results.get("metric") == "mean_class_accuracy" else "accuracy"
    ax.set(xlabel="DSP (M parameters stored, summed over tasks)", ylabel=f"average {metric} (%)")
    ax.set(title=f"{results.get('display_name', results.get('benchmark', ''))}: accuracy vs DSP")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(buf := io.BytesIO(), format="png")
    return atomic_write_bytes(path, buf.getvalue())


def write_report(results: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the Markdown table, the plot and finally ``results.json`` (the finished-run marker) to ``output_dir``."""
    out = Path(output_dir)
    paths = {"markdown": atomic_write_text(out / MARKDOWN_FILENAME, render_markdown(results))}
    paths["plot"] = plot_accuracy_vs_dsp(results, out / PLOT_FILENAME)
    return {**paths, "json": save_results(results, out / RESULTS_FILENAME)}
