"""Model card (models/NAME/README.md) rendered from the stage reports."""

CLS_COLS = ["accuracy", "nll", "ece", "brier", "agreement", "tv"]
REG_COLS = ["rmse", "nll", "coverage90"]
METHOD_NOTES = {
    "flow": "flow BMA (JAX sampler, default solver)",
    "hmc": "HMC BMA, held-out chain (`eval.hmc_*`)",
    "map": "MAP net (`reference.theta`)",
    "ensemble": "deep ensemble of the chains' start nets",
    "gaussian": "Gaussian around MAP, posterior per-coordinate sd",
    "pair_midpoints": "mid-points of training-sample pairs",
}


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(methods, cols):
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, row in methods.items():
        lines.append(f"| {METHOD_NOTES.get(m, m)} | " + " | ".join(_fmt(row.get(c, "—")) for c in cols) + " |")
    return "\n".join(lines)


def fidelity_checks(methods):
    """The issue-3 targets for classification bundles, evaluated honestly (no tuning)."""
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


def render(ctx, man, figs):
    cfg, rep, data = ctx["cfg"], ctx["reports"], ctx["data"]
    post, ev, fl = rep["posterior"], rep["evaluate"], rep["flow"]
    classification = cfg["data"]["task"] == "classification"
    sizes = ctx["sizes"]
    L = []
    L += [f"# {cfg['name']} — postflow bundle", "", cfg["description"], ""]
    L += ["Rebuild (from the repository root):", "", "```",
          f"nice -n 10 .venv/bin/python -m train build train/configs/{cfg['name']}.toml --out models/{cfg['name']}",
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
          "- whitening: per-coordinate mean and sd of the training samples (`flow.whiten.*`)", ""]
    L += ["## Flow", "",
          f"- velocity MLP {fl['hidden']} (SiLU) on [x, {fl['time_freqs']} sinusoidal time features]; "
          f"coupling `{fl['coupling']}`, σ = {fl['sigma']}; AdamW lr {fl['optimizer']['lr']}, "
          f"{fl['steps']} steps of batch {fl['batch']}, EMA {fl['ema']}",
          f"- trained on {fl['train_samples']} samples; final CFM loss (per coordinate) train "
          f"{fl['final_train_loss']:.4f}, held-out chain (EMA) {fl['final_heldout_loss_ema']:.4f}",
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
        L += ["Targets of issue 3, as measured:", "", fidelity_checks(rm["methods"]), ""]
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
