"""VisDA-2017 (12 classes; synthetic renderings -> real images): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table V: one task, scored by mean per-class accuracy; the table lists every class. Defaults:
``cmkd/presets/visda.yaml`` (lr 3e-7 and tau 1e-7 for ViT-B/16, 20,000 iterations).

    python recipes/visda.py --data_dir data/visda-2017 --source Syn --target Real --rst --output_dir runs/visda_rst
    accelerate launch recipes/visda.py --data_dir data/visda-2017 --all --rst --output_dir runs/visda_rst

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

BENCHMARK = "visda"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark visda``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
