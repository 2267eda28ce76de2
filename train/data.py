"""Datasets: scikit-learn loaders and generators, or a built-in 1-D regression with a gap.
Returns raw features plus the standardization statistics that net.onnx folds in."""

import importlib

import numpy as np
from sklearn.model_selection import train_test_split


def gap1d(n_samples=160, noise=0.1, random_state=0):
    """y = sin(2x) + 0.3x + noise on two clusters x in [-3,-1] U [1,3]: the gap in the middle
    is where epistemic uncertainty should grow."""
    rng = np.random.default_rng(random_state)
    half = n_samples // 2
    x = np.concatenate([rng.uniform(-3, -1, half), rng.uniform(1, 3, n_samples - half)])
    y = np.sin(2 * x) + 0.3 * x + noise * rng.standard_normal(n_samples)
    return x[:, None], y


def _load_source(source: str, args: dict, seed: int):
    kind, _, name = source.partition(":")
    if kind == "builtin":
        if name != "gap1d":
            raise ValueError(f"unknown builtin dataset {name!r}")
        args = {"random_state": seed, **args}
        x, y = gap1d(**args)
        return x, y, ["x"], None
    if kind != "sklearn":
        raise ValueError(f"unknown data source {source!r}")
    fn = getattr(importlib.import_module("sklearn.datasets"), name)
    if name.startswith("load_"):
        bunch = fn(**args)
        names = list(getattr(bunch, "feature_names", None) or [])
        classes = getattr(bunch, "target_names", None)
        return bunch.data, bunch.target, names, classes
    # generators take a random_state; seed it from the config unless given
    args = {"random_state": seed, **args}
    x, y = fn(**args)
    return x, y, [], None


def load(cfg: dict) -> dict:
    dcfg, seed = cfg["data"], cfg["seed"]
    x, y, feature_names, class_names = _load_source(dcfg["source"], dcfg["args"], seed)
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        x = x[:, None]
    classification = dcfg["task"] == "classification"
    if classification:
        y = np.asarray(y).astype(np.int64)
        classes = int(y.max()) + 1
        if class_names is None or len(class_names) != classes:
            class_names = [str(c) for c in range(classes)]
        class_names = [str(c) for c in class_names]
    else:
        y = np.asarray(y, np.float64)
        if y.ndim == 1:
            y = y[:, None]
    if not feature_names or len(feature_names) != x.shape[1]:
        feature_names = [f"x{i}" for i in range(x.shape[1])]

    x_tr, x_ev, y_tr, y_ev = train_test_split(
        x, y, test_size=dcfg["eval_fraction"], random_state=seed,
        stratify=y if classification else None,
    )
    if dcfg["max_train"]:
        x_tr, y_tr = x_tr[: dcfg["max_train"]], y_tr[: dcfg["max_train"]]

    x_mean = x_tr.mean(0)
    x_std = x_tr.std(0)
    x_std = np.where(x_std > 1e-8, x_std, 1.0)  # constant features (digit borders) pass as 0
    out = {
        "x_train": x_tr.astype(np.float32), "x_eval": x_ev.astype(np.float32),
        "x_mean": x_mean.astype(np.float32), "x_std": x_std.astype(np.float32),
        "feature_names": np.array(feature_names),
    }
    if classification:
        out.update(y_train=y_tr, y_eval=y_ev, class_names=np.array(class_names))
        out["y_mean"] = np.zeros(1, np.float32)
        out["y_std"] = np.ones(1, np.float32)
    else:
        y_mean, y_std = y_tr.mean(0), y_tr.std(0)
        out.update(y_train=y_tr.astype(np.float32), y_eval=y_ev.astype(np.float32),
                   y_mean=y_mean.astype(np.float32), y_std=y_std.astype(np.float32))
    return out


def n_outputs(cfg: dict, data: dict) -> int:
    if cfg["data"]["task"] == "classification":
        return len(data["class_names"])
    return data["y_train"].shape[1]


def standardized(data: dict, split: str):
    """Network-space inputs/targets: what the likelihood sees during training."""
    x = (data[f"x_{split}"] - data["x_mean"]) / data["x_std"]
    y = data[f"y_{split}"]
    if y.dtype != np.int64:
        y = (y - data["y_mean"]) / data["y_std"]
    return x.astype(np.float32), y
