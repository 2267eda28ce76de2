"""Model card (models/NAME/README.md) rendered from the stage reports."""

from pathlib import Path

from . import sphere

CLS_COLS = ["accuracy", "nll", "ece", "brier", "agreement", "tv"]
REG_COLS = ["rmse", "nll", "coverage90"]
METHOD_NOTES = {
    "flow": "flow BMA, fresh samples (t₀ = 0; JAX sampler, the evaluation solver)",
    "hmc": "HMC BMA, held-out chain (`eval.hmc_*`)",
    "map": "MAP net (`reference.theta`)",
    "ensemble": "deep ensemble of the chains' start nets",
    "gaussian": "Gaussian around MAP, posterior per-coordinate sd",
    "pair_midpoints": "mid-points of training-sample pairs",
}


WEIGHT_STORAGE = {
    "f16": "rounded to float16 after training (`flow.weight_dtype = \"f16\"`) and stored as f16 in the flow "
           "graphs; every evaluation here uses the rounded weights",
    "f32": "float32, as trained (`flow.weight_dtype = \"f32\"`)",
}


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(methods, cols):
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in methods.items():
        lines.append(f"| {METHOD_NOTES.get(m, m)} | " + " | ".join(_fmt(row.get(c, "—")) for c in cols) + " |")
    return "\n".join(lines)


def fidelity_checks(methods):
    """The project's original fidelity targets for classification bundles, on the plain flow's
    row (t₀ = 0), evaluated honestly (no tuning)."""
    f, h, m = methods["flow"], methods["hmc"], methods["map"]
    rows = [
        ("agreement with HMC ≥ 0.97", f["agreement"], f["agreement"] >= 0.97),
        ("total variation to HMC ≤ 0.05", f["tv"], f["tv"] <= 0.05),
        ("abs(NLL − NLL_HMC) ≤ 0.02", abs(f["nll"] - h["nll"]), abs(f["nll"] - h["nll"]) <= 0.02),
        ("abs(ECE − ECE_HMC) ≤ 0.01", abs(f["ece"] - h["ece"]), abs(f["ece"] - h["ece"]) <= 0.01),
        ("NLL below MAP's", f["nll"] - m["nll"], f["nll"] < m["nll"]),
    ]
    lines = ["| target | value | met |", "|---|---|---|"]
    lines += [f"| {name} | {v:.4f} | {'yes' if ok else '**no**'} |" for name, v, ok in rows]
    return "\n".join(lines)


def start_time_section(ctx, man):
    """Anchors, the f16 cost, the start-time sweep (memorization ratio beside TV) and the
    default start time with the reason it was chosen."""
    st = ctx.get("start_times")
    if not st:
        return []
    classification = ctx["cfg"]["data"]["task"] == "classification"
    info, err = st["info"], st["info"]["error"]
    hmc = ctx["reports"]["evaluate"]["methods"]["hmc"]
    L = ["## Start time: fresh flow samples or stored draws", "",
         f"The bundle stores {info['count']} of the flow's {info['training_draws']} training draws "
         + (f"(every {info['thin_every']}th draw across the training chains, as many as the "
            f"{info['max_bytes'] / 1e6:.0f} MB bundle budget allows)" if info["thin_every"] > 1 else "(all of them)")
         + f" as `flow.anchors`, in whitened "
         f"coordinates, {info['dtype']} ({info['bytes'] / 1e6:.2f} MB). Storing them as {info['dtype']} moves a "
         f"whitened coordinate by at most {err['max_abs_whitened']:.2e} (largest |x| {err['max_abs_whitened_value']:.1f}) "
         f"and a weight by at most {err['max_abs_theta']:.2e} after un-whitening "
         f"({err['max_abs_theta_vs_draws']:.2e} against the draws themselves).", "",
         "BMA over all stored draws (start time 1) against HMC: the stored anchors, the same anchors in f32, and "
         "all training draws:", ""]
    cols = ["tv", "nll", "ece", "agreement"] if classification else ["nll", "rmse", "coverage90"]
    names = {"stored": f"stored anchors ({info['dtype']}, {info['count']})", "f32": f"same anchors, f32",
             "all_training_draws": f"all {info['training_draws']} training draws"}
    L += ["| draws | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    L += [f"| {names[k]} | " + " | ".join(f"{v[c]:.5f}" for c in cols) + " |" for k, v in info["t1_bma"].items()]
    from .evaluate import start_time_failures
    epi_name = "mutual information" if classification else "epistemic variance"
    start = ("slerp(z, a; t₀) on each sphere (z uniform) and t₀·a + (1 − t₀)·z on the Euclidean coordinates"
             if ctx["reports"]["flow"].get("geometry") == sphere.NAME else "t₀·a + (1 − t₀)·z")
    L += ["", f"Sampling at start time t₀ starts from {start} around a uniformly chosen stored draw a "
          "and integrates the flow from t₀ to 1: t₀ = 0 is the plain flow, t₀ = 1 returns the stored draws "
          "themselves. Each row: "
          f"{man['reference_metrics']['flow_samples']} samples, seed {man['reference_metrics']['seed']}, "
          f"{man['reference_metrics']['solver']['method']} with {man['reference_metrics']['solver']['steps']} steps "
          "spread over [t₀, 1]. The **memorization ratio** is the median distance (whitened) from each sample "
          "to its nearest stored draw, divided by the same for the held-out HMC chain: about 1 for draws as new "
          "as HMC's, 0 for copies. The **epistemic ratio** is the mean " + epi_name + " of the samples' "
          "predictive divided by the held-out chain's, on the eval inputs and on OOD inputs (`eval.ood_x`: each "
          "feature uniform in the training mean ± 4 sd" + (", plus noise and shuffled-pixel images" if
          ctx["cfg"]["evaluate"]["ood"] and classification else "") + f"; HMC's {epi_name}: eval "
          f"{st['hmc_epistemic']['eval']:.4g}, OOD {st['hmc_epistemic']['ood']:.4g}).", ""]
    head = (["t₀", "TV", "memorization ratio", "NLL", "ECE", "agreement"] if classification
            else ["t₀", "NLL", "memorization ratio", "RMSE", "coverage90"])
    head += ["epistemic ratio (eval)", "epistemic ratio (OOD)", "meets the rule"]
    L += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in st["sweep"]:
        vals = ([r["tv"], r["memorization_ratio"], r["nll"], r["ece"], r["agreement"]] if classification
                else [r["nll"], r["memorization_ratio"], r["rmse"], r["coverage90"]])
        vals += [r["epistemic_ratio_eval"], r["epistemic_ratio_ood"]]
        ok = not start_time_failures(r, hmc, classification, st.get("rule_ece", False))
        t0 = f"**{r['start_time']:g}** (default)" if r["start_time"] == st["default_start_time"] else f"{r['start_time']:g}"
        L.append(f"| {t0} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {'yes' if ok else 'no'} |")
    hmc_line = (f"HMC (held-out chain): NLL {hmc['nll']:.4f}, ECE {hmc['ece']:.4f}" if classification
                else f"HMC (held-out chain): NLL {hmc['nll']:.4f}, RMSE {hmc['rmse']:.4f}, coverage90 {hmc['coverage90']:.4f}")
    default = next(r for r in st["sweep"] if r["start_time"] == st["default_start_time"]) if any(
        r["start_time"] == st["default_start_time"] for r in st["sweep"]) else None
    L += ["", hmc_line + ".", "",
          f"**Default start time (`flow.default_start_time`): {st['default_start_time']:g}**, the smallest swept "
          f"t₀ that meets {st['rule']} (0 if the plain flow does, 1 if no start time does). Why: {st['reason']}.", ""]
    if default is not None:
        L += [f"At the default start time, before refinement, the memorization ratio is {default['memorization_ratio']:.3f}"
              + (f" next to TV {default['tv']:.4f}" if classification else f" next to NLL {default['nll']:.4f}")
              + (": the samples are close copies of stored draws, not new networks. What this bundle gives at "
                 "that setting is, in effect, the HMC model average itself (refinement, below, is what moves "
                 "them)." if default["memorization_ratio"] < 0.5 else "."), ""]
    return L


def refine_section(ctx):
    """Refinement (format versions 3-4): the sweep over the number of HMC transitions and the default."""
    rf = ctx.get("refine")
    if not rf:
        return []
    from .evaluate import start_time_failures
    classification = ctx["cfg"]["data"]["task"] == "classification"
    hmc = ctx["reports"]["evaluate"]["methods"]["hmc"]
    ece = ctx["cfg"]["bundle"]["start_time_rule_ece"]
    L = ["## Refinement: K exact HMC transitions on every sample", "",
         f"The bundle carries the posterior's log-density (`posterior.onnx`, checked against JAX: "
         f"relative error {rf['parity']['log_density']:.1e} value, {rf['parity']['grad']:.1e} gradient). The runtime "
         f"rescales each sample to its anchor's unit scales and runs K HMC transitions of {rf['leapfrog_steps']} "
         f"leapfrog steps of size {rf['step_size']:.4g} (pilot acceptance {rf['pilot_acceptance']:.3f} from the "
         f"stored draws; NUTS's step {rf['nuts_step_size']:.4g}) with the draws' variance as inverse mass, then "
         f"canonicalizes. An exact kernel keeps posterior draws posterior draws, so K trades the copies' "
         f"memorization for gradient evaluations (K × {rf['leapfrog_steps']} per sample). Rows: the samples at "
         f"refinement's start time (`refine.start_time`) {rf['start_time']:g}"
         + (" (the stored draws themselves: exact posterior draws in, exact posterior draws out)"
            if rf["start_time"] == 1 else "")
         + ", scored like the start-time sweep. The memorization ratio is a median, and it does not see "
         "copies: **at a stored draw** is the share of samples within 1 % of the held-out chain's median distance "
         "of a stored draw, the stored draws unchanged (an endpoint HMC transition that is rejected keeps its "
         "start), and **mean ratio** the mean of the per-sample ratios, which counts them. The runtime's "
         "multinomial kernel (`--refine-kernel multinomial`) moves nearly every sample (docs/fidelity.md).", ""]
    head = (["K", "TV", "memorization ratio", "mean ratio", "at a stored draw", "NLL", "ECE", "agreement"]
            if classification else ["K", "NLL", "memorization ratio", "mean ratio", "at a stored draw", "RMSE",
                                    "coverage90"])
    head += ["epistemic ratio (eval)", "epistemic ratio (OOD)", "meets the rule"]
    L += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rf["sweep"]:
        # rows of bundles built before the copies columns lack them: NaN
        copies = [r.get("memorization_ratio_mean", float("nan")), r.get("at_stored_draws", float("nan"))]
        vals = ([r["tv"], r["memorization_ratio"], *copies, r["nll"], r["ece"], r["agreement"]] if classification
                else [r["nll"], r["memorization_ratio"], *copies, r["rmse"], r["coverage90"]])
        vals += [r["epistemic_ratio_eval"], r["epistemic_ratio_ood"]]
        ok = not start_time_failures(r, hmc, classification, ece)
        k = f"**{r['transitions']}** (default)" if r["transitions"] == rf["default_transitions"] else f"{r['transitions']}"
        L.append(f"| {k} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {'yes' if ok else 'no'} |")
    L += ["", f"**Default transitions (`refine.default_transitions`): {rf['default_transitions']}**. Rule: "
          f"{rf['rule']}. Why: {rf['reason']}.", ""]
    return L


def solver_section(ctx, man):
    """The Euler/RK4 sweep and the default solver it chose (train/solver_choice.py)."""
    sc = ctx.get("solver_choice")
    if not sc:
        return []
    classification = ctx["cfg"]["data"]["task"] == "classification"
    key = "tv" if classification else "nll"
    epi = "mutual information" if classification else "epistemic variance"
    L = ["## Solver: cost against fidelity", "",
         f"The flow sampled with Euler and RK4 at each step count, at t₀ = 0 and at the default start time "
         f"when it integrates ({man['reference_metrics']['flow_samples']} samples, seed "
         f"{man['reference_metrics']['seed']}, the same noise and anchors in every row, so rows differ only by "
         f"the solver). Cost is field evaluations per sample (Euler: steps, RK4: 4 × steps). Rule: {sc['rule']}.", "",
         f"| t₀ | solver | steps | evaluations | {key.upper()} | mean {epi} (eval) | mean abs log q error (nats) "
         "| within tolerance |", "|---|---|---|---|---|---|---|---|"]
    from .solver_choice import within
    conv = {}
    for r in sc["sweep"]:
        if r["method"] == "rk4":
            prev = conv.get(r["start_time"])
            if prev is None or r["steps"] > prev["steps"]:
                conv[r["start_time"]] = r
    for r in sc["sweep"]:
        ok = within(r, conv[r["start_time"]], key, sc["tolerance"], sc["spread_tolerance"], sc["logq_tolerance"])
        chosen = r["method"] == sc["method"] and r["steps"] == sc["steps"]
        L.append(f"| {r['start_time']:g} | {'**' + r['method'] + '**' if chosen else r['method']} | {r['steps']} | "
                 f"{r['evaluations']} | {r[key]:.4f} | {r['epistemic_eval']:.4g} | {r['log_density_mae']:.3g} | "
                 f"{'yes' if ok else 'no'} |")
    L += ["", f"**Default solver (`flow.default_solver`): {sc['method']} with {sc['steps']} steps.** {sc['reason']}. "
          f"The evaluation above uses {sc['evaluate_solver']['method']} with {sc['evaluate_solver']['steps']} "
          "steps (the pipeline's protocol, `reference_metrics.solver`).", ""]
    return L


def baselines_section(ctx):
    """The honest comparison (train/baselines.py): the flow beside simple samplers built from the
    same training draws, with the spread columns that TV misses."""
    rows = ctx.get("baselines")
    if not rows:
        return []
    classification = ctx["cfg"]["data"]["task"] == "classification"
    cols = ["tv", "nll", "ece", "agreement"] if classification else ["nll", "rmse", "coverage90"]
    head = [c.upper() if c in ("tv", "nll", "ece", "rmse") else c for c in cols]
    head += ["memorization ratio", "epistemic ratio (eval)", "epistemic ratio (OOD)"]
    L = ["## The honest comparison", "",
         "The flow beside samplers built from its own training draws, each scored like the flow against the "
         "held-out HMC chain (train/baselines.py states every row). The memorization ratio here is measured "
         "against all the flow's training draws (the start-time table above uses the stored ones); the "
         "epistemic ratio is the mean " + ("mutual information" if classification else "variance of the means")
         + " over the held-out chain's. A faithful sampler has TV near 0 *and* both ratios near 1.", "",
         "| method | samples | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for r in rows:
        vals = [r[c] for c in cols] + [r["memorization_ratio"], r["epistemic_ratio_eval"], r["epistemic_ratio_ood"]]
        L.append(f"| {r['method']} | {r['count']} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return L + [""]


def geometry_line(fl):
    """Where the flow lives (`flow.geometry`), from the flow stage's report."""
    if fl.get("geometry") == sphere.NAME:
        return (f"- geometry: `sphere_product`, the canonical slice {fl['spheres'].removeprefix('Geometry(')[:-1]}: "
                "uniform base on each sphere and N(0, I) on the Euclidean coordinates, slerp paths, minibatch OT "
                "under the geodesic cost; the runtime projects the field onto the tangent spaces and retracts "
                "every solver stage, and log-densities are relative to surface × Lebesgue measure")
    return ("- geometry: `euclidean`, R^D with a standard normal base, straight-line paths; log-densities are "
            "relative to Lebesgue measure on R^D")


def rebuild_config(ctx, name):
    """The config path of the card's rebuild command: relative to the repository root when the
    build's config lies inside it (the shipped bundles: train/configs/NAME.toml), else absolute."""
    path = ctx.get("config_path")
    if path is None:
        return f"train/configs/{name}.toml"
    root = Path(__file__).resolve().parents[1]
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def render(ctx, man, figs):
    cfg, rep, data = ctx["cfg"], ctx["reports"], ctx["data"]
    post, ev, fl = rep["posterior"], rep["evaluate"], rep["flow"]
    classification = cfg["data"]["task"] == "classification"
    sizes = ctx["sizes"]
    sphere_geometry = fl.get("geometry") == sphere.NAME
    L = []
    L += [f"# {cfg['name']} — postflow bundle", "", cfg["description"], ""]
    L += ["Rebuild (from the repository root):", "", "```",
          f"nice -n 10 .venv/bin/python -m train build {rebuild_config(ctx, cfg['name'])} --out models/{cfg['name']}",
          "```", ""]
    L += ["## Data", "",
          f"- source: `{cfg['data']['source']}` {cfg['data']['args'] or ''}; task: {cfg['data']['task']}",
          f"- split: {len(data['x_train'])} train / {len(data['x_eval'])} eval (eval fraction "
          f"{cfg['data']['eval_fraction']}, seed {cfg['seed']}{', stratified' if classification else ''})",
          "- features are standardized with the training split's mean and sd; the standardization is inside "
          "`net.onnx`, so callers pass raw features", ""]
    L += ["## Network", "",
          f"- MLP {'-'.join(map(str, sizes))}, ReLU hidden layers, D = {man['network']['dim']} weights",
          "- likelihood: " + ("categorical (softmax)" if classification else
                              f"Gaussian, homoscedastic, σ = {man['task']['noise']['sigma']:.4g} (raw units)"),
          f"- prior: N(0, {cfg['posterior']['prior_scale']}²) on every weight; likelihood temperature "
          f"{cfg['likelihood']['temperature']}" + (" (**not 1**)" if cfg["likelihood"]["temperature"] != 1 else ""), ""]
    L += ["## Posterior", ""]
    if post["method"] == "nuts":
        p = cfg["posterior"]
        L += [f"NUTS (blackjax, window adaptation, diagonal mass matrix, target acceptance {p['target_accept']}), "
              f"{p['chains']} chains each started from an independently trained MAP net, {p['warmup']} warm-up + "
              f"{p['draws']} draws per chain, thinned by {p['thin']}. The last chain is held out "
              "(`posterior.theta`, `eval.hmc_*`); the others train the flow.", "",
              "| chain | acceptance | divergences | step size | mean leapfrog steps | seconds |", "|---|---|---|---|---|---|"]
        for i, c in enumerate(post["chains"]):
            L.append(f"| {i}{' (held out)' if i == len(post['chains']) - 1 else ''} | {c['acceptance']:.3f} | "
                     f"{c['divergences']} | {c['step_size']:.4g} | {c['mean_leapfrog_steps']:.0f} | {c['seconds']} |")
    else:
        L += [f"Ensemble posterior: {cfg['posterior']['ensemble_size']} independently trained MAP nets "
              f"(vmapped), grouped in {cfg['posterior']['chains']} blocks; the last block is held out."]
    r = post["predictive_split_rhat"]
    L += ["", f"Split-R̂ of the predictive on the eval points (over all chains): max {r['max']:.3f}, "
          f"mean {r['mean']:.4f}, fraction > 1.1: {r['frac_above_1.1']:.3f}.", ""]
    a = rep["align"]
    L += ["## Alignment, canonicalization, whitening", "",
          f"- alignment `{a['method']}` to the MAP reference: mean distance "
          f"{a['mean_distance_to_reference']['before']:.3f} → {a['mean_distance_to_reference']['after']:.3f}; "
          f"mid-point training-loss barrier {a['midpoint_loss_barrier']['before']:.4f} → "
          f"{a['midpoint_loss_barrier']['after']:.4f}",
          "- canonicalization: every hidden unit's [incoming weights, bias] scaled to unit norm, outgoing "
          "weights scaled back (exact for ReLU; last layer untouched)",
          "- whitening: per-coordinate mean and sd of the training samples (`flow.whiten.*`)"
          + ("; the identity (mean 0, sd 1) on sphere coordinates" if sphere_geometry else ""), ""]
    fields = {"np": "train/np_field.py", "rt": "train/rt_field.py"}
    L += ["## Flow", "", geometry_line(fl),
          (f"- velocity: {fl['hidden']} ({fields[fl['field']]}), {fl['time_freqs']} sinusoidal time features; "
           if fl.get("field") in fields else
           f"- velocity MLP {fl['hidden']} (SiLU) on [x, {fl['time_freqs']} sinusoidal time features]; ") +
          f"coupling `{fl['coupling']}`, σ = {fl['sigma']}; AdamW lr {fl['optimizer']['lr']}, "
          f"{fl['steps']} steps of batch {fl['batch']}, EMA {fl['ema']}",
          f"- trained on {fl['train_samples']} samples; final CFM loss (per coordinate) train "
          f"{fl['final_train_loss']:.4f}, held-out chain (EMA) {fl['final_heldout_loss_ema']:.4f}",
          f"- weights: {WEIGHT_STORAGE[fl.get('weight_dtype', 'f32')]}",
          f"- ONNX parity vs JAX (relative error): {rep['export']['relative_error']}", ""]
    rm = man["reference_metrics"]
    L += ["## Evaluation", "",
          f"Eval split, n = {rm['n']}; flow: {rm['flow_samples']} samples, solver {rm['solver']['method']} "
          f"with {rm['solver']['steps']} steps, seed {rm['seed']}. Agreement and TV are against HMC BMA.", "",
          table(rm["methods"], CLS_COLS if classification else REG_COLS), ""]
    if "diagnostics" in ev:
        L += ["Diagnostic (not a method): BMA over the mid-points of random pairs of flow-training samples. "
              "Bad mid-points mean the aligned posterior is non-convex in weight space, and a flow whose "
              "samples fall between training samples inherits that gap. Good mid-points do not prove the "
              "converse: a mid-point has half the spread of a posterior sample.", "",
              table(ev["diagnostics"], CLS_COLS if classification else REG_COLS), ""]
    if classification:
        L += ["The plain flow (t₀ = 0) against the project's original fidelity targets:", "",
              fidelity_checks(rm["methods"]), ""]
    L += start_time_section(ctx, man)
    L += refine_section(ctx)
    L += baselines_section(ctx)
    L += solver_section(ctx, man)
    if cfg["card_notes"]:
        L += ["### Notes", "", cfg["card_notes"].strip(), ""]
    mem = ev["memorization"]
    L += ["Memorization: distance from each sample to its nearest flow-training sample (canonical weights): "
          f"flow mean {mem['nearest_train_distance_flow']['mean']:.3f} (median "
          f"{mem['nearest_train_distance_flow']['median']:.3f}) vs held-out HMC mean "
          f"{mem['nearest_train_distance_heldout_hmc']['mean']:.3f} (median "
          f"{mem['nearest_train_distance_heldout_hmc']['median']:.3f}).", "",
          f"Flow log-density (Hutchinson, 1 probe, 32 samples): mean {ev['flow_log_density_hutchinson']['mean']:.1f}, "
          f"sd {ev['flow_log_density_hutchinson']['sd']:.1f}.", ""]
    if "ood" in ev:
        L += ["### Out-of-distribution inputs (AUROC, eval images vs OOD)", "",
              "| method | noise: MI | noise: entropy | shuffled: MI | shuffled: entropy |", "|---|---|---|---|---|"]
        for m, res in ev["ood"].items():
            n, s = res["uniform_noise"], res["shuffled_pixels"]
            L.append(f"| {m} | {_fmt(n.get('auroc_mutual_information', '—'))} | {n['auroc_entropy']:.4f} | "
                     f"{_fmt(s.get('auroc_mutual_information', '—'))} | {s['auroc_entropy']:.4f} |")
        L.append("")
    L += ["## Stage timings (this 2-core machine, seconds)", "",
          "| " + " | ".join(ctx["timings"]) + " | total |", "|---" * (len(ctx["timings"]) + 1) + "|",
          "| " + " | ".join(f"{v:.1f}" for v in ctx["timings"].values()) + f" | {sum(ctx['timings'].values()):.1f} |", ""]
    L += ["## Figures", ""] + [f"![{k}](figures/{v})" for k, v in figs.items()] + [""]
    return "\n".join(L)
