"""Predictive metrics, with the exact formulas the runtime uses (so `reference_metrics` can be
recomputed from the bundle alone). All computed in float64 from the given arrays.

Classification: accuracy; NLL = mean −log p[y] (log-softmax for a single net's logits, log of
the averaged probability for a BMA); ECE with 15 equal-width bins on the top-label confidence
(bin i holds confidences in (i/15, (i+1)/15], confidence 0 in bin 0, as the runtime's metrics.rs); Brier = mean over inputs of Σ_c (p_c − 1[y=c])²;
agreement = mean 1[argmax p = argmax p_ref]; tv = mean ½ Σ_c |p_c − p_ref,c|.
Regression: rmse; Gaussian NLL with the predictive mean and total variance; coverage90 =
fraction of targets inside mean ± z₀.₉₅·sd (the central 90% Gaussian interval)."""

import numpy as np
from scipy.special import log_softmax

Z95 = 1.6448536269514722
ECE_BINS = 15


def _bin_index(conf, bins):
    """Bin i is (i/bins, (i+1)/bins]; a confidence on an edge goes to the lower bin, 0 to bin 0."""
    edges = np.arange(bins + 1, dtype=np.float64) / bins  # i / bins, exactly as metrics.rs
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)


def ece(probs, y, bins=ECE_BINS):
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(conf, bins)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(y) * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def reliability(probs, y, bins=ECE_BINS):
    """(bin centers, accuracy, confidence, count) for reliability diagrams."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    idx = _bin_index(conf, bins)
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    cf = np.array([conf[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    count = np.array([(idx == b).sum() for b in range(bins)])
    return (np.arange(bins) + 0.5) / bins, acc, cf, count


def classification(y, probs=None, logits=None, ref_probs=None):
    """Pass either averaged `probs` [N,C] or single-net `logits` [N,C]."""
    y = np.asarray(y)
    if logits is not None:
        logp = log_softmax(np.asarray(logits, np.float64), axis=1)
        probs = np.exp(logp)
    else:
        probs = np.asarray(probs, np.float64)
        with np.errstate(divide="ignore"):
            logp = np.log(probs)
    n = len(y)
    onehot = np.eye(probs.shape[1])[y]
    out = {
        "accuracy": float(np.mean(probs.argmax(axis=1) == y)),
        "nll": float(-np.mean(logp[np.arange(n), y])),
        "ece": ece(probs, y),
        "brier": float(np.mean(np.sum((probs - onehot) ** 2, axis=1))),
    }
    if ref_probs is not None:
        ref = np.asarray(ref_probs, np.float64)
        out["agreement"] = float(np.mean(probs.argmax(axis=1) == ref.argmax(axis=1)))
        out["tv"] = float(np.mean(0.5 * np.sum(np.abs(probs - ref), axis=1)))
    return out


def regression(y, mean, var):
    y, mean, var = (np.asarray(a, np.float64) for a in (y, mean, var))
    r = y - mean
    return {
        "rmse": float(np.sqrt(np.mean(r**2))),
        "nll": float(np.mean(0.5 * np.log(2 * np.pi * var) + r**2 / (2 * var))),
        "coverage90": float(np.mean(np.abs(r) <= Z95 * np.sqrt(var))),
    }


def bma_probs(logits):
    """Per-sample logits [S,N,C] -> averaged probabilities [N,C] (float64)."""
    return np.exp(log_softmax(np.asarray(logits, np.float64), axis=-1)).mean(axis=0)


def bma_gaussian(means, sigma):
    """Per-sample predictive means [S,N,k] + homoscedastic noise -> (mean, total variance)."""
    means = np.asarray(means, np.float64)
    return means.mean(axis=0), means.var(axis=0) + sigma**2


def entropy(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def mutual_information(logits):
    """Epistemic part of the predictive entropy: H(E p) − E H(p)."""
    p = np.exp(log_softmax(np.asarray(logits, np.float64), axis=-1))
    return entropy(p.mean(axis=0)) - entropy(p).mean(axis=0)


def epistemic_variance(means):
    """Per-sample predictive means [S,N,k] -> per-input epistemic variance [N]: the population
    variance over samples of the predicted mean, averaged over the k outputs."""
    return np.asarray(means, np.float64).var(axis=0).mean(axis=-1)


def epistemic(out, classification):
    """Mean over inputs of the epistemic part of the predictive: mutual information (nats) for
    classification logits [S,N,C], epistemic variance for regression means [S,N,k]."""
    return float(np.mean(mutual_information(out) if classification else epistemic_variance(out)))


def nearest_distance(a, b, chunk=256):
    """For each row of a, the Euclidean distance to its nearest row of b (float64)."""
    b = np.asarray(b, np.float64)
    b2 = np.sum(b**2, axis=1)
    out = []
    for i in range(0, len(a), chunk):
        x = np.asarray(a[i:i + chunk], np.float64)
        d2 = np.sum(x**2, axis=1)[:, None] + b2[None, :] - 2 * x @ b.T
        out.append(np.sqrt(np.maximum(d2.min(axis=1), 0.0)))
    return np.concatenate(out)


def memorization_ratio(samples_x, heldout_x, anchors_x):
    """median nearest-anchor distance of the samples / the same for the held-out draws (all in
    whitened coordinates). 0 for copies of the anchors, about 1 for draws as new as HMC's."""
    return float(np.median(nearest_distance(samples_x, anchors_x)) /
                 np.median(nearest_distance(heldout_x, anchors_x)))
