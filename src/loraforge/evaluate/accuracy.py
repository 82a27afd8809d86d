"""Token accuracy during training evaluation (``compute_accuracy: true``), as LLaMA-Factory reports it.

Per evaluated row, the share of label tokens (labels != -100) that the model's argmax at the previous position
predicts exactly; ``eval_accuracy`` is the mean over rows. The Trainer keeps only argmax ids per batch
(:func:`argmax_logits`), never the ``[batch, length, vocab]`` logits.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def token_accuracy(predictions: Any, labels: Any) -> float:
    """Mean over rows of the exact next-token accuracy; ``predictions[i, t]`` predicts ``labels[i, t + 1]``.

    Rows without any label token are left out; padding (-100 in either array) never counts.
    """
    import numpy as np

    preds, gold = np.asarray(predictions), np.asarray(labels)
    scores = []
    for pred, label in zip(preds[:, :-1], gold[:, 1:]):
        mask = label != IGNORE_INDEX
        if mask.any():
            scores.append(float(np.mean(pred[mask] == label[mask])))
    return float(np.mean(scores)) if scores else 0.0


def argmax_logits(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics``: keep the predicted ids so evaluation never gathers whole logits."""
    if isinstance(logits, (list, tuple)):  # models that also return past key values or hidden states
        logits = logits[0]
    return logits.argmax(dim=-1)


def accuracy_metrics(eval_prediction: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: ``{"accuracy": ...}`` (logged as ``eval_accuracy``)."""
    return {"accuracy": token_accuracy(eval_prediction.predictions, eval_prediction.label_ids)}
