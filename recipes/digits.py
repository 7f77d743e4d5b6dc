"""Digits (10 classes; SVHN, MNIST, USPS via torchvision): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table III (S->M, U->M, M->U): trained on the training sets, scored on the target test set; USPS as source
gets the release's own augmentation. Defaults: ``cmkd/presets/digits.yaml`` (batch 64 + 64, 20,000 iterations,
mixed precision on GPU).

    python recipes/digits.py --data_dir data/digits --download --source svhn --target mnist --rst --output_dir runs/s_m
    python recipes/digits.py --data_dir data/digits --all --rst --output_dir runs/digits_rst
    accelerate launch recipes/digits.py --data_dir data/digits -s U -t M --rst --output_dir runs/u_m

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

BENCHMARK = "digits"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark digits``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
