"""Office-Home (65 classes; Art, Clipart, Product, Real_World): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table I (12 tasks), Appendix K (partial-set 65 -> 25). Defaults: ``cmkd/presets/office_home.yaml``.

    python recipes/office_home.py --data_dir data/OfficeHome -s Art -t Clipart --rst --output_dir runs/ar_cl
    python recipes/office_home.py --data_dir data/OfficeHome --all --rst --output_dir runs/office_home_rst
    python recipes/office_home.py --data_dir data/OfficeHome -s Ar -t Cl --partial --output_dir runs/ar_cl_partial
    accelerate launch recipes/office_home.py --data_dir data/OfficeHome -s Ar -t Cl --rst --output_dir runs/ar_cl

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

BENCHMARK = "office_home"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark office_home``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
