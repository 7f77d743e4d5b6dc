"""The whole pipeline in one command: zero-shot CLIP, source-only, CMKD and CMKD+RST on one transfer task.

Offline, on CPU, in a few minutes (the README's main command)::

    python recipes/demo.py --output_dir runs/demo

The default task ships with the project: scikit-learn's handwritten digits rendered clean (source, like MNIST) and
in random colours, poses and strokes (target, like SVHN) (`cmkd.toy`), written as an ImageFolder tree so the same
loading code as the real benchmarks runs, and a tiny CLIP pretrained contrastively on other digits
(`cmkd.toy.TINY_CLIP_PATH`). With a real CLIP and a benchmark folder the same command does the real thing, with
that benchmark's YAML defaults::

    python recipes/demo.py --output_dir runs/demo_ar_cl --model openai/clip-vit-base-patch16 \\
        --benchmark office_home --data_dir data/OfficeHome --source Art --target Clipart

Each trained method runs with ``--seeds`` seeds (default 3: ``--seed``, ``--seed`` + 1, ...) and is reported as the
mean ± std over them. The reported checkpoint of every run is picked by ``--selection`` (default ``last``: the last
checkpoint, which needs no target labels; ``oracle`` picks the best target accuracy, which needs them), and every
printed number names its rule.

The output folder holds one sub-folder per method and seed (the RST adapter with its model card is in
``cmkd_rst/seed-<seed>/<task>/adapter``), and the comparison as ``results.json``, ``results.md`` and
``accuracy_vs_dsp.png``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cmkd.pretrained import load_clip  # noqa: E402
from recipes import run_uda  # noqa: E402
from recipes.core.arguments import Run, parse  # noqa: E402
from recipes.core.outputs import ADAPTER_DIRNAME, TaskResult  # noqa: E402
from recipes.core.tables import add_result  # noqa: E402

TOY = run_uda.TOY
DEFAULT_OUTPUT = "runs/demo"

# The rows of the comparison: (sub-folder, Run.method, RST). FixMatch (--fixmatch) applies to the CMKD rows. Rows
# are named everywhere (table, summary, plot, cards) by Run.method_label: CLIP, Baseline, CMKD, CMKD+RST.
ROWS = (("zero_shot", "zero_shot", False), ("source_only", "baseline", False), ("cmkd", "cmkd", False))
ROWS += (("cmkd_rst", "cmkd", True),)
LEGEND = "CLIP = zero-shot CLIP (no training), Baseline = source-only fine-tuning"
SCRIPT = "recipes/demo.py"
QUICK_MAX_STEPS = 6  # --quick: a smoke run of the pipeline (tests), not a result
QUICK_EVAL_STEPS = 3


@dataclass
class DemoArguments:
    """The demo's own flags (the rest are the recipes' flags, with the toy task's preset as defaults)."""

    quick: bool = field(default=False, metadata={"help": f"{QUICK_MAX_STEPS} iterations: checks the pipeline only"})
    seeds: int = field(
        default=3, metadata={"help": "training runs per method, seeds --seed, --seed + 1, ...; mean ± std"}
    )


def parse_demo(argv: Sequence[str] | None) -> tuple[Run, int]:
    """The demo's flags over its preset (``--benchmark``, default the toy task); --quick shortens the run.
    Returns the run and the number of seeds per method."""
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"benchmark": TOY, "rst": True, "selection": "last"}  # label-free selection by default
    toy = run_uda.toy_defaults(argv, TOY if "--benchmark" not in argv else None, DEFAULT_OUTPUT)
    if toy:  # 32x32 digits decode in microseconds: worker processes cost more than they save
        defaults.update(toy, output_dir=DEFAULT_OUTPUT, dataloader_num_workers=0)
    if "--quick" in argv:
        defaults.update(max_steps=QUICK_MAX_STEPS, eval_steps=QUICK_EVAL_STEPS)
    run, (demo,) = parse(argv, defaults=defaults, extra=(DemoArguments,), script=SCRIPT)
    problem = "--seeds must be >= 1" if demo.seeds < 1 else None
    if run.recipe.baseline or run.recipe.zero_shot:
        problem = "the demo runs zero-shot, source-only, CMKD and CMKD+RST itself; drop --baseline / --zero-shot"
    if problem:  # a usage error, like the parser's own
        print(f"error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return run, demo.seeds


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    start = time.time()
    # 1. Parse (validated before anything is written); the toy task's data is rendered into the output folder
    run, num_seeds = parse_demo(argv)
    if run.bench.name == TOY and "OMP_NUM_THREADS" not in os.environ:
        # the tiny model's matrices are too small to split over threads, and one thread keeps the demo's time when
        # other processes load the machine
        torch.set_num_threads(1)
    _quiet_weight_bars()
    run_uda.quiet_progress_bars(run)
    run_uda.prepare_inputs(run)
    clip = load_clip(run.model)
    results = run_uda.start_run(run)
    ((source, target),) = run.tasks
    seeds = [run.training.seed + i for i in range(num_seeds)]
    rule = run.selection_rule

    # 2-7. For each method and seed: data, model, train, evaluate, save (+ card), push; the recipes' own steps
    for number, (folder, method, rst) in enumerate(ROWS, 1):
        row = dataclasses.replace(
            run,
            method=method,
            peft="rst" if rst else "full",
            peft_methods=("rst",) if rst else ("full",),
            tau=run.tau if rst else None,
            recipe=dataclasses.replace(run.recipe, fixmatch=run.recipe.fixmatch and method == "cmkd"),
            training=dataclasses.replace(run.training, push_to_hub=run.training.push_to_hub and rst),
            hub_model_id=run.hub_model_id or run.output_dir.resolve().name,  # the demo pushes the RST adapter only
        )
        trained = method != "zero_shot"  # zero-shot trains nothing: one evaluation, the same for every seed
        runs = seeds if trained else seeds[:1]
        what = f"seeds {', '.join(map(str, runs))}, checkpoint: {rule}" if trained else "no training"
        print(f"method {number} of {len(ROWS)}: {row.method_label} ({what})", flush=True)
        done = []
        for seed in runs:
            seeded = dataclasses.replace(
                row,
                training=dataclasses.replace(row.training, seed=seed),
                output_dir=run.output_dir / folder / f"seed-{seed}",
            )
            result = run_uda.run_task(seeded, clip, source, target, callbacks)
            done.append(result)
            if trained:
                print(f"  seed {seed}: {100 * result.score:.1f} % ({rule})", flush=True)
        record(results, done, runs)
        print(_method_line(results["methods"][row.method_label][done[0].task], row.method_label), flush=True)

    # 8. The comparison: results.json, results.md, accuracy_vs_dsp.png, and a summary on stdout
    results["meta"].update(selection=rule, seeds=seeds, legend=LEGEND)
    # the table's heading and the plot's title say what the numbers are
    results["display_name"] += f" (mean of {len(seeds)} seeds; checkpoint: {rule})"
    run_uda.finish_run(run, results)
    print(summary(run, results, time.time() - start), flush=True)
    return results


def _quiet_weight_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars each time a checkpoint is loaded or saved; the Trainer's own
    progress bar stays (``--quiet`` hides it too)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


NO_TRAINING = "no training (zero-shot)"


def mean_selection(runs: Sequence[TaskResult]) -> dict | None:
    """The runs' selection summaries (``cmkd.validators.selection_summary``, one rule) as one: the rule, and the mean
    over the runs of the pick's value and of the last / picked / oracle accuracies and the gap; None without
    training (zero-shot)."""
    sels = [r.selection for r in runs]
    if any(s is None for s in sels):
        return None

    def mean(values: list) -> float | None:
        return None if any(v is None for v in values) else statistics.fmean(values)

    first = sels[0]
    out: dict = {"rule": first["rule"], "metric": first["metric"], "value": mean([s["value"] for s in sels])}
    if all(s.get("oracle") for s in sels):
        out.update(
            accuracy=mean([s["accuracy"] for s in sels]),
            last={"accuracy": mean([s["last"]["accuracy"] for s in sels])},
            oracle={"accuracy": mean([s["oracle"]["accuracy"] for s in sels]), "name": first["oracle"]["name"]},
            gap=mean([s["gap"] for s in sels]),
        )
    return out


def rule_of(entry: dict) -> str:
    """The selection rule of a comparison row, as printed next to its numbers."""
    return entry["selection"]["rule"] if entry.get("selection") else NO_TRAINING


def record(results: dict, runs: Sequence[TaskResult], seeds: Sequence[int]) -> dict:
    """One row of the comparison from a method's runs: mean (the table's number), std and every run's score, the
    selection summary averaged over the runs; for RST the adapters' changed backbone fraction
    (``peft_rst.report``)."""
    scores = [r.score for r in runs]
    first = runs[0]
    extra: dict = {
        "std": statistics.pstdev(scores),
        "runs": {str(seed): r.score for seed, r in zip(seeds, runs)},
        "overall_accuracy": statistics.fmean(r.accuracy for r in runs),
        "mean_class_accuracy": statistics.fmean(r.mean_class_accuracy for r in runs),
        "nbytes": round(statistics.fmean(r.nbytes for r in runs)),
        "num_eval": first.num_eval,
        "path": first.path,
    }
    selection = mean_selection(runs)
    if selection is not None:
        extra["selection"] = selection
    if first.teacher_accuracy is not None:
        extra["teacher_accuracy"] = statistics.fmean(r.teacher_accuracy for r in runs)
    if first.path and Path(first.path).name == ADAPTER_DIRNAME:
        import peft_rst

        reports = [peft_rst.report(r.path).adapters[0] for r in runs]
        extra["backbone_changed"] = round(statistics.fmean(a.backbone_changed for a in reports))
        extra["backbone_numel"] = reports[0].backbone_numel
        extra["changed_fraction"] = statistics.fmean(a.density for a in reports)
    dsp = round(statistics.fmean(r.dsp for r in runs))
    add_result(results, first.method, first.task, statistics.fmean(scores), dsp, None, **extra)
    return results


def _method_line(entry: dict, label: str) -> str:
    n = len(entry["runs"])
    spread = f" ± {100 * entry['std']:.1f} (mean ± std over {n} seeds)" if n > 1 else ""
    line = f"  {label}: {100 * entry['accuracy']:.1f} %{spread}, {rule_of(entry)}, DSP {entry['dsp']:,}"
    if "changed_fraction" in entry:
        line += (
            f", backbone changed {entry['backbone_changed']:,} of {entry['backbone_numel']:,} entries "
            f"({100 * entry['changed_fraction']:.2f} %)"
        )
    return line


def summary(run: Run, results: dict, seconds: float) -> str:
    (task,) = run.task_names
    rule = results["meta"]["selection"]
    lines = [
        f"{run.bench.display_name} {task.replace('->', ' → ')}: target accuracy, mean ± std over seeds "
        f"{', '.join(map(str, results['meta']['seeds']))}, {run.training.max_steps} iterations each, "
        f"checkpoint: {rule}; "
        f"whole demo {seconds:.0f} s",
        f"{'Method':<12}{'accuracy':>16}{'DSP':>12}{'changed':>10}{'stored bytes':>14}  selection",
    ]
    for method, rows in results["methods"].items():
        e = rows[task]
        acc = f"{100 * e['accuracy']:.1f} ± {100 * e['std']:.1f}%"
        changed = f"{100 * e['changed_fraction']:.2f}%" if "changed_fraction" in e else "-"
        lines.append(f"{method:<12}{acc:>16}{e['dsp']:>12,}{changed:>10}{e['nbytes']:>14,}  {rule_of(e)}")
    lines.append(f"({LEGEND}; changed = share of the targeted backbone entries the RST adapter changes)")
    return "\n".join(lines)


if __name__ == "__main__":
    run_uda.run_recipe(main)
