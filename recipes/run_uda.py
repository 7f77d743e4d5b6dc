"""Unsupervised domain adaptation of CLIP with CMKD on any benchmark preset: ``--benchmark`` picks
``recipes/configs/<benchmark>.yaml``, whose values are the defaults every flag overrides.

    python recipes/run_uda.py --benchmark office_home --data_dir data/OfficeHome -s Ar -t Cl --rst
    python recipes/run_uda.py --benchmark office_home --data_dir data/OfficeHome --all --peft rst,lora,bitfit
    python recipes/run_uda.py --benchmark digits_shift --peft rst,lora,adalora,bitfit,linear_probe,full \\
        --output_dir runs/table7          # the paper's Table VII on the embedded toy task, offline on CPU

``recipes/<benchmark>.py`` (e.g. ``accelerate launch recipes/office_home.py ...``) is this script with its preset.
``--benchmark X --help`` lists every flag with X's defaults.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.core import runner  # noqa: E402
from recipes.core.config import available_benchmarks, build_parser  # noqa: E402

TOY = "digits_shift"  # the embedded task: its images are rendered by cmkd.toy on first use


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """--benchmark -> that preset's recipe: parse -> load CLIP -> per method and task: data, model (+PEFT),
    CMKDTrainer, evaluate, save + card, push -> results table (see recipes/core/runner.run_benchmark)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark", choices=available_benchmarks())
    pre.add_argument("--output_dir")
    known, _ = pre.parse_known_args(argv)
    if known.benchmark is None:
        pre.error(f"--benchmark is required; presets: {', '.join(available_benchmarks())}")
    parser = runner.add_runner_arguments(build_parser(known.benchmark))
    parser.add_argument("--benchmark", choices=available_benchmarks(), help="the preset: recipes/configs/<name>.yaml")
    if known.benchmark == TOY:  # the embedded task: its domains and a data folder next to the outputs by default
        from cmkd.toy import DOMAIN_NAMES

        data_dir = Path(known.output_dir or f"runs/{TOY}") / "data"
        parser.set_defaults(source=DOMAIN_NAMES["source"], target=DOMAIN_NAMES["target"], data_dir=str(data_dir))
        args = parser.parse_args(argv)
        if args.data_dir == str(data_dir) and not data_dir.exists():
            from cmkd.toy import write_digits_shift_imagefolder

            print(f"writing the digits domain-shift task to {data_dir}", flush=True)
            write_digits_shift_imagefolder(data_dir)
    return runner.run_benchmark(known.benchmark, argv, callbacks, parser=parser)


if __name__ == "__main__":
    runner.run_recipe(main)
