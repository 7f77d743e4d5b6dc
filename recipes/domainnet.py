"""DomainNet (345 classes; clipart, infograph, painting, quickdraw, real, sketch): CMKD / RST adaptation of CLIP.

Paper Table VI: all 30 ordered pairs, shown as a source x target matrix per method. Needs the official
``<domain>_train.txt`` / ``<domain>_test.txt`` image lists. Defaults: ``cmkd/presets/domainnet.yaml``.

    python recipes/domainnet.py --data_dir data/domainnet --source clipart --target sketch --rst --output_dir runs/c_s
    python recipes/domainnet.py --data_dir data/domainnet --all --rst --output_dir runs/domainnet_rst
    accelerate launch recipes/domainnet.py --data_dir data/domainnet -s clp -t skt --rst --output_dir runs/c_s

Flags: ``--baseline`` (source only), ``--zero-shot``, ``--fixmatch``, ``--tau``, ``--model`` (any CLIP on the Hub or a
local folder), ``--push_to_hub``, ``--resume_from_checkpoint``; ``--help`` lists them with this benchmark's defaults.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes import run_uda  # noqa: E402

BENCHMARK = "domainnet"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark domainnet``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
