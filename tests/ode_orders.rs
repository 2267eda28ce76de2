//! Solver orders on a nonlinear ODE with a known solution, and Dormand–Prince
//! meeting its tolerance. The ODE lives in the f64 part of the state so that
//! float32 rounding does not mask the high-order error terms.
use postflow::ode::{integrate, SolverConfig, SolverKind, VectorField, Workspace};
use postflow::Result;

/// Logistic growth with a time-varying rate: y' = (1 + t)·y·(1 − y),
/// so y(t) = 1 / (1 + 9·exp(−(t + t²/2))) from y(0) = 0.1.
struct Logistic {
    calls: usize,
}

fn exact(t: f64) -> f64 {
    1.0 / (1.0 + 9.0 * (-(t + t * t / 2.0)).exp())
}

impl VectorField for Logistic {
    fn eval(&mut self, t: f64, _x: &[f32], acc: &[f64], _dx: &mut [f32], dacc: &mut [f64]) -> Result<()> {
        self.calls += 1;
        for (d, y) in dacc.iter_mut().zip(acc) {
            *d = (1.0 + t) * y * (1.0 - y);
        }
        Ok(())
    }
}

fn solve(cfg: &SolverConfig, t0: f64, t1: f64, y0: f64) -> (f64, postflow::OdeStats, usize) {
    let mut field = Logistic { calls: 0 };
    let mut acc = vec![y0];
    let stats = integrate(&mut field, cfg, t0, t1, &mut [], &mut acc, 1, &mut Workspace::default()).unwrap();
    (acc[0], stats, field.calls)
}

fn error(kind: SolverKind, steps: u32) -> f64 {
    let (y, stats, calls) = solve(&SolverConfig::fixed(kind, steps), 0.0, 2.0, 0.1);
    assert_eq!(stats.nfe, calls, "reported function evaluations");
    (y - exact(2.0)).abs()
}

#[test]
fn fixed_step_solvers_have_their_order() {
    for (kind, order) in [(SolverKind::Euler, 1), (SolverKind::Heun, 2), (SolverKind::Rk4, 4)] {
        let ratio = error(kind, 32) / error(kind, 64);
        let want = 2f64.powi(order);
        assert!(
            (ratio / want - 1.0).abs() < 0.15,
            "{kind:?}: error ratio {ratio:.3} when the step halves, expected {want}"
        );
    }
}

#[test]
fn fixed_step_solvers_count_evaluations() {
    for (kind, stages) in [(SolverKind::Euler, 1), (SolverKind::Heun, 2), (SolverKind::Rk4, 4)] {
        let (_, stats, _) = solve(&SolverConfig::fixed(kind, 10), 0.0, 1.0, 0.1);
        assert_eq!(stats.nfe, 10 * stages);
        assert_eq!(stats.steps, 10);
    }
}

#[test]
fn dopri5_meets_its_tolerance_and_tighter_costs_more() {
    let mut last_nfe = 0;
    for tol in [1e-4, 1e-7, 1e-10] {
        let cfg = SolverConfig { kind: SolverKind::Dopri5, steps: 0, rtol: tol, atol: tol, max_steps: 100_000 };
        let (y, stats, _) = solve(&cfg, 0.0, 2.0, 0.1);
        let err = (y - exact(2.0)).abs();
        // The local tolerance bounds the global error up to a modest factor on this smooth problem.
        assert!(err < 10.0 * tol, "tol {tol:e}: error {err:e}");
        assert!(stats.nfe > last_nfe, "tighter tolerance should need more evaluations");
        last_nfe = stats.nfe;
    }
}

#[test]
fn dopri5_integrates_backwards() {
    let cfg = SolverConfig { kind: SolverKind::Dopri5, steps: 0, rtol: 1e-9, atol: 1e-9, max_steps: 100_000 };
    let (y, _, _) = solve(&cfg, 2.0, 0.0, exact(2.0));
    assert!((y - 0.1).abs() < 1e-7, "y(0) = {y}");
}

#[test]
fn dopri5_step_cap_is_an_error() {
    let cfg = SolverConfig { kind: SolverKind::Dopri5, steps: 0, rtol: 1e-12, atol: 1e-12, max_steps: 3 };
    let mut acc = vec![0.1];
    let err = integrate(&mut Logistic { calls: 0 }, &cfg, 0.0, 2.0, &mut [], &mut acc, 1, &mut Workspace::default())
        .unwrap_err();
    assert_eq!(err.kind(), postflow::ErrorKind::Numeric);
    assert!(err.message().contains("within 3 steps"), "{}", err.message());
}

#[test]
fn invalid_solver_settings_are_refused() {
    let mut acc = vec![0.1];
    let zero_steps = SolverConfig::fixed(SolverKind::Rk4, 0);
    let err =
        integrate(&mut Logistic { calls: 0 }, &zero_steps, 0.0, 1.0, &mut [], &mut acc, 1, &mut Workspace::default())
            .unwrap_err();
    assert!(err.message().contains("steps must be >= 1"), "{}", err.message());
    let bad_tol = SolverConfig { kind: SolverKind::Dopri5, steps: 0, rtol: -1.0, atol: 1e-6, max_steps: 10 };
    let err =
        integrate(&mut Logistic { calls: 0 }, &bad_tol, 0.0, 1.0, &mut [], &mut acc, 1, &mut Workspace::default())
            .unwrap_err();
    assert!(err.message().contains("rtol"), "{}", err.message());
}
