"""Model cards for RST adapters: rendered from a template shipped in the package, written next to the adapter.

Templates are Markdown with `$name` placeholders (`string.Template`); the YAML front matter is built here from the
card fields with huggingface_hub's `ModelCardData`, so the Hub's metadata rules (library, base model, tags,
`model-index` results) are followed without hand-written YAML. The default template is package data
(`peft_rst/templates/rst_adapter.md`, read through importlib.resources), so cards render from an installed wheel
too. See docs/model-cards.md for the fields.
"""

from __future__ import annotations

import os
import string
from importlib.resources import files
from pathlib import Path
from typing import Any

from .files import atomic_write_text

__all__ = ["CARD_FIELDS", "DEFAULT_TEMPLATE", "PAPER_CITATION", "render_model_card", "write_model_card"]

DEFAULT_TEMPLATE = files(__package__) / "templates" / "rst_adapter.md"
CARD_NAME = "README.md"
TAGS = ["rst", "domain-adaptation", "clip", "peft_rst"]
NOT_REPORTED = "not reported"

PAPER_CITATION = """@article{zhou2024unsupervised,
  title   = {Unsupervised Domain Adaption Harnessing Vision-Language Pre-training},
  author  = {Zhou, Wenlve and Zhou, Zhiheng},
  journal = {IEEE Transactions on Circuits and Systems for Video Technology},
  year    = {2024},
  doi     = {10.1109/TCSVT.2024.3391304}
}"""

# field -> what it is (the documentation in docs/model-cards.md mirrors this)
CARD_FIELDS: dict[str, str] = {
    "repo_id": "Hub repo id (or folder) used in the loading snippet",
    "base_model": "Hub id or path of the base model the adapter was trained from",
    "dataset": "benchmark name, e.g. office_home",
    "source_domain": "labeled source domain, e.g. Art",
    "target_domain": "unlabeled target domain, e.g. Clipart",
    "accuracy": "target-domain score as a fraction in [0, 1] (what `evaluate`'s accuracy returns)",
    "metric": "metric id of `accuracy`: accuracy (default) or balanced_accuracy (VisDA's mean per-class accuracy)",
    "task": "Hub task of the model-index result (default image-classification)",
    "tau": "RST reset threshold",
    "backbone_changed": "changed backbone entries",
    "head_params": "task-head parameters stored whole",
    "density": "changed fraction of the targeted backbone entries",
    "dsp": "downstream parameters (changed entries + head parameters)",
    "adapter_nbytes": "bytes of adapter_config.json + adapter_model.safetensors",
    "base_loading_code": "Python lines that build `base`, the model to load the adapter onto",
    "training_notes": "free text about the training run (method, steps, learning rate)",
    "license": "license id for the card metadata",
}
_METRIC_LABELS = {"accuracy": "Accuracy", "balanced_accuracy": "Mean per-class accuracy"}
# measured from the adapter files by write_model_card, so callers cannot contradict them
_MEASURED = ("tau", "backbone_changed", "head_params", "density", "dsp", "adapter_nbytes")


def render_model_card(template_path: str | os.PathLike | None = None, /, **fields: Any) -> str:
    """The card text for `fields` (see `CARD_FIELDS`); missing fields read "not reported"."""
    unknown = sorted(set(fields) - set(CARD_FIELDS))
    if unknown:
        raise TypeError(f"Unknown model card field(s) {unknown}; known fields: {sorted(CARD_FIELDS)}.")
    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        hint = (
            "check the template_path you passed"
            if template_path is not None
            else "the peft_rst installation is incomplete (its package data is missing): reinstall rst-cmkd"
        )
        raise FileNotFoundError(f"Model card template '{path}' not found; {hint}.")
    values = _placeholder_values(fields)
    try:
        return string.Template(path.read_text(encoding="utf-8")).substitute(values)
    except KeyError as err:
        raise ValueError(
            f"Template '{path}' uses the placeholder ${err.args[0]}, which the card renderer does not provide; "
            f"available: {sorted(values)}."
        ) from err
    except ValueError as err:
        raise ValueError(f"Template '{path}' has a malformed placeholder ({err}); write a literal $ as $$.") from err


def write_model_card(folder: str | os.PathLike, template_path: str | os.PathLike | None = None, **fields: Any) -> Path:
    """Render the card of the adapter saved in `folder` and write it to `folder/README.md` atomically.

    DSP, density, sizes and tau are measured from the adapter files (`peft_rst.report`); the caller gives the rest
    (source and target domain, accuracy, dataset, repo id...).
    """
    from .report import report_adapter

    given = sorted(set(fields) & set(_MEASURED))
    if given:
        raise TypeError(f"write_model_card measures {given} from the adapter files; do not pass them.")
    folder = Path(folder)
    measured = report_adapter(folder)
    recorded = measured.base_model
    if recorded and fields.get("base_model") not in (None, recorded):
        raise ValueError(
            f"base_model={fields['base_model']!r} contradicts the adapter's config, which records {recorded!r}."
        )
    fields["base_model"] = fields.get("base_model") or recorded
    text = render_model_card(
        template_path,
        **fields,
        tau=measured.tau,
        backbone_changed=measured.backbone_changed,
        head_params=measured.head_params,
        density=measured.density,
        dsp=measured.dsp,
        adapter_nbytes=measured.disk_nbytes,
    )
    return atomic_write_text(folder / CARD_NAME, text)


# ----------------------------------------------------------------------------------------------------------------


def _check_accuracy(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"accuracy must be a fraction in [0, 1] (0.877 for 87.7 %), got {value!r}.")
    return float(value)


def _front_matter(fields: dict[str, Any], accuracy: float | None, metric: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = None
    if accuracy is not None:
        dataset = fields.get("dataset")
        if not dataset:
            raise ValueError("accuracy needs dataset= (the benchmark it was measured on, e.g. 'office_home').")
        pair = _pair(fields)
        eval_results = [
            EvalResult(
                task_type=fields.get("task") or "image-classification",
                task_name="Unsupervised domain adaptation",
                dataset_type=dataset,
                dataset_name=f"{dataset} {pair}" if pair else dataset,
                dataset_config=f"{fields['source_domain']}->{fields['target_domain']}" if pair else None,
                metric_type=metric,
                metric_name=_METRIC_LABELS[metric],
                metric_value=accuracy,
            )
        ]
    data = ModelCardData(
        library_name="peft",
        base_model=fields.get("base_model"),
        license=fields.get("license"),
        tags=list(TAGS),
        metrics=[metric],
        # model-index results are named after the model; without results, no model_name key
        **(
            {"eval_results": eval_results, "model_name": fields.get("repo_id") or "rst-adapter"}
            if eval_results
            else {}
        ),
    )
    return data.to_yaml()


def _pair(fields: dict[str, Any]) -> str | None:
    source, target = fields.get("source_domain"), fields.get("target_domain")
    if source and target:
        return f"{source} → {target}"
    return None


def _placeholder_values(fields: dict[str, Any]) -> dict[str, str]:
    metric = fields.get("metric") or "accuracy"
    if metric not in _METRIC_LABELS:
        raise ValueError(f"metric must be one of {sorted(_METRIC_LABELS)}, got {metric!r}.")
    accuracy = _check_accuracy(fields.get("accuracy"))
    base_model = fields.get("base_model")
    pair = _pair(fields)
    dataset = fields.get("dataset")
    title = "RST adapter" + (f": {pair}" if pair else "") + (f" ({dataset})" if dataset else "")

    def text(name: str, fmt=str) -> str:
        value = fields.get(name)
        return NOT_REPORTED if value is None else fmt(value)

    base_code = fields.get("base_loading_code") or (
        f"base = ...  # the model the adapter was trained on, built from {base_model or 'its base checkpoint'}"
    )
    dsp = fields.get("dsp")
    return {
        "front_matter": _front_matter(fields, accuracy, metric),
        "title": title,
        "repo_id": fields.get("repo_id") or "path/or/repo-id",
        "base_model": base_model or NOT_REPORTED,
        "dataset": text("dataset"),
        "source_domain": text("source_domain"),
        "target_domain": text("target_domain"),
        "metric_label": _METRIC_LABELS[metric],
        "accuracy": NOT_REPORTED if accuracy is None else f"{100 * accuracy:.2f} %",
        "tau": text("tau", lambda v: f"{v:g}"),
        "backbone_changed": text("backbone_changed", lambda v: f"{v:,}"),
        "head_params": text("head_params", lambda v: f"{v:,}"),
        "density": text("density", lambda v: f"{100 * v:.3f} %"),
        "dsp": text("dsp", lambda v: f"{v:,}"),
        "dsp_m": NOT_REPORTED if dsp is None else f"{dsp / 1e6:.4f}",
        "adapter_size": text("adapter_nbytes", lambda v: f"{v:,} bytes ({v / 2**20:.2f} MiB)"),
        "base_loading_code": base_code,
        "training_notes": fields.get("training_notes") or "",
        "citation": PAPER_CITATION,
    }
