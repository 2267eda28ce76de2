import subprocess
import sys
from pathlib import Path

import pytest

# tests import the pipeline as the `train` package from the repository root
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The tiny config built once per session: (bundle dir, work dir)."""
    tmp = tmp_path_factory.mktemp("tiny")
    out, work = tmp / "bundle", tmp / "work"
    subprocess.run([sys.executable, "-m", "train", "build", "train/configs/tiny.toml", "--out", str(out),
                    "--work", str(work)], cwd=ROOT, check=True, timeout=600)  # ~1 min when the machine is idle
    return out, work
