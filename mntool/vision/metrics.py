"""Classification metrics on a device period: the per-device mean accuracy (the headline, as UAUC
is for the recommender), overall accuracy, macro-F1, NLL and expected calibration error."""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # equal-width confidence bins (Guo et al. 2017)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def device_mean_accuracy(device: np.ndarray, label: np.ndarray, pred: np.ndarray) -> float:
    """Accuracy per device, averaged over devices (each device counts once)."""
    devices, inverse = np.unique(device, return_inverse=True)
    correct = np.bincount(inverse, weights=(pred == label).astype(np.float64), minlength=len(devices))
    return float(np.mean(correct / np.bincount(inverse, minlength=len(devices))))


def macro_f1(label: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean over classes present in the labels or the predictions of their F1."""
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (label == c))
        fp, fn = np.sum((pred == c) & (label != c)), np.sum((pred != c) & (label == c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def expected_calibration_error(label: np.ndarray, logp: np.ndarray, bins: int = ECE_BINS) -> float:
    conf = np.exp(logp.max(axis=1))
    correct = logp.argmax(axis=1) == label
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(device: np.ndarray, label: np.ndarray, logits: np.ndarray) -> dict:
    """All metrics of one period from per-image logits (N, classes)."""
    logp = log_softmax(logits.astype(np.float64))
    pred = logp.argmax(axis=1)
    return {
        "device_mean_accuracy": device_mean_accuracy(device, label, pred),
        "accuracy": float(np.mean(pred == label)),
        "macro_f1": macro_f1(label, pred, logits.shape[1]),
        "nll": float(-np.mean(logp[np.arange(len(label)), label])),
        "ece": expected_calibration_error(label, logp),
    }
