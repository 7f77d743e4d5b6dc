"""Command line: ``python -m cmkd predict --model PATH [--adapter PATH] IMAGES_OR_FOLDER --output preds.csv``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {"predict": "label images with a saved CLIPAdaptationModel or a base + adapter, top-k labels to a CSV"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<10}{text}" for name, text in COMMANDS.items())
        print(f"usage: python -m cmkd COMMAND ...\n\ncommands:\n{usage}", file=sys.stderr if argv else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    from .predict import main as predict

    predict(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
