"""Exact scale canonicalization of ReLU hidden units.

relu(c·z) = c·relu(z) for c > 0, so scaling a hidden unit's incoming weights and bias by
1/c and its outgoing weights by c leaves the function unchanged. We pick c = the norm of
[incoming weights, bias], layer by layer from the input side, so every hidden unit ends up
with unit incoming norm. The last layer is never rescaled: its outputs are the logits/means
users see."""

import numpy as np

from . import mlp


def canonicalize(theta, sizes, eps=1e-12):
    """θ [..., D] -> canonical θ [..., D] (numpy, float64 internally)."""
    theta = np.asarray(theta, np.float64)
    params = [(w.copy(), b.copy()) for w, b in mlp.unflatten(theta, sizes)]
    for l in range(len(params) - 1):
        w, b = params[l]
        norm = np.sqrt(np.sum(w**2, axis=-1) + b**2)  # [..., out]
        norm = np.where(norm > eps, norm, 1.0)  # a dead unit stays as it is
        params[l] = (w / norm[..., :, None], b / norm)
        w_next, b_next = params[l + 1]
        params[l + 1] = (w_next * norm[..., None, :], b_next)
    return mlp.flatten(params)
