"""Which label-free validator picks CMKD checkpoints best? Evidence on the embedded digits world.

For every domain shift and seed, CMKD trains the shipped tiny CLIP (`cmkd.toy.TINY_CLIP_PATH`) on a labeled source
(10 % held out as the source validation split) and the unlabeled target, evaluating every ``--eval_every`` steps.
Each evaluation records every validator of `cmkd.validators` and, for this study only, the target accuracy. Per
validator the table reports, averaged over the runs:

- Spearman correlation between the validator (signed so that higher = better) and target accuracy across the
  evaluated checkpoints of a run;
- accuracy lost against the oracle: target accuracy of the oracle's pick (uses target labels) minus that of the
  validator's pick, in points; "last" picks the final checkpoint.

Re-run after changing the world (styles, model, iterations): the default ``metric_for_best_model`` should be the
validator with the smallest loss here (docs/validation.md records the last run)::

    OMP_NUM_THREADS=1 python benchmarks/validator_study.py            # 2 shifts x 3 seeds
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmkd import CLIPAdaptationModel, CMKDConfig, CMKDTrainer, CMKDTrainingArguments, with_image_transform  # noqa: E402
from cmkd.validators import ORACLE_NAME, VALIDATORS, ValidatorWarning  # noqa: E402

SHIFTS = {"clean->styled": ("clean", "styled"), "styled->clean": ("styled", "clean")}


def domain(pool: str, style: str, seed: int):
    """One pool of the toy digits rendered in ``style`` as a labeled ``datasets.Dataset``."""
    from datasets import ClassLabel, Dataset, Features, Image

    from cmkd.toy import TASK_CLASSES, digits_to_pil, load_digit_pools, render_digits, sample_styles

    digits, labels = load_digit_pools()[pool]
    images = render_digits(digits, sample_styles(style, len(digits), torch.Generator().manual_seed(seed)))
    features = Features({"image": Image(), "label": ClassLabel(names=TASK_CLASSES)})
    return Dataset.from_dict({"image": digits_to_pil(images), "label": labels.tolist()}, features=features)


def run(shift: str, seed: int, steps: int, eval_every: int, out: Path, batch_size: int = 16) -> list[dict]:
    """Train one CMKD run; return the evaluation records (validators + target accuracy) in step order."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    from cmkd.toy import DIGITS_PROMPT, TINY_CLIP_PATH
    from cmkd.transforms import build_transform

    src_style, tgt_style = SHIFTS[shift]
    source = domain("source", src_style, seed).train_test_split(test_size=0.1, seed=seed, stratify_by_column="label")
    target = domain("target", tgt_style, seed + 1000)
    train_tf, test_tf = build_transform("digits_train", 32), build_transform("digits_test", 32)
    clip = AutoModel.from_pretrained(TINY_CLIP_PATH)
    tokenizer = AutoTokenizer.from_pretrained(TINY_CLIP_PATH)
    torch.manual_seed(seed)
    names = source["train"].features["label"].names
    model = CLIPAdaptationModel.from_clip(clip, names, DIGITS_PROMPT, tokenizer=tokenizer)
    args = CMKDTrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=1e-4,
        head_lr_multiplier=100,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=256,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=eval_every,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        eval_validators=list(VALIDATORS),  # DEV too (opt-in by default)
    )
    trainer = CMKDTrainer(
        model,
        args,
        source_dataset=with_image_transform(source["train"], train_tf),
        target_dataset=with_image_transform(target.remove_columns("label"), train_tf),
        eval_dataset=with_image_transform(target, test_tf),  # labels: only to measure the validators here
        source_val_dataset=with_image_transform(source["test"], test_tf),
        cmkd_config=CMKDConfig(gamma=10.0, warmup_max_iter=steps),
    )
    trainer.remove_callback(PrinterCallback)  # the per-step logs; the study prints its own summary
    trainer.train()
    return [h for h in trainer.state.log_history if "eval_accuracy" in h]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def analyse(records: list[dict]) -> dict[str, tuple[float, float]]:
    """Per rule: (Spearman with accuracy, points lost against the oracle) for one run."""
    acc = np.array([r["eval_accuracy"] for r in records])
    oracle = acc.max()
    out = {"last checkpoint": (float("nan"), 100 * (oracle - acc[-1]))}
    for name, v in VALIDATORS.items():
        values = np.array([r[f"eval_{name}"] for r in records], dtype=np.float64)
        signed = values if v.greater_is_better else -values
        signed = np.where(np.isfinite(signed), signed, -np.inf)
        pick = int(np.argmax(signed))  # first best, as the Trainer keeps the first of equal scores
        out[name] = (spearman(signed, acc), 100 * (oracle - acc[pick]))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--eval_every", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=16, help="source and target batch size")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", ValidatorWarning)
    start = time.perf_counter()
    results: dict[str, list[tuple[float, float]]] = {}
    accs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shift in args.shifts:
            for seed in args.seeds:
                records = run(shift, seed, args.steps, args.eval_every, Path(tmp) / f"{shift}-{seed}", args.batch_size)
                acc = [100 * r["eval_accuracy"] for r in records]
                accs.append((shift, seed, acc[0], max(acc), acc[-1]))
                print(
                    f"{shift} seed {seed}: target accuracy first {acc[0]:.1f}, {ORACLE_NAME} {max(acc):.1f}, "
                    f"last {acc[-1]:.1f} over {len(acc)} checkpoints",
                    flush=True,
                )
                for rule, value in analyse(records).items():
                    results.setdefault(rule, []).append(value)
    n = len(accs)
    print(
        f"\n{len(args.shifts)} shifts x {len(args.seeds)} seeds, {args.steps} steps, evaluation every "
        f"{args.eval_every} steps ({time.perf_counter() - start:.0f} s)\n"
    )
    print(
        "| selection rule | better | Spearman with target accuracy (mean ± std) | points lost vs oracle "
        "(mean ± std) | worst run |"
    )
    print("|---|---|---:|---:|---:|")
    for rule, values in results.items():
        rho = np.array([v[0] for v in values])
        lost = np.array([v[1] for v in values])
        better = "" if rule not in VALIDATORS else ("higher" if VALIDATORS[rule].greater_is_better else "lower")
        rho_cell = "–" if np.isnan(rho).all() else f"{np.nanmean(rho):+.2f} ± {np.nanstd(rho):.2f}"
        print(f"| {rule} | {better} | {rho_cell} | {lost.mean():.2f} ± {lost.std():.2f} | {lost.max():.1f} |")
    print(f"| {ORACLE_NAME} | higher | +1.00 | 0.00 | 0.0 |  (n = {n} runs)")


if __name__ == "__main__":
    main()
