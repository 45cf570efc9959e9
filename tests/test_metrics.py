"""Metrics against hand-computed cases, and against scikit-learn, SciPy and seqeval (dev extras:
the cross-checks fail rather than skip when those are missing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaptercli.metrics import (
    accuracy,
    average_ranks,
    bio_entities,
    compute_metrics,
    entity_scores,
    f1_binary,
    f1_macro,
    matthews_corrcoef,
    pearson,
    spearman,
)

# tp=2 (0, 2), fp=1 (3), fn=1 (1), tn=0.
PREDICTED = np.array([1, 0, 1, 1])
ACTUAL = np.array([1, 1, 1, 0])


def test_binary_classification_by_hand() -> None:
    assert accuracy(PREDICTED, ACTUAL) == 0.5
    assert f1_binary(PREDICTED, ACTUAL) == pytest.approx(2 / 3)  # 2tp / (2tp + fp + fn)
    assert f1_binary(PREDICTED, ACTUAL, positive=0) == 0.0
    assert f1_macro(PREDICTED, ACTUAL) == pytest.approx(1 / 3)
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = -1 / sqrt(9)
    assert matthews_corrcoef(PREDICTED, ACTUAL) == pytest.approx(-1 / 3)


def test_multiclass_mcc_by_hand() -> None:
    actual = np.array([0, 1, 2, 0, 1, 2])
    predicted = np.array([0, 2, 1, 0, 0, 2])
    # trace 3, n 6, true counts (2,2,2), predicted counts (3,1,2):
    # (3*6 - 12) / sqrt((36 - 14) * (36 - 12))
    assert matthews_corrcoef(predicted, actual) == pytest.approx(6 / math.sqrt(22 * 24))
    assert matthews_corrcoef(actual, actual) == pytest.approx(1.0)
    assert matthews_corrcoef(np.zeros(6, dtype=int), actual) == 0.0  # undefined -> 0, as sklearn


def test_correlations_by_hand() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 4 / sqrt(5 * 5)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert average_ranks(np.array([10, 20, 20, 30])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(np.array([3.0, 1.0, 2.0])).tolist() == [3.0, 1.0, 2.0]
    # Pearson of ranks (1,2,3,4) and (1,2.5,2.5,4): 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [10, 20, 20, 30]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear


@pytest.mark.parametrize(
    ("tags", "entities"),
    [
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        (["I-PER", "I-PER", "B-PER"], [("PER", 0, 2), ("PER", 2, 3)]),  # I- after O starts one
        (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 3)]),  # a type change ends one
        (["B-geo-loc", "I-geo-loc"], [("geo-loc", 0, 2)]),  # types may contain hyphens
        (["O", "O"], []),
    ],
)
def test_bio_entities(tags: list[str], entities: list[tuple[str, int, int]]) -> None:
    assert bio_entities(tags) == entities


def test_entity_f1_needs_exact_type_and_span() -> None:
    actual = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "O", "O", "B-LOC"], ["B-PER", "O"]]
    # Predicted: PER 0-1 (span too short), LOC 3-4 (right), PER 0-1 in sentence 2 (wrong type).
    scores = entity_scores(predicted, actual)
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3})
    assert entity_scores(actual, actual)["f1"] == 1.0
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_compute_classification_from_logits_and_ids() -> None:
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [-1.0, 2.0]], dtype=np.float32)
    from_logits = compute_metrics("classification", logits, ACTUAL, ["neg", "pos"])
    assert from_logits == compute_metrics("classification", PREDICTED, ACTUAL, ["neg", "pos"])
    assert from_logits == pytest.approx({"accuracy": 0.5, "f1": 2 / 3, "f1_macro": 1 / 3, "mcc": -1 / 3})

    three = compute_metrics(
        "classification", np.array([0, 2, 1, 0, 0, 2]), np.array([0, 1, 2, 0, 1, 2]), list("abc")
    )
    assert three["f1"] == three["f1_macro"]  # macro when there are more than two classes


def test_compute_multilabel() -> None:
    logits = np.array([[2.0, -1.0, 0.5], [-1.0, -1.0, -3.0]])
    labels = np.array([[1, 0, 1], [1, 0, 0]])
    # Decisions [[1,0,1],[0,0,0]]: tp=2, fp=0, fn=1.
    expected = {"f1_micro": 4 / 5, "subset_accuracy": 0.5}
    assert compute_metrics("multilabel", logits, labels) == pytest.approx(expected)
    assert compute_metrics("multilabel", logits > 0, labels) == pytest.approx(expected)


def test_compute_regression_accepts_a_column_of_predictions() -> None:
    scores = compute_metrics(
        "regression", np.array([[1.0], [3.0], [2.0], [4.0]]), np.array([1.0, 2.0, 3.0, 4.0])
    )
    assert scores == pytest.approx({"pearson": 0.8, "spearman": 0.8, "mse": 0.5})


def test_compute_tagging_skips_ignored_positions() -> None:
    names = ["O", "B-PER", "I-PER"]
    labels = np.array([[-100, 1, 2, -100, 0, -100]])
    predicted = np.array([[0, 1, 2, 0, 1, 0]])  # a false B-PER at position 4
    scores = compute_metrics("tagging", predicted, labels, names)
    assert scores == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "accuracy": 2 / 3})
    logits = np.eye(3, dtype=np.float32)[predicted]
    assert compute_metrics("tagging", logits, labels, names) == scores


def test_compute_language_modelling_accuracy() -> None:
    labels = np.array([[-100, 5, -100, 7]])
    assert compute_metrics("mlm", np.array([[1, 5, 1, 8]]), labels) == {"accuracy": 0.5}
    # Causal: position t predicts token t+1.
    assert compute_metrics("causal_lm", np.array([[2, 3, 9, 9]]), np.array([[1, 2, 3, -100]])) == {
        "accuracy": 1.0
    }


def test_unknown_task() -> None:
    with pytest.raises(ValueError, match="no metrics for task 'qa'"):
        compute_metrics("qa", np.zeros(2), np.zeros(2))


def test_cross_check_with_scikit_learn() -> None:
    import sklearn.metrics as sklearn_metrics

    rng = np.random.default_rng(0)
    for classes in (2, 5):
        actual, predicted = rng.integers(0, classes, 200), rng.integers(0, classes, 200)
        assert accuracy(predicted, actual) == pytest.approx(sklearn_metrics.accuracy_score(actual, predicted))
        assert f1_macro(predicted, actual) == pytest.approx(
            sklearn_metrics.f1_score(actual, predicted, average="macro")
        )
        mcc = sklearn_metrics.matthews_corrcoef(actual, predicted)
        assert matthews_corrcoef(predicted, actual) == pytest.approx(mcc)
    assert f1_binary(predicted % 2, actual % 2) == pytest.approx(
        sklearn_metrics.f1_score(actual % 2, predicted % 2)
    )
    multi_actual, multi_predicted = rng.integers(0, 2, (50, 4)), rng.integers(0, 2, (50, 4))
    scores = compute_metrics("multilabel", multi_predicted, multi_actual)
    assert scores["f1_micro"] == pytest.approx(
        sklearn_metrics.f1_score(multi_actual, multi_predicted, average="micro")
    )
    assert scores["subset_accuracy"] == pytest.approx(
        sklearn_metrics.accuracy_score(multi_actual, multi_predicted)
    )


def test_cross_check_with_scipy() -> None:
    import scipy.stats as stats

    rng = np.random.default_rng(1)
    x = rng.normal(size=100)
    y = np.round(x + rng.normal(size=100), 1)  # rounding makes ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert average_ranks(y) == pytest.approx(stats.rankdata(y))


def test_cross_check_with_seqeval() -> None:
    import seqeval.metrics as seqeval

    actual = [["B-PER", "I-PER", "O", "I-LOC", "B-LOC"], ["B-ORG", "I-ORG", "I-PER"]]
    predicted = [["B-PER", "I-PER", "O", "B-LOC", "B-LOC"], ["I-ORG", "I-ORG", "O"]]
    scores = entity_scores(predicted, actual)
    assert scores["precision"] == pytest.approx(seqeval.precision_score(actual, predicted))
    assert scores["recall"] == pytest.approx(seqeval.recall_score(actual, predicted))
    assert scores["f1"] == pytest.approx(seqeval.f1_score(actual, predicted))
