"""ImageCLEF-DA (12 classes; ImageNet, Pascal, Caltech): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table IV (6 tasks). Needs the shipped ``i_list.txt`` / ``p_list.txt`` / ``c_list.txt``. Defaults:
``cmkd/presets/image_clef.yaml``.

    python recipes/image_clef.py --data_dir data/image_CLEF --source I --target P --rst --output_dir runs/i_p
    python recipes/image_clef.py --data_dir data/image_CLEF --all --rst --output_dir runs/image_clef_rst
    accelerate launch recipes/image_clef.py --data_dir data/image_CLEF -s I -t P --rst --output_dir runs/i_p

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

BENCHMARK = "image_clef"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    """``recipes/run_uda.py --benchmark image_clef``."""
    return run_uda.main(argv, callbacks, benchmark=BENCHMARK)


if __name__ == "__main__":
    run_uda.run_recipe(main)
