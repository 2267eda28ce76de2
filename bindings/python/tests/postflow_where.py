"""Where the binding under test comes from (a module of its own: conftest.py is not
importable by name when pytest also collects another folder with a conftest.py).

The suite tests the package as users get it: ``test_wheel.py`` builds the wheel,
installs it into a fresh venv outside the repository and runs this folder there
with no ``POSTFLOW_*`` variables. Three cases:

- ``postflow`` is installed (not from this checkout): that fresh venv, or any other
  install. Every test runs against it; ``test_wheel.py`` skips itself.
- ``postflow`` is importable from this checkout (``PYTHONPATH=bindings/python``, a
  quick loop while editing): every test runs, the wheel test included.
- ``postflow`` is not importable (the repository's ``.venv``, ``make test-python``):
  only ``test_wheel.py`` is collected; it runs the rest inside the fresh venv.
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.find_spec("postflow")
#: The package is importable at all.
IMPORTABLE = _spec is not None and _spec.origin is not None
#: The package comes from an install, not from this checkout's bindings/python.
INSTALLED = IMPORTABLE and ROOT not in Path(_spec.origin).resolve().parents
