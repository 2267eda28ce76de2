"""postflow: posterior weight samples and Bayesian model averaging from flow bundles.

A ctypes binding of the postflow C API (``include/postflow.h``)::

    import numpy as np
    import postflow

    with postflow.Model("models/digits") as model:            # a bundle folder
        print(model)                                            # name, task, D and dims
        samples = model.sample(100, seed=0)                     # 100 posterior weight vectors [100, D]
        x = np.random.default_rng(0).uniform(0, 16, (5, 64))    # 5 inputs [N, 64]
        p = model.predict(x, samples)                           # Bayesian model average
        print(p.mean.argmax(axis=1))                            # predicted classes
        print(p.epistemic[:, 0])                                # mutual information per input

The wheel carries ``libpostflow`` itself; the shared library is found, in order, at
``$POSTFLOW_LIB``, next to this module (``libpostflow.abi3.so`` in a wheel, or a
``libpostflow.so`` put there), in the repository checkout this module lives in
(``target/release/libpostflow.so``), then through the system loader.

ONNX Runtime comes from the ``onnxruntime`` wheel this package depends on: unless the
caller names a library (``Model(onnxruntime_path=...)``, ``$POSTFLOW_ORT_LIB`` or
``$ORT_DYLIB_PATH``), each :class:`Model` is loaded with that wheel's
``onnxruntime/capi/libonnxruntime.so.*`` (see :func:`onnxruntime_library`). Without
the wheel, the runtime's own search applies (the variables, a checkout's ``.ort/``,
the system loader).

Arrays are numpy ``float32`` (inputs are converted, C-contiguous and aligned); every
failure raises a subclass of :class:`Error` carrying ``status`` and the C message, and
integers out of range of their C field are refused, never wrapped. A :class:`Model`
may be shared by threads: the calls release the GIL, and :meth:`Model.close` waits for
calls in progress.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import importlib.util
import json
import numbers
import operator
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, SupportsIndex, Tuple, Type, Union

import numpy as np
import numpy.typing as npt

__all__ = [
    "Model", "Samples", "Prediction", "Status", "Error", "InvalidArgumentError", "IoError", "BundleError",
    "RuntimeError_", "NumericError", "UnsupportedError", "PanicError", "LibraryError", "version",
    "library_path", "onnxruntime_library", "F32Array",
    "OK", "ERR_INVALID_ARGUMENT", "ERR_IO", "ERR_BUNDLE", "ERR_RUNTIME", "ERR_NUMERIC", "ERR_UNSUPPORTED", "ERR_PANIC",
    "DEVICES", "SOLVERS", "TRACES", "REFINE_KERNELS", "TASKS", "MODEL_FLAG_ALLOW_SPINNING", "START_TIME_BUNDLE", "REFINE_BUNDLE",
]

#: A float32 numpy array (every array this module returns).
F32Array = npt.NDArray[np.float32]
#: What a bundle folder may be given as.
PathLike = Union[str, "os.PathLike[str]"]


class Status(enum.IntEnum):
    """The C API's ``pf_status`` codes (an ``int``: ``Status.ERR_IO == 2``)."""

    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_IO = 2
    ERR_BUNDLE = 3
    ERR_RUNTIME = 4
    ERR_NUMERIC = 5
    ERR_UNSUPPORTED = 6
    ERR_PANIC = 7


# The codes as module constants, as in the C header.
OK, ERR_INVALID_ARGUMENT, ERR_IO, ERR_BUNDLE, ERR_RUNTIME, ERR_NUMERIC, ERR_UNSUPPORTED, ERR_PANIC = tuple(Status)
#: ``device`` names accepted by :class:`Model` (``pf_device``).
DEVICES = {"cpu": 0, "cuda": 1}
#: ``solver`` names accepted by the sampling methods (``pf_solver``; "default": the bundle's).
SOLVERS = {"default": 0, "euler": 1, "heun": 2, "rk4": 3, "dopri5": 4}
#: ``trace`` names accepted by the sampling methods (``pf_trace``; "none": no log-densities).
#: "hutchinson" is the bundle's own estimator (:attr:`Model.hutchinson_trace`), as on the command
#: line; the code 1 alone (``PF_TRACE_HUTCHINSON``) is Rademacher probes.
TRACES = {"none": 0, "hutchinson": 1, "hutchinson-rademacher": 1, "hutchinson-gaussian": 2, "exact": 3}
#: ``refine_kernel`` names accepted by the sampling methods (``pf_refine_kernel``): "bundle"
#: (the default) is the bundle's, the endpoint kernel for every format so far; "endpoint" keeps
#: a rejected transition's start; "multinomial" (NUTS's trajectory sampling at a fixed depth,
#: no U-turn rule) nearly never returns the start.
REFINE_KERNELS = {"bundle": 0, "endpoint": 1, "multinomial": 2}
#: ``pf_trace`` codes of a bundle's estimator to their :data:`TRACES` names.
HUTCHINSON_NAMES = {1: "hutchinson-rademacher", 2: "hutchinson-gaussian"}
#: ``pf_task`` values to :attr:`Model.task` names.
TASKS = {0: "classification", 1: "regression"}


class Error(Exception):
    """Base of every postflow failure: ``status`` (:class:`Status`), ``status_name`` and ``message``."""

    def __init__(self, status: int, message: str):
        try:
            self.status: Union[Status, int] = Status(status)
            self.status_name = "PF_" + self.status.name
        except ValueError:  # a status newer than this module
            self.status, self.status_name = status, "PF_UNKNOWN_STATUS"
        self.message = message
        super().__init__(f"{self.status_name}: {message}")

    def __reduce__(self) -> Tuple[Any, ...]:
        # args holds only the formatted text, which __init__ cannot take back: pickle and
        # copy rebuild from (status, message) instead, keeping any attributes or notes.
        return type(self), (self.status, self.message), dict(self.__dict__)


class InvalidArgumentError(Error, ValueError):
    """An argument or option was rejected (``PF_ERR_INVALID_ARGUMENT``)."""


class IoError(Error, OSError):
    """A bundle file could not be read (``PF_ERR_IO``)."""


class BundleError(Error):
    """The bundle is malformed or inconsistent (``PF_ERR_BUNDLE``)."""


class RuntimeError_(Error, RuntimeError):
    """ONNX Runtime failed or could not be loaded (``PF_ERR_RUNTIME``)."""


class NumericError(Error, ArithmeticError):
    """NaN or Inf in inputs or results (``PF_ERR_NUMERIC``)."""


class UnsupportedError(Error):
    """The request needs something this build or bundle lacks, e.g. CUDA (``PF_ERR_UNSUPPORTED``)."""


class PanicError(Error):
    """A bug inside libpostflow, caught at the C boundary (``PF_ERR_PANIC``)."""


class LibraryError(Error, OSError):
    """libpostflow itself could not be loaded (status ``PF_ERR_IO``); the message lists every path tried."""

    def __init__(self, message: str):
        super().__init__(ERR_IO, message)

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.message,), dict(self.__dict__)  # this __init__ takes the message only


_ERRORS: Dict[int, Type[Error]] = {
    ERR_INVALID_ARGUMENT: InvalidArgumentError, ERR_IO: IoError, ERR_BUNDLE: BundleError,
    ERR_RUNTIME: RuntimeError_, ERR_NUMERIC: NumericError, ERR_UNSUPPORTED: UnsupportedError, ERR_PANIC: PanicError,
}

_f32p = ctypes.POINTER(ctypes.c_float)


class _ModelOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("device", ctypes.c_uint32), ("device_id", ctypes.c_int32),
                ("intra_op_threads", ctypes.c_uint32), ("onnxruntime_path", ctypes.c_char_p),
                ("max_sessions", ctypes.c_uint32), ("flags", ctypes.c_uint64)]


#: ``pf_model_options.flags`` bit: let ONNX Runtime's worker threads spin between runs.
MODEL_FLAG_ALLOW_SPINNING = 1


class _ModelInfo(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("task", ctypes.c_uint32), ("input_dim", ctypes.c_size_t),
                ("output_dim", ctypes.c_size_t), ("weight_dim", ctypes.c_size_t), ("uncertainty_dim", ctypes.c_size_t),
                ("default_start_time", ctypes.c_double), ("anchor_count", ctypes.c_size_t),
                ("hutchinson_trace", ctypes.c_uint32), ("hutchinson_probes", ctypes.c_uint32),
                ("default_refine_transitions", ctypes.c_uint32), ("default_refine_start_time", ctypes.c_double)]


class _SampleOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("seed", ctypes.c_uint64), ("solver", ctypes.c_uint32),
                ("steps", ctypes.c_uint32), ("rtol", ctypes.c_double), ("atol", ctypes.c_double),
                ("trace", ctypes.c_uint32), ("probes", ctypes.c_uint32), ("max_steps", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("start_time", ctypes.c_double),
                ("project_to_slice", ctypes.c_uint32), ("refine_transitions", ctypes.c_int64),
                ("first_index", ctypes.c_uint64), ("refine_kernel", ctypes.c_uint32),
                ("refine_leapfrog", ctypes.c_uint32)]


#: ``pf_sample_options.start_time`` value that selects the bundle's default start time.
START_TIME_BUNDLE = -1.0

#: ``pf_sample_options.refine_transitions`` value that selects the bundle's default refinement.
REFINE_BUNDLE = -1


class _Prediction(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("mean", _f32p), ("mean_len", ctypes.c_size_t),
                ("total", _f32p), ("total_len", ctypes.c_size_t), ("aleatoric", _f32p),
                ("aleatoric_len", ctypes.c_size_t), ("epistemic", _f32p), ("epistemic_len", ctypes.c_size_t),
                ("ess", ctypes.c_double)]


# ---- Finding the libraries ---------------------------------------------------------

def _candidates() -> Iterator[Path]:
    env = os.environ.get("POSTFLOW_LIB")
    if env:
        yield Path(env)
        return
    here = Path(__file__).resolve().parent
    yield here / "libpostflow.abi3.so"  # what the wheel carries
    yield here / "libpostflow.so"
    for parent in here.parents:
        if (parent / "Cargo.toml").is_file() and (parent / "include" / "postflow.h").is_file():
            yield parent / "target" / "release" / "libpostflow.so"
            break
    found = ctypes.util.find_library("postflow")
    yield Path(found or "libpostflow.so")


def _version_key(path: Path) -> Tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name.split(".so", 1)[-1]))


def _find_onnxruntime_wheel() -> Optional[str]:
    """The ``onnxruntime`` wheel's shared library, located without importing onnxruntime."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        libs = [p for p in Path(location, "capi").glob("libonnxruntime.so*") if p.is_file()]
        if libs:
            return str(max(libs, key=_version_key))  # the versioned file, not a link to it
    return None


# Found once, at import: the wheel cannot move while the process runs.
_WHEEL_ORT = _find_onnxruntime_wheel()


def onnxruntime_library() -> Optional[str]:
    """The ONNX Runtime library a :class:`Model` without ``onnxruntime_path`` is pointed at.

    That is the ``onnxruntime`` wheel's ``capi/libonnxruntime.so.*``, or None when the
    caller set ``$POSTFLOW_ORT_LIB`` or ``$ORT_DYLIB_PATH`` (the runtime then searches
    as documented in docs/c-api.md) or no ``onnxruntime`` package is installed. The
    first library loaded serves the whole process.
    """
    if any(os.environ.get(v) for v in ("POSTFLOW_ORT_LIB", "ORT_DYLIB_PATH")):
        return None
    return _WHEEL_ORT


def library_path() -> str:
    """The path of the libpostflow this module loaded (loading it if needed)."""
    _lib()
    return _LIB_PATH


_LIB: Optional[ctypes.CDLL] = None
_LIB_PATH = ""


def _lib() -> ctypes.CDLL:
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
    raise LibraryError("cannot load libpostflow (set POSTFLOW_LIB to its path); tried: " + "; ".join(tried))


def _declare(lib: ctypes.CDLL) -> None:
    c_size, c_u32, st = ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32
    mp = ctypes.c_void_p
    sig: Dict[str, Tuple[Any, List[Any]]] = {
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


def _check(status: int) -> None:
    if status != OK:
        message = _lib().pf_last_error_message().decode("utf-8", "replace")
        raise _ERRORS.get(status, Error)(status, message)


def version() -> str:
    """The loaded libpostflow's version string, e.g. "0.4.0"."""
    v: bytes = _lib().pf_version()
    return v.decode()


def _int(value: Any, name: str, bits: int = 32, signed: bool = False) -> int:
    """``value`` for a C integer field of ``bits`` bits, checked: ctypes would silently wrap it."""
    # bool is an int subclass, but True as a seed or a count is a mistake, not 1.
    if isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # ints and numpy integers; refuses floats (3.0 included)
    except TypeError:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT,
                                   f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= v <= hi:
        kind = f"{'' if signed else 'u'}int{bits}_t"
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} is {v}, outside the {kind} range [{lo}, {hi}]")
    return v


def _real(value: Any, name: str) -> float:
    """``value`` for a C double field; anything but a real number (bool included) is refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} must be a real number, got {value!r}")
    return float(value)  # NaN and out-of-range values are the library's to refuse, with its message


def _path(value: Any, name: str) -> bytes:
    """A path for a C string: ctypes would cut it silently at a NUL byte."""
    try:
        encoded = os.fsencode(value)
    except TypeError:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT,
                                   f"{name} must be a path, got {type(value).__name__} {value!r}") from None
    if b"\0" in encoded:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} contains a NUL byte: {value!r}")
    return encoded


def _enum(value: Union[str, int], table: Dict[str, int], what: str) -> int:
    if isinstance(value, str):
        try:
            return table[value]
        except KeyError:
            raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"unknown {what} {value!r} (expected one of {sorted(table)})")
    return _int(value, what)  # an integer in range of the field; the library refuses unknown values


def _ptr(a: Optional[np.ndarray]) -> Any:
    return None if a is None else a.ctypes.data_as(_f32p)


def _as_f32(a: npt.ArrayLike, name: str, ndim: int) -> F32Array:
    # The C API reads native float32, C-contiguous and aligned (it refuses unaligned pointers):
    # np.require copies only what lacks one of those (strided, Fortran, float64, big-endian,
    # unaligned buffers); "E" makes it a base ndarray. Unlike ascontiguousarray, it keeps 0-d as 0-d.
    try:
        arr = np.require(a, np.float32, ["C", "A", "E"])
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} is not convertible to a float32 array: {e}") from None
    if arr.ndim != ndim:
        raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


# ---- Results -----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Samples:
    """Weight samples drawn by :meth:`Model.sample`.

    ``np.asarray(samples)`` is ``theta``; ``len(samples)`` the number of samples.
    """

    #: ``[n, D]`` weight vectors, one per row.
    theta: F32Array
    #: ``[n]`` log-densities under the flow, or None (``trace="none"``).
    log_density: Optional[F32Array] = None
    #: ``[n]`` standard errors of the Hutchinson estimates (zeros with one probe or the exact trace), or None.
    stderr: Optional[F32Array] = None

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def __array__(self, dtype: Optional[npt.DTypeLike] = None, copy: Optional[bool] = None) -> np.ndarray:
        return _array_view(self.theta, dtype, copy)


@dataclass(frozen=True, eq=False)
class Prediction:
    """A Bayesian model average at ``N`` inputs (:meth:`Model.predict`, :meth:`Model.sample_predict`).

    ``np.asarray(prediction)`` is ``mean``; ``len(prediction)`` the number of inputs.
    """

    #: ``[N, output_dim]`` averaged predictive: class probabilities, or the regression mean.
    mean: F32Array
    #: ``[N, U]`` total uncertainty: predictive entropy (classification) or variance (regression).
    total: F32Array
    #: ``[N, U]`` its aleatoric part: expected entropy, or expected noise variance.
    aleatoric: F32Array
    #: ``[N, U]`` its epistemic part (``total - aleatoric``): mutual information, or variance of the means.
    epistemic: F32Array
    #: Kish effective sample size of the weights (the sample count when unweighted).
    ess: float

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def __array__(self, dtype: Optional[npt.DTypeLike] = None, copy: Optional[bool] = None) -> np.ndarray:
        return _array_view(self.mean, dtype, copy)


def _array_view(a: np.ndarray, dtype: Optional[npt.DTypeLike], copy: Optional[bool]) -> np.ndarray:
    # numpy's __array__ protocol: copy=False forbids a copy, True forces one.
    if dtype is not None and np.dtype(dtype) != a.dtype:
        if copy is False:
            raise ValueError(f"converting float32 to {np.dtype(dtype)} needs a copy")
        return a.astype(dtype)
    return a.copy() if copy else a


# ---- The model -----------------------------------------------------------------------

class Model:
    """A loaded bundle (``pf_model``). Use as a context manager, or call :meth:`close`.

    ``bundle_dir`` is the bundle folder. ``onnxruntime_path`` names the ONNX Runtime
    library (default: :func:`onnxruntime_library`). ``intra_op_threads`` (0: ONNX
    Runtime's default), ``max_sessions`` (0: the default pool) and ``allow_spinning``
    tune the sessions; ``device`` is "cpu" or "cuda" (with ``device_id``).

    Threads may share a model. :meth:`close` refuses calls that start after it, waits
    for the calls in progress to return, then frees the model once.
    """

    def __init__(self, bundle_dir: PathLike, device: Union[str, int] = "cpu", device_id: int = 0,
                 intra_op_threads: int = 0, onnxruntime_path: Optional[PathLike] = None, max_sessions: int = 0,
                 allow_spinning: bool = False):
        lib = _lib()
        self._handle: Optional[ctypes.c_void_p] = None
        # Guards _handle, _closing and _calls (the C calls in progress, made without the GIL).
        self._lock = threading.Condition()
        self._calls = 0
        self._closing = False
        path = _path(bundle_dir, "bundle_dir")
        self.bundle_dir = Path(os.fsdecode(path))
        opts = _ModelOptions()
        _check(lib.pf_model_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        opts.device = _enum(device, DEVICES, "device")
        opts.device_id = _int(device_id, "device_id", 32, signed=True)
        opts.intra_op_threads = _int(intra_op_threads, "intra_op_threads")
        ort = onnxruntime_path if onnxruntime_path is not None else onnxruntime_library()
        opts.onnxruntime_path = _path(ort, "onnxruntime_path") if ort else None
        opts.max_sessions = _int(max_sessions, "max_sessions")
        # Off by default: idle spinning pools would take cores from the host process.
        opts.flags = MODEL_FLAG_ALLOW_SPINNING if allow_spinning else 0
        handle = ctypes.c_void_p()
        _check(lib.pf_model_load(path, ctypes.byref(opts), ctypes.byref(handle)))
        self._handle = handle
        info = _ModelInfo(struct_size=ctypes.sizeof(_ModelInfo))
        _check(lib.pf_model_get_info(handle, ctypes.byref(info)))
        #: "classification" or "regression".
        self.task: str = TASKS[info.task]
        #: Features per input row (``d_in``).
        self.input_dim: int = info.input_dim
        #: Outputs per input row: classes, or regression targets.
        self.output_dim: int = info.output_dim
        #: ``D``, the length of one weight vector.
        self.weight_dim: int = info.weight_dim
        #: Columns of the uncertainty arrays of a :class:`Prediction`.
        self.uncertainty_dim: int = info.uncertainty_dim
        #: The start time ``start_time=None`` selects for unrefined draws and draws with
        #: log-densities (refined ones: :attr:`default_refine_start_time`): 0 gives fresh flow
        #: samples, 1 the stored draws themselves (no log-density), in between samples started
        #: around stored draws.
        self.default_start_time: float = info.default_start_time
        #: Stored draws (anchors) the bundle carries; start times above 0 need them.
        self.anchor_count: int = info.anchor_count
        #: The bundle's own Hutchinson estimator ("hutchinson-rademacher" or "hutchinson-gaussian",
        #: what ``trace="hutchinson"`` selects) and its probe count.
        self.hutchinson_trace: str = HUTCHINSON_NAMES[info.hutchinson_trace]
        self.hutchinson_probes: int = info.hutchinson_probes
        #: HMC transitions on the posterior that ``refine_transitions=None`` runs after drawing
        #: without log-densities (0: the bundle has no refinement; format versions 3 and 4).
        self.default_refine_transitions: int = info.default_refine_transitions
        #: The start time ``start_time=None`` selects for refined samples: the bundle's own
        #: (format version 4; 1 refines the stored draws themselves), else :attr:`default_start_time`.
        self.default_refine_start_time: float = info.default_refine_start_time
        #: The manifest's ``name`` (the folder's name if it has none).
        self.name: str = _bundle_name(self.bundle_dir)

    def __repr__(self) -> str:
        state = "" if self._handle is not None else ", closed"
        return (f"postflow.Model({self.name!r}, task={self.task!r}, D={self.weight_dim}, "
                f"input_dim={self.input_dim}, output_dim={self.output_dim}{state})")

    def close(self) -> None:
        """Free the model (idempotent, thread-safe); the object is unusable afterwards.

        Calls that start after ``close`` raise :class:`InvalidArgumentError`; calls already
        in progress in other threads finish first (``close`` waits for them), so the model
        is never freed under a running call, and never twice.
        """
        with self._lock:
            self._closing = True
            self._lock.wait_for(lambda: self._calls == 0)
            # Freed under the lock: a concurrent close() returns only once the model is gone.
            handle, self._handle = self._handle, None
            if handle is not None:
                _lib().pf_model_free(handle)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Tuple[Any, ...]:
        # A copy would share the C handle, and the first close() would free it under the other.
        raise UnsupportedError(ERR_UNSUPPORTED, "a postflow.Model cannot be copied or pickled (it owns the loaded "
                                                "C model): share the object between threads, or load the bundle again")

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # No call can be in progress (each holds a reference to the model), so nothing to wait
        # for; never block here. getattr: __init__ may have failed before setting the fields.
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._handle = None
            try:
                _lib().pf_model_free(handle)
            except Exception:
                pass

    @contextlib.contextmanager
    def _call(self) -> Iterator[ctypes.c_void_p]:
        """The handle for one C call, counted so that :meth:`close` waits until it returns."""
        with self._lock:
            if self._closing or self._handle is None:
                raise InvalidArgumentError(ERR_INVALID_ARGUMENT, "the model is closed")
            self._calls += 1
            handle = self._handle
        try:
            yield handle
        finally:
            with self._lock:
                self._calls -= 1
                if self._calls == 0:
                    self._lock.notify_all()

    @property
    def handle(self) -> ctypes.c_void_p:
        """The ``pf_model *`` handle; raises :class:`InvalidArgumentError` once closed.

        A C call made with it directly is not waited for by :meth:`close`: do not close
        the model while such a call may be running.
        """
        with self._lock:
            if self._closing or self._handle is None:
                raise InvalidArgumentError(ERR_INVALID_ARGUMENT, "the model is closed")
            return self._handle

    @staticmethod
    def _options(seed: int = 0, solver: Union[str, int] = "default", steps: int = 0, rtol: float = 0.0,
                 atol: float = 0.0, trace: Union[str, int] = "none", probes: int = 0, max_steps: int = 0,
                 batch_size: int = 0, start_time: Optional[float] = None, project_to_slice: bool = False,
                 refine_transitions: Optional[int] = None, first_index: int = 0,
                 refine_kernel: Union[str, int] = "bundle", refine_leapfrog: Optional[int] = None,
                 struct_size: Optional[int] = None) -> _SampleOptions:
        o = _SampleOptions()
        _check(_lib().pf_sample_options_init(ctypes.byref(o), ctypes.sizeof(o)))
        o.seed = _int(seed, "seed", 64)
        o.solver = _enum(solver, SOLVERS, "solver")
        o.steps = _int(steps, "steps")
        o.rtol = _real(rtol, "rtol")
        o.atol = _real(atol, "atol")
        o.trace = _enum(trace, TRACES, "trace")
        o.probes = _int(probes, "probes")
        o.max_steps = _int(max_steps, "max_steps")
        o.batch_size = _int(batch_size, "batch_size")
        # None: the bundle's default start time (0, the plain flow, for bundles without anchors).
        o.start_time = START_TIME_BUNDLE if start_time is None else _real(start_time, "start_time")
        # sphere_product bundles: log_prob renormalizes each unit's (w, b) instead of refusing it.
        # An integer other than 0 or 1 goes through for the library to refuse, not read as True.
        o.project_to_slice = (int(project_to_slice) if isinstance(project_to_slice, (bool, np.bool_))
                              else _int(project_to_slice, "project_to_slice"))
        # None: the bundle's default refinement (applied to draws without log-densities only).
        o.refine_transitions = (REFINE_BUNDLE if refine_transitions is None
                                else _int(refine_transitions, "refine_transitions"))
        o.first_index = _int(first_index, "first_index", 64)
        o.refine_kernel = _enum(refine_kernel, REFINE_KERNELS, "refine_kernel")
        # None or 0: the bundle's refine.leapfrog_steps; the library refuses counts past 1000.
        o.refine_leapfrog = 0 if refine_leapfrog is None else _int(refine_leapfrog, "refine_leapfrog")
        if struct_size is not None:
            o.struct_size = _int(struct_size, "struct_size")
        return o

    def _bundle_trace(self, options: Dict[str, Any]) -> Dict[str, Any]:
        """``options`` with ``trace="hutchinson"`` read as the bundle's own estimator."""
        if options.get("trace") == "hutchinson":
            return {**options, "trace": self.hutchinson_trace}
        return options

    def sample(self, n: int, **options: Any) -> Samples:
        """Draw ``n`` weight samples.

        Options (``pf_sample_options``): ``seed``, ``solver`` (a :data:`SOLVERS` name),
        ``steps``, ``rtol``, ``atol``, ``max_steps``, ``start_time`` (None: the bundle's; for
        refined samples :attr:`default_refine_start_time`),
        ``trace`` (a :data:`TRACES` name; anything but "none" adds log-densities; "hutchinson"
        is the bundle's estimator, :attr:`hutchinson_trace`), ``probes``
        and ``batch_size`` (samples integrated together per ONNX Runtime call, 0: 128; trades
        memory for speed, changes results only by float rounding; dopri5: by its tolerance),
        ``refine_transitions`` (HMC transitions on the
        posterior after drawing, bundles with refinement only; None: the bundle's default
        :attr:`default_refine_transitions` when ``trace`` is "none", none otherwise; refined
        samples have no log-density), ``refine_kernel`` (a :data:`REFINE_KERNELS` name:
        "bundle", the default, is the bundle's, so far always "endpoint"; "endpoint" is
        Metropolis on the trajectory's end, a rejected transition keeping its start; "multinomial" draws one state of a trajectory of 2^d - 1 >= L
        leapfrog steps built by doublings in random directions, by weight exp(-H) biased toward
        the newest doubling, so it nearly never returns the start), ``refine_leapfrog``
        (leapfrog steps L per trajectory, in [1, 1000]; None or 0: the bundle's
        ``refine.leapfrog_steps``), ``first_index`` (0: the call's sample ``i`` is sample
        ``first_index + i`` of the seed, so consecutive calls continue one run; bitwise when
        each split falls on a multiple of the batch used: ``batch_size``, 0: 128, lowered past
        256 MiB). ``project_to_slice`` is accepted and ignored here (it is :meth:`log_prob`'s).
        Sample ``i`` depends only on ``(seed, first_index + i)``.
        Integers must fit their C fields (``seed`` and ``first_index`` a uint64,
        ``refine_transitions`` an int64, the others uint32): out-of-range
        values, floats and bools raise :class:`InvalidArgumentError`.
        """
        n = _int(n, "n", 8 * ctypes.sizeof(ctypes.c_size_t))
        o = self._options(**self._bundle_trace(options))
        if n * self.weight_dim * 4 > sys.maxsize:  # the C API's own limit; numpy would fail less clearly
            raise InvalidArgumentError(ERR_INVALID_ARGUMENT, f"n x weight_dim = {n} x {self.weight_dim} is too large")
        with_density = o.trace != TRACES["none"]
        try:
            theta = np.empty((n, self.weight_dim), dtype=np.float32)
            logd = np.empty(n, dtype=np.float32) if with_density else None
            se = np.empty(n, dtype=np.float32) if with_density else None
        except MemoryError:
            raise InvalidArgumentError(ERR_INVALID_ARGUMENT,
                                       f"n is {n}: cannot allocate {n} x {self.weight_dim} float32 samples") from None
        with self._call() as handle:
            _check(_lib().pf_sample(handle, ctypes.byref(o), n, _ptr(theta), theta.size, _ptr(logd),
                                    n if with_density else 0, _ptr(se), n if with_density else 0))
        return Samples(theta, logd, se)

    def log_prob(self, theta: npt.ArrayLike, **options: Any) -> Tuple[F32Array, F32Array]:
        """Log-densities of the rows of ``theta`` ``[n, D]``: ``(log_density, stderr)``, each ``[n]``.

        Takes :meth:`sample`'s options (``batch_size`` included: rows per ONNX Runtime call,
        0: 128, changes results only by float rounding); ``trace`` defaults to "exact". On a ``sphere_product``
        bundle, rows with a hidden unit's (w, b) off its unit sphere are refused unless
        ``project_to_slice=True`` renormalizes each unit onto its sphere first (a unit of
        norm 0 stays an error); other bundles ignore ``project_to_slice``.
        """
        options.setdefault("trace", "exact")
        o = self._options(**self._bundle_trace(options))
        t = _as_f32(theta, "theta", 2)
        n = t.shape[0]
        logd = np.empty(n, dtype=np.float32)
        se = np.empty(n, dtype=np.float32)
        with self._call() as handle:
            _check(_lib().pf_log_prob(handle, ctypes.byref(o), _ptr(t), n, t.size, _ptr(logd), n, _ptr(se), n))
        return logd, se

    def _prediction(self, n_inputs: int) -> Tuple[_Prediction, F32Array, List[F32Array]]:
        mean = np.empty((n_inputs, self.output_dim), dtype=np.float32)
        us = [np.empty((n_inputs, self.uncertainty_dim), dtype=np.float32) for _ in range(3)]
        p = _Prediction(struct_size=ctypes.sizeof(_Prediction), mean=_ptr(mean), mean_len=mean.size,
                        total=_ptr(us[0]), total_len=us[0].size, aleatoric=_ptr(us[1]), aleatoric_len=us[1].size,
                        epistemic=_ptr(us[2]), epistemic_len=us[2].size)
        return p, mean, us

    def predict(self, x: npt.ArrayLike, theta: Union[npt.ArrayLike, Samples],
                log_weights: Optional[npt.ArrayLike] = None) -> Prediction:
        """Bayesian model average at ``x`` ``[N, d_in]`` over ``theta`` ``[S, D]`` (or a :class:`Samples`).

        ``log_weights`` ``[S]`` (e.g. target minus flow log-densities) self-normalise
        the average; None weighs the samples equally.
        """
        xa = _as_f32(x, "x", 2)
        t = _as_f32(theta.theta if isinstance(theta, Samples) else theta, "theta", 2)
        lw = None
        if log_weights is not None:
            lw = _as_f32(log_weights, "log_weights", 1)
            if lw.shape[0] != t.shape[0]:
                raise InvalidArgumentError(ERR_INVALID_ARGUMENT,
                                           f"log_weights has {lw.shape[0]} entries, theta has {t.shape[0]} rows")
        p, mean, us = self._prediction(xa.shape[0])
        with self._call() as handle:
            _check(_lib().pf_predict(handle, _ptr(xa), xa.shape[0], xa.size, _ptr(t), t.shape[0], t.size, _ptr(lw),
                                     ctypes.byref(p)))
        return Prediction(mean, us[0], us[1], us[2], p.ess)

    def sample_predict(self, n: int, x: npt.ArrayLike, **options: Any) -> Prediction:
        """Draw ``n`` samples (:meth:`sample`'s options, ``batch_size`` included) and average
        their predictions at ``x``."""
        n = _int(n, "n", 8 * ctypes.sizeof(ctypes.c_size_t))
        o = self._options(**self._bundle_trace(options))
        xa = _as_f32(x, "x", 2)
        p, mean, us = self._prediction(xa.shape[0])
        with self._call() as handle:
            _check(_lib().pf_sample_predict(handle, ctypes.byref(o), n, _ptr(xa), xa.shape[0], xa.size,
                                            ctypes.byref(p)))
        return Prediction(mean, us[0], us[1], us[2], p.ess)


def _bundle_name(bundle_dir: Path) -> str:
    # The C API does not expose the name; the manifest has already been validated by the load.
    try:
        name = json.loads((bundle_dir / "postflow.json").read_text(encoding="utf-8")).get("name")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else bundle_dir.resolve().name
