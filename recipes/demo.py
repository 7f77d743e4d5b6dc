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

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from recipes.core import runner  # noqa: E402
from recipes.core.config import available_benchmarks, build_parser  # noqa: E402
from recipes.core.tables import add_result  # noqa: E402

TOY = "digits_shift"
DEFAULT_OUTPUT = "runs/demo"

# The rows of the comparison: (sub-folder, RunConfig.method, RST). FixMatch (--fixmatch) applies to the CMKD rows.
# Rows are named everywhere (table, summary, plot, cards) by RunConfig.method_label: CLIP (zero-shot), Baseline
# (source-only), CMKD, CMKD+RST.
ROWS = (("zero_shot", "zero_shot", False), ("source_only", "baseline", False), ("cmkd", "cmkd", False))
ROWS += (("cmkd_rst", "cmkd", True),)
LEGEND = "CLIP = zero-shot CLIP (no training), Baseline = source-only fine-tuning"
SCRIPT = "recipes/demo.py"
DEFAULT_SEEDS = 3

# The toy task's settings (iterations, eval interval, lr, tau, ...) are its preset, recipes/configs/digits_shift.yaml.
QUICK_MAX_STEPS = 6  # --quick: a smoke run of the pipeline (tests), not a result
QUICK_EVAL_STEPS = 3


def build_demo_parser(benchmark: str | Path, toy: bool, output_dir: str | None) -> argparse.ArgumentParser:
    parser = runner.add_runner_arguments(
        build_parser(
            str(benchmark),
            description="Zero-shot CLIP, source-only, CMKD and CMKD+RST on one task, offline on CPU by default.",
        )
    )
    demo = parser.add_argument_group("demo")
    demo.add_argument(
        "--benchmark",
        default=TOY,
        help=f"{TOY} (default: shipped with the project) or one of {', '.join(available_benchmarks())}",
    )
    demo.add_argument("--quick", action="store_true", help=f"{QUICK_MAX_STEPS} iterations: checks the pipeline only")
    demo.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        help="training runs per method, with seeds --seed, --seed + 1, ...; the table shows mean ± std "
        f"(default: {DEFAULT_SEEDS})",
    )
    # --rst on: the CMKD+RST row's tau comes from the preset (or --tau); label-free selection by default
    parser.set_defaults(rst=True, selection="last")  # --selection (recipes/core/unlabeled.py) picks another rule
    if toy:
        from cmkd.toy import DOMAIN_NAMES

        data_dir = Path(output_dir or DEFAULT_OUTPUT) / "data"
        # 32x32 digits decode in microseconds: worker processes cost more than they save
        parser.set_defaults(
            source=DOMAIN_NAMES["source"], target=DOMAIN_NAMES["target"], data_dir=str(data_dir), num_workers=0
        )
    return parser


def parse(argv: Sequence[str] | None) -> tuple[runner.RunConfig, int]:
    """The demo's flags over its preset (``--benchmark``, default the toy task); --quick shortens an unset
    --max_steps / --eval_steps. Returns the run's config and the number of seeds per method."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", default=TOY)
    pre.add_argument("--output_dir")
    known, _ = pre.parse_known_args(argv)
    toy = known.benchmark == TOY
    parser = build_demo_parser(known.benchmark, toy, known.output_dir)
    args = parser.parse_args(argv)
    if args.baseline or args.zero_shot:
        parser.error(
            "the demo runs zero-shot, source-only, CMKD and CMKD+RST itself; drop --baseline / --zero-shot "
            "(recipes/<benchmark>.py runs one method)"
        )
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.quick:
        args.max_steps = QUICK_MAX_STEPS if args.max_steps is None else args.max_steps
        args.eval_steps = QUICK_EVAL_STEPS if args.eval_steps is None else args.eval_steps
    cfg = runner.parse(known.benchmark, parser=parser, args=args)
    return dataclasses.replace(cfg, recipe_script=SCRIPT), args.seeds


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    start = time.time()
    # 1. Parse (validated before anything is written); the toy task's data is rendered into the output folder
    cfg, num_seeds = parse(argv)
    if cfg.benchmark.name == TOY and "OMP_NUM_THREADS" not in os.environ:
        # the tiny model's matrices are too small to split over threads, and one thread keeps the demo's time when
        # other processes load the machine
        torch.set_num_threads(1)
    _quiet_weight_bars()
    if cfg.benchmark.name == TOY and not cfg.data_dir.exists():
        from cmkd.toy import write_digits_shift_imagefolder

        print(f"writing the digits domain-shift task to {cfg.data_dir}", flush=True)
        write_digits_shift_imagefolder(cfg.data_dir)
    clip = runner.load_clip(cfg)
    results = runner.start_run(cfg)
    ((source, target),) = cfg.tasks
    seeds = [cfg.seed + i for i in range(num_seeds)]
    rule = runner.selection_name(cfg)

    # 2-7. For each method and seed: data, model, train, evaluate, save (+ card), push; the benchmark recipes' steps
    for number, (folder, method, rst) in enumerate(ROWS, 1):
        row = dataclasses.replace(
            cfg,
            method=method,
            rst=rst,
            peft="rst" if rst else "full",
            peft_methods=("rst",) if rst else ("full",),
            tau=cfg.tau if rst else None,
            fixmatch=cfg.fixmatch and method == "cmkd",
            push_to_hub=cfg.push_to_hub and rst,  # the demo pushes the RST adapter only
            hub_model_id=cfg.hub_model_id or cfg.output_dir.resolve().name,
        )
        trained = method != "zero_shot"  # zero-shot trains nothing: one evaluation, the same for every seed
        runs = seeds if trained else seeds[:1]
        what = f"seeds {', '.join(map(str, runs))}, checkpoint: {rule}" if trained else "no training"
        print(f"method {number} of {len(ROWS)}: {row.method_label} ({what})", flush=True)
        done = []
        for seed in runs:
            run = dataclasses.replace(row, seed=seed, output_dir=cfg.output_dir / folder / f"seed-{seed}")
            result = runner.run_task(run, clip, source, target, callbacks)
            done.append(result)
            if trained:
                print(f"  seed {seed}: {100 * result.score:.1f} % ({rule})", flush=True)
        record(results, done, runs)
        print(_method_line(results["methods"][row.method_label][done[0].task], row.method_label), flush=True)

    # 8. The comparison: results.json, results.md, accuracy_vs_dsp.png, and a summary on stdout
    results["meta"].update(selection=rule, seeds=seeds, legend=LEGEND)
    # the table's heading and the plot's title say what the numbers are
    results["display_name"] += f" (mean of {len(seeds)} seeds; checkpoint: {rule})"
    runner.finish_run(cfg, results)
    print(summary(cfg, results, time.time() - start), flush=True)
    return results


def _quiet_weight_bars() -> None:
    """No "Loading weights" / "Writing model shards" bars each time a checkpoint is loaded or saved; the Trainer's own
    progress bar stays (``--quiet`` hides it too)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


NO_TRAINING = "no training (zero-shot)"


def mean_selection(runs: Sequence[runner.TaskResult]) -> dict | None:
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


def record(results: dict, runs: Sequence[runner.TaskResult], seeds: Sequence[int]) -> dict:
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
    if first.path and Path(first.path).name == runner.ADAPTER_DIRNAME:
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


def summary(cfg: runner.RunConfig, results: dict, seconds: float) -> str:
    (task,) = cfg.task_names
    rule = results["meta"]["selection"]
    lines = [
        f"{cfg.benchmark.display_name} {task.replace('->', ' → ')}: target accuracy, mean ± std over seeds "
        f"{', '.join(map(str, results['meta']['seeds']))}, {cfg.max_steps} iterations each, checkpoint: {rule}; "
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
    runner.run_recipe(main)
