"""Command line: `python -m peft_rst {report,card,push} ...` (also installed as `peft-rst`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", dest="source_domain", help="labeled source domain, e.g. Art")
    parser.add_argument("--target", dest="target_domain", help="unlabeled target domain, e.g. Clipart")
    parser.add_argument("--dataset", help="benchmark, e.g. office_home")
    parser.add_argument("--accuracy", type=float, help="target-domain accuracy as a fraction in [0, 1]")
    parser.add_argument("--metric", choices=("accuracy", "balanced_accuracy"), help="what --accuracy measures")
    parser.add_argument("--base-model", dest="base_model", help="base model id (default: the adapter config's)")
    parser.add_argument("--notes", dest="training_notes", help="free text about the training run")
    parser.add_argument("--template", dest="template_path", help="model card template (default: rst_adapter.md)")


def _card_fields(args: argparse.Namespace) -> dict:
    names = ("source_domain", "target_domain", "dataset", "accuracy", "metric", "base_model", "training_notes")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m peft_rst", description="Tools for RST adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    rep = commands.add_parser(
        "report",
        help="DSP, density and size of saved adapters",
        description="Per-module changed entries, density, DSP (changed backbone entries + head parameters) and "
        "bytes on disk of saved RST adapters, read without loading the base model. Several folders add a sum "
        "row: the DSP(M) of a benchmark.",
    )
    rep.add_argument("paths", nargs="+", help="adapter folders written by save_pretrained")
    rep.add_argument("--json", action="store_true", help="print the full report as JSON")
    group = rep.add_mutually_exclusive_group()
    group.add_argument("--modules", dest="modules", action="store_true", default=None, help="per-module tables")
    group.add_argument("--no-modules", dest="modules", action="store_false", help="only per-adapter totals")

    card = commands.add_parser("card", help="write README.md (model card) into a saved adapter folder")
    card.add_argument("folder")
    card.add_argument("--repo-id", dest="repo_id", help="repo id shown in the loading snippet")
    _card_arguments(card)

    push = commands.add_parser("push", help="upload a saved adapter and its model card to the Hub (one commit)")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    push.add_argument("--message", default="Upload RST adapter", help="commit message")
    _card_arguments(push)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from .report import report

            result = report(args.paths)
            print(result.to_json() if args.json else result.table(modules=args.modules))
        elif args.command == "card":
            from .model_card import write_model_card

            fields = _card_fields(args)
            if args.repo_id:
                fields["repo_id"] = args.repo_id
            print(write_model_card(args.folder, args.template_path, **fields))
        else:
            from .hub import push_adapter_to_hub

            info = push_adapter_to_hub(
                args.folder,
                args.repo_id,
                card_data=_card_fields(args),
                token=args.token,
                private=args.private,
                commit_message=args.message,
                endpoint=args.endpoint,
                template_path=args.template_path,
            )
            print(info.commit_url)
    except BrokenPipeError:
        # the reader stopped early (`peft-rst report ... | head -3`): exit quietly, as the Python docs advise, with
        # stdout pointed at devnull so that the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (OSError, ValueError, RuntimeError) as err:  # bad input (RSTFormatError is a ValueError), Hub errors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
