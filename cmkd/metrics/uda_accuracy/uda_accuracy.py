"""UDA accuracy: overall accuracy, mean per-class (balanced) accuracy and the per-class list.

Office-Home/Office-31/DomainNet report the overall accuracy on the whole target set; VisDA-2017 reports the mean of
the per-class accuracies plus the per-class list. A local `evaluate` module so it loads offline by path::

    import evaluate
    from cmkd.metrics import UDA_ACCURACY_PATH
    metric = evaluate.load(UDA_ACCURACY_PATH)
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], num_classes=2)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy over all examples, accuracy of each class (fraction of the examples of class c predicted as c) and their
mean over the classes present in `references` (balanced accuracy, the VisDA-2017 metric).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): ground-truth class ids (>= 0).
    num_classes (`int`, optional): length of the per-class list; defaults to max(predictions, references) + 1.
Returns:
    accuracy (`float`): fraction of correct predictions.
    mean_class_accuracy (`float`): mean of the per-class accuracies over the classes present in `references`.
    per_class_accuracy (`list[float | None]`): accuracy of each class id, None for classes absent from `references`.
    num_examples (`int`): number of examples scored.
Examples:
    >>> metric = evaluate.load("cmkd/metrics/uda_accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2], num_classes=3)["mean_class_accuracy"]
    0.8333333333333334
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UdaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_classes=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if references.size == 0:
            raise ValueError("uda_accuracy got no examples to score.")
        if (references < 0).any():
            raise ValueError(
                "references contain negative class ids (missing labels); evaluation needs a labeled target set."
            )
        top = int(max(predictions.max(initial=0), references.max())) + 1
        if num_classes is None:
            num_classes = top
        elif top > num_classes:
            raise ValueError(f"class id {top - 1} out of range for num_classes={num_classes}.")
        correct = predictions == references
        per_class = []
        for c in range(num_classes):
            of_c = references == c
            per_class.append(float(correct[of_c].mean()) if of_c.any() else None)
        present = [a for a in per_class if a is not None]
        return {
            "accuracy": float(correct.mean()),
            "mean_class_accuracy": float(np.mean(present)),
            "per_class_accuracy": per_class,
            "num_examples": int(references.size),
        }
