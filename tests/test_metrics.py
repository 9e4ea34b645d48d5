import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from affectprep.models.metrics import (
    au_f1, au_report, cluster_scores, confusion_matrix, confusion_table, expression_report, multi_view_average,
    per_class_recall, save_confusion_png, search_thresholds, uar, war,
)

K = 7
RNG = np.random.default_rng(0)
RANDOM_TRUE = RNG.integers(0, K, 500)
RANDOM_PRED = np.where(RNG.random(500) < 0.6, RANDOM_TRUE, RNG.integers(0, K, 500))

EXPRESSION_CASES = {
    "random": (RANDOM_TRUE, RANDOM_PRED),
    "class 3 never predicted": (np.arange(50) % K, np.where(np.arange(50) % K == 3, 0, np.arange(50) % K)),
    "class 5 absent from y_true": (np.array([0, 1, 2, 3, 4, 6, 0, 1]), np.array([0, 5, 2, 5, 4, 6, 1, 1])),
    "all correct": (np.arange(21) % K, np.arange(21) % K),
    "all wrong": (np.arange(21) % K, (np.arange(21) + 1) % K),
}


def sklearn_quietly(function, *args, **kwargs):
    # balanced_accuracy_score warns when y_pred holds a class y_true lacks; that is one of the cases under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


@pytest.mark.parametrize("case", EXPRESSION_CASES)
def test_expression_metrics_match_sklearn(case):
    y_true, y_pred = EXPRESSION_CASES[case]
    labels = list(range(K))
    cm = confusion_matrix(y_true, y_pred, K)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert uar(y_true, y_pred, K) == pytest.approx(sklearn_quietly(skm.balanced_accuracy_score, y_true, y_pred))
    assert war(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    recall = per_class_recall(cm)
    present = np.isin(labels, y_true)
    assert np.all(np.isnan(recall[~present]))
    np.testing.assert_allclose(
        recall[present],
        sklearn_quietly(skm.recall_score, y_true, y_pred, labels=labels, average=None, zero_division=0)[present],
    )


def test_expression_report_is_json_ready_and_names_classes():
    y_true, y_pred = EXPRESSION_CASES["class 5 absent from y_true"]
    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"]
    report = expression_report(y_true.tolist(), y_pred.tolist(), names)
    assert report["per_class_recall"]["disgust"] is None and report["support"]["disgust"] == 0
    assert report["per_class_recall"]["surprise"] == 0.0 and report["support"]["neutral"] == 2
    assert report["uar"] == pytest.approx(uar(y_true, y_pred, K))
    assert report["war"] == pytest.approx(5 / 8)
    assert report["confusion"] == confusion_matrix(y_true, y_pred, K).tolist()


def test_bad_labels_raise_clear_errors():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix([0, 7], [0, 1], K)
    with pytest.raises(ValueError, match="differ in length"):
        uar([0, 1], [0], K)
    with pytest.raises(ValueError, match="empty"):
        war([], [])
    with pytest.raises(ValueError, match="integer class indices"):
        war([0.5, 1], [0, 1])
    with pytest.raises(ValueError, match="3 class names given for 7"):
        confusion_table(np.eye(K), ["a", "b", "c"])


def au_case():
    rng = np.random.default_rng(1)
    y_true = (rng.random((200, 6)) < 0.3).astype(float)
    scores = np.clip(0.6 * y_true + 0.5 * rng.random((200, 6)), 0, 1)
    y_true[rng.random((200, 6)) < 0.15] = np.nan        # unknown labels
    y_true[:, 4] = 0.0                                  # an AU that never occurs
    return y_true, scores


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_au_f1_matches_sklearn_and_ignores_unknown_labels(threshold):
    y_true, scores = au_case()
    ours = au_f1(y_true, scores, threshold)
    for au in range(y_true.shape[1]):
        known = ~np.isnan(y_true[:, au])
        expected = skm.f1_score(y_true[known, au], scores[known, au] >= threshold, zero_division=0)
        assert ours[au] == pytest.approx(expected)
    assert ours[4] == 0.0


def test_au_without_known_labels_has_undefined_f1_and_report_skips_it():
    y_true, scores = au_case()
    y_true[:, 5] = np.nan
    assert np.isnan(au_f1(y_true, scores)[5])
    report = au_report(y_true, scores, [f"AU{i}" for i in (1, 2, 4, 6, 7, 10)])
    assert report["f1"]["AU10"] is None and report["thresholds"]["AU10"] == 0.5
    defined = au_f1(y_true, scores)[:5]
    assert report["mean_f1"] == pytest.approx(defined.mean())


def test_threshold_search_picks_the_f1_maximising_threshold():
    # AU0: positives score 0.7-0.8, negatives 0.2-0.62 -> any threshold in (0.62, 0.7] separates them perfectly.
    # AU1: scores are high for everything, so only a high threshold drops the negatives.
    y_true = np.array([[1, 1], [1, 1], [0, 0], [0, 0], [0, np.nan], [1, 0]])
    scores = np.array([[0.7, 0.95], [0.8, 0.92], [0.2, 0.85], [0.62, 0.88], [0.4, 0.1], [0.75, 0.89]])
    grid = np.linspace(0.05, 0.95, 19)
    thresholds = search_thresholds(y_true, scores, grid)
    assert thresholds[0] == pytest.approx(0.65)
    assert thresholds[1] == pytest.approx(0.9)
    np.testing.assert_allclose(au_f1(y_true, scores, thresholds), [1.0, 1.0])
    for au in range(2):
        best = max(au_f1(y_true, scores, t)[au] for t in grid)
        assert au_f1(y_true, scores, thresholds)[au] == pytest.approx(best)
    report = au_report(y_true, scores, ["AU1", "AU2"], thresholds)
    assert report["mean_f1"] == 1.0 and report["thresholds"]["AU1"] == pytest.approx(0.65)


def test_au_inputs_are_validated():
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        au_f1([[2.0]], [[0.5]])
    with pytest.raises(ValueError, match="does not match"):
        au_f1([[1.0, 0.0]], [[0.5]])
    with pytest.raises(ValueError, match="one per AU"):
        au_f1([[1.0, 0.0]], [[0.5, 0.5]], threshold=[0.5, 0.5, 0.5])


def test_confusion_table_has_one_row_per_class():
    y_true, y_pred = EXPRESSION_CASES["class 5 absent from y_true"]
    names = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"]
    cm = confusion_matrix(y_true, y_pred, K)
    lines = confusion_table(cm, names).splitlines()
    assert len(lines) == 1 + K
    assert [line.split()[0] for line in lines[1:]] == names
    assert lines[1].split()[-1] == "50.0%"          # neutral: 1 of 2 right
    assert lines[6].split()[-1] == "-"              # disgust has no samples
    counts = confusion_table(cm, names, normalise=False).splitlines()
    assert counts[2].split()[1:1 + K] == [str(v) for v in cm[1]]


@pytest.mark.parametrize("normalise", [True, False])
def test_confusion_png_is_written(tmp_path, normalise):
    cm = confusion_matrix(RANDOM_TRUE, RANDOM_PRED, K)
    path = tmp_path / "plots" / "confusion.png"
    save_confusion_png(cm, [f"class{i}" for i in range(K)], path, normalise=normalise, title="DFEW fold 1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 200 and height > 200


def test_multi_view_average_is_mean_of_softmax():
    logits = np.random.default_rng(2).normal(size=(3, 5, 4)) * 10
    logits[0, 0, 0] = 1000.0                        # would overflow a naive exp
    probabilities = multi_view_average(logits)
    assert probabilities.shape == (5, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    expected = (np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(probabilities, expected)
    with pytest.raises(ValueError, match="views, samples, classes"):
        multi_view_average(np.zeros((5, 4)))


def test_cluster_scores_match_scikit_learn():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 4, size=60)
    embeddings = generator.normal(size=(60, 8)) + labels[:, None] * 1.5
    scores = cluster_scores(embeddings, labels)
    assert scores["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(embeddings, labels), rel=1e-9)
    assert scores["calinski_harabasz"] == pytest.approx(skm.calinski_harabasz_score(embeddings, labels), rel=1e-9)
    # Non-contiguous label values and torch input.
    shifted = torch.from_numpy(embeddings).float()
    scores = cluster_scores(shifted, labels * 3 + 7)
    assert scores["davies_bouldin"] == pytest.approx(skm.davies_bouldin_score(shifted.numpy(), labels), rel=1e-6)
    # Better separated clusters score better on both.
    tight = cluster_scores(generator.normal(size=(60, 8)) * 0.1 + labels[:, None] * 1.5, labels)
    assert tight["davies_bouldin"] < scores["davies_bouldin"] and tight["calinski_harabasz"] > scores[
        "calinski_harabasz"]
    with pytest.raises(ValueError, match="2 to N - 1 clusters"):
        cluster_scores(embeddings, np.zeros(60))
