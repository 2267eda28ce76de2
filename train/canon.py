"""Exact scale canonicalization of ReLU hidden units.

relu(c·z) = c·relu(z) for c > 0, so scaling a hidden unit's incoming weights and bias by
1/c and its outgoing weights by c leaves the function unchanged. We pick c = the norm of
[incoming weights, bias], layer by layer from the input side, so every hidden unit ends up
with unit incoming norm. The last layer is never rescaled: its outputs are the logits/means
users see. A dead unit (incoming weights and bias all zero, as a MAP net can have) becomes
(0, …, 0, −1): it still outputs 0 everywhere, and now lies on its unit sphere too."""

import numpy as np

from . import mlp


def canonicalize(theta, sizes):
    """θ [..., D] -> canonical θ [..., D] (numpy, float64 internally)."""
    theta = np.asarray(theta, np.float64)
    params = [(w.copy(), b.copy()) for w, b in mlp.unflatten(theta, sizes)]
    for l in range(len(params) - 1):
        w, b = params[l]
        norm = np.sqrt(np.sum(w**2, axis=-1) + b**2)  # [..., out]
        # only an exactly zero unit is dead: a tiny nonzero one still computes relu(w·x + b), which
        # its outgoing weights may scale back up (a threshold would change the function)
        dead = norm == 0.0
        norm = np.where(dead, 1.0, norm)
        # a dead unit (zero incoming weights and bias) outputs relu(0) = 0 for every input; so does
        # the unit-norm (0, …, 0, −1), which puts it on the slice without changing the function
        params[l] = (np.where(dead[..., :, None], 0.0, w / norm[..., :, None]), np.where(dead, -1.0, b / norm))
        w_next, b_next = params[l + 1]
        params[l + 1] = (w_next * norm[..., None, :], b_next)
    return mlp.flatten(params)
