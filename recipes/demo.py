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

The output folder holds one sub-folder per method (the RST adapter with its model card is in
``cmkd_rst/<task>/adapter``), and the comparison as ``results.json``, ``results.md`` and ``accuracy_vs_dsp.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from recipes.core import runner  # noqa: E402
from recipes.core.config import available_benchmarks, build_parser  # noqa: E402

TOY = "digits_shift"
DEFAULT_OUTPUT = "runs/demo"

# The rows of the comparison: (sub-folder, RunConfig.method, RST). FixMatch (--fixmatch) applies to the CMKD rows.
ROWS = (("zero_shot", "zero_shot", False), ("source_only", "baseline", False), ("cmkd", "cmkd", False))
ROWS += (("cmkd_rst", "cmkd", True),)

# Toy-task settings, chosen so the whole demo takes ~2 minutes on 2 CPU cores (see the test in tests/recipes).
TOY_ITERATIONS = 300
TOY_EVAL_INTERVAL = 50
QUICK_ITERATIONS = 6  # --quick: a smoke run of the pipeline (tests), not a result
QUICK_EVAL_INTERVAL = 3


def toy_benchmark(folder: Path) -> Path:
    """Write the toy task's benchmark YAML (same schema as ``recipes/configs/*.yaml``) and return its path."""
    from cmkd.toy import DIGITS_PROMPT, DOMAIN_NAMES, TINY_CLIP_PATH

    source, target = DOMAIN_NAMES["source"], DOMAIN_NAMES["target"]
    config = {
        "name": TOY,
        "display_name": "Digits shift (scikit-learn digits)",
        "num_classes": 10,
        "homepage": "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        "license": "CC BY 4.0 (UCI optical recognition of handwritten digits), rendered by cmkd.toy",
        "domains": {source: {"name": source, "folder": source}, target: {"name": target, "folder": target}},
        "tasks": [f"{source}->{target}"],
        "metric": "accuracy",
        "eval_split": "train",  # as in the paper: the whole unlabeled target is adapted on and evaluated
        "backbone": "tiny_clip",
        "backbones": {
            # release (ViT-B/16): lr 3e-6, head x1000, tau 1e-6 = lr / 3. The tiny tower, pretrained on 900 digits,
            # wants larger steps (3e-4 already overfits the clean source); tau keeps the release's ratio to lr.
            "tiny_clip": {"model": str(TINY_CLIP_PATH), "lr": 1e-4, "head_lr_multiplier": 100, "tau": 3e-5},
        },
        "optim": {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "lr_gamma": 0.0003, "lr_power": 0.75},
        "training": {
            "iterations": TOY_ITERATIONS,
            "eval_interval": TOY_EVAL_INTERVAL,
            "batch_size": 32,
            "eval_batch_size": 256,
            "seed": 42,
            "mixed_precision": False,
        },
        # The release's weights. Its warm-up lam(t) = 2 / (1 + exp(-gamma t / max_iter)) - 1 (gamma 1, max_iter 10,000)
        # reaches 0.46 after 10,000 iterations; in 300 iterations the CMKD terms must come in sooner: gamma 10 over
        # the demo's iterations reaches 0.46 after 30 iterations and ~1 at the end.
        "cmkd": {
            "lambda1": 0.25,
            "lambda2": 0.1,
            "lambda3": 0.025,
            "gamma": 10.0,
            "lambda_max_iter": TOY_ITERATIONS,
            "label_smoothing": 0.1,
            "prompt_template": DIGITS_PROMPT,
        },
        "augmentation": {"image_size": 32, "train": "digits_train", "test": "digits_test"},
        "fixmatch": {"threshold": 0.95, "factor": 0.5, "strong": "fixmatch_strong"},
        "partial": {"available": False},
    }
    path = folder / f"{TOY}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


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
    demo.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations: checks the pipeline only")
    if toy:
        from cmkd.toy import DOMAIN_NAMES

        data_dir = Path(output_dir or DEFAULT_OUTPUT) / "data"
        # 32x32 digits decode in microseconds: worker processes cost more than they save
        parser.set_defaults(
            source=DOMAIN_NAMES["source"], target=DOMAIN_NAMES["target"], data_dir=str(data_dir), num_workers=0
        )
    return parser


def parse(argv: Sequence[str] | None) -> runner.RunConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", default=TOY)
    pre.add_argument("--output_dir")
    known, _ = pre.parse_known_args(argv)
    toy = known.benchmark == TOY
    with tempfile.TemporaryDirectory() as tmp:
        benchmark = str(toy_benchmark(Path(tmp))) if toy else known.benchmark
        parser = build_demo_parser(benchmark, toy, known.output_dir)
        methods = {"--baseline", "--zero-shot", "--zero_shot"} & set(argv)
        if methods:
            parser.error(
                f"the demo runs zero-shot, source-only, CMKD and CMKD+RST itself; drop {', '.join(sorted(methods))} "
                "(recipes/<benchmark>.py runs one method)"
            )
        cfg = runner.parse(benchmark, [*argv, "--rst"], parser=parser)  # --rst: resolves tau for the RST row
    if cfg.extra.get("quick") and "--iterations" not in argv:
        cfg = dataclasses.replace(cfg, iterations=QUICK_ITERATIONS, eval_interval=QUICK_EVAL_INTERVAL)
    return cfg


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    start = time.time()
    # 1. Parse (validated before anything is written); the toy task's data is rendered into the output folder
    cfg = parse(argv)
    if cfg.benchmark.name == TOY and "OMP_NUM_THREADS" not in os.environ:
        # the tiny model's matrices are too small to split over threads: one thread was faster (69 s vs 88 s for the
        # whole demo on 2 idle cores) and keeps the demo's time when other processes load the machine
        torch.set_num_threads(1)
    if cfg.benchmark.name == TOY and not cfg.data_dir.exists():
        from cmkd.toy import write_digits_shift_imagefolder

        print(f"writing the digits domain-shift task to {cfg.data_dir}", flush=True)
        write_digits_shift_imagefolder(cfg.data_dir)
    clip = runner.load_clip(cfg)
    results = runner.start_run(cfg)
    ((source, target),) = cfg.tasks

    # 2-7. For each method: data, model, train, evaluate, save (+ card), push; exactly the benchmark recipes' steps
    for folder, method, rst in ROWS:
        row = dataclasses.replace(
            cfg,
            method=method,
            rst=rst,
            tau=cfg.tau if rst else None,
            fixmatch=cfg.fixmatch and method == "cmkd",
            push_to_hub=cfg.push_to_hub and rst,  # the demo pushes the RST adapter only
            hub_model_id=cfg.hub_model_id or cfg.output_dir.resolve().name,
            output_dir=cfg.output_dir / folder,
        )
        runner.record_task(results, runner.run_task(row, clip, source, target, callbacks, announce=True))

    # 8. The comparison: results.json, results.md, accuracy_vs_dsp.png, and a summary on stdout
    runner.finish_run(cfg, results)
    print(summary(cfg, results, time.time() - start), flush=True)
    return results


def summary(cfg: runner.RunConfig, results: dict, seconds: float) -> str:
    names = {"CLIP": "zero-shot CLIP", "Baseline": "source-only"}
    (task,) = cfg.task_names
    lines = [
        f"{cfg.benchmark.display_name} {task.replace('->', ' → ')}: target accuracy after {cfg.iterations} "
        f"iterations; whole demo {seconds:.0f} s",
        f"{'method':<22}{'accuracy':>10}{'DSP':>14}{'stored bytes':>16}  where",
    ]
    for method, rows in results["methods"].items():
        entry = rows[task]
        lines.append(
            f"{names.get(method, method):<22}{100 * entry['accuracy']:>9.1f}%{entry['dsp']:>14,}"
            f"{entry['nbytes']:>16,}  {entry.get('path', '-')}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    runner.run_recipe(main)
