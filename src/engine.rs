//! ONNX Runtime sessions for a bundle's graphs (flow, flow_jvp, net, and the
//! posterior's log-density for refinement).
//!
//! `Session::run` needs `&mut Session`, yet a loaded model is shared by many
//! threads. Each graph therefore has a small pool of sessions, each behind its
//! own mutex: a caller takes any free session, creates another one while the
//! pool is below its cap, and otherwise waits for one. A lock is held for one
//! `run` only. (`docs/performance.md` compares pool sizes under 4 threads.)
use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, TensorRefMut, ValueType};
use ort::AsPointer;

use crate::bundle::Manifest;
use crate::{Error, Result};

/// Where the graphs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The CUDA execution provider on GPU `id` (needs the `cuda` feature and a CUDA build of ONNX Runtime).
    Cuda(i32),
}

/// How sessions are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub device: Device,
    /// Intra-op threads per session; 0 lets ONNX Runtime choose.
    pub intra_op_threads: usize,
    /// Most sessions per graph (concurrent runs of that graph); at least 1.
    pub max_sessions: usize,
    /// Let ONNX Runtime's intra-op worker threads spin (busy-wait) between runs.
    pub allow_spinning: bool,
}

struct SessionPool {
    graph: &'static str,
    bytes: Vec<u8>,
    slots: Box<[OnceLock<Mutex<Session>>]>,
    creating: Mutex<()>,
    next: AtomicUsize,
}

impl SessionPool {
    fn new(graph: &'static str, bytes: Vec<u8>, first: Session, max: usize) -> Self {
        let slots: Box<[OnceLock<Mutex<Session>>]> = (0..max.max(1)).map(|_| OnceLock::new()).collect();
        let _ = slots[0].set(Mutex::new(first));
        SessionPool { graph, bytes, slots, creating: Mutex::new(()), next: AtomicUsize::new(0) }
    }

    fn acquire(&self, config: &SessionConfig) -> Result<MutexGuard<'_, Session>> {
        for slot in self.slots.iter() {
            match slot.get() {
                Some(m) => match m.try_lock() {
                    Ok(guard) => return Ok(guard),
                    // A run that panicked poisoned the lock, not the session: reuse it rather
                    // than count it busy forever.
                    Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                    Err(TryLockError::WouldBlock) => {}
                },
                None => {
                    // Every session is busy: add one if nobody else is doing so.
                    if let Ok(_creating) = self.creating.try_lock() {
                        if slot.get().is_none() {
                            let session = build_session(config, &self.bytes, self.graph)?;
                            let _ = slot.set(Mutex::new(session));
                        }
                    }
                    if let Some(m) = slot.get() {
                        return Ok(m.lock().unwrap_or_else(|p| p.into_inner()));
                    }
                    break;
                }
            }
        }
        let live = self.slots.iter().take_while(|s| s.get().is_some()).count().max(1);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live;
        let m = self.slots[i].get().expect("slot 0 is always filled");
        Ok(m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn live_sessions(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }
}

fn build_session(config: &SessionConfig, bytes: &[u8], graph: &str) -> Result<Session> {
    let env = crate::runtime::environment(None)?;
    let fail = |what: &str, e: String| Error::runtime(format!("graph {graph}: {what}: {e}"));
    let mut builder = Session::builder(env).map_err(|e| fail("session builder", e.to_string()))?;
    if config.intra_op_threads > 0 {
        builder =
            builder.with_intra_threads(config.intra_op_threads).map_err(|e| fail("intra-op threads", e.to_string()))?;
    }
    // An idle spinning pool burns cores the host application may need (see ModelOptions).
    builder = builder.with_intra_op_spinning(config.allow_spinning).map_err(|e| fail("spinning", e.to_string()))?;
    builder = builder.with_inter_op_spinning(config.allow_spinning).map_err(|e| fail("spinning", e.to_string()))?;
    match config.device {
        Device::Cpu => {}
        #[cfg(feature = "cuda")]
        Device::Cuda(id) => {
            let ep = ort::ep::CUDA::default().with_device_id(id).build().error_on_failure();
            builder = builder.with_execution_providers([ep]).map_err(|e| {
                Error::unsupported(format!(
                    "CUDA device {id} is not available to ONNX Runtime ({e}); a CUDA build of libonnxruntime and a visible GPU are needed"
                ))
            })?;
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(id) => {
            return Err(Error::unsupported(format!(
                "CUDA device {id} requested, but postflow was built without the `cuda` feature"
            )))
        }
    }
    builder.commit_from_memory(bytes).map_err(|e| fail("could not load the ONNX graph", e.to_string()))
}

/// The three graphs of a bundle, ready to run.
pub struct Engine {
    config: SessionConfig,
    flow: SessionPool,
    flow_jvp: SessionPool,
    net: SessionPool,
    /// `refine.graph` (format versions 3 and 4) and its fixed I/O names (`POSTERIOR_IO`).
    posterior: Option<(SessionPool, CNames<1, 2>)>,
    names: GraphNames,
    flow_c: CNames<2, 1>,
    jvp_c: CNames<3, 2>,
    dim: usize,
    input_dim: usize,
    outputs: usize,
}

/// The I/O names from the manifest, in the format's order.
#[derive(Debug, Clone)]
struct GraphNames {
    flow_in: [String; 2],
    flow_out: String,
    jvp_in: [String; 3],
    jvp_out: [String; 2],
    net_in: [String; 2],
    net_out: String,
}

/// The refinement graph's input and outputs (docs/bundle-format.md, "Refinement").
pub const POSTERIOR_IO: (&str, [&str; 2]) = ("theta", ["log_density", "grad"]);

/// Expected dims of a graph input or output: `None` = a batch dimension (must be dynamic).
type DimSpec = [Option<usize>];

impl Engine {
    /// Build one session per graph and check every input and output against the manifest.
    pub fn new(manifest: &Manifest, graphs: crate::bundle::GraphBytes, config: SessionConfig) -> Result<Engine> {
        crate::runtime::environment(None)?;
        let d = manifest.network.dim;
        let d_in = manifest.input.dim;
        let c = manifest.task.net_outputs();
        let g = &manifest.graphs;
        let names = GraphNames {
            flow_in: [g.flow.inputs[0].clone(), g.flow.inputs[1].clone()],
            flow_out: g.flow.outputs[0].clone(),
            jvp_in: [g.flow_jvp.inputs[0].clone(), g.flow_jvp.inputs[1].clone(), g.flow_jvp.inputs[2].clone()],
            jvp_out: [g.flow_jvp.outputs[0].clone(), g.flow_jvp.outputs[1].clone()],
            net_in: [g.net.inputs[0].clone(), g.net.inputs[1].clone()],
            net_out: g.net.outputs[0].clone(),
        };
        let flow = build_session(&config, &graphs.flow, "flow")?;
        check_io(&flow, "flow", true, &[(&names.flow_in[0], &[None]), (&names.flow_in[1], &[None, Some(d)])])?;
        check_io(&flow, "flow", false, &[(&names.flow_out, &[None, Some(d)])])?;
        let jvp = build_session(&config, &graphs.flow_jvp, "flow_jvp")?;
        check_io(
            &jvp,
            "flow_jvp",
            true,
            &[
                (&names.jvp_in[0], &[None]),
                (&names.jvp_in[1], &[None, Some(d)]),
                (&names.jvp_in[2], &[None, None, Some(d)]),
            ],
        )?;
        check_io(
            &jvp,
            "flow_jvp",
            false,
            &[(&names.jvp_out[0], &[None, Some(d)]), (&names.jvp_out[1], &[None, None])],
        )?;
        let net = build_session(&config, &graphs.net, "net")?;
        check_io(&net, "net", true, &[(&names.net_in[0], &[None, Some(d_in)]), (&names.net_in[1], &[None, Some(d)])])?;
        check_io(&net, "net", false, &[(&names.net_out, &[None, None, Some(c)])])?;
        let max = config.max_sessions.max(1);
        let posterior = match graphs.posterior {
            Some(bytes) => {
                let session = build_session(&config, &bytes, "posterior")?;
                let theta = POSTERIOR_IO.0.to_string();
                let [logp, grad] = POSTERIOR_IO.1.map(String::from);
                check_io(&session, "posterior", true, &[(&theta, &[None, Some(d)])])?;
                check_io(&session, "posterior", false, &[(&logp, &[None]), (&grad, &[None, Some(d)])])?;
                let names = CNames::new(&[theta], &[logp, grad])?;
                Some((SessionPool::new("posterior", bytes, session, max), names))
            }
            None => None,
        };
        let flow_c = CNames::new(&names.flow_in, std::slice::from_ref(&names.flow_out))?;
        let jvp_c = CNames::new(&names.jvp_in, &names.jvp_out)?;
        Ok(Engine {
            flow_c,
            jvp_c,
            flow: SessionPool::new("flow", graphs.flow, flow, max),
            flow_jvp: SessionPool::new("flow_jvp", graphs.flow_jvp, jvp, max),
            net: SessionPool::new("net", graphs.net, net, max),
            posterior,
            config,
            names,
            dim: d,
            input_dim: d_in,
            outputs: c,
        })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Sessions created so far for (flow, flow_jvp, net).
    pub fn live_sessions(&self) -> (usize, usize, usize) {
        (self.flow.live_sessions(), self.flow_jvp.live_sessions(), self.net.live_sessions())
    }

    /// `v = flow(t, x)` for a batch of `b` states (`t` has length `b`, `x` and `v_out` `b·D`).
    /// ONNX Runtime writes `v` straight into `v_out` (no copy).
    pub fn velocity(&self, t: &[f32], x: &[f32], v_out: &mut [f32]) -> Result<()> {
        let b = t.len();
        debug_assert_eq!(x.len(), b * self.dim);
        let inputs = [TensorRef::from_array_view(([b], t))?, TensorRef::from_array_view(([b, self.dim], x))?];
        let mut outputs = [TensorRefMut::from_array_view_mut(([b, self.dim], v_out))?];
        let mut session = self.flow.acquire(&self.config)?;
        run_into(&mut session, "flow", &self.flow_c, &inputs, &mut outputs)
    }

    /// `v` and `quad[b,k] = eps[b,k]ᵀ J eps[b,k]` for `b` states and `k` tangents each,
    /// written straight into `v_out` and `quad_out`.
    pub fn velocity_jvp(
        &self,
        t: &[f32],
        x: &[f32],
        eps: &[f32],
        k: usize,
        v_out: &mut [f32],
        quad_out: &mut [f32],
    ) -> Result<()> {
        let b = t.len();
        debug_assert_eq!(eps.len(), b * k * self.dim);
        let inputs = [
            TensorRef::from_array_view(([b], t))?,
            TensorRef::from_array_view(([b, self.dim], x))?,
            TensorRef::from_array_view(([b, k, self.dim], eps))?,
        ];
        let mut outputs = [
            TensorRefMut::from_array_view_mut(([b, self.dim], v_out))?,
            TensorRefMut::from_array_view_mut(([b, k], quad_out))?,
        ];
        let mut session = self.flow_jvp.acquire(&self.config)?;
        run_into(&mut session, "flow_jvp", &self.jvp_c, &inputs, &mut outputs)
    }

    /// Network outputs `[S,N,C]` for `n` inputs `x` (`n·d_in`) and `s` weight vectors `theta` (`s·D`).
    pub fn net(&self, x: &[f32], n: usize, theta: &[f32], s: usize, out: &mut [f32]) -> Result<()> {
        debug_assert_eq!(x.len(), n * self.input_dim);
        debug_assert_eq!(theta.len(), s * self.dim);
        let mut session = self.net.acquire(&self.config)?;
        let outputs = session.run(ort::inputs![
            self.names.net_in[0].as_str() => TensorRef::from_array_view(([n, self.input_dim], x))?,
            self.names.net_in[1].as_str() => TensorRef::from_array_view(([s, self.dim], theta))?,
        ])?;
        copy_output(&outputs, &self.names.net_out, "net", &[s, n, self.outputs], out)
    }
}

impl Engine {
    /// The posterior's `log_density` (`s`) and `grad` (`s·D`) at `s` weight vectors `theta`.
    pub fn log_posterior(&self, theta: &[f32], s: usize, logp_out: &mut [f32], grad_out: &mut [f32]) -> Result<()> {
        let (pool, names) =
            self.posterior.as_ref().ok_or_else(|| Error::invalid("this bundle has no refinement graph"))?;
        debug_assert_eq!(theta.len(), s * self.dim);
        // Straight into the caller's buffers, as the flow graphs: no tensor allocated or copied per run.
        let inputs = [TensorRef::from_array_view(([s, self.dim], theta))?];
        let mut outputs = [
            TensorRefMut::from_array_view_mut(([s], logp_out))?,
            TensorRefMut::from_array_view_mut(([s, self.dim], grad_out))?,
        ];
        let mut session = pool.acquire(&self.config)?;
        run_into(&mut session, "posterior", names, &inputs, &mut outputs)
    }
}

/// A graph's input and output names as C strings, made once for every `Run`.
struct CNames<const I: usize, const O: usize> {
    inputs: [CString; I],
    outputs: [CString; O],
}

impl<const I: usize, const O: usize> CNames<I, O> {
    fn new(inputs: &[String], outputs: &[String]) -> Result<Self> {
        let c =
            |n: &String| CString::new(n.as_str()).map_err(|_| Error::bundle(format!("graph name {n:?} contains NUL")));
        let inputs: Vec<CString> = inputs.iter().map(c).collect::<Result<_>>()?;
        let outputs: Vec<CString> = outputs.iter().map(c).collect::<Result<_>>()?;
        Ok(CNames {
            inputs: inputs.try_into().map_err(|_| Error::runtime("input name count"))?,
            outputs: outputs.try_into().map_err(|_| Error::runtime("output name count"))?,
        })
    }
}

/// One `Run` of `session` in which ONNX Runtime writes each output into the caller's
/// buffer behind `outputs` (pre-allocated outputs of the C API), saving the allocation of a
/// result tensor and its copy on every solver stage. ONNX Runtime refuses the run when a
/// graph produces a shape other than the buffer's.
fn run_into<const I: usize, const O: usize>(
    session: &mut Session,
    graph: &str,
    names: &CNames<I, O>,
    inputs: &[TensorRef<'_, f32>; I],
    outputs: &mut [TensorRefMut<'_, f32>; O],
) -> Result<()> {
    let in_names: [*const c_char; I] = std::array::from_fn(|i| names.inputs[i].as_ptr());
    let out_names: [*const c_char; O] = std::array::from_fn(|i| names.outputs[i].as_ptr());
    let in_values: [*const ort::sys::OrtValue; I] = std::array::from_fn(|i| inputs[i].ptr());
    let mut out_values: [*mut ort::sys::OrtValue; O] = std::array::from_fn(|i| outputs[i].ptr().cast_mut());
    let expected = out_values;
    // SAFETY: every pointer stays valid for the call: the names live in `names`, the
    // OrtValues in `inputs`/`outputs`, which borrow the caller's buffers of the right sizes
    // (checked when the views were made); the session is exclusively ours (`&mut`).
    let status = unsafe {
        (ort::api().Run)(
            session.ptr_mut(),
            std::ptr::null(),
            in_names.as_ptr(),
            in_values.as_ptr(),
            I,
            out_names.as_ptr(),
            O,
            out_values.as_mut_ptr(),
        )
    };
    // SAFETY: `status` comes straight from `Run`; this takes ownership and frees it.
    unsafe { ort::Error::result_from_status(status) }.map_err(|e| {
        let shapes: Vec<String> =
            outputs.iter().zip(names.outputs.iter()).map(|(o, n)| format!("{n:?} {:?}", o.shape())).collect();
        Error::runtime(format!("graph {graph}: ONNX Runtime: {e} (outputs expected: {})", shapes.join(", ")))
    })?;
    // ONNX Runtime fills pre-allocated outputs in place; it never swaps in a value of its own.
    if out_values != expected {
        return Err(Error::runtime(format!("graph {graph}: ONNX Runtime replaced a pre-allocated output")));
    }
    Ok(())
}

fn copy_output(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
    graph: &str,
    shape: &[usize],
    out: &mut [f32],
) -> Result<()> {
    let value = outputs
        .get(name)
        .ok_or_else(|| Error::runtime(format!("graph {graph}: output {name:?} missing from the results")))?;
    let (got_shape, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| Error::runtime(format!("graph {graph}: output {name:?}: {e}")))?;
    let dims: Vec<usize> = got_shape.iter().map(|d| *d as usize).collect();
    if dims != shape {
        return Err(Error::runtime(format!("graph {graph}: output {name:?} has shape {dims:?}, expected {shape:?}")));
    }
    out.copy_from_slice(data);
    Ok(())
}

fn check_io(session: &Session, graph: &str, inputs: bool, expected: &[(&String, &DimSpec)]) -> Result<()> {
    let (kind, outlets) = if inputs { ("input", session.inputs()) } else { ("output", session.outputs()) };
    if outlets.len() != expected.len() {
        let have: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
        return Err(Error::bundle(format!(
            "graph {graph}: has {} {kind}s {have:?}, the format needs {}",
            outlets.len(),
            expected.len()
        )));
    }
    for (name, dims) in expected {
        let outlet = outlets.iter().find(|o| o.name() == name.as_str()).ok_or_else(|| {
            let have: Vec<&str> = outlets.iter().map(|o| o.name()).collect();
            Error::bundle(format!(
                "graph {graph}: no {kind} named {name:?} (the manifest's graphs.{graph}); the graph has {have:?}"
            ))
        })?;
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            return Err(Error::bundle(format!("graph {graph}: {kind} {name:?} is not a tensor")));
        };
        if *ty != TensorElementType::Float32 {
            return Err(Error::bundle(format!(
                "graph {graph}: {kind} {name:?} has element type {ty:?}, expected float32"
            )));
        }
        if shape.len() != dims.len() {
            return Err(Error::bundle(format!(
                "graph {graph}: {kind} {name:?} has rank {}, expected rank {}",
                shape.len(),
                dims.len()
            )));
        }
        for (axis, (got, want)) in shape.iter().zip(dims.iter()).enumerate() {
            match want {
                Some(w) if *got >= 0 && *got as usize != *w => {
                    return Err(Error::bundle(format!(
                        "graph {graph}: {kind} {name:?} axis {axis} is {got}, the manifest says {w}"
                    )))
                }
                None if *got >= 0 => {
                    return Err(Error::bundle(format!(
                        "graph {graph}: {kind} {name:?} axis {axis} is fixed to {got}; batch axes must be dynamic"
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
