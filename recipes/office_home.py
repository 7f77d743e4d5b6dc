"""Office-Home (65 classes; Art, Clipart, Product, Real_World): CMKD / RST unsupervised domain adaptation of CLIP.

Paper Table I (12 tasks), Appendix K (partial-set 65 -> 25). Defaults: ``recipes/configs/office_home.yaml``.

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

from recipes.core import runner  # noqa: E402

BENCHMARK = "office_home"


def main(argv: Sequence[str] | None = None, callbacks: Sequence = ()) -> dict:
    # 1. Parse: YAML defaults + flags, checked (flags, data folder, output folder, Hub token) before anything runs
    cfg = runner.parse(BENCHMARK, argv)
    clip = runner.load_clip(cfg)  # the pretrained CLIP: vision tower to adapt, text tower for the zero-shot teacher
    results = runner.start_run(cfg)

    for source, target in cfg.tasks:
        task_dir = runner.task_output_dir(cfg, source, target)
        done = runner.finished_task(cfg, task_dir)  # a restarted --all run keeps the tasks it finished
        if done is None:
            resume_from = runner.resume_checkpoint(cfg, task_dir)
            # 2. Data: labeled source, unlabeled target, and the target's evaluation view
            data = runner.load_task_data(cfg, source, target, clip)
            # 3. Model: CLIP vision tower + task head + cached zero-shot teacher (+ the RST adapter with --rst)
            model = runner.build_model(cfg, clip, data.classes)
            # 4. Train with CMKDTrainer (Accelerate: devices, mixed precision, several processes)
            trainer = runner.build_trainer(cfg, model, data, task_dir, callbacks, resume_from)
            runner.train(cfg, trainer, resume_from)
            # 5. Evaluate on the target domain
            metrics = runner.evaluate(cfg, trainer)
            # 6. Save the adapter (or model) with its model card, 7. optionally push it to the Hub
            saved = runner.save_task(cfg, trainer, task_dir, source, target, metrics)
            saved = runner.push_task(cfg, saved)
            done = runner.finish_task(cfg, saved, metrics, task_dir)
        runner.record_task(results, done)

    # 8. Results JSON, the paper's table layout (per task, Avg., DSP(M)) and the accuracy-vs-DSP plot
    runner.finish_run(cfg, results)
    return results


if __name__ == "__main__":
    runner.run_recipe(main)
