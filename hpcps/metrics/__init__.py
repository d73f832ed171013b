"""Evaluation metrics and training-run logs (see docs/metrics.md).

- ``bleu``, ``rouge``, ``perplexity``: text generation (sacrebleu / rouge-score compatible)
- ``accuracy``, ``precision_recall_f1``, ``confusion_matrix``: string-label classification
- ``read_metrics``: a run directory's de-duplicated per-step records
"""

from hpcps.metrics.classification import accuracy, confusion_matrix, precision_recall_f1
from hpcps.metrics.runlog import read_metrics, run_label, write_metrics_csv
from hpcps.metrics.text import bleu, nll_from_lines, perplexity, rouge

__all__ = [
    "accuracy", "bleu", "confusion_matrix", "nll_from_lines", "perplexity",
    "precision_recall_f1", "read_metrics", "rouge", "run_label", "write_metrics_csv",
]
