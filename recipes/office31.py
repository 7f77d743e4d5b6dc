"""Office-31 (31 classes; amazon, dslr, webcam): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table II (6 tasks). Defaults: ``cmkd/presets/office31.yaml``.

    python recipes/office31.py --data_dir data/office31 --source amazon --target webcam --rst --output_dir runs/a_w
    python recipes/office31.py --data_dir data/office31 --all --rst --output_dir runs/office31_rst
    accelerate launch recipes/office31.py --data_dir data/office31 -s A -t W --rst --output_dir runs/a_w

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

BENCHMARK = "office31"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark office31``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
