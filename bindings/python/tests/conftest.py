"""Collect only test_wheel.py where postflow is not importable (see postflow_where.py)."""
from postflow_where import IMPORTABLE

collect_ignore = [] if IMPORTABLE else ["test_binding.py", "test_as_a_user.py"]
