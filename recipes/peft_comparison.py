"""Paper Table VII on the embedded digits world: the six PEFT methods under CMKD, one command, offline on CPU::

    python recipes/peft_comparison.py --output_dir runs/peft_table

For every method (`cmkd.PEFT_METHODS`) and seed it builds a fresh `CLIPAdaptationModel` from the shipped tiny CLIP,
prepares it with `cmkd.apply_peft`, trains it with the same `CMKDTrainer` settings as the demo's CMKD row
(``recipes/demo.py``: 300 iterations, lr 1e-4, head x100, RST tau 1e-4), reports the *last* checkpoint (no target
labels used to pick it) and counts its DSP with `cmkd.count_dsp`; then it writes ``results.md`` and
``accuracy_vs_dsp.png`` (`recipes.peft_table.write_table_vii`). Only library APIs are used, so a benchmark script can
call `run_peft_comparison` with its own data, model and arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file from a source checkout: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import PrinterCallback  # noqa: E402

from cmkd import (  # noqa: E402
    PEFT_LABELS,
    PEFT_METHODS,
    CMKDConfig,
    CMKDTrainer,
    CMKDTrainingArguments,
    apply_peft,
    count_dsp,
)
from cmkd.peft_methods import describe  # noqa: E402
from recipes.peft_table import PeftRow, write_table_vii  # noqa: E402

LAST = "last checkpoint"

# The demo's toy settings (recipes/demo.py, toy_benchmark): same optimiser, loss weights and RST threshold.
TOY_ITERATIONS = 300
TOY_ARGS: dict[str, Any] = dict(
    learning_rate=1e-4,
    head_lr_multiplier=100.0,
    weight_decay=5e-4,
    sgd_momentum=0.9,
    sgd_nesterov=True,
    lr_decay_gamma=0.0003,
    lr_decay_power=0.75,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=256,
)
TOY_CMKD = dict(lambda1=0.25, lambda2=0.1, lambda3=0.025, gamma=10.0, label_smoothing=0.1)
TOY_OPTIONS: dict[str, dict[str, Any]] = {"rst": {"tau": 1e-4}}


@dataclasses.dataclass
class Task:
    """One transfer task: labeled source, unlabeled target (training) and labeled target (reporting only)."""

    name: str
    source: Any
    target: Any
    eval: Any


def method_options(method: str, iterations: int, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The options `apply_peft` gets for ``method``; AdaLoRA's rank schedule spans the run (total_step)."""
    opts = dict(options.get(method, {}))
    if method == "adalora":
        opts.setdefault("total_step", iterations)
    return opts


def run_peft_comparison(
    build_model: Callable[[], torch.nn.Module],
    tasks: Sequence[Task],
    args: CMKDTrainingArguments,
    output_dir: str | Path,
    methods: Sequence[str] = PEFT_METHODS,
    seeds: Sequence[int] = (42,),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cmkd_config: CMKDConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> list[PeftRow]:
    """Train every method on every task with every seed (last checkpoint), write Table VII, return its rows.

    ``build_model()`` returns a fresh `CLIPAdaptationModel` (called after seeding, once per run); ``args`` are the
    shared training arguments (``output_dir``, ``seed`` and the selection fields are set per run: no checkpoint is
    chosen with target labels).
    """
    log = log or (lambda line: print(line, flush=True))
    unknown = [m for m in methods if m not in PEFT_METHODS]
    if unknown:
        raise ValueError(f"unknown PEFT method(s) {unknown}; choose from {', '.join(PEFT_METHODS)}.")
    options = dict(options or {})
    output_dir = Path(output_dir)
    rows = []
    for number, method in enumerate(methods, 1):
        opts = method_options(method, args.max_steps, options)
        log(
            f"method {number} of {len(methods)}: {describe(method, opts)} (seeds {', '.join(map(str, seeds))}, {LAST})"
        )
        acc: dict[str, list[float]] = {t.name: [] for t in tasks}
        dsp: dict[str, list[int]] = {t.name: [] for t in tasks}
        for task in tasks:
            for seed in seeds:
                run_args = dataclasses.replace(
                    args,
                    output_dir=str(output_dir / method / task.name.replace("->", "_to_") / f"seed-{seed}"),
                    seed=seed,
                    eval_strategy="no",
                    save_strategy="no",
                    load_best_model_at_end=False,
                )
                torch.manual_seed(seed)
                model = apply_peft(build_model(), method, **opts)
                trainer = CMKDTrainer(
                    model,
                    run_args,
                    source_dataset=task.source,
                    target_dataset=task.target,
                    eval_dataset=task.eval,
                    cmkd_config=cmkd_config,
                )
                trainer.remove_callback(PrinterCallback)  # one line per run below instead of every log dict
                trainer.train()
                score = trainer.evaluate()["eval_accuracy"]
                acc[task.name].append(score)
                dsp[task.name].append(count_dsp(model, method))
                log(f"  {task.name} seed {seed}: {100 * score:.1f} % ({LAST}), DSP {dsp[task.name][-1]:,}")
        rows.append(
            PeftRow(
                method=method,
                accuracy={t: statistics.fmean(v) for t, v in acc.items()},
                dsp={t: round(statistics.fmean(v)) for t, v in dsp.items()},
                selection=LAST,
                settings=describe(method, opts).removeprefix(PEFT_LABELS[method]).strip(" ()"),
                std={t: statistics.pstdev(v) for t, v in acc.items()},
                seeds=len(seeds),
            )
        )
    return rows


def toy_world(seed: int = 0) -> tuple[Callable[[], torch.nn.Module], list[Task]]:
    """The demo's embedded task (clean -> styled digits, `cmkd.toy`) and a builder of its tiny-CLIP model."""
    from torchvision import transforms as T
    from transformers import AutoTokenizer, CLIPModel

    from cmkd import CLIP_MEAN, CLIP_STD, CLIPAdaptationModel, with_image_transform
    from cmkd.toy import DIGITS_PROMPT, DOMAIN_NAMES, IMAGE_SIZE, TINY_CLIP_PATH, make_digits_shift

    data = make_digits_shift(seed)
    finish = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    # the release's digits transforms (recipes/core/transforms.py: digits_train / digits_test)
    train = T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.75, 1.2)), *finish])
    test = T.Compose([T.Resize(IMAGE_SIZE), *finish])
    task = Task(
        name=f"{DOMAIN_NAMES['source']}->{DOMAIN_NAMES['target']}",
        source=with_image_transform(data["source"], train),
        target=with_image_transform(data["target"], train, label_column=None),
        eval=with_image_transform(data["target"], test),
    )
    clip = CLIPModel.from_pretrained(TINY_CLIP_PATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_CLIP_PATH)
    names = data["source"].features["label"].names

    def build() -> torch.nn.Module:
        return CLIPAdaptationModel.from_clip(clip, names, DIGITS_PROMPT, tokenizer=tokenizer)

    return build, [task]


def main(argv: Sequence[str] | None = None) -> list[PeftRow]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--output_dir", default="runs/peft_table")
    parser.add_argument("--methods", nargs="+", default=list(PEFT_METHODS), choices=PEFT_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed; mean ± std reported")
    parser.add_argument("--iterations", type=int, default=TOY_ITERATIONS)
    ns = parser.parse_args(argv)
    if ns.iterations < 2:
        parser.error(f"--iterations must be >= 2 (AdaLoRA's rank schedule), got {ns.iterations}")
    torch.set_num_threads(1)  # the tiny model's matrices are too small to split over threads
    start = time.time()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    build, tasks = toy_world()
    args = CMKDTrainingArguments(
        output_dir=ns.output_dir,
        max_steps=ns.iterations,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        logging_strategy="no",
        **TOY_ARGS,
    )
    cmkd_config = CMKDConfig(**TOY_CMKD, warmup_max_iter=ns.iterations)
    rows = run_peft_comparison(build, tasks, args, ns.output_dir, ns.methods, ns.seeds, TOY_OPTIONS, cmkd_config)
    title = f"PEFT methods under CMKD, embedded digits world ({ns.iterations} iterations)"
    paths = write_table_vii(rows, ns.output_dir, title)
    print(paths[0].read_text(encoding="utf-8"))
    print(f"wrote {', '.join(map(str, paths))} in {time.time() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
