//! Explicit Runge–Kutta solvers for batched flow ODEs: Euler, Heun, RK4 with a
//! fixed number of steps, and Dormand–Prince 5(4) with adaptive steps.
//!
//! The state has two parts: `x` (f32, the flow state that ONNX Runtime sees)
//! and `acc` (f64, integrals carried along, such as the trace of the Jacobian).
//! Both are advanced by the same tableau, so the log-density integral gets the
//! solver's order of accuracy.
//!
//! A field on a manifold (the sphere-product geometry) supplies a retraction
//! (`VectorField::retract`), applied to every stage point and every step's result:
//! the standard projection method, which keeps each method's order.
use crate::{Error, Result};

mod lincomb;

/// A batched vector field: `dx/dt` and `dacc/dt` at time `t`. Flow fields ignore
/// `acc`; it is passed so that any ODE (tests included) can live in the f64 part.
pub trait VectorField {
    fn eval(&mut self, t: f64, x: &[f32], acc: &[f64], dx: &mut [f32], dacc: &mut [f64]) -> Result<()>;

    /// Map a state back onto the manifold the flow lives on (a retraction); the solvers
    /// apply it to every stage point before it is evaluated and to every step's result.
    /// The default (Euclidean space) does nothing.
    fn retract(&self, _x: &mut [f32]) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverKind {
    Euler,
    Heun,
    Rk4,
    Dopri5,
}

impl SolverKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "euler" => Ok(SolverKind::Euler),
            "heun" => Ok(SolverKind::Heun),
            "rk4" => Ok(SolverKind::Rk4),
            "dopri5" => Ok(SolverKind::Dopri5),
            other => Err(Error::invalid(format!("unknown solver {other:?} (expected euler, heun, rk4 or dopri5)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SolverKind::Euler => "euler",
            SolverKind::Heun => "heun",
            SolverKind::Rk4 => "rk4",
            SolverKind::Dopri5 => "dopri5",
        }
    }
    fn tableau(self) -> &'static Tableau {
        match self {
            SolverKind::Euler => &EULER,
            SolverKind::Heun => &HEUN,
            SolverKind::Rk4 => &RK4,
            SolverKind::Dopri5 => &DOPRI5,
        }
    }
}

/// How to integrate: fixed-step methods use `steps`; `dopri5` uses the tolerances
/// and gives up after `max_steps` attempted steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverConfig {
    pub kind: SolverKind,
    pub steps: u32,
    pub rtol: f64,
    pub atol: f64,
    pub max_steps: u32,
}

impl SolverConfig {
    pub fn fixed(kind: SolverKind, steps: u32) -> Self {
        SolverConfig { kind, steps, rtol: 1e-5, atol: 1e-5, max_steps: 10_000 }
    }
    pub fn validate(&self) -> Result<()> {
        if self.kind != SolverKind::Dopri5 && self.steps == 0 {
            return Err(Error::invalid("solver steps must be >= 1"));
        }
        if self.kind == SolverKind::Dopri5 {
            for (name, v) in [("rtol", self.rtol), ("atol", self.atol)] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(Error::invalid(format!("{name} must be finite and > 0, got {v}")));
                }
            }
            if self.max_steps == 0 {
                return Err(Error::invalid("max_steps must be >= 1"));
            }
        }
        Ok(())
    }
}

/// What an integration cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OdeStats {
    /// Function evaluations (calls of the vector field).
    pub nfe: usize,
    /// Accepted steps.
    pub steps: usize,
    /// Rejected steps (adaptive only).
    pub rejected: usize,
}

impl std::ops::AddAssign for OdeStats {
    fn add_assign(&mut self, o: Self) {
        self.nfe += o.nfe;
        self.steps += o.steps;
        self.rejected += o.rejected;
    }
}

struct Tableau {
    c: &'static [f64],
    a: &'static [&'static [f64]],
    b: &'static [f64],
    /// `b − b̂` for the embedded error estimate (adaptive methods only).
    e: Option<&'static [f64]>,
    /// The last stage equals the next step's first (first same as last).
    fsal: bool,
}

static EULER: Tableau = Tableau { c: &[0.0], a: &[&[]], b: &[1.0], e: None, fsal: false };
static HEUN: Tableau = Tableau { c: &[0.0, 1.0], a: &[&[], &[1.0]], b: &[0.5, 0.5], e: None, fsal: false };
static RK4: Tableau = Tableau {
    c: &[0.0, 0.5, 0.5, 1.0],
    a: &[&[], &[0.5], &[0.0, 0.5], &[0.0, 0.0, 1.0]],
    b: &[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
    e: None,
    fsal: false,
};
static DOPRI5: Tableau = Tableau {
    c: &[0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0],
    a: &[
        &[],
        &[1.0 / 5.0],
        &[3.0 / 40.0, 9.0 / 40.0],
        &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
        &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
        &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
        &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
    ],
    b: &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0],
    e: Some(&[
        35.0 / 384.0 - 5179.0 / 57600.0,
        0.0,
        500.0 / 1113.0 - 7571.0 / 16695.0,
        125.0 / 192.0 - 393.0 / 640.0,
        -2187.0 / 6784.0 + 92097.0 / 339200.0,
        11.0 / 84.0 - 187.0 / 2100.0,
        -1.0 / 40.0,
    ]),
    fsal: true,
};

/// Reusable stage buffers, so repeated integrations allocate nothing.
#[derive(Default)]
pub struct Workspace {
    kx: Vec<Vec<f32>>,
    ka: Vec<Vec<f64>>,
    yx: Vec<f32>,
    ya: Vec<f64>,
    ex: Vec<f32>,
    ea: Vec<f64>,
}

impl Workspace {
    /// Size every buffer; an error, not an abort, when memory runs out.
    fn prepare(&mut self, stages: usize, nx: usize, na: usize) -> Result<()> {
        fn fit<T: Clone + Default>(v: &mut Vec<T>, len: usize) -> Result<()> {
            let too_big =
                || Error::invalid(format!("the solver's working memory ({len} values per stage) does not fit"));
            crate::alloc::resize(v, len, too_big)
        }
        self.kx.resize_with(stages, Vec::new);
        self.ka.resize_with(stages, Vec::new);
        for k in &mut self.kx {
            fit(k, nx)?;
        }
        for k in &mut self.ka {
            fit(k, na)?;
        }
        fit(&mut self.yx, nx)?;
        fit(&mut self.ya, na)?;
        fit(&mut self.ex, nx)?;
        fit(&mut self.ea, na)
    }
}

/// Integrate from `t0` to `t1` (either direction), updating `x` and `acc` in place.
/// `groups` splits the state into independent samples of equal size: the adaptive
/// solver requires every sample to meet its tolerance.
pub fn integrate<F: VectorField>(
    field: &mut F,
    cfg: &SolverConfig,
    t0: f64,
    t1: f64,
    x: &mut [f32],
    acc: &mut [f64],
    groups: usize,
    ws: &mut Workspace,
) -> Result<OdeStats> {
    cfg.validate()?;
    let tab = cfg.kind.tableau();
    ws.prepare(tab.b.len(), x.len(), acc.len())?;
    if cfg.kind == SolverKind::Dopri5 {
        adaptive(field, cfg, tab, t0, t1, x, acc, groups.max(1), ws)
    } else {
        let h = (t1 - t0) / f64::from(cfg.steps);
        let mut stats = OdeStats::default();
        for i in 0..cfg.steps {
            let t = t0 + f64::from(i) * h;
            stages(field, tab, t, h, x, acc, ws, false, &mut stats)?;
            combine(tab.b, h, x, acc, &ws.kx, &ws.ka);
            field.retract(x);
            stats.steps += 1;
        }
        Ok(stats)
    }
}

/// Evaluate all stages of one step into `ws.kx/ka`. With `first_known`, stage 0
/// is already in place (FSAL).
#[allow(clippy::too_many_arguments)]
fn stages<F: VectorField>(
    field: &mut F,
    tab: &Tableau,
    t: f64,
    h: f64,
    x: &[f32],
    acc: &[f64],
    ws: &mut Workspace,
    first_known: bool,
    stats: &mut OdeStats,
) -> Result<()> {
    for i in 0..tab.c.len() {
        if i == 0 {
            if !first_known {
                field.eval(t, x, acc, &mut ws.kx[0], &mut ws.ka[0])?;
                stats.nfe += 1;
            }
            continue;
        }
        // y = x + h Σ_j a_ij k_j in one pass over the state
        let (done, rest) = ws.kx.split_at_mut(i);
        lincomb::combine_into(&mut ws.yx, Some(x), tab.a[i], h, done);
        field.retract(&mut ws.yx);
        ws.ya.copy_from_slice(acc);
        combine_f64(tab.a[i], h, &mut ws.ya, &ws.ka);
        let (_, rest_a) = ws.ka.split_at_mut(i);
        field.eval(t + tab.c[i] * h, &ws.yx, &ws.ya, &mut rest[0], &mut rest_a[0])?;
        stats.nfe += 1;
    }
    Ok(())
}

/// `y += h Σ_j w_j k_j` for both parts of the state.
fn combine(w: &[f64], h: f64, yx: &mut [f32], ya: &mut [f64], kx: &[Vec<f32>], ka: &[Vec<f64>]) {
    lincomb::combine_into(yx, None, w, h, kx);
    combine_f64(w, h, ya, ka);
}

/// `y += h Σ_j w_j k_j` on the f64 accumulators (a few values per sample).
fn combine_f64(w: &[f64], h: f64, ya: &mut [f64], ka: &[Vec<f64>]) {
    for (j, &wj) in w.iter().enumerate() {
        if wj == 0.0 {
            continue;
        }
        let hw = h * wj;
        for (y, k) in ya.iter_mut().zip(&ka[j]) {
            *y += hw * *k;
        }
    }
}

/// Per-sample RMS norm of an error scaled by `atol + rtol·max(|y_old|, |y_new|)`; the max over samples.
fn error_norm(
    cfg: &SolverConfig,
    groups: usize,
    old: (&[f32], &[f64]),
    new: (&[f32], &[f64]),
    err: (&[f32], &[f64]),
) -> f64 {
    let gx = old.0.len() / groups;
    let ga = old.1.len() / groups;
    let mut worst: f64 = 0.0;
    for g in 0..groups {
        let mut sum = 0.0;
        for i in g * gx..(g + 1) * gx {
            let sc = cfg.atol + cfg.rtol * f64::from(old.0[i].abs().max(new.0[i].abs()));
            let r = f64::from(err.0[i]) / sc;
            sum += r * r;
        }
        for i in g * ga..(g + 1) * ga {
            let sc = cfg.atol + cfg.rtol * old.1[i].abs().max(new.1[i].abs());
            let r = err.1[i] / sc;
            sum += r * r;
        }
        let n = (gx + ga).max(1) as f64;
        let norm = (sum / n).sqrt();
        if norm.is_nan() {
            return f64::NAN;
        }
        worst = worst.max(norm);
    }
    worst
}

#[allow(clippy::too_many_arguments)]
fn adaptive<F: VectorField>(
    field: &mut F,
    cfg: &SolverConfig,
    tab: &Tableau,
    t0: f64,
    t1: f64,
    x: &mut [f32],
    acc: &mut [f64],
    groups: usize,
    ws: &mut Workspace,
) -> Result<OdeStats> {
    let mut stats = OdeStats::default();
    let span = t1 - t0;
    if span == 0.0 {
        return Ok(stats);
    }
    let dir = span.signum();
    let e = tab.e.expect("adaptive tableau has an error estimate");
    let last = tab.b.len() - 1;

    // Initial step (Hairer, Nørsett & Wanner, II.4): from the sizes of y and f.
    field.eval(t0, x, acc, &mut ws.kx[0], &mut ws.ka[0])?;
    stats.nfe += 1;
    let zeros_x = vec![0f32; x.len()];
    let zeros_a = vec![0f64; acc.len()];
    let d0 = error_norm(cfg, groups, (x, acc), (x, acc), (x, acc));
    let d1 = error_norm(cfg, groups, (x, acc), (x, acc), (&ws.kx[0], &ws.ka[0]));
    let mut h = if d0 < 1e-5 || d1 < 1e-5 { 1e-6 } else { 0.01 * d0 / d1 };
    h = h.min(span.abs());
    {
        ws.yx.copy_from_slice(x);
        ws.ya.copy_from_slice(acc);
        combine(&[1.0], dir * h, &mut ws.yx, &mut ws.ya, &ws.kx[..1], &ws.ka[..1]);
        field.retract(&mut ws.yx);
        field.eval(t0 + dir * h, &ws.yx, &ws.ya, &mut ws.ex, &mut ws.ea)?;
        stats.nfe += 1;
        for (d, k) in ws.ex.iter_mut().zip(&ws.kx[0]) {
            *d -= *k;
        }
        for (d, k) in ws.ea.iter_mut().zip(&ws.ka[0]) {
            *d -= *k;
        }
        let d2 = error_norm(cfg, groups, (x, acc), (&zeros_x, &zeros_a), (&ws.ex, &ws.ea)) / h;
        let dmax = d1.max(d2);
        let h1 = if dmax <= 1e-15 { (h * 1e-3).max(1e-6) } else { (0.01 / dmax).powf(1.0 / 5.0) };
        h = (100.0 * h).min(h1).min(span.abs());
    }

    let mut t = t0;
    let mut attempts = 0u32;
    let mut first_known = true;
    loop {
        let remaining = (t1 - t) * dir;
        if remaining <= 1e-12 * span.abs() {
            break;
        }
        if attempts >= cfg.max_steps {
            return Err(Error::numeric(format!(
                "dopri5 did not reach t = {t1} within {} steps (stopped at t = {t:.6}); raise max_steps or loosen rtol/atol",
                cfg.max_steps
            )));
        }
        attempts += 1;
        let step = h.min(remaining);
        let hs = dir * step;
        stages(field, tab, t, hs, x, acc, ws, first_known, &mut stats)?;
        // Candidate solution in yx/ya, error estimate in ex/ea.
        lincomb::combine_into(&mut ws.yx, Some(x), tab.b, hs, &ws.kx);
        // Retracted before FSAL reuses the last stage, which was evaluated at this same
        // point retracted (its stage row equals b).
        field.retract(&mut ws.yx);
        ws.ya.copy_from_slice(acc);
        combine_f64(tab.b, hs, &mut ws.ya, &ws.ka);
        ws.ex.iter_mut().for_each(|v| *v = 0.0);
        ws.ea.iter_mut().for_each(|v| *v = 0.0);
        combine(e, hs, &mut ws.ex, &mut ws.ea, &ws.kx, &ws.ka);
        let err = error_norm(cfg, groups, (x, acc), (&ws.yx, &ws.ya), (&ws.ex, &ws.ea));
        if !err.is_finite() {
            return Err(Error::numeric(format!("dopri5: non-finite error estimate at t = {t:.6}")));
        }
        if err <= 1.0 {
            x.copy_from_slice(&ws.yx);
            acc.copy_from_slice(&ws.ya);
            t += hs;
            stats.steps += 1;
            if tab.fsal {
                ws.kx.swap(0, last);
                ws.ka.swap(0, last);
                first_known = true;
            } else {
                first_known = false;
            }
            let fac = if err == 0.0 { 5.0 } else { (0.9 * err.powf(-0.2)).clamp(0.2, 5.0) };
            h = step * fac;
        } else {
            stats.rejected += 1;
            first_known = true; // stage 0 is still f(t, x)
            h = step * (0.9 * err.powf(-0.2)).clamp(0.2, 1.0);
            if h < 1e-12 * span.abs() {
                return Err(Error::numeric(format!("dopri5: step size underflow at t = {t:.6}")));
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dx/dt = x·cos(t), so x(t) = x0·exp(sin t); dacc/dt = cos t, so acc(t) = sin t.
    struct Analytic;
    impl VectorField for Analytic {
        fn eval(&mut self, t: f64, x: &[f32], _acc: &[f64], dx: &mut [f32], dacc: &mut [f64]) -> Result<()> {
            for (d, v) in dx.iter_mut().zip(x) {
                *d = *v * t.cos() as f32;
            }
            dacc.iter_mut().for_each(|d| *d = t.cos());
            Ok(())
        }
    }

    fn error_acc(kind: SolverKind, steps: u32) -> f64 {
        let mut x = vec![1.0f32];
        let mut acc = vec![0.0f64];
        let cfg = SolverConfig::fixed(kind, steps);
        integrate(&mut Analytic, &cfg, 0.0, 1.0, &mut x, &mut acc, 1, &mut Workspace::default()).unwrap();
        (acc[0] - 1f64.sin()).abs()
    }

    #[test]
    fn runs_backwards() {
        let mut x = vec![1f64.sin().exp() as f32];
        let mut acc = vec![0.0];
        let cfg = SolverConfig::fixed(SolverKind::Rk4, 50);
        integrate(&mut Analytic, &cfg, 1.0, 0.0, &mut x, &mut acc, 1, &mut Workspace::default()).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-5, "x(0) = {}", x[0]);
        assert!((acc[0] + 1f64.sin()).abs() < 1e-9);
    }

    #[test]
    fn euler_order_one_on_accumulator() {
        let r = error_acc(SolverKind::Euler, 20) / error_acc(SolverKind::Euler, 40);
        assert!((1.8..2.2).contains(&r), "ratio {r}");
    }
}
