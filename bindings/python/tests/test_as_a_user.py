"""A user's job on a shipped bundle: 100 digits posterior samples, predictions on the
bundle's eval inputs, checked against the CLI's `postflow predict` for the same seed."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import postflow
from postflow_where import ROOT

DIGITS = ROOT / "models" / "digits"
SEED = 3
N = 100


def read_tensor(path: Path, name: str) -> np.ndarray:
    """One little-endian tensor of a safetensors file (8-byte header length, JSON header, data)."""
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "F16": "<f2"}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n))[name]
        start, end = entry["data_offsets"]
        f.seek(8 + n + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])


def cli() -> Path:
    path = Path(os.environ.get("POSTFLOW_BIN") or ROOT / "target" / "release" / "postflow")
    if not path.is_file():
        pytest.skip(f"{path} not built (cargo build --release)")
    return path


def test_digits_matches_the_cli(tmp_path):
    x = read_tensor(DIGITS / "tensors.safetensors", "eval.x")
    with postflow.Model(DIGITS) as model:
        assert (model.name, model.task, model.input_dim, model.output_dim) == ("digits", "classification", 64, 10)
        samples = model.sample(N, seed=SEED)
        assert np.asarray(samples).shape == (N, model.weight_dim) and len(samples) == N
        p = model.predict(x, samples)
    assert len(p) == x.shape[0] == 360 and p.ess == pytest.approx(N)
    np.testing.assert_allclose(np.asarray(p).sum(axis=1), 1.0, atol=1e-5)

    np.save(tmp_path / "x.npy", x)
    # The same ONNX Runtime as the binding's, so both sides run the same kernels.
    ort = postflow.onnxruntime_library() or os.environ.get("POSTFLOW_ORT_LIB") or os.environ.get("ORT_DYLIB_PATH")
    cmd = [str(cli()), "predict", str(DIGITS), "-i", str(tmp_path / "x.npy"), "-n", str(N), "--seed", str(SEED),
           "--json", "-q"] + (["--onnxruntime", ort] if ort else [])
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout)
    probs = np.array([row["probs"] for row in out["predictions"]])
    assert out["samples"] == N and probs.shape == p.mean.shape
    np.testing.assert_allclose(p.mean, probs, rtol=0, atol=1e-6)
    mi = np.array([row["entropy"]["epistemic"] for row in out["predictions"]])
    np.testing.assert_allclose(p.epistemic[:, 0], mi, rtol=0, atol=1e-6)
    # The average is not degenerate: the eval labels are mostly predicted.
    labels = read_tensor(DIGITS / "tensors.safetensors", "eval.y")
    assert np.mean(p.mean.argmax(axis=1) == labels) > 0.9


def python_block(readme: Path) -> str:
    text = readme.read_text()
    start = text.index("```python\n") + len("```python\n")
    return text[start:text.index("```", start)]


def test_the_readme_example(tmp_path):
    example = python_block(ROOT / "bindings" / "python" / "README.md")
    assert example == python_block(ROOT / "README.md"), "the two READMEs' examples differ"
    assert len(example.strip().splitlines()) == 10
    script = tmp_path / "example.py"
    script.write_text(example)
    # From the repository root, as the README's relative bundle path expects; the script's
    # own folder (not the checkout) is first on sys.path, so the tested postflow is imported.
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=300).stdout.splitlines()
    assert out[0] == "postflow.Model('digits', task='classification', D=2410, input_dim=64, output_dim=10)"
    classes = np.array(out[1].strip("[]").split(), dtype=int)
    mi = np.array(out[2].strip("[]").split(), dtype=float)
    assert classes.shape == mi.shape == (5,) and np.all((classes >= 0) & (classes < 10))
    assert np.all((mi > 0) & (mi <= np.log(10)))


def test_types_check_strictly(tmp_path):
    """A user's code type-checks against the package (py.typed) under mypy --strict."""
    pytest.importorskip("mypy")
    from postflow_where import INSTALLED
    if not INSTALLED:
        pytest.skip("mypy reads the installed package (py.typed)")
    user = tmp_path / "user.py"
    user.write_text(
        "import numpy as np\nimport numpy.typing as npt\nimport postflow\n\n"
        "def run(path: str) -> tuple[npt.NDArray[np.float32], float, str]:\n"
        "    with postflow.Model(path) as m:\n"
        "        s: postflow.Samples = m.sample(4, seed=1, trace='exact')\n"
        "        p: postflow.Prediction = m.predict(np.zeros((2, m.input_dim)), s, log_weights=s.log_density)\n"
        "        logd, se = m.log_prob(s.theta)\n"
        "        return p.mean + logd.sum() + se.sum(), p.ess, repr(m)\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("import postflow\n\nn: int = postflow.Model('x').task\n")
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run(mypy + [str(user)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(mypy + [str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 1 and 'incompatible types in assignment (expression has type "str"' in wrong.stdout.lower()
