"""Alignment of posterior samples to the reference net, modulo hidden-unit permutations.

`weight_matching` (Git Re-Basin): coordinate descent over hidden layers; each step is a
linear assignment (scipy) maximizing the inner product with the reference weights that
touch that layer. `sinkhorn_*` (Sinkhorn re-basin, Peña et al. 2023): relax each permutation
to a doubly-stochastic matrix (log-domain Sinkhorn), start from the weight-matching solution,
optimize an objective with Adam, round with a linear assignment. Objectives: `l2` distance
to the reference, `mid` training loss at the mid-point, `rnd` training loss at a random
point of the segment. A relaxed solution is kept only if it beats weight matching on the
rounded objective."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

from . import canon, mlp


def permute(theta, perms, sizes):
    """Apply hidden-unit permutations: new unit i of hidden layer l is old unit perms[l][i]."""
    params = mlp.unflatten(np.asarray(theta), sizes)
    out, prev = [], None
    for l, (w, b) in enumerate(params):
        if prev is not None:
            w = w[:, prev]
        if l < len(params) - 1:
            w, b = w[perms[l]], b[perms[l]]
            prev = perms[l]
        out.append((w, b))
    return mlp.flatten(out)


def identity_perms(sizes):
    return [np.arange(n) for n in sizes[1:-1]]


def weight_matching(ref, theta, sizes, max_iters=50, rng=None, init=None):
    ref_p = mlp.unflatten(np.asarray(ref, np.float64), sizes)
    th_p = mlp.unflatten(np.asarray(theta, np.float64), sizes)
    n_hidden = len(sizes) - 2
    rng = rng or np.random.default_rng(0)
    if init is not None:
        perms = [p.copy() for p in init]
    else:
        # forward sweep from the input side, where the ordering is fixed: match each layer on
        # its incoming weights given the previous layer's matching. A good start for the
        # coordinate descent (and exact for a permuted copy of the reference).
        perms = []
        for l in range(n_hidden):
            w_ref, b_ref = ref_p[l]
            w, b = th_p[l]
            if l > 0:
                w = w[:, perms[l - 1]]
            perms.append(linear_sum_assignment(w_ref @ w.T + np.outer(b_ref, b), maximize=True)[1])
    for _ in range(max_iters):
        changed = False
        for l in rng.permutation(n_hidden):
            w_ref, b_ref = ref_p[l]
            w, b = th_p[l]
            if l > 0:
                w = w[:, perms[l - 1]]
            cost = w_ref @ w.T + np.outer(b_ref, b)
            w2_ref, w2 = ref_p[l + 1][0], th_p[l + 1][0]
            if l + 1 < n_hidden:
                w2 = w2[perms[l + 1]]
            cost += w2_ref.T @ w2
            new = linear_sum_assignment(cost, maximize=True)[1]
            if not np.array_equal(new, perms[l]):
                perms[l], changed = new, True
        if not changed:
            break
    return perms


def train_loss_fn(x, y, sizes, task, noise_sigma):
    def loss(theta):
        return -mlp.log_likelihood(theta, x, y, sizes, task, noise_sigma) / x.shape[0]
    return loss


def _sinkhorn(logits, iters=20):
    def body(_, lg):  # alternate row and column normalization, in the log domain
        lg = lg - jax.nn.logsumexp(lg, axis=-1, keepdims=True)
        return lg - jax.nn.logsumexp(lg, axis=-2, keepdims=True)
    return jnp.exp(jax.lax.fori_loop(0, iters, body, logits))


def _soft_permute(theta, soft, sizes):
    """Same as permute() with doubly-stochastic matrices: W_l <- P_l W_l P_{l-1}^T."""
    params = mlp.unflatten(theta, sizes)
    out, prev = [], None
    for l, (w, b) in enumerate(params):
        if prev is not None:
            w = w @ prev.T
        if l < len(params) - 1:
            w, b = soft[l] @ w, soft[l] @ b
            prev = soft[l]
        out.append((w, b))
    return mlp.flatten(out)


def sinkhorn_rebasin(ref, thetas, init_perms, sizes, objective, loss, x_train, y_train, acfg, seed):
    """Batched over samples with vmap. Returns per-sample perms (list over samples)."""
    ref = jnp.asarray(ref)
    tau, steps = acfg["sinkhorn_tau"], acfg["sinkhorn_steps"]
    opt = optax.adam(acfg["sinkhorn_lr"])
    n_train, batch = x_train.shape[0], min(acfg["sinkhorn_batch"], x_train.shape[0])

    def batch_loss(theta, idx):
        return -mlp.log_likelihood(theta, x_train[idx], y_train[idx], sizes, *loss) / idx.shape[0]

    def objective_fn(logits, theta, key):
        soft = [_sinkhorn(lg / tau) for lg in logits]
        p = _soft_permute(theta, soft, sizes)
        k_idx, k_lam = jax.random.split(key)
        idx = jax.random.choice(k_idx, n_train, (batch,), replace=False)
        if objective == "l2":
            return jnp.sum((p - ref) ** 2)
        lam = 0.5 if objective == "mid" else jax.random.uniform(k_lam)
        return batch_loss(lam * ref + (1 - lam) * p, idx)

    def optimize(logits, theta, key):
        def step(carry, k):
            lg, st = carry
            g = jax.grad(objective_fn)(lg, theta, k)
            upd, st = opt.update(g, st, lg)
            return (optax.apply_updates(lg, upd), st), None
        (logits, _), _ = jax.lax.scan(step, (logits, opt.init(logits)), jax.random.split(key, steps))
        return logits

    # start at the weight-matching permutation: logits peaked on it
    logits0 = [np.stack([5.0 * np.eye(len(p))[p] for p in layer]) for layer in zip(*init_perms)]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(thetas))
    run = jax.jit(jax.vmap(optimize))
    chunk = 128  # bounds memory; thousands of samples at once thrash a small machine
    parts = [run([jnp.asarray(l[i:i + chunk]) for l in logits0], jnp.asarray(thetas[i:i + chunk]), keys[i:i + chunk])
             for i in range(0, len(thetas), chunk)]
    out = [np.concatenate([np.asarray(p[l]) for p in parts]) for l in range(len(logits0))]
    return [[linear_sum_assignment(out[l][s], maximize=True)[1] for l in range(len(out))]
            for s in range(len(thetas))]


def objective_score(ref, thetas, sizes, objective, loss):
    """Per-sample rounded objective: squared distance (l2) or mid-point barrier (mid, rnd)."""
    if objective == "l2":
        return np.sum((thetas - ref) ** 2, axis=1)
    return barrier(ref, thetas, loss)


def sinkhorn_refine(ref, thetas, wm_perms, sizes, objective, loss_args, x, y, acfg, seed):
    """Sinkhorn re-basin started at weight matching; per sample, keep whichever rounded
    permutation scores better on the objective."""
    soft = sinkhorn_rebasin(ref, thetas, wm_perms, sizes, objective, loss_args, x, y, acfg, seed)
    loss = train_loss_fn(x, y, sizes, *loss_args)
    score = lambda ps: objective_score(ref, np.stack([permute(th, p, sizes) for th, p in zip(thetas, ps)]),
                                       sizes, objective, loss)
    s_wm, s_sk = score(wm_perms), score(soft)
    return [s if b < a else w for s, w, a, b in zip(soft, wm_perms, s_wm, s_sk)]


def barrier(ref, thetas, loss):
    """Mid-point loss barrier per sample: L((a+b)/2) - (L(a)+L(b))/2."""
    f = jax.jit(jax.vmap(loss))
    ref = jnp.asarray(ref)
    th = jnp.asarray(thetas)
    mid = f((ref[None] + th) / 2)
    return np.asarray(mid - (loss(ref) + f(th)) / 2)


def run(cfg, data, map_out, post_out):
    from .data import standardized
    acfg, method = cfg["align"], cfg["align"]["method"]
    sizes = mlp.sizes_of(cfg, data)
    samples = post_out["samples"]
    shape = samples.shape
    flat = samples.reshape(-1, shape[-1]).astype(np.float64)
    ref = map_out["reference"].astype(np.float64)
    x, y = standardized(data, "train")
    x, y = jnp.asarray(x), jnp.asarray(y)
    loss_args = (cfg["data"]["task"], float(map_out["noise_sigma"]))
    loss = train_loss_fn(x, y, sizes, *loss_args)

    # match scale-free units: canonical copies, so a unit's norm does not swamp its direction
    ref_c, flat_c = canon.canonicalize(ref, sizes), canon.canonicalize(flat, sizes)
    rng = np.random.default_rng(cfg["seed"])
    if method == "none":
        perms = [identity_perms(sizes) for _ in flat]
    else:
        perms = [weight_matching(ref_c, th, sizes, acfg["max_iters"], rng) for th in flat_c]
        if method.startswith("sinkhorn_"):
            objective = method.split("_", 1)[1]
            if objective not in ("mid", "l2", "rnd"):
                raise ValueError(f"unknown alignment method {method!r}")
            perms = sinkhorn_refine(ref_c, flat_c, perms, sizes, objective, loss_args, x, y, acfg, cfg["seed"])
        elif method != "weight_matching":
            raise ValueError(f"unknown alignment method {method!r}")
    aligned = np.stack([permute(th, p, sizes) for th, p in zip(flat, perms)])

    # report on canonical copies (the space the flow sees)
    aligned_c = canon.canonicalize(aligned, sizes)
    dist_before = np.linalg.norm(flat_c - ref_c, axis=1)
    dist_after = np.linalg.norm(aligned_c - ref_c, axis=1)
    report = {
        "method": method,
        "reference": "MAP net",
        "mean_distance_to_reference": {"before": float(dist_before.mean()), "after": float(dist_after.mean())},
        "midpoint_loss_barrier": {"before": float(barrier(ref_c, flat_c, loss).mean()),
                                  "after": float(barrier(ref_c, aligned_c, loss).mean())},
        "matched_on": "canonicalized copies",
    }
    print(f"  alignment: {report}", flush=True)
    return {"samples": aligned.reshape(shape).astype(np.float32)}, report
