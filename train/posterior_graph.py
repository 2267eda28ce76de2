"""posterior.onnx: the posterior's log-density and its gradient, for refinement
(bundle format version 3, train/refine.py).

    theta [S,D] (original-scale weights, net.onnx's layout) -> log_density [S], grad [S,D]

log_density = log p(θ | training data) up to a constant, exactly the density NUTS sampled
(train/posterior.py, refine.log_posterior): the likelihood of the standardized training split
(stored in the graph as initializers) divided by the temperature, plus the prior
−½ Σ θ² / prior_scale². Written node by node with an explicit backward pass:

    forward   h₀ = X [N,i];  z_l = h_{l−1} W_lᵀ + b_l  (MatMul broadcasts X [N,i] @ W_lᵀ [S,i,o]);
              h_l = relu(z_l) for hidden layers; out = z_L [S,N,C]
    classif.  ℓ = Σ_n (z_L[n,y_n] − logsumexp z_L[n]),   ∂ℓ/∂z_L = onehot(y) − softmax(z_L)
    regress.  ℓ = Σ_{n,k} (−½ r² − log σ − ½ log 2π), r = (y − z_L)/σ,   ∂ℓ/∂z_L = r/σ
    backward  g_L = (∂ℓ/∂z_L)/T;  ∂/∂W_l = g_lᵀ h_{l−1} [S,o,i];  ∂/∂b_l = Σ_n g_l;
              g_{l−1} = (g_l W_l) ⊙ [z_{l−1} > 0]
    prior     −½ Σ θ²/s², gradient −θ/s²

jax2onnx's export of a batched value-and-vjp is correct (parity 7e-7) but bloated (381-527
nodes: broadcasts materialized by Expand, ScatterND for slice transposes). The log-softmax is
written by hand with its exponentials floored at exp(SOFTMAX_LOG_FLOOR) relative to the largest
logit, so that confident nets give no float32 subnormals, which made ONNX Runtime's LogSoftmax
and the backward MatMuls 2-3x slower on x86 (docs/performance.md, "Refinement"); `timing`
measures this graph against jitted JAX."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import mlp, refine
from .data import standardized

OPSET = 17
SOFTMAX_LOG_FLOOR = -80.0  # exp(-80) is a normal float32: no subnormals in the backward pass


def _f32(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _i64(name, a):
    return numpy_helper.from_array(np.asarray(a, np.int64), name)


def build(task, x, y, sizes, noise_sigma, temperature, prior_scale, n_classes=None):
    """The ModelProto. x [N,i] standardized inputs; y [N] class indices (classification) or
    [N,k] standardized targets (regression); `noise_sigma` in standardized units."""
    if task not in ("classification", "regression"):  # the pipeline's likelihoods (mlp.log_likelihood)
        raise ValueError(f"posterior graph: task {task!r} (classification or homoscedastic regression)")
    layers, d = mlp.layout(sizes)
    x = np.asarray(x, np.float32)
    n = len(x)
    nodes, inits = [], [_f32("X", x), _i64("ax1", [1]), _i64("ax12", [1, 2]),
                        _i64("flat", [0, -1]), _f32("zero", 0.0)]
    mk = lambda op, ins, outs, **kw: nodes.append(helper.make_node(op, ins, outs, **kw))

    # forward
    h = "X"
    for i, (d_in, d_out, w_off, b_off) in enumerate(layers):
        inits += [_i64(f"w{i}_lo", [w_off]), _i64(f"w{i}_hi", [w_off + d_in * d_out]), _i64(f"b{i}_hi", [b_off + d_out]),
                  _i64(f"w{i}_shape", [0, d_out, d_in])]
        mk("Slice", ["theta", f"w{i}_lo", f"w{i}_hi", "ax1"], [f"wf{i}"])
        mk("Reshape", [f"wf{i}", f"w{i}_shape"], [f"W{i}"])                   # [S,o,i]
        mk("Transpose", [f"W{i}"], [f"Wt{i}"], perm=[0, 2, 1])               # [S,i,o]
        mk("Slice", ["theta", f"w{i}_hi", f"b{i}_hi", "ax1"], [f"b{i}"])      # [S,o]
        mk("Unsqueeze", [f"b{i}", "ax1"], [f"b3{i}"])                         # [S,1,o]
        mk("MatMul", [h, f"Wt{i}"], [f"zw{i}"])                               # [S,N,o]
        mk("Add", [f"zw{i}", f"b3{i}"], [f"z{i}"])
        if i < len(layers) - 1:
            mk("Relu", [f"z{i}"], [f"h{i}"])
            h = f"h{i}"
    last = len(layers) - 1
    zl = f"z{last}"

    # likelihood and its gradient with respect to the output
    if task == "classification":
        c = sizes[-1] if n_classes is None else n_classes
        onehot = np.zeros((n, c), np.float32)
        onehot[np.arange(n), np.asarray(y, np.int64)] = 1.0
        inits += [_f32("Y1", onehot), _f32("logit_floor", SOFTMAX_LOG_FLOOR), _i64("ax2", [2])]
        # log-softmax by hand, one exp shared with the softmax: zc = z − max z, e = exp(max(zc,
        # −80)), log p = zc − log Σ e, softmax = e / Σ e. Below e^−80 ≈ 1.8e-35 exp would return
        # float32 subnormals, which are slow on x86 in every op they reach (ONNX Runtime's own
        # LogSoftmax and the backward MatMuls; docs/performance.md, "Refinement"); the floor
        # changes Σ e by less than C·e^−80 relative and the gradient by less than 2e-35 per entry.
        # (ONNX Runtime's flush-to-zero option would do it too, but it leaves FTZ/DAZ set on the
        # caller's thread.)
        mk("ReduceMax", [zl], ["zmax"], axes=[2], keepdims=1)                 # [S,N,1]
        mk("Sub", [zl, "zmax"], ["zc"])
        mk("Max", ["zc", "logit_floor"], ["zc_floored"])
        mk("Exp", ["zc_floored"], ["ez"])
        mk("ReduceSum", ["ez", "ax2"], ["sez"], keepdims=1)
        mk("Log", ["sez"], ["lse"])
        mk("Sub", ["zc", "lse"], ["logp"])                                    # [S,N,C]
        mk("Mul", ["logp", "Y1"], ["logp_y"])
        mk("ReduceSum", ["logp_y", "ax12"], ["loglik"], keepdims=0)           # [S]
        mk("Div", ["ez", "sez"], ["softmax"])
        mk("Sub", ["Y1", "softmax"], ["dz_raw"])
    else:
        y = np.asarray(y, np.float32).reshape(n, -1)
        sigma = float(noise_sigma)
        const = y.size * (-np.log(sigma) - 0.5 * np.log(2 * np.pi))
        inits += [_f32("Y", y), _f32("inv_sigma", 1.0 / sigma), _f32("neg_half", -0.5), _f32("llconst", const)]
        mk("Sub", ["Y", zl], ["res"])
        mk("Mul", ["res", "inv_sigma"], ["r"])
        mk("Mul", ["r", "r"], ["r2"])
        mk("ReduceSum", ["r2", "ax12"], ["sr2"], keepdims=0)
        mk("Mul", ["sr2", "neg_half"], ["llq"])
        mk("Add", ["llq", "llconst"], ["loglik"])
        mk("Mul", ["r", "inv_sigma"], ["dz_raw"])
    inits += [_f32("inv_temp", 1.0 / float(temperature)), _f32("neg_inv_var", -1.0 / float(prior_scale) ** 2),
              _f32("half", 0.5)]
    mk("Mul", ["dz_raw", "inv_temp"], [f"g{last}"])

    # prior, value
    mk("Mul", ["loglik", "inv_temp"], ["ll_t"])
    mk("Mul", ["theta", "theta"], ["th2"])
    mk("ReduceSum", ["th2", "ax1"], ["sth2"], keepdims=0)
    mk("Mul", ["sth2", "neg_inv_var"], ["lp2"])
    mk("Mul", ["lp2", "half"], ["logprior"])
    mk("Add", ["ll_t", "logprior"], ["log_density"])

    # backward
    parts = []
    for i in reversed(range(len(layers))):
        g = f"g{i}"
        prev = "X" if i == 0 else f"h{i - 1}"
        mk("Transpose", [g], [f"gt{i}"], perm=[0, 2, 1])                     # [S,o,N]
        mk("MatMul", [f"gt{i}", prev], [f"dW{i}"])                           # [S,o,i]
        mk("Reshape", [f"dW{i}", "flat"], [f"dWf{i}"])
        mk("ReduceSum", [g, "ax1"], [f"db{i}"], keepdims=0)                   # [S,o]
        parts = [f"dWf{i}", f"db{i}"] + parts
        if i > 0:
            mk("MatMul", [g, f"W{i}"], [f"gh{i - 1}"])                        # [S,N,i]
            # the ReLU mask as a float factor: Where with a broadcast scalar was 3x slower
            mk("Greater", [f"z{i - 1}", "zero"], [f"act{i - 1}"])
            mk("Cast", [f"act{i - 1}"], [f"mask{i - 1}"], to=TensorProto.FLOAT)
            mk("Mul", [f"gh{i - 1}", f"mask{i - 1}"], [f"g{i - 1}"])
    mk("Concat", parts, ["gl"], axis=1)
    mk("Mul", ["theta", "neg_inv_var"], ["gprior"])
    mk("Add", ["gl", "gprior"], ["grad"])

    graph = helper.make_graph(
        nodes, "postflow_posterior",
        [helper.make_tensor_value_info("theta", TensorProto.FLOAT, ["S", d])],
        [helper.make_tensor_value_info("log_density", TensorProto.FLOAT, ["S"]),
         helper.make_tensor_value_info("grad", TensorProto.FLOAT, ["S", d])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="train.posterior_graph")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def of_pipeline(cfg, data, noise_sigma, sizes):
    """(ModelProto, the JAX log-density θ [D] -> scalar) of the pipeline's posterior."""
    x, y = standardized(data, "train")
    task = cfg["data"]["task"]
    temperature, prior_scale = cfg["likelihood"]["temperature"], cfg["posterior"]["prior_scale"]
    model = build(task, x, y, sizes, float(noise_sigma), temperature, prior_scale)
    return model, refine.log_posterior(task, x, y, sizes, float(noise_sigma), temperature, prior_scale)


def jax_value_and_grad(logdensity):
    """The batched JAX reference: θ [S,D] -> (log_density [S], grad [S,D]), jitted."""
    return jax.jit(jax.vmap(jax.value_and_grad(logdensity)))


def parity(model, logdensity, thetas, tol):
    """Max-abs error relative to the largest JAX magnitude, per output; raises above `tol`."""
    from .export import parity as graph_parity
    return graph_parity(model, jax_value_and_grad(logdensity), [thetas], "posterior", tol)


def timing(model, logdensity, thetas, reps=20):
    """Seconds per call, median of `reps`: ONNX Runtime (CPU) and jitted JAX on θ [S,D]."""
    from .export import session
    sess = session(model.SerializeToString())
    feed = {"theta": np.asarray(thetas, np.float32)}
    f = jax_value_and_grad(logdensity)
    th = jnp.asarray(thetas, jnp.float32)
    jax.block_until_ready(f(th))
    sess.run(None, feed)
    ort_t, jax_t = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ort_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(f(th))
        jax_t.append(time.perf_counter() - t0)
    return {"ort_s": float(np.median(ort_t)), "jax_s": float(np.median(jax_t)), "S": int(len(thetas))}
