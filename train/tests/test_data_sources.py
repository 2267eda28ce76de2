"""Data sources (csv:, npz:, every tabular scikit-learn loader), the refusals that name file, line
and column, `python -m train init`, and the build's no-partial-bundle rename. All fast: no NUTS."""

import tomllib
from pathlib import Path

import numpy as np
import pytest

from train import config, data, pipeline
from train.data import DataError

ROOT = Path(__file__).resolve().parents[2]


def dcfg(source, task="classification", **kw):
    return {"source": source, "target": None, "features": None, "args": {}, "task": task,
            "eval_fraction": 0.25, "max_train": 0, **kw}


def cfg_of(source, task="classification", **kw):
    return {"seed": 0, "data": dcfg(source, task, **kw)}


def cli(argv):
    """`python -m train ARGV` in this process (the same main(); no second interpreter to start)."""
    from train.__main__ import main
    return main(argv)


def write(path, text):
    path.write_text(text)
    return path


# --- scikit-learn loaders ---------------------------------------------------------------------

LOADERS = data.tabular_loaders()


def test_the_loader_list_is_found_by_listing_sklearn():
    assert {"load_iris", "load_wine", "load_diabetes", "load_digits", "load_linnerud",
            "load_breast_cancer"} <= set(LOADERS)
    assert not {"load_files", "load_svmlight_file", "load_sample_image", "load_sample_images"} & set(LOADERS)


@pytest.mark.parametrize("name", LOADERS)
def test_data_stage_runs_on_every_tabular_loader(name):
    from sklearn import datasets
    bunch = getattr(datasets, name)()
    y = np.asarray(bunch.target)
    extra = {}
    if y.ndim == 2:  # load_linnerud: multi-output regression is refused clearly; one output works
        with pytest.raises(DataError, match="multi-output regression is not supported.*data.target"):
            data.load(cfg_of(f"sklearn:{name}", "regression"))
        extra = {"target": str(bunch.target_names[0])}
        task = "regression"
    else:
        task = "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
    out = data.load(cfg_of(f"sklearn:{name}", task, **extra))
    n, d = bunch.data.shape
    assert out["x_train"].shape[1] == out["x_eval"].shape[1] == d
    assert len(out["x_train"]) + len(out["x_eval"]) == n
    assert len(out["feature_names"]) == d and np.all(np.isfinite(out["x_train"]))
    if task == "classification":
        assert out["y_train"].dtype == np.int64
        assert len(out["class_names"]) == len(np.unique(y))
        if getattr(bunch, "target_names", None) is not None:
            assert list(out["class_names"]) == [str(t) for t in bunch.target_names]
    else:
        assert out["y_train"].shape[1] == 1


def test_feature_names_given_as_an_array_are_kept():  # load_breast_cancer: the crash of issue 14
    out = data.load(cfg_of("sklearn:load_breast_cancer"))
    assert out["feature_names"][0] == "mean radius"


def test_a_continuous_target_is_refused_for_classification():
    with pytest.raises(DataError, match="look continuous.*regression"):
        data.load(cfg_of("sklearn:load_diabetes"))


# --- csv: and npz: ------------------------------------------------------------------------------

def classes_csv(tmp_path, n=40):
    rng = np.random.default_rng(0)
    rows = ["a,b,label,c"]
    for i in range(n):
        rows.append(f"{rng.normal():.4f},{rng.normal():.4f},{['cat', 'dog', 'emu'][i % 3]},{i}")
    return write(tmp_path / "d.csv", "\n".join(rows) + "\n")


def test_csv_class_labels_of_any_type_become_indices_and_names(tmp_path):
    p = classes_csv(tmp_path)
    out = data.load(cfg_of(f"csv:{p}", target="label"))
    assert list(out["class_names"]) == ["cat", "dog", "emu"]
    assert list(out["feature_names"]) == ["a", "b", "c"]
    assert set(np.unique(out["y_train"])) == {0, 1, 2} and out["y_train"].dtype == np.int64
    assert len(out["x_train"]) + len(out["x_eval"]) == 40
    out = data.load(cfg_of(f"csv:{p}", target="label", features=["c", "a"]))
    assert list(out["feature_names"]) == ["c", "a"] and out["x_train"].shape[1] == 2


def test_csv_numeric_labels_sort_numerically(tmp_path):
    p = write(tmp_path / "n.csv", "x,y\n" + "".join(f"{i},{[10, 9, 2][i % 3]}\n" for i in range(30)))
    out = data.load(cfg_of(f"csv:{p}", target="y"))
    assert list(out["class_names"]) == ["2", "9", "10"]


def test_csv_regression_and_relative_paths_resolve_against_the_config(tmp_path):
    p = write(tmp_path / "r.csv", "x1,x2,t\n" + "".join(f"{i},{i * i},{0.5 * i}\n" for i in range(20)))
    out = data.load(cfg_of("csv:r.csv", "regression", target="t"), base=tmp_path)
    assert out["y_train"].shape == (15, 1) and out["y_train"].dtype == np.float32


def test_npz_source(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.normal(size=(30, 3)), y=np.array(["no", "yes"] * 15))
    out = data.load(cfg_of(f"npz:{p}"))
    assert list(out["class_names"]) == ["no", "yes"] and out["x_train"].shape == (22, 3)
    np.savez(p, x=rng.normal(size=(30, 3)), y=rng.normal(size=30))
    assert data.load(cfg_of(f"npz:{p}", "regression"))["y_eval"].shape == (8, 1)


# --- refusals: each names the file, the line and the column -----------------------------------

def refused(tmp_path, text, match, **kw):
    p = write(tmp_path / "bad.csv", text)
    kw.setdefault("target", "y")
    with pytest.raises(DataError) as e:
        data.load(cfg_of(f"csv:{p}", kw.pop("task", "classification"), **kw))
    msg = str(e.value)
    assert str(p) in msg, msg
    assert __import__("re").search(match, msg), msg
    return msg


GOOD = "".join(f"{i},{i % 2}\n" for i in range(20))


def test_missing_target_column(tmp_path):
    refused(tmp_path, "a,b\n" + GOOD, r"line 1: no target column 'y' in the header \(columns: a, b\)")


def test_missing_header_row(tmp_path):
    refused(tmp_path, "1,2\n" + GOOD, r"line 1: the first row has no column names; a header row .* is required")


def test_missing_header_row_with_a_text_label(tmp_path):
    """Most cells of the first row are numbers: data, though the label column holds text."""
    refused(tmp_path, "1,2,cat\n" + "".join(f"{i},{i},{['cat', 'dog'][i % 2]}\n" for i in range(20)),
            r"line 1: the first row has no column names; a header row .* is required \(data.target = 'y'\)")


def test_a_column_without_a_name_in_the_header(tmp_path):
    """A trailing comma on every line: refused at the header, not as an empty cell on line 2."""
    msg = refused(tmp_path, "a,y,\n" + GOOD.replace("\n", ",\n"), r"line 1, column 3: the column has no name")
    assert msg.endswith("(a trailing comma?); name it, or choose the columns with data.features"), msg
    out = data.load(cfg_of(f"csv:{tmp_path / 'bad.csv'}", target="y", features=["a"]))  # not a feature: kept out
    assert list(out["feature_names"]) == ["a"]


def test_a_header_without_data_rows(tmp_path):
    for task in ("classification", "regression"):
        refused(tmp_path, "a,b,y\n\n", r": no data rows after the header \(line 1\)$", task=task)
    p = tmp_path / "e.npz"
    np.savez(p, x=np.zeros((0, 2)), y=np.zeros(0, np.int64))
    with pytest.raises(DataError, match=r"e\.npz: no data rows$"):
        data.load(cfg_of(f"npz:{p}"))


@pytest.mark.parametrize("bad", ["NaN", "inf", "-Infinity"])
def test_nan_or_inf_among_text_class_labels(tmp_path, bad):
    """Text labels: a NaN or inf cell is a missing value, not a class named "NaN"."""
    rows = "".join(f"{i},{['cat', 'dog'][i % 2]}\n" for i in range(20))
    refused(tmp_path, "a,y\n" + rows + f"7,{bad}\n" + rows,
            rf"line 22, column 2 \('y'\): {bad} is not a finite number \(NaN or inf class label\)")


def test_non_numeric_feature(tmp_path):
    refused(tmp_path, "a,y\n" + GOOD + "abc,1\n" + GOOD,
            r"line 22, column 1 \('a'\): 'abc' is not a number \(non-numeric feature\)")


def test_empty_feature_cell(tmp_path):
    refused(tmp_path, "a,b,y\n1,,0\n" + "1," + GOOD.replace("\n", "\n1,", 19),
            r"line 2, column 2 \('b'\): an empty cell is not a number")


@pytest.mark.parametrize("bad", ["nan", "inf", "-Infinity"])
def test_nan_or_inf(tmp_path, bad):
    refused(tmp_path, "a,y\n" + GOOD[:12] + f"{bad},1\n" + GOOD,
            r"line \d+, column 1 \('a'\): .* is not a finite number \(NaN or inf feature\)")


def test_nan_regression_target(tmp_path):
    refused(tmp_path, "a,y\n1,2\n2,nan\n" + GOOD, r"line 3, column 2 \('y'\): nan is not a finite number",
            task="regression")


def test_nan_in_npz(tmp_path):
    p = tmp_path / "n.npz"
    x = np.ones((20, 3))
    x[7, 2] = np.nan
    np.savez(p, x=x, y=np.arange(20) % 2)
    with pytest.raises(DataError, match=r"n\.npz: row 7, column 2 \('x2'\): nan is not a finite number"):
        data.load(cfg_of(f"npz:{p}"))


def test_single_class(tmp_path):
    refused(tmp_path, "a,y\n" + "".join(f"{i},same\n" for i in range(20)),
            r"column 2 \('y'\): every row has the class 'same': a single class")


def test_too_few_rows_for_the_eval_split(tmp_path):
    refused(tmp_path, "a,y\n1,0\n2,1\n3,0\n", r"3 rows \(last data row: line 4\) are too few for the eval split")
    refused(tmp_path, "a,y\n1,0\n2,1\n", r"too few for the eval split", task="regression")
    refused(tmp_path, "a,y\n" + GOOD + "5,2\n", r"line 22: class '2' has only 1 row: too few rows for the eval split")


def test_ragged_rows(tmp_path):
    refused(tmp_path, "a,b,y\n" + "1," + GOOD.replace("\n", "\n1,", 5) + "\n",
            r"line 3: 3 fields|line \d+: \d+ fields, but the header \(line 1\) has 3: ragged rows")
    refused(tmp_path, "a,b,y\n1,2,0\n1,2\n" + "1," + GOOD.replace("\n", "\n1,", 19),
            r"line 3: 2 fields, but the header \(line 1\) has 3: ragged rows")


def test_missing_file_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match="nope.csv: no such file"):
        data.load(cfg_of(f"csv:{tmp_path / 'nope.csv'}", target="y"))
    with pytest.raises(DataError, match="unknown data source"):
        data.load(cfg_of("parquet:x"))


# --- init ------------------------------------------------------------------------------------

def test_init_writes_a_config_sized_from_the_data(tmp_path, capsys):
    p = classes_csv(tmp_path, n=60)
    out = tmp_path / "configs" / "mine.toml"
    assert cli(["init", str(p), "--target", "label", "--task", "classification", "--out", str(out)]) == 0
    raw = tomllib.loads(out.read_text())
    assert "name" not in raw and raw["data"]["source"] == "csv:../d.csv" and raw["data"]["target"] == "label"
    assert raw["network"]["hidden"] == [16, 16] and raw["posterior"]["executor"] == "processes"
    cfg = config.load(out, default_name="my_bundle")
    assert cfg["name"] == "my_bundle"
    d = data.load(cfg, base=out.parent)
    assert list(d["class_names"]) == ["cat", "dog", "emu"]
    assert cli(["init", str(p), "--target", "nope", "--task", "classification", "--out", str(tmp_path / "x.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no target column 'nope'" in err
    assert not (tmp_path / "x.toml").exists()


def test_init_hidden_sizes_follow_the_data():
    from train.init import hidden_for
    assert hidden_for(2, 2) == [16, 16] and hidden_for(10, 1) == [16] and hidden_for(64, 10) == [32]
    assert hidden_for(784, 10) == [4]  # halved while over the NUTS size budget (D > 3000), to 4 at least


# --- the build: fingerprints and no partial bundle -------------------------------------------

def test_executor_keys_do_not_change_fingerprints():
    a = config.load(ROOT / "train/configs/tiny.toml")
    b = config.load(ROOT / "train/configs/tiny.toml")
    b["posterior"].update(executor="ray", workers=3, ray_address="auto")
    for stage in pipeline.STAGES:
        assert pipeline._fingerprint(a, stage, "") == pipeline._fingerprint(b, stage, "")
    b["data"]["target"] = "y"
    assert pipeline._fingerprint(a, "data", "") != pipeline._fingerprint(b, "data", "")


def test_flow_weight_dtype_is_checked_and_fingerprinted(tmp_path):
    """flow.weight_dtype changes the flow stage's output (f16-rounded parameters), so it is part
    of the flow fingerprint (stages cached before it existed rebuild); an unknown value is refused."""
    a = config.load(ROOT / "train/configs/tiny.toml")
    assert a["flow"]["weight_dtype"] == "f16"
    b = config.load(ROOT / "train/configs/tiny.toml")
    b["flow"]["weight_dtype"] = "f32"
    assert pipeline._fingerprint(a, "flow", "") != pipeline._fingerprint(b, "flow", "")
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "train/configs/tiny.toml").read_text().replace("[flow]\n", "[flow]\nweight_dtype = \"bf16\"\n"))
    with pytest.raises(ValueError, match="flow.weight_dtype"):
        config.load(bad)


def fake_stages(monkeypatch, fail_at=None):
    def make(stage):
        def run(ctx):
            if stage == "bundle":
                ctx["out"].mkdir(parents=True)
                (ctx["out"] / "postflow.json").write_text("{}")
            if stage == fail_at:
                raise RuntimeError(f"{stage} failed")
            return {"x": np.zeros(1)}, {}
        return run
    monkeypatch.setattr(pipeline, "RUNNERS", {s: make(s) for s in pipeline.STAGES})
    monkeypatch.setattr(pipeline.mlp, "sizes_of", lambda cfg, d: [1, 1])


def test_no_partial_bundle_at_out(tmp_path, monkeypatch):
    cfg = write(tmp_path / "c.toml", 'seed = 0\n[data]\nsource = "sklearn:make_moons"\n')
    out = tmp_path / "models" / "mine"
    fake_stages(monkeypatch, fail_at="bundle")
    with pytest.raises(RuntimeError, match="bundle failed"):
        pipeline.build(cfg, out, work=tmp_path / "w1")
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []
    fake_stages(monkeypatch)
    ctx = pipeline.build(cfg, out, work=tmp_path / "w2")
    assert ctx["cfg"]["name"] == "mine" and (out / "postflow.json").exists()
    (out / "stale").write_text("")
    fake_stages(monkeypatch, fail_at="evaluate")  # a failed rebuild keeps the old bundle whole
    with pytest.raises(RuntimeError):
        pipeline.build(cfg, out, work=tmp_path / "w3")
    assert (out / "stale").exists() and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mine"]
    fake_stages(monkeypatch)
    pipeline.build(cfg, out, work=tmp_path / "w4")  # a completed rebuild replaces it
    assert not (out / "stale").exists() and sorted(p.name for p in (tmp_path / "models").iterdir()) == ["mine"]


def test_build_refuses_bad_data_with_one_error_line(tmp_path, capsys):
    p = write(tmp_path / "bad.csv", "a,y\n1,0\nx,1\n")
    cfg = write(tmp_path / "c.toml", f'[data]\nsource = "csv:bad.csv"\ntarget = "y"\n')
    assert cli(["build", str(cfg), "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err == (f"error: {p}: line 3, column 1 ('a'): 'x' is not a number "
                                       "(non-numeric feature)\n")
    assert not (tmp_path / "b").exists()


def test_the_bundle_stage_prints_out_not_the_temporary_folder(tmp_path, monkeypatch, capsys):
    """The bundle is written to .NAME.partial-PID and renamed to --out: the log names --out."""
    from train import bundle
    cfg = write(tmp_path / "c.toml", 'seed = 0\n[data]\nsource = "sklearn:make_moons"\n[bundle]\nbaselines = false\n')
    fake_stages(monkeypatch)
    # the real bundle stage, its parts stubbed: no graphs, tensors or figures to write
    monkeypatch.setitem(pipeline.RUNNERS, "bundle", pipeline._stage_bundle)
    monkeypatch.setattr(bundle, "GRAPH_FILES", {})
    for name, value in {"tensors": {}, "refine_setup": None, "start_times": None, "solver_choice": None,
                        "manifest": {}}.items():
        monkeypatch.setattr(bundle, name, lambda *a, v=value: v)
    monkeypatch.setattr(bundle, "check_reference_metrics", lambda *a: None)
    monkeypatch.setattr(bundle.figures, "make", lambda *a: [])
    monkeypatch.setattr(bundle.card, "render", lambda *a: "")
    out = tmp_path / "models" / "mine"
    pipeline.build(cfg, out, work=tmp_path / "w")
    printed = capsys.readouterr().out
    assert f"  bundle written to {out}: " in printed and ".partial" not in printed, printed
    assert (out / "postflow.json").exists()
