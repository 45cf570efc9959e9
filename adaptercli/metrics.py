"""Evaluation metrics in plain numpy, so evaluation needs no network (no `evaluate.load`).

Definitions follow scikit-learn (accuracy, F1, MCC), scipy (Pearson, Spearman with average ranks
for ties), seqeval's default mode (entity-level F1 for BIO tags), Google's ``rouge_score``
(ROUGE-L) and sacrebleu (chrF) for generated text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100
"""Label id of positions that are not scored (special tokens, later sub-tokens, padding)."""


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to their label."""
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def _f1_from_counts(true_positives: float, false_positives: float, false_negatives: float) -> float:
    """F1 = 2TP / (2TP + FP + FN); 0 when there is nothing to find and nothing found."""
    denominator = 2 * true_positives + false_positives + false_negatives
    return float(2 * true_positives / denominator) if denominator else 0.0


def f1_binary(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the `positive` class."""
    predicted, actual = np.asarray(predictions) == positive, np.asarray(labels) == positive
    return _f1_from_counts(
        np.sum(predicted & actual), np.sum(predicted & ~actual), np.sum(~predicted & actual)
    )


def f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in labels or predictions."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    return float(np.mean([f1_binary(predictions, labels, positive=c) for c in classes]))


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, multiclass form (Gorodkin, 2004); 0 when undefined."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes, indices = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true_index, predicted_index = indices[: len(labels)], indices[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (true_index, predicted_index), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    covariance = correct * total - true_counts @ predicted_counts
    denominator = np.sqrt(
        (total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts)
    )
    return float(covariance / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    x = np.asarray(predictions, dtype=float) - np.mean(predictions)
    y = np.asarray(labels, dtype=float) - np.mean(labels)
    denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denominator) if denominator else float("nan")


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (scipy's ``rankdata``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    return pearson(average_ranks(predictions), average_ranks(labels))


def bio_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` (end exclusive) in a sequence of BIO tags.

    As in conlleval and seqeval's default mode, an ``I-X`` that does not continue an ``X`` entity
    starts a new one; ``O`` and anything without a ``B-``/``I-`` prefix is outside.
    """
    entities = []
    start, entity_type = None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, tag_type = tag.partition("-")
        continues = prefix == "I" and tag_type == entity_type
        if start is not None and not continues:
            entities.append((entity_type, start, position))
            start, entity_type = None, None
        if prefix in ("B", "I") and tag_type and not continues:
            start, entity_type = position, tag_type
    return entities


def entity_scores(predicted: Sequence[Sequence[str]], actual: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities; one counts only if type and span both match."""
    found = correct = expected = 0
    for predicted_tags, actual_tags in zip(predicted, actual, strict=True):
        predicted_entities, actual_entities = (
            set(bio_entities(predicted_tags)),
            set(bio_entities(actual_tags)),
        )
        found += len(predicted_entities)
        expected += len(actual_entities)
        correct += len(predicted_entities & actual_entities)
    precision = correct / found if found else 0.0
    recall = correct / expected if expected else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": _f1_from_counts(correct, found - correct, expected - correct),
    }


_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score``'s default tokenizer (no stemming): lowercase, split at every character that
    is not an ASCII letter or digit."""
    return [token for token in _NOT_ALPHANUMERIC.split(text.lower()) if token]


def _longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L: the mean over examples of the F-measure of the longest common subsequence of words
    (as ``rouge_score.RougeScorer(["rougeL"])`` scores each pair; 0 when either side has no words)."""
    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
        common = _longest_common_subsequence(wanted, predicted) if predicted and wanted else 0
        precision = common / len(predicted) if predicted else 0.0
        recall = common / len(wanted) if wanted else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores)) if scores else 0.0


CHRF_CHAR_ORDER, CHRF_BETA = 6, 2


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """chrF on the 0-100 scale, as ``sacrebleu.CHRF()`` scores a corpus: character n-grams of
    orders 1-6 with whitespace removed, no word n-grams, beta 2. The n-gram counts of all the
    examples are summed first; precision and recall are averaged over the orders that have
    n-grams on both sides, then combined into the F-beta score."""
    totals = np.zeros((CHRF_CHAR_ORDER, 3))  # per order: predicted n-grams, reference n-grams, matches
    for prediction, reference in zip(predictions, references, strict=True):
        predicted, wanted = "".join(prediction.split()), "".join(reference.split())
        for n in range(1, CHRF_CHAR_ORDER + 1):
            ours = Counter(predicted[i : i + n] for i in range(len(predicted) - n + 1))
            theirs = Counter(wanted[i : i + n] for i in range(len(wanted) - n + 1))
            matches = sum(min(count, theirs[gram]) for gram, count in ours.items() if gram in theirs)
            # sacrebleu counts no predicted n-grams where the reference has none of this order
            totals[n - 1] += (ours.total() if theirs else 0, theirs.total(), matches)
    both = (totals[:, 0] > 0) & (totals[:, 1] > 0)
    if not both.any():
        return 0.0
    precision = float(np.mean(totals[both, 2] / totals[both, 0]))
    recall = float(np.mean(totals[both, 2] / totals[both, 1]))
    if precision + recall == 0:
        return 0.0
    factor = CHRF_BETA**2
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


METRIC_NAMES: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "f1", "f1_macro", "mcc"),
    "multilabel": ("f1_micro", "subset_accuracy"),
    "regression": ("pearson", "spearman", "mse"),
    "tagging": ("precision", "recall", "f1", "accuracy"),
    "mlm": ("accuracy",),
    "causal_lm": ("accuracy",),
    "instruct": ("accuracy",),  # of the answer tokens (the prompt is not scored)
    "seq2seq": ("rougeL", "chrf"),  # of the generated texts against the targets
}
"""The metrics `compute_metrics` reports for each task (evaluation adds ``loss``)."""


def _class_ids(predictions: np.ndarray) -> np.ndarray:
    """Class ids from logits (last axis = classes, float) or from ids already."""
    predictions = np.asarray(predictions)
    return predictions.argmax(axis=-1) if np.issubdtype(predictions.dtype, np.floating) else predictions


def compute_metrics(
    task: str, predictions: np.ndarray, labels: np.ndarray, label_names: Sequence[str] | None = None
) -> dict[str, float]:
    """The standard metrics of `task` for a whole evaluation set.

    Args:
        task: classification, multilabel, regression, tagging, mlm or causal_lm.
        predictions: logits (float; for multilabel, a logit > 0 means the label is on) or ids /
            0-1 decisions (integers or booleans). Shapes: ``(n, classes)`` or ``(n,)`` for
            classification; ``(n, labels)`` for multilabel; ``(n,)`` or ``(n, 1)`` for regression;
            ``(n, length, classes)`` or ``(n, length)`` for tagging and language modelling.
        labels: the matching labels; -100 marks positions that are not scored.
        label_names: tag names of the ids, needed for tagging.

    For seq2seq, `predictions` are the generated texts and `labels` the target texts.

    Returns:
        classification: accuracy, f1 (the positive class for two classes, else macro), f1_macro,
        mcc. multilabel: f1_micro, subset_accuracy. regression: pearson, spearman, mse. tagging:
        precision, recall, f1 (entity level), accuracy (token level). mlm/causal_lm: accuracy of
        the scored tokens (for causal_lm each position predicts the next token). seq2seq: rougeL
        (0-1, as rouge_score), chrf (0-100, as sacrebleu).
    """
    if task == "seq2seq":
        return {"rougeL": rouge_l(predictions, labels), "chrf": chrf(predictions, labels)}
    labels = np.asarray(labels)
    if task == "classification":
        predicted = _class_ids(predictions)
        macro = f1_macro(predicted, labels)
        binary = (
            len(label_names) == 2 if label_names is not None else set(np.union1d(predicted, labels)) <= {0, 1}
        )
        return {
            "accuracy": accuracy(predicted, labels),
            "f1": f1_binary(predicted, labels) if binary else macro,
            "f1_macro": macro,
            "mcc": matthews_corrcoef(predicted, labels),
        }
    if task == "multilabel":
        predictions = np.asarray(predictions)
        predicted = (
            predictions > 0 if np.issubdtype(predictions.dtype, np.floating) else predictions.astype(bool)
        )
        actual = labels.astype(bool)
        return {
            "f1_micro": _f1_from_counts(
                np.sum(predicted & actual), np.sum(predicted & ~actual), np.sum(~predicted & actual)
            ),
            "subset_accuracy": float(np.mean(np.all(predicted == actual, axis=1))),
        }
    if task == "regression":
        predicted = np.asarray(predictions, dtype=float).reshape(len(labels))
        return {
            "pearson": pearson(predicted, labels),
            "spearman": spearman(predicted, labels),
            "mse": float(np.mean((predicted - labels) ** 2)),
        }
    if task == "tagging":
        if label_names is None:
            raise ValueError("tagging metrics need the tag names (label_names)")
        predicted = _class_ids(predictions)
        scored = labels != IGNORE_INDEX
        predicted_tags = [
            [label_names[i] for i in row[keep]] for row, keep in zip(predicted, scored, strict=True)
        ]
        actual_tags = [[label_names[i] for i in row[keep]] for row, keep in zip(labels, scored, strict=True)]
        return {
            **entity_scores(predicted_tags, actual_tags),
            "accuracy": accuracy(predicted[scored], labels[scored]),
        }
    if task in ("mlm", "causal_lm", "instruct"):
        predicted = _class_ids(predictions)
        if task in ("causal_lm", "instruct"):
            predicted, labels = predicted[:, :-1], labels[:, 1:]
        scored = labels != IGNORE_INDEX
        return {"accuracy": accuracy(predicted[scored], labels[scored])}
    raise ValueError(f"no metrics for task {task!r}")
