"""Per-coordinate whitening: θ = mean + scale ⊙ x, so the flow sees unit-scale coordinates."""

import numpy as np


def fit(samples, min_scale):
    """Mean and sd over training samples; a floor keeps near-constant coordinates finite."""
    mean = samples.mean(axis=0)
    scale = samples.std(axis=0)
    scale = np.maximum(scale, min_scale * max(float(np.median(scale)), 1e-12))
    return mean.astype(np.float32), scale.astype(np.float32)


def apply(theta, mean, scale):
    return ((theta - mean) / scale).astype(np.float32)


def invert(x, mean, scale):
    return (mean + scale * x).astype(np.float32)
