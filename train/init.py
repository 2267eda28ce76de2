"""`python -m train init DATA --target COL --task classification|regression --out CONFIG.toml`:
a starting config for a user's own data. The data is read and checked exactly as the data stage
will read it; the network and flow sizes are chosen from its shape; every other value is the
shipped bundles' tuned default. The config sets no `name`, so the bundle takes its --out folder's
name at build time."""

import json
import os
from pathlib import Path

from . import data, mlp

KINDS = ("csv", "npz", "sklearn", "builtin")
NUTS_MAX_D = 3000  # NUTS cost and bundle size grow with D; digits (D = 2410) takes ~15 min a chain here
NUTS_MAX_TRAIN = 2000  # full-batch NUTS: each leapfrog step touches every training row


def source_of(spec: str, out_dir: Path) -> str:
    """DATA as a data.source: `file.csv` / `file.npz` (or csv:/npz: with a path), written relative to
    the config's folder, or a `sklearn:`/`builtin:` source as given."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if kind in ("sklearn", "builtin"):
            return spec
        path = rest
    else:
        kind, path = Path(spec).suffix.lower().lstrip("."), spec
        if kind not in ("csv", "npz"):
            raise data.DataError(f"{spec}: give a .csv or .npz file, or a source like csv:PATH, npz:PATH, "
                                 "sklearn:load_iris")
    path = Path(path).resolve()
    if not path.is_file():
        raise data.DataError(f"{spec}: no such file")
    return f"{kind}:{Path(os.path.relpath(path, out_dir.resolve())).as_posix()}"


def hidden_for(d_in: int, outputs: int):
    """One hidden layer of 16 (≤ 16 features) or 32 units, two for ≤ 4 features (moons: 16-16),
    halved while the network is over the NUTS size budget."""
    width = 16 if d_in <= 16 else 32
    layers = 2 if d_in <= 4 else 1
    while width > 4 and mlp.dim([d_in, *[width] * layers, outputs]) > NUTS_MAX_D:
        width //= 2
    return [width] * layers


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def render(source, target, task, features, n, d_in, outputs, class_names, out_dir) -> str:
    eval_fraction = 0.25 if n < 1000 else 0.2
    n_train = n - int(-(-eval_fraction * n // 1))
    hidden = hidden_for(d_in, outputs)
    dim = mlp.dim([d_in, *hidden, outputs])
    flow_width = 256 if dim <= 1500 else 224  # 224 keeps digits-sized flows under the 15 MB budget
    what = (f"{len(class_names)} classes" if task == "classification" else f"{outputs} output")
    sizes = "-".join(str(s) for s in [d_in, *hidden, outputs])
    L = [
        f"# Starting config written by `python -m train init` for {source} ({n} rows, {d_in} features, {what}).",
        f"# {sizes} ReLU MLP (D = {dim}); NUTS posterior; the flow, export and evaluation use the shipped",
        "# bundles' tuned defaults. No `name`: the bundle is named after the build's --out folder.",
        f"description = {_toml(f'{sizes} ReLU MLP on {Path(source.partition(chr(58))[2]).name}; NUTS posterior')}",
        "seed = 0",
        "",
        "[data]",
        f"source = {_toml(source)}",
    ]
    if target is not None:
        L.append(f"target = {_toml(target)}")
    if features:
        L.append(f"features = {_toml(list(features))}")
    L += [f"task = {_toml(task)}", f"eval_fraction = {eval_fraction}"]
    if n_train > NUTS_MAX_TRAIN:
        L.append(f"max_train = {NUTS_MAX_TRAIN}  # full-batch NUTS: {n_train} training rows would be slow; 0 = all")
    L += ["", "[network]", f"hidden = {_toml(hidden)}"]
    if task == "regression":
        L += ["", "[likelihood]", "# noise sd (standardized targets): the training RMSE of a MAP net fitted with unit noise",
              'noise_sigma = "map"']
    L += [
        "", "[map]", "steps = 3000", "lr = 1e-2",
        "", "[posterior]", 'method = "nuts"', "prior_scale = 1.0",
        "chains = 5  # the last chain is held out for evaluation", "warmup = 500", "draws = 400", "thin = 1",
        '# where the chains run (the draws are the same): "local", "processes" (one per core), "ray"',
        'executor = "processes"',
        "", "[flow]", f"hidden = {_toml([flow_width] * 3)}", "steps = 5000", "batch = 256", "lr = 1e-3",
        "", "[evaluate]", "flow_samples = 400", "",
    ]
    return "\n".join(L)


def init(spec, target, task, out, features=None, force=False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (--force to overwrite)")
    out_dir = out.parent if str(out.parent) else Path(".")
    source = source_of(spec, out_dir)
    dcfg = {"source": source, "target": target, "features": features, "task": task, "args": {},
            "eval_fraction": 0.25, "max_train": 0}
    x, y, _, class_names = data.read(dcfg, 0, out_dir.resolve())
    outputs = len(class_names) if task == "classification" else y.shape[1]
    text = render(source, target, task, features, len(x), x.shape[1], outputs, class_names or [], out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out
