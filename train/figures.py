"""Model-card figures (PNG): flow training curve; reliability diagram (classification);
entropy and mutual information over the plane (2-D inputs); mean with epistemic and
aleatoric bands (1-D regression); predicted vs true (other regression); weight marginals."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import metrics  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def make(ctx, folder):
    folder.mkdir(parents=True, exist_ok=True)
    cfg, data, ev = ctx["cfg"], ctx["data"], ctx["evaluate"]
    out = {}

    curve = ctx["reports"]["flow"]["curve"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([c["step"] for c in curve], [c["train_loss"] for c in curve], label="train (per coordinate)")
    ax.plot([c["step"] for c in curve], [c["heldout_loss_ema"] for c in curve], label="held-out chain, EMA")
    ax.set_xlabel("step"), ax.set_ylabel("CFM loss"), ax.set_yscale("log"), ax.legend()
    out["flow_loss"] = _save(fig, folder / "flow_loss.png")

    # marginals of the 6 highest-variance weight coordinates: flow vs held-out HMC
    held, flow_th = ctx["canon"]["samples"][-1], ev["flow_theta"]
    idx = np.argsort(held.var(0))[::-1][:6]
    fig, axes = plt.subplots(2, 3, figsize=(8, 4.5))
    for ax, i in zip(axes.ravel(), idx):
        bins = np.linspace(min(held[:, i].min(), flow_th[:, i].min()), max(held[:, i].max(), flow_th[:, i].max()), 30)
        ax.hist(held[:, i], bins=bins, alpha=0.5, density=True, label="HMC (held out)")
        ax.hist(flow_th[:, i], bins=bins, alpha=0.5, density=True, label="flow")
        ax.set_title(f"θ[{i}]", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    out["marginals"] = _save(fig, folder / "marginals.png")

    st = ctx.get("start_times")
    if st:
        out["start_time_sweep"] = start_time_figure(st, ctx["reports"]["evaluate"]["methods"]["hmc"],
                                                    cfg["data"]["task"] == "classification", folder)

    if cfg["data"]["task"] == "classification":
        y = data["y_eval"]
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for m in ("flow", "hmc", "map"):
            _, acc, conf, count = metrics.reliability(ev[f"probs_{m}"], y)
            keep = count > 0
            ax.plot(conf[keep], acc[keep], "o-", ms=4, label=f"{m} (ECE {metrics.ece(ev[f'probs_{m}'], y):.3f})")
        ax.set_xlabel("confidence (top label)"), ax.set_ylabel("accuracy"), ax.legend()
        ax.set_title("reliability, 15 equal-width bins")
        out["reliability"] = _save(fig, folder / "reliability.png")
        if "grid_entropy_flow" in ev:
            g = ev["grid_x"]
            shape = ev["grid_entropy_flow"].shape
            g0, g1 = g[:, 0].reshape(shape), g[:, 1].reshape(shape)
            fig, axes = plt.subplots(2, 2, figsize=(9, 8))
            for row, m in enumerate(("flow", "hmc")):
                for col, (q, title) in enumerate(((f"grid_entropy_{m}", "predictive entropy"),
                                                  (f"grid_mi_{m}", "mutual information"))):
                    ax = axes[row, col]
                    cs = ax.contourf(g0, g1, ev[q], levels=20, cmap="viridis")
                    fig.colorbar(cs, ax=ax)
                    ax.scatter(*data["x_train"].T, c=data["y_train"], cmap="coolwarm", s=6, edgecolors="k", linewidths=0.2)
                    ax.set_title(f"{m.upper() if m == 'hmc' else 'flow'}: {title}")
            out["uncertainty_plane"] = _save(fig, folder / "uncertainty_plane.png")
    else:
        sigma = float(ev["noise_sigma_raw"][0])
        if "grid_mean_flow" in ev:
            g = ev["grid_x"][:, 0]
            fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
            for ax, m in zip(axes, ("flow", "hmc")):
                mu, epi = ev[f"grid_mean_{m}"], np.sqrt(ev[f"grid_epi_var_{m}"])
                tot = np.sqrt(ev[f"grid_epi_var_{m}"] + sigma**2)
                ax.fill_between(g, mu - 2 * tot, mu + 2 * tot, alpha=0.2, color="C1", label="±2 sd total (aleatoric + epistemic)")
                ax.fill_between(g, mu - 2 * epi, mu + 2 * epi, alpha=0.4, color="C0", label="±2 sd epistemic")
                ax.plot(g, mu, "C0", label="predictive mean")
                ax.scatter(data["x_train"][:, 0], data["y_train"][:, 0], s=6, c="k", label="train")
                ax.set_title("flow BMA" if m == "flow" else "HMC BMA (held-out chain)")
                ax.set_xlabel("x")
            axes[0].legend(fontsize=7)
            out["bands"] = _save(fig, folder / "bands.png")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
            y = data["y_eval"][:, 0]
            for ax, m in zip(axes, ("flow", "hmc")):
                if m == "hmc":
                    mu, sd = ev["hmc_mean"][:, 0], np.sqrt(ev["hmc_var"][:, 0])
                else:
                    th = ev["flow_theta"]
                    from .export import run_net
                    o = run_net((ctx["work"] / "graphs" / "net.onnx").read_bytes(), data["x_eval"], th)
                    mu, var = metrics.bma_gaussian(o, sigma)
                    mu, sd = mu[:, 0], np.sqrt(var[:, 0])
                ax.errorbar(y, mu, yerr=1.645 * sd, fmt="o", ms=3, alpha=0.5, elinewidth=0.7)
                lo, hi = y.min(), y.max()
                ax.plot([lo, hi], [lo, hi], "k:")
                ax.set_xlabel("true"), ax.set_title(f"{'flow' if m == 'flow' else 'HMC'}: mean ± 90% interval")
            axes[0].set_ylabel("predicted")
            out["predicted_vs_true"] = _save(fig, folder / "predicted_vs_true.png")
    return out


def start_time_figure(st, hmc, classification, folder):
    """TV (regression: NLL) against the memorization ratio, one point per start time t₀."""
    rows = st["sweep"]
    mem = [r["memorization_ratio"] for r in rows]
    val = [r["tv"] if classification else r["nll"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(mem, val, "o-", color="C0")
    for r, x, y in zip(rows, mem, val):
        label = f"t₀={r['start_time']:g}" + (" (default)" if r["start_time"] == st["default_start_time"] else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if r["start_time"] == st["default_start_time"]:
            ax.plot([x], [y], "*", ms=14, color="C3")
    ax.axvline(1.0, color="k", ls=":", lw=1, label="held-out HMC draws (ratio 1)")
    ax.set_xlim(-0.05, 1.2 * max(1.0, max(mem)))
    if classification:
        ax.axhline(0.05, color="C2", ls="--", lw=1, label="target TV ≤ 0.05")
        ax.set_ylabel("TV to HMC predictive (eval)")
    else:
        ax.axhline(hmc["nll"], color="k", ls="-", lw=0.8, label=f"HMC NLL {hmc['nll']:.3f}")
        ax.axhline(hmc["nll"] + 0.05, color="C2", ls="--", lw=1, label="HMC NLL + 0.05")
        ax.set_ylabel("NLL (eval)")
    ax.set_xlabel("memorization ratio (nearest stored draw, samples / HMC)")
    ax.set_title("start time t₀: fidelity against memorization")
    ax.legend(fontsize=7)
    return _save(fig, folder / "start_time_sweep.png")
