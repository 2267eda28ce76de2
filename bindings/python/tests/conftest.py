"""Make the in-tree package importable and point it at the repository's builds."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "bindings" / "python"))
os.environ.setdefault("POSTFLOW_ORT_LIB", str(ROOT / ".ort" / "libonnxruntime.so"))
