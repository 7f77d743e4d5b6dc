"""Digits (10 classes; SVHN, MNIST, USPS via torchvision): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table III (S->M, U->M, M->U): trained on the training sets, scored on the target test set; USPS as source
gets the release's own augmentation. Defaults: ``recipes/configs/digits.yaml`` (batch 64 + 64, 20,000 iterations,
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

from recipes.core import runner  # noqa: E402

BENCHMARK = "digits"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    # 1. Parse: YAML defaults + flags, checked (flags, data folder, output folder, Hub token) before anything runs
    cfg = runner.parse(BENCHMARK, argv)
    clip = runner.load_clip(cfg)  # the pretrained CLIP: vision tower to adapt, text tower for the zero-shot teacher
    results = runner.start_run(cfg)

    for source, target in cfg.tasks:
        # resume? -> 2. data -> 3. model (+RST) -> 4. CMKDTrainer.train -> 5. evaluate -> 6. save + card -> 7. push
        runner.record_task(results, runner.run_task(cfg, clip, source, target, callbacks))

    # 8. Results JSON, the paper's table layout (per task, Avg., DSP(M)) and the accuracy-vs-DSP plot
    runner.finish_run(cfg, results)
    return results


if __name__ == "__main__":
    runner.run_recipe(main)
