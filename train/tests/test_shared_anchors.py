"""train/diagnostics/shared_anchors.py through the Python binding and the built library: draws
j and A + j start at the same stored draw, so without refinement they coincide, and refinement
moves them apart."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = Path(os.environ.get("POSTFLOW_LIB", ROOT / "target" / "release" / "libpostflow.so"))


def run(bundle, out, *args, check=True):
    env = {**os.environ, "POSTFLOW_LIB": str(LIB), "PYTHONPATH": str(ROOT / "bindings" / "python")}
    r = subprocess.run([sys.executable, "-m", "train.diagnostics.shared_anchors", str(bundle), "--n", "8",
                        "--json", str(out), *args], cwd=ROOT, env=env, check=check, capture_output=True, text=True)
    return json.loads(out.read_text()) if check else r


@pytest.mark.skipif(not LIB.exists(), reason=f"no libpostflow at {LIB} (set POSTFLOW_LIB)")
def test_pairs_share_their_stored_draw(tmp_path):
    bundle = tmp_path / "affine_refine_v4"  # refined draws start at the 24 stored draws themselves
    shutil.copytree(ROOT / "tests" / "fixtures" / "bundles" / "affine_refine", bundle)
    manifest = json.loads((bundle / "postflow.json").read_text())
    manifest["format_version"] = 4
    manifest["refine"]["start_time"] = 1.0
    (bundle / "postflow.json").write_text(json.dumps(manifest))

    copies = run(bundle, tmp_path / "k0.json", "--refine", "0")
    assert copies["stored_draws"] == 24 and copies["transitions"] == 0
    # the stored draws themselves (f16 anchors through f32 whitening: rounding only)
    assert copies["same_anchor_pair"] == 0.0 and copies["to_stored_draws"] < 1e-3
    assert copies["nearest_other_draw"] > 0.1
    assert copies["unchanged"] == 1.0 and copies["identical_pairs"] == 1.0 and copies["ratio"]["q25"] < 0.01

    refined = run(bundle, tmp_path / "k.json")
    assert refined["transitions"] == manifest["refine"]["default_transitions"] > 0
    assert refined["same_anchor_pair"] > 0.1 and refined["to_stored_draws"] > 0.1
    assert refined["held_out_to_stored_draws"] == copies["held_out_to_stored_draws"] > 0
    # the multinomial kernel moves every draw, and two draws from one start are two networks
    multinomial = run(bundle, tmp_path / "m.json", "--kernel", "multinomial", "--leapfrog", "9")
    assert (multinomial["kernel"], multinomial["leapfrog"]) == ("multinomial", 9)
    assert multinomial["unchanged"] == 0.0 and multinomial["identical_pairs"] == 0.0
    assert multinomial["ratio"]["q10"] > 0.1

    # refused where the pairing does not hold: more draws than stored, or refinement that starts
    # below 1 (the format-3 original: its stored draw per sample comes from the sample's stream)
    too_many = run(bundle, tmp_path / "x.json", "--n", "25", check=False)
    assert too_many.returncode != 0 and "must be in [2, 24]" in too_many.stderr
    below = run(ROOT / "tests" / "fixtures" / "bundles" / "affine_refine", tmp_path / "y.json", check=False)
    assert below.returncode != 0 and "does not start at stored draws (start time 0.5" in below.stderr
