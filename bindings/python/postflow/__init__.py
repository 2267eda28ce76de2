"""ctypes binding of the postflow C API (``include/postflow.h``).

    import postflow
    with postflow.Model("tests/fixtures/bundles/affine_cls") as model:
        s = model.sample(100, seed=7, trace="hutchinson")
        p = model.predict(x, s.theta, log_weights=s.log_density)

The shared library is found, in order, at ``$POSTFLOW_LIB``, next to this package
(``postflow/libpostflow.so``), in the repository checkout this package lives in
(``target/release/libpostflow.so``), then through the system loader (an installed
``libpostflow.so``, e.g. after ``make install PREFIX=/usr/local``).

Arrays are numpy ``float32`` (inputs are converted, C-contiguous); failures raise
:class:`Error` (a subclass per status) carrying ``status`` and the C message. A
:class:`Model` may be shared by threads: the calls release the GIL.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = [
    "Model", "Samples", "Prediction", "Error", "InvalidArgumentError", "IoError", "BundleError",
    "RuntimeError_", "NumericError", "UnsupportedError", "PanicError", "version", "library_path",
    "OK", "ERR_INVALID_ARGUMENT", "ERR_IO", "ERR_BUNDLE", "ERR_RUNTIME", "ERR_NUMERIC", "ERR_UNSUPPORTED", "ERR_PANIC",
]

# pf_status
OK, ERR_INVALID_ARGUMENT, ERR_IO, ERR_BUNDLE, ERR_RUNTIME, ERR_NUMERIC, ERR_UNSUPPORTED, ERR_PANIC = range(8)
DEVICES = {"cpu": 0, "cuda": 1}
SOLVERS = {"default": 0, "euler": 1, "heun": 2, "rk4": 3, "dopri5": 4}
TRACES = {"none": 0, "hutchinson": 1, "hutchinson-gaussian": 2, "exact": 3}
TASKS = {0: "classification", 1: "regression"}


class Error(Exception):
    """A failed postflow call: ``status`` (int), ``status_name`` and ``message``."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.status_name = _status_name(status)
        self.message = message
        super().__init__(f"{self.status_name}: {message}")


class InvalidArgumentError(Error, ValueError):
    pass


class IoError(Error, OSError):
    pass


class BundleError(Error):
    pass


class RuntimeError_(Error, RuntimeError):
    """ONNX Runtime failed (PF_ERR_RUNTIME)."""


class NumericError(Error, ArithmeticError):
    pass


class UnsupportedError(Error):
    pass


class PanicError(Error):
    pass


_ERRORS = {
    ERR_INVALID_ARGUMENT: InvalidArgumentError, ERR_IO: IoError, ERR_BUNDLE: BundleError,
    ERR_RUNTIME: RuntimeError_, ERR_NUMERIC: NumericError, ERR_UNSUPPORTED: UnsupportedError, ERR_PANIC: PanicError,
}

_f32p = ctypes.POINTER(ctypes.c_float)


class _ModelOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("device", ctypes.c_uint32), ("device_id", ctypes.c_int32),
                ("intra_op_threads", ctypes.c_uint32), ("onnxruntime_path", ctypes.c_char_p),
                ("max_sessions", ctypes.c_uint32), ("flags", ctypes.c_uint64)]

# pf_model_options.flags bit: let ONNX Runtime's worker threads spin between runs.
MODEL_FLAG_ALLOW_SPINNING = 1


class _ModelInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("task", ctypes.c_uint32), ("input_dim", ctypes.c_size_t),
                ("output_dim", ctypes.c_size_t), ("weight_dim", ctypes.c_size_t), ("uncertainty_dim", ctypes.c_size_t)]


class _SampleOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("seed", ctypes.c_uint64), ("solver", ctypes.c_uint32),
                ("steps", ctypes.c_uint32), ("rtol", ctypes.c_double), ("atol", ctypes.c_double),
                ("trace", ctypes.c_uint32), ("probes", ctypes.c_uint32), ("max_steps", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("start_time", ctypes.c_double),
                ("project_to_slice", ctypes.c_uint32)]

# pf_sample_options.start_time value that selects the bundle's default start time.
START_TIME_BUNDLE = -1.0


class _Prediction(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("mean", _f32p), ("mean_len", ctypes.c_size_t),
                ("total", _f32p), ("total_len", ctypes.c_size_t), ("aleatoric", _f32p),
                ("aleatoric_len", ctypes.c_size_t), ("epistemic", _f32p), ("epistemic_len", ctypes.c_size_t),
                ("ess", ctypes.c_double)]


def _candidates():
    env = os.environ.get("POSTFLOW_LIB")
    if env:
        yield Path(env)
        return
    here = Path(__file__).resolve().parent
    yield here / "libpostflow.so"
    for parent in here.parents:
        if (parent / "Cargo.toml").is_file() and (parent / "include" / "postflow.h").is_file():
            yield parent / "target" / "release" / "libpostflow.so"
            break
    found = ctypes.util.find_library("postflow")
    yield Path(found or "libpostflow.so")


def library_path() -> str:
    """The path of the libpostflow.so this module loaded."""
    _lib()
    return _LIB_PATH


_LIB = None
_LIB_PATH = ""


def _lib():
    global _LIB, _LIB_PATH
    if _LIB is not None:
        return _LIB
    tried = []
    for cand in _candidates():
        if cand.parent != Path(".") and not cand.exists():
            tried.append(f"{cand}: not found")
            continue
        try:
            lib = ctypes.CDLL(str(cand))
        except OSError as e:
            tried.append(f"{cand}: {e}")
            continue
        _declare(lib)
        _LIB, _LIB_PATH = lib, str(cand)
        return lib
    raise OSError("cannot load libpostflow.so (set POSTFLOW_LIB to its path); tried: " + "; ".join(tried))


def _declare(lib):
    c_size, c_u32, st = ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32
    mp = ctypes.c_void_p
    sig = {
        "pf_version": (ctypes.c_char_p, []),
        "pf_status_string": (ctypes.c_char_p, [c_u32]),
        "pf_last_error_message": (ctypes.c_char_p, []),
        "pf_model_options_default": (None, [ctypes.POINTER(_ModelOptions)]),
        "pf_model_options_init": (st, [ctypes.POINTER(_ModelOptions), c_u32]),
        "pf_sample_options_default": (None, [ctypes.POINTER(_SampleOptions)]),
        "pf_sample_options_init": (st, [ctypes.POINTER(_SampleOptions), c_u32]),
        "pf_model_load": (st, [ctypes.c_char_p, ctypes.POINTER(_ModelOptions), ctypes.POINTER(mp)]),
        "pf_model_free": (None, [mp]),
        "pf_model_get_info": (st, [mp, ctypes.POINTER(_ModelInfo)]),
        "pf_sample": (st, [mp, ctypes.POINTER(_SampleOptions), c_size, _f32p, c_size, _f32p, c_size, _f32p, c_size]),
        "pf_log_prob": (st, [mp, ctypes.POINTER(_SampleOptions), _f32p, c_size, c_size, _f32p, c_size, _f32p, c_size]),
        "pf_predict": (st, [mp, _f32p, c_size, c_size, _f32p, c_size, c_size, _f32p, ctypes.POINTER(_Prediction)]),
        "pf_sample_predict": (st, [mp, ctypes.POINTER(_SampleOptions), c_size, _f32p, c_size, c_size,
                                   ctypes.POINTER(_Prediction)]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _status_name(status: int) -> str:
    return _lib().pf_status_string(status).decode()


def _check(status: int) -> None:
    if status != OK:
        message = _lib().pf_last_error_message().decode("utf-8", "replace")
        raise _ERRORS.get(status, Error)(status, message)


def version() -> str:
    """The library's version string."""
    return _lib().pf_version().decode()


def _enum(value: Union[str, int], table: dict, what: str) -> int:
    if isinstance(value, str):
        try:
            return table[value]
        except KeyError:
            raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"unknown {what} {value!r} (expected one of {sorted(table)})")
    return int(value)  # passed through: the library validates integers


def _ptr(a: Optional[np.ndarray]):
    return None if a is None else a.ctypes.data_as(_f32p)


def _as_f32(a, name: str, ndim: int) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float32)
    if arr.ndim != ndim:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


@dataclass
class Samples:
    theta: np.ndarray  # [n, D] float32
    log_density: Optional[np.ndarray]  # [n] or None
    stderr: Optional[np.ndarray]  # [n] or None (zeros with one probe or the exact trace)


@dataclass
class Prediction:
    mean: np.ndarray  # [N, output_dim]
    total: np.ndarray  # [N, U]
    aleatoric: np.ndarray
    epistemic: np.ndarray
    ess: float


class Model:
    """A loaded bundle (``pf_model``). Use as a context manager, or call :meth:`close`."""

    def __init__(self, bundle_dir, device: Union[str, int] = "cpu", device_id: int = 0, intra_op_threads: int = 0,
                 onnxruntime_path: Optional[str] = None, max_sessions: int = 0, allow_spinning: bool = False):
        lib = _lib()
        self._handle = None
        opts = _ModelOptions()
        _check(lib.pf_model_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        opts.device = _enum(device, DEVICES, "device")
        opts.device_id = device_id
        opts.intra_op_threads = intra_op_threads
        opts.onnxruntime_path = os.fsencode(onnxruntime_path) if onnxruntime_path else None
        opts.max_sessions = max_sessions
        # Off by default: idle spinning pools would take cores from the host process.
        opts.flags = MODEL_FLAG_ALLOW_SPINNING if allow_spinning else 0
        handle = ctypes.c_void_p()
        _check(lib.pf_model_load(os.fsencode(os.fspath(bundle_dir)), ctypes.byref(opts), ctypes.byref(handle)))
        self._handle = handle
        info = _ModelInfo(struct_size=ctypes.sizeof(_ModelInfo))
        _check(lib.pf_model_get_info(handle, ctypes.byref(info)))
        self.task = TASKS[info.task]
        self.input_dim = info.input_dim
        self.output_dim = info.output_dim
        self.weight_dim = info.weight_dim
        self.uncertainty_dim = info.uncertainty_dim

    def close(self) -> None:
        """Free the model (idempotent); the object is unusable afterwards."""
        if self._handle is not None:
            _lib().pf_model_free(self._handle)
            self._handle = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidArgumentError(ERR_INVALID_ARGUMENT, "the model is closed")
        return self._handle

    @staticmethod
    def _options(seed=0, solver="default", steps=0, rtol=0.0, atol=0.0, trace="none", probes=0, max_steps=0,
                 batch_size=0, start_time=None, project_to_slice=False, struct_size=None) -> _SampleOptions:
        o = _SampleOptions()
        _check(_lib().pf_sample_options_init(ctypes.byref(o), ctypes.sizeof(o)))
        o.seed = seed
        o.solver = _enum(solver, SOLVERS, "solver")
        o.steps = steps
        o.rtol = rtol
        o.atol = atol
        o.trace = _enum(trace, TRACES, "trace")
        o.probes = probes
        o.max_steps = max_steps
        o.batch_size = batch_size
        # None: the bundle's default start time (0, the plain flow, for bundles without anchors).
        o.start_time = START_TIME_BUNDLE if start_time is None else float(start_time)
        # sphere_product bundles: log_prob renormalizes each unit's (w, b) instead of refusing it.
        o.project_to_slice = 1 if project_to_slice else 0
        if struct_size is not None:
            o.struct_size = struct_size
        return o

    def sample(self, n: int, **options) -> Samples:
        """Draw ``n`` weight samples; ``trace`` != "none" adds log-densities (see pf_sample_options)."""
        o = self._options(**options)
        theta = np.empty((n, self.weight_dim), dtype=np.float32)
        with_density = o.trace != TRACES["none"]
        logd = np.empty(n, dtype=np.float32) if with_density else None
        se = np.empty(n, dtype=np.float32) if with_density else None
        _check(_lib().pf_sample(self.handle, ctypes.byref(o), n, _ptr(theta), theta.size, _ptr(logd), n if with_density else 0,
                                _ptr(se), n if with_density else 0))
        return Samples(theta, logd, se)

    def log_prob(self, theta, **options):
        """Log-densities of the rows of ``theta`` [n, D]; returns (log_density, stderr)."""
        options.setdefault("trace", "exact")
        o = self._options(**options)
        t = _as_f32(theta, "theta", 2)
        n = t.shape[0]
        logd = np.empty(n, dtype=np.float32)
        se = np.empty(n, dtype=np.float32)
        _check(_lib().pf_log_prob(self.handle, ctypes.byref(o), _ptr(t), n, t.size, _ptr(logd), n, _ptr(se), n))
        return logd, se

    def _prediction(self, n_inputs: int):
        mean = np.empty((n_inputs, self.output_dim), dtype=np.float32)
        us = [np.empty((n_inputs, self.uncertainty_dim), dtype=np.float32) for _ in range(3)]
        p = _Prediction(struct_size=ctypes.sizeof(_Prediction), mean=_ptr(mean), mean_len=mean.size,
                        total=_ptr(us[0]), total_len=us[0].size, aleatoric=_ptr(us[1]), aleatoric_len=us[1].size,
                        epistemic=_ptr(us[2]), epistemic_len=us[2].size)
        return p, mean, us

    def predict(self, x, theta, log_weights=None) -> Prediction:
        """Bayesian model average at ``x`` [N, d_in] over ``theta`` [S, D], optional log-weights [S]."""
        xa = _as_f32(x, "x", 2)
        t = _as_f32(theta, "theta", 2)
        lw = None
        if log_weights is not None:
            lw = _as_f32(log_weights, "log_weights", 1)
            if lw.shape[0] != t.shape[0]:
                raise InvalidArgumentError(ERR_INVALID_ARGUMENT,
                                           f"log_weights has {lw.shape[0]} entries, theta has {t.shape[0]} rows")
        p, mean, us = self._prediction(xa.shape[0])
        _check(_lib().pf_predict(self.handle, _ptr(xa), xa.shape[0], xa.size, _ptr(t), t.shape[0], t.size, _ptr(lw),
                                 ctypes.byref(p)))
        return Prediction(mean, us[0], us[1], us[2], p.ess)

    def sample_predict(self, n: int, x, **options) -> Prediction:
        """Draw ``n`` samples and average their predictions at ``x``."""
        o = self._options(**options)
        xa = _as_f32(x, "x", 2)
        p, mean, us = self._prediction(xa.shape[0])
        _check(_lib().pf_sample_predict(self.handle, ctypes.byref(o), n, _ptr(xa), xa.shape[0], xa.size, ctypes.byref(p)))
        return Prediction(mean, us[0], us[1], us[2], p.ess)
