"""Datasets: a CSV file (`csv:PATH`), a NumPy archive (`npz:PATH`, arrays x and y), a
scikit-learn loader (`sklearn:load_iris`, any of `tabular_loaders()`) or generator
(`sklearn:make_moons` with `args`), or a built-in 1-D regression with a gap (`builtin:gap1d`).
Returns raw features plus the standardization statistics that net.onnx folds in.

Bad input is refused with a `DataError` that names the file (or source), line and column."""

import csv
import hashlib
import importlib
import inspect
import math
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split


class DataError(ValueError):
    """Input data the pipeline refuses; the message names the file, line and column."""


def gap1d(n_samples=160, noise=0.1, random_state=0):
    """y = sin(2x) + 0.3x + noise on two clusters x in [-3,-1] U [1,3]: the gap in the middle
    is where epistemic uncertainty should grow."""
    rng = np.random.default_rng(random_state)
    half = n_samples // 2
    x = np.concatenate([rng.uniform(-3, -1, half), rng.uniform(1, 3, n_samples - half)])
    y = np.sin(2 * x) + 0.3 * x + noise * rng.standard_normal(n_samples)
    return x[:, None], y


def tabular_loaders():
    """Every scikit-learn `load_*` that needs no download and no argument and returns a table
    (2-D `data` and a `target`), found by listing sklearn.datasets."""
    mod = importlib.import_module("sklearn.datasets")
    names = []
    for name in sorted(n for n in dir(mod) if n.startswith("load_")):
        fn = getattr(mod, name)
        params = inspect.signature(fn).parameters.values()
        if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in params):
            continue  # needs a path (load_files, load_svmlight_file, load_sample_image)
        bunch = fn()
        if np.ndim(getattr(bunch, "data", None)) == 2 and getattr(bunch, "target", None) is not None:
            names.append(name)
    return names


class Table:
    """Raw features x [N, d] (float64), raw targets y (any dtype, [N] or [N, k]) and how to name
    a row or a cell in error messages."""

    def __init__(self, x, y, feature_names, target_names, where, class_names=None, rows=None,
                 feature_cols=None, target_cols=None):
        self.x, self.y, self.where = x, y, where
        self.feature_names, self.target_names, self.class_names = feature_names, target_names, class_names
        self.rows = rows  # file line of each row (CSV), else None
        self.feature_cols, self.target_cols = feature_cols, target_cols  # 1-based file columns (CSV)

    def row(self, i):
        return f"line {self.rows[i]}" if self.rows is not None else f"row {i}"

    def cell(self, i, j, target=False):
        names, cols = (self.target_names, self.target_cols) if target else (self.feature_names, self.feature_cols)
        col = cols[j] if cols is not None else j
        return f"{self.where}: {self.row(i)}, column {col} ({names[j]!r})"

    def column(self, j=0, target=True):
        names, cols = (self.target_names, self.target_cols) if target else (self.feature_names, self.feature_cols)
        col = cols[j] if cols is not None else j
        return f"{self.where}: column {col} ({names[j]!r})"


def resolve_path(path, base=None) -> Path:
    """A data file path from a config: absolute, or relative to the config file's folder
    (`base`; the current directory when there is none)."""
    p = Path(path).expanduser()
    if p.is_absolute() or base is None:
        return p
    return Path(os.path.normpath(Path(base) / p))


def source_digest(dcfg: dict, base=None) -> str:
    """sha256 of a csv:/npz: source file (so editing the file invalidates the data cache), "" for
    the sources a config fully determines."""
    kind, _, name = dcfg["source"].partition(":")
    if kind not in ("csv", "npz"):
        return ""
    p = resolve_path(name, base)
    if not p.is_file():
        return "missing"
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _targets_list(target):
    if target is None:
        return None
    return [target] if isinstance(target, str) else list(target)


def _read_csv(path: Path, dcfg: dict) -> Table:
    try:
        return _read_csv_rows(path, dcfg)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None


def _read_csv_rows(path: Path, dcfg: dict) -> Table:
    where = str(path)
    targets = _targets_list(dcfg.get("target"))
    if not targets:
        raise DataError(f"{where}: data.target must name the target column of this CSV")
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise DataError(f"{where}: cannot read the file ({e.strerror})") from e
    with f:
        reader = csv.reader(f)
        header = None
        for header in reader:
            if any(c.strip() for c in header):
                break
        if not header or not any(c.strip() for c in header):
            raise DataError(f"{where}: the file is empty (a header row naming the columns is required)")
        header = [c.strip() for c in header]
        hline = reader.line_num
        missing = [t for t in targets if t not in header]
        if missing:
            named = [c for c in header if c]
            if sum(map(_is_number, named)) > len(named) / 2:  # data, not names (a text label column is no name)
                raise DataError(f"{where}: line {hline}: the first row has no column names; a header row "
                                f"naming the columns is required (data.target = {missing[0]!r})")
            raise DataError(f"{where}: line {hline}: no target column {missing[0]!r} in the header "
                            f"(columns: {', '.join(header)})")
        dup = sorted({c for c in header if c and header.count(c) > 1})  # unnamed columns: below
        if dup:
            raise DataError(f"{where}: line {hline}: column {dup[0]!r} appears more than once in the header")
        features = dcfg.get("features")
        if features:
            absent = [c for c in features if c not in header]
            if absent:
                raise DataError(f"{where}: line {hline}: no feature column {absent[0]!r} in the header "
                                f"(columns: {', '.join(header)})")
            both = [c for c in features if c in targets]
            if both:
                raise DataError(f"{where}: column {both[0]!r} is both a feature and the target")
        else:
            features = [c for c in header if c not in targets]
        if not features:
            raise DataError(f"{where}: line {hline}: no feature columns besides the target {targets[0]!r}")
        if "" in features:  # a trailing comma on every line makes an empty last column
            k = header.index("")
            raise DataError(f"{where}: line {hline}, column {k + 1}: the column has no name in the header "
                            "(a trailing comma?); name it, or choose the columns with data.features")
        fidx = [header.index(c) for c in features]
        tidx = [header.index(c) for c in targets]
        regression = dcfg["task"] == "regression"
        xs, ys, lines = [], [], []
        for row in reader:
            if not any(c.strip() for c in row):
                continue  # blank line
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(f"{where}: line {line}: {len(row)} fields, but the header (line {hline}) has "
                                f"{len(header)}: ragged rows")
            xs.append([_cell_float(row[k], where, line, k, header[k], "feature") for k in fidx])
            if regression:
                ys.append([_cell_float(row[k], where, line, k, header[k], "target") for k in tidx])
            else:
                label = row[tidx[0]].strip()
                if not label:
                    raise DataError(f"{where}: line {line}, column {tidx[0] + 1} ({header[tidx[0]]!r}): "
                                    f"empty class label")
                ys.append(label)
            lines.append(line)
    if not xs:
        raise DataError(f"{where}: no data rows after the header (line {hline})")
    x = np.array(xs, np.float64).reshape(len(xs), len(fidx))
    y = np.array(ys, np.float64).reshape(len(ys), len(tidx)) if regression else np.array(ys, dtype=object)
    return Table(x, y, features, targets, where, rows=lines,
                 feature_cols=[k + 1 for k in fidx], target_cols=[k + 1 for k in tidx])


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def _cell_float(cell, where, line, k, name, what):
    s = cell.strip()
    try:
        v = float(s)
    except ValueError:
        shown = repr(cell) if s else "an empty cell"
        raise DataError(f"{where}: line {line}, column {k + 1} ({name!r}): {shown} is not a number "
                        f"(non-numeric {what})") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: line {line}, column {k + 1} ({name!r}): {s} is not a finite number "
                        f"(NaN or inf {what})")
    return v


def _read_npz(path: Path, dcfg: dict) -> Table:
    where = str(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot read the archive ({e})") from e
    with z:
        for k in ("x", "y"):
            if k not in z.files:
                raise DataError(f"{where}: no array {k!r} (arrays: {', '.join(z.files) or 'none'}); "
                                "npz: sources hold the features as x [N, d] and the targets as y [N]")
        x, y = z["x"], z["y"]
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise DataError(f"{where}: x has shape {x.shape}; expected [rows, features]")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: x has dtype {x.dtype}; features must be numeric (non-numeric feature)")
    if len(y) != len(x):
        raise DataError(f"{where}: x has {len(x)} rows but y has {len(y)}")
    names = [f"x{i}" for i in range(x.shape[1])]
    tnames = ["y"] if y.ndim == 1 else [f"y{i}" for i in range(y.shape[1])]
    return Table(x.astype(np.float64), y, names, tnames, where)


def _read_sklearn(name: str, dcfg: dict, seed: int) -> Table:
    where = f"sklearn:{name}"
    mod = importlib.import_module("sklearn.datasets")
    fn = getattr(mod, name, None)
    if fn is None or not (name.startswith("load_") or name.startswith("make_")):
        raise DataError(f"{where}: no such scikit-learn loader or generator "
                        f"(tabular loaders: {', '.join(tabular_loaders())})")
    args = dcfg["args"]
    if name.startswith("load_"):
        bunch = fn(**args)
        if np.ndim(getattr(bunch, "data", None)) != 2 or getattr(bunch, "target", None) is None:
            raise DataError(f"{where}: not a table with a target (tabular loaders: {', '.join(tabular_loaders())})")
        x, y = bunch.data, bunch.target
        fn_ = getattr(bunch, "feature_names", None)  # a list or an array, depending on the loader
        names = [] if fn_ is None else [str(n) for n in fn_]
        tn = getattr(bunch, "target_names", None)
        tn = None if tn is None else [str(t) for t in tn]
        y2 = np.asarray(y)
        if y2.ndim == 2:  # multi-output (load_linnerud): target_names name the outputs
            return _select_targets(Table(np.asarray(x, np.float64), y2, names, tn or [f"y{i}" for i in range(y2.shape[1])],
                                         where), dcfg)
        return Table(x, y, names, ["target"], where, class_names=tn)
    # generators take a random_state; seed it from the config unless given
    x, y = fn(**{"random_state": seed, **args})
    return Table(x, y, [], ["target"], where)


def _select_targets(tab: Table, dcfg: dict) -> Table:
    """A source with several target columns: keep those named by data.target (default all)."""
    targets = _targets_list(dcfg.get("target"))
    if targets is None:
        return tab
    missing = [t for t in targets if t not in tab.target_names]
    if missing:
        raise DataError(f"{tab.where}: no target {missing[0]!r} (targets: {', '.join(tab.target_names)})")
    idx = [tab.target_names.index(t) for t in targets]
    tab.y, tab.target_names = tab.y[:, idx], targets
    return tab


def _load_source(dcfg: dict, seed: int, base=None) -> Table:
    source = dcfg["source"]
    kind, _, name = source.partition(":")
    if kind == "builtin":
        if name != "gap1d":
            raise DataError(f"unknown builtin dataset {name!r} (builtin:gap1d)")
        x, y = gap1d(**{"random_state": seed, **dcfg["args"]})
        return Table(x, y, ["x"], ["y"], source)
    if kind == "sklearn":
        return _read_sklearn(name, dcfg, seed)
    if kind in ("csv", "npz"):
        path = resolve_path(name, base)
        if not path.is_file():
            raise DataError(f"{path}: no such file (data.source = {source!r})")
        return _read_csv(path, dcfg) if kind == "csv" else _select_targets(_read_npz(path, dcfg), dcfg)
    raise DataError(f"unknown data source {source!r} (csv:PATH, npz:PATH, sklearn:NAME, builtin:gap1d)")


def _check_finite(tab: Table):
    bad = ~np.isfinite(tab.x)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"{tab.cell(i, j)}: {tab.x[i, j]} is not a finite number (NaN or inf feature)")


def _class_indices(tab: Table):
    """Class labels of any type -> indices 0..C-1 (sorted labels; numerically when all labels are
    numbers) and the class names."""
    y = np.asarray(tab.y)
    if y.ndim == 2:
        if y.shape[1] != 1:
            raise DataError(f"{tab.where}: {y.shape[1]} target columns ({', '.join(tab.target_names)}): "
                            "classification takes one; choose it with data.target, or use task = \"regression\"")
        y = y[:, 0]
    if y.dtype == object or y.dtype.kind in "US":
        labels = [str(v) for v in y]
        if all(_is_number(v) for v in labels):
            nums = np.array([float(v) for v in labels])
            bad = ~np.isfinite(nums)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"{tab.cell(i, 0, target=True)}: {labels[i]} is not a finite number "
                                "(NaN or inf class label)")
            uniq = np.unique(nums)
            inv = np.searchsorted(uniq, nums)
            first = {u: labels[int(np.argmax(nums == u))] for u in uniq}
            names = [first[u] for u in uniq]
            if not np.all(uniq == np.round(uniq)) and len(uniq) > 20:
                raise DataError(f"{tab.column()}: {len(uniq)} distinct non-integer values look continuous; "
                                "use task = \"regression\"")
        else:
            # text labels may still hold a "NaN" or "inf": a missing value, never a class
            bad = [i for i, v in enumerate(labels) if _is_number(v) and not math.isfinite(float(v))]
            if bad:
                i = bad[0]
                raise DataError(f"{tab.cell(i, 0, target=True)}: {labels[i]} is not a finite number "
                                "(NaN or inf class label)")
            uniq, inv = np.unique(np.array(labels, dtype=object).astype(str), return_inverse=True)
            names = [str(u) for u in uniq]
        return inv.astype(np.int64), names
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{tab.where}: {tab.row(i)}, target {tab.target_names[0]!r}: {y[i]} is not a finite number")
        if not np.all(y == np.round(y)):
            raise DataError(f"{tab.column()}: non-integer target values ({y[np.argmax(y != np.round(y))]}) "
                            "look continuous; use task = \"regression\"")
    uniq, inv = np.unique(y, return_inverse=True)
    if tab.class_names is not None and np.all(uniq == np.round(uniq)) and uniq.min() >= 0 \
            and uniq.max() < len(tab.class_names):
        names = [tab.class_names[int(u)] for u in uniq]
    else:
        names = [str(int(u)) if float(u).is_integer() else str(u) for u in uniq]
    return inv.reshape(-1).astype(np.int64), names


def _regression_targets(tab: Table):
    y = np.asarray(tab.y)
    if y.dtype == object or y.dtype.kind in "USb" or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{tab.column()}: regression targets must be numbers (dtype {y.dtype})")
    y = np.asarray(y, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    bad = ~np.isfinite(y)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"{tab.cell(i, j, target=True)}: {y[i, j]} is not a finite number (NaN or inf target)")
    if y.shape[1] != 1:
        raise DataError(f"{tab.where}: {y.shape[1]} regression targets ({', '.join(tab.target_names)}): "
                        "multi-output regression is not supported (a bundle has one homoscedastic noise sd); "
                        "choose one with data.target")
    return y


def _check_split(tab: Table, y, classification: bool, eval_fraction: float):
    n = len(y)
    if n == 0:
        raise DataError(f"{tab.where}: no data rows")
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction = {eval_fraction}: must be between 0 and 1")
    n_eval = math.ceil(eval_fraction * n)
    n_train = n - n_eval
    last = f" (last data row: {tab.row(n - 1)})" if n else ""
    if classification:
        counts = np.bincount(y)
        if len(counts) < 2:
            raise DataError(f"{tab.column()}: every row has the class {tab._names[0]!r}: a single class; "
                            "classification needs at least 2")
        c = len(counts)
        if n_eval < c or n_train < c:
            raise DataError(f"{tab.where}: {n} rows{last} are too few for the eval split: eval_fraction "
                            f"{eval_fraction} leaves {n_train} training and {n_eval} eval rows, and a stratified "
                            f"split needs at least one row per class ({c} classes) on each side")
        k = int(np.argmin(counts))
        if counts[k] < 2:
            i = int(np.argmax(y == k))
            raise DataError(f"{tab.where}: {tab.row(i)}: class {tab._names[k]!r} has only 1 row: too few rows for "
                            "the eval split (a stratified split needs at least 2 per class)")
    elif n_eval < 1 or n_train < 2:
        raise DataError(f"{tab.where}: {n} rows{last} are too few for the eval split: eval_fraction "
                        f"{eval_fraction} leaves {n_train} training and {n_eval} eval rows (need at least 2 and 1)")


def read(dcfg: dict, seed: int = 0, base=None):
    """The checked table: features x [N, d] float64, targets (class indices [N] or floats
    [N, 1]), feature names, class names (classification) or None."""
    tab = _load_source(dcfg, seed, base)
    tab.x = np.asarray(tab.x, np.float64)
    if tab.x.ndim == 1:
        tab.x = tab.x[:, None]
    _check_finite(tab)
    classification = dcfg["task"] == "classification"
    if dcfg["task"] not in ("classification", "regression"):
        raise DataError(f"data.task = {dcfg['task']!r}: \"classification\" or \"regression\"")
    if classification:
        y, names = _class_indices(tab)
        tab._names = names
        if len(names) > 20 and len(names) > len(y) / 4:
            raise DataError(f"{tab.column()}: {len(names)} distinct values in {len(y)} rows look continuous, "
                            "not like class labels; use task = \"regression\"")
    else:
        y, names = _regression_targets(tab), None
    _check_split(tab, y, classification, dcfg["eval_fraction"])
    feature_names = tab.feature_names
    if not feature_names or len(feature_names) != tab.x.shape[1]:
        feature_names = [f"x{i}" for i in range(tab.x.shape[1])]
    return tab.x, y, feature_names, names


def load(cfg: dict, base=None) -> dict:
    dcfg, seed = cfg["data"], cfg["seed"]
    x, y, feature_names, class_names = read(dcfg, seed, base)
    classification = dcfg["task"] == "classification"

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
