"""The package as a new user gets it: build the wheel, install it into a fresh venv
outside the repository, and run this test folder there with no POSTFLOW_* variables."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from postflow_where import INSTALLED, ROOT

pytestmark = pytest.mark.skipif(INSTALLED, reason="already running from an installed postflow")

OFFLINE = ("No matching distribution", "Could not find a version", "Failed to establish", "Network is unreachable",
           "Temporary failure in name resolution")
MAX_WHEEL_BYTES = 20 * 1024 * 1024


def _user_env():
    """The caller's environment without anything that points postflow or Python at the checkout."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("POSTFLOW_") and k not in ("ORT_DYLIB_PATH", "PYTHONPATH", "VIRTUAL_ENV")}


def _run(cmd, cwd, timeout, check_offline=False):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_user_env(), capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0 and check_offline and any(s in r.stdout + r.stderr for s in OFFLINE):
        pytest.skip("no package index reachable: " + r.stderr[-300:])
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv outside the repository with the wheel (and its dependencies) installed."""
    tmp = tmp_path_factory.mktemp("user")
    assert ROOT not in tmp.parents
    wheels = tmp / "wheels"
    # What `pip install ./bindings/python` does first: an isolated build (setuptools-rust from the index).
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, ROOT / "bindings" / "python"], tmp, 1800,
         check_offline=True)
    (wheel,) = wheels.glob("postflow-*.whl")
    _run([sys.executable, "-m", "venv", tmp / "venv"], tmp, 300)
    python = tmp / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", wheel, "pytest", "mypy"], tmp, 900, check_offline=True)
    return tmp, wheel, python


def test_wheel_contents(venv):
    _, wheel, _ = venv
    assert wheel.stat().st_size < MAX_WHEEL_BYTES, wheel.stat().st_size
    assert "-cp39-abi3-linux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"postflow/__init__.py", "postflow/py.typed", "postflow/libpostflow.abi3.so"} <= names, names
    # ONNX Runtime is a dependency, never a copy.
    assert not any("onnxruntime" in n for n in names), names
    assert "Requires-Dist: onnxruntime==1.31.*" in metadata, metadata
    assert "Requires-Dist: numpy" in metadata


def test_import_and_load_with_no_variables(venv):
    tmp, _, python = venv
    code = (
        "import json, postflow\n"
        f"m = postflow.Model({str(ROOT / 'models' / 'digits')!r})\n"
        "maps = [l.split()[-1] for l in open('/proc/self/maps') if 'libonnxruntime.so' in l]\n"
        "print(json.dumps({'repr': repr(m), 'module': postflow.__file__, 'lib': postflow.library_path(),\n"
        "                  'ort': postflow.onnxruntime_library(), 'theta': m.sample(2).theta.shape,\n"
        "                  'mapped': sorted(set(maps))}))\n"
    )
    out = json.loads(_run([python, "-c", code], tmp, 300).stdout)
    site = tmp / "venv"
    assert out["repr"] == "postflow.Model('digits', task='classification', D=2410, input_dim=64, output_dim=10)"
    assert Path(out["module"]).is_relative_to(site) and Path(out["lib"]).is_relative_to(site), out
    assert Path(out["lib"]).name == "libpostflow.abi3.so"
    assert Path(out["ort"]).is_relative_to(site / "lib") and "/onnxruntime/capi/libonnxruntime.so." in out["ort"], out
    assert out["theta"] == [2, 2410]
    # The ONNX Runtime in use is the wheel's (not the checkout's .ort/ the library was built beside).
    assert out["mapped"] == [str(Path(out["ort"]).resolve())], out["mapped"]


def test_suite_in_the_fresh_venv(venv):
    tmp, _, python = venv
    r = subprocess.run([str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(ROOT / "bindings" / "python" / "tests")],
                       cwd=tmp, env=_user_env(), capture_output=True, text=True, timeout=1800)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_binding_suite_from_the_checkout():
    """The binding tests against this checkout's library, in a subprocess with
    PYTHONPATH=bindings/python: they run even where no package index is reachable and the
    wheel tests above skip (a skip must never be the only thing that checks the binding)."""
    lib = ROOT / "target" / "release" / "libpostflow.so"
    assert lib.exists(), f"{lib}: build the library first (cargo build --release)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bindings" / "python"), "POSTFLOW_LIB": str(lib)}
    tests = ROOT / "bindings" / "python" / "tests"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests / "test_binding.py",
                        tests / "test_as_a_user.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
