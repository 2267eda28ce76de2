"""The default-solver rule (train/solver_choice.py) on hand-made sweep rows (the tiny bundle's
own sweep and choice: test_end_to_end.py::test_default_solver_is_the_sweeps_choice)."""

import pytest

from train import solver_choice


def row(t0, method, steps, tv, epi=1.0, mae=0.0):
    return {"start_time": t0, "method": method, "steps": steps,
            "evaluations": solver_choice.evaluations(method, steps), "tv": tv, "nll": tv,
            "epistemic_eval": epi, "log_density_mae": mae}


def pick(rows, tol=0.01, spread=0.1, logq=0.5, classification=True):
    method, steps, _, _ = solver_choice.choose(rows, classification, tol, spread, logq)
    return method, steps


def test_cheapest_within_the_tv_tolerance_wins():
    rows = [row(0.0, "euler", 1, 0.40), row(0.0, "euler", 4, 0.305), row(0.0, "euler", 8, 0.301),
            row(0.0, "rk4", 1, 0.33), row(0.0, "rk4", 2, 0.309), row(0.0, "rk4", 8, 0.30)]
    # euler x 4 (4 evaluations) is within 0.01; rk4 x 2 (8) is too but costs more; euler x 1 is not
    assert pick(rows) == ("euler", 4)
    # a tighter tolerance moves to the next cheapest qualifying solver
    assert pick(rows, tol=0.002) == ("euler", 8)


def test_spread_and_density_clauses_exclude_a_solver_with_the_same_tv():
    base = [row(0.0, "rk4", 1, 0.30, epi=1.0), row(0.0, "rk4", 4, 0.30, epi=1.0)]
    assert pick(base + [row(0.0, "euler", 1, 0.30, epi=0.5)]) == ("rk4", 1)  # spread halved
    assert pick(base + [row(0.0, "euler", 1, 0.30, epi=1.05)]) == ("euler", 1)
    assert pick(base + [row(0.0, "euler", 1, 0.30, mae=3.0)]) == ("rk4", 1)  # densities off by 3 nats
    assert pick(base + [row(0.0, "euler", 1, 0.30, mae=3.0)], logq=5.0) == ("euler", 1)


def test_every_start_time_must_be_within_tolerance():
    rows = [row(0.0, "rk4", 8, 0.30), row(0.0, "euler", 2, 0.50), row(0.0, "euler", 8, 0.305),
            row(0.9, "rk4", 8, 0.02), row(0.9, "euler", 2, 0.021), row(0.9, "euler", 8, 0.02)]
    # euler x 2 is fine near the anchors (t0 0.9) but not for the plain flow
    assert pick(rows) == ("euler", 8)


def test_ties_in_cost_go_to_rk4_and_regression_uses_nll():
    rows = [row(0.0, "euler", 4, 0.30), row(0.0, "rk4", 1, 0.30), row(0.0, "rk4", 4, 0.30)]
    assert pick(rows) == ("rk4", 1)
    rows = [row(0.0, "euler", 1, 5.70), row(0.0, "rk4", 4, 5.66)]
    assert pick(rows, classification=False, tol=0.05) == ("euler", 1)
    assert pick(rows, classification=False, tol=0.01) == ("rk4", 4)


def test_missing_rows_are_an_error():
    with pytest.raises(ValueError, match="empty"):
        solver_choice.choose([], True, 0.01, 0.1, 0.5)
    with pytest.raises(ValueError, match="no rk4 row"):
        solver_choice.choose([row(0.0, "euler", 1, 0.3)], True, 0.01, 0.1, 0.5)


def test_sweep_start_times():
    assert solver_choice.sweep_start_times(None) == [0.0]
    assert solver_choice.sweep_start_times(1.0) == [0.0]
    assert solver_choice.sweep_start_times(0.9) == [0.0, 0.9]
