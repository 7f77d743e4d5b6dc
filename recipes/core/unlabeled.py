"""Bridge for today's argparse ``config.py`` only: the label-free flags and their checks, delegating to
:class:`recipes.core.data.DataArguments`. Deleted with the HfArgumentParser rewrite of ``config.py``."""

from __future__ import annotations

import argparse
import dataclasses

from cmkd.validators import ORACLE_NAME, VALIDATORS

from .config import ConfigError
from .data import EVAL_FLAGS, TARGET_FLAGS, DataArguments

LABEL_FREE_DESTS = (*TARGET_FLAGS, *EVAL_FLAGS, "target_split", "eval_split", "selection", "source_val_fraction")
ORACLE = "oracle"


def add_label_free_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("target without labels / labeled target for reporting / checkpoint selection")
    for f in dataclasses.fields(DataArguments):
        if f.name in LABEL_FREE_DESTS:
            kind = {"source_val_fraction": float}.get(f.name, str)
            group.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    group.add_argument(
        "--selection",
        choices=[*VALIDATORS, "last", ORACLE],
        help=f"rule choosing the reported checkpoint: a label-free validator, 'last', or '{ORACLE}' = {ORACLE_NAME}",
    )
    return parser


def _data_args(args: argparse.Namespace) -> DataArguments:
    names = {f.name for f in dataclasses.fields(DataArguments)}
    return DataArguments(**{k: v for k, v in vars(args).items() if k in names and k != "image_list"})


def custom_target_name(args: argparse.Namespace) -> str | None:
    return _data_args(args).custom_target(getattr(args, "target", None))


def check_label_free_args(args: argparse.Namespace, benchmark) -> None:
    data = _data_args(args)
    data.check_target_flags(benchmark, [args.target] if args.target else [], all_tasks=bool(args.all))
    selection, targets, evals = args.selection, data.given(TARGET_FLAGS), data.given(EVAL_FLAGS)
    if selection in ("source_accuracy", "dev") and not data.source_val_fraction:
        raise ConfigError(
            f"--selection {selection} scores a held-out source split: add --source_val_fraction (e.g. 0.1)"
        )
    if selection == ORACLE and targets and not evals:
        raise ConfigError(
            f"--selection {ORACLE} is the {ORACLE_NAME}, and --{targets[0]} has no labels: add a labeled copy of the "
            f"target with --eval_dir, --eval_list or --eval_dataset_id, or choose a label-free --selection"
        )
    if selection == ORACLE and getattr(args, "zero_shot", False):
        raise ConfigError(f"--zero-shot trains nothing, so --selection {ORACLE} has no checkpoints to choose from")
