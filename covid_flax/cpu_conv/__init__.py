"""Convolutions on oneDNN for XLA:CPU: `conv_general_dilated`, a drop-in for lax's.

XLA:CPU runs this project's convolutions 1.7x (float32) and 3.4x (bfloat16) slower than oneDNN on
the same cores: its bfloat16 convolutions never reach AVX-512 BF16 or AMX (docs/performance.md). `onednn_conv.cc`
gives XLA three FFI handlers on oneDNN (forward, input gradient, weight gradient; float32 and
bfloat16 with float32 accumulation); `conv_general_dilated` calls them under a `jax.custom_vjp`
and falls back to `lax.conv_general_dilated` for what they do not cover (input dilation, groups,
other layouts or dtypes).

The kernel is compiled on first use, with the system g++ against the installed jaxlib's FFI
headers and the `onednn-cpu-gomp` wheel's libdnnl.so.3, into `$COVID_FLAX_CACHE` (default
~/.cache/covid_flax), keyed by source, jaxlib and library: building at `pip install` time would
see neither jaxlib (pip builds in an isolated environment) nor the jaxlib the user ends up with.
Without g++, the wheel or a loadable library, `unavailable_reason()` says why and the models keep
XLA's convolutions (`use_onednn`, one log line).
"""

import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax import lax

SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
LIBRARY_DIST = "onednn-cpu-gomp"
_FORWARD, _BACKWARD_DATA, _BACKWARD_WEIGHTS = (
  "covid_flax_onednn_conv_forward",
  "covid_flax_onednn_conv_backward_data",
  "covid_flax_onednn_conv_backward_weights",
)
_SYMBOLS = {
  _FORWARD: "CovidFlaxOnednnConvForward",
  _BACKWARD_DATA: "CovidFlaxOnednnConvBackwardData",
  _BACKWARD_WEIGHTS: "CovidFlaxOnednnConvBackwardWeights",
}
_NHWC = lax.ConvDimensionNumbers(
  lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


class Unavailable(RuntimeError):
  """Why the oneDNN kernel cannot be built or loaded here."""


def libdnnl() -> pathlib.Path:
  """The installed oneDNN library (`onednn-cpu-gomp`'s libdnnl.so.3)."""
  try:
    files = importlib.metadata.distribution(LIBRARY_DIST).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(f"the {LIBRARY_DIST} package is not installed") from None
  for file in files:
    if file.name == "libdnnl.so.3":
      return pathlib.Path(file.locate()).resolve()
  raise Unavailable(f"the {LIBRARY_DIST} package has no libdnnl.so.3")


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("COVID_FLAX_CACHE", pathlib.Path.home() / ".cache/covid_flax"))


def build() -> pathlib.Path:
  """The compiled kernel (built now if this source, jaxlib and libdnnl have none yet)."""
  library = libdnnl()
  key = hashlib.sha256(
    SOURCE.read_bytes() + importlib.metadata.version("jaxlib").encode() + str(library).encode()
  ).hexdigest()[:16]
  out = cache_dir() / f"onednn_conv-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(out.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Another process may be building the same file.
    if out.exists():
      return out
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      built = pathlib.Path(tmp) / out.name
      command = [
        os.environ.get("CXX", "g++"),
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-I{jax.ffi.include_dir()}",
        str(SOURCE),
        "-o",
        str(built),
        f"-L{library.parent}",
        "-l:libdnnl.so.3",
        f"-Wl,-rpath,{library.parent}",
      ]
      try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
      except FileNotFoundError:
        raise Unavailable(f"no C++ compiler ({command[0]}) to build {SOURCE.name}") from None
      if result.returncode:
        raise Unavailable(f"building {SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
      os.replace(built, out)
  return out


@functools.cache
def _load() -> ctypes.CDLL | str:
  """The loaded kernel with its FFI targets registered, or why there is none."""
  try:
    library = ctypes.CDLL(str(build()))
  except (Unavailable, OSError) as error:
    return str(error)
  for target, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  library.CovidFlaxOnednnConvCalls.restype = ctypes.c_int64
  library.CovidFlaxOnednnConvSupports.argtypes = [ctypes.c_int]
  library.CovidFlaxOnednnConvNanoseconds.restype = ctypes.c_int64
  library.CovidFlaxOnednnConvBlockedWeightGradients.restype = ctypes.c_int
  return library


def unavailable_reason() -> str | None:
  """None if the oneDNN kernel is usable in this process, else why not."""
  loaded = _load()
  return loaded if isinstance(loaded, str) else None


@functools.cache
def supports(dtype) -> bool:
  """Whether oneDNN has convolutions of `dtype` (float32, bfloat16) on this CPU: an AVX2-only CPU
  has no bfloat16 ones (oneDNN 3.x needs AVX-512 for them)."""
  loaded = _load()
  code = {jnp.dtype(jnp.float32): 3, jnp.dtype(jnp.bfloat16): 2}.get(jnp.dtype(dtype))
  return (
    not isinstance(loaded, str)
    and code is not None
    and bool(loaded.CovidFlaxOnednnConvSupports(code))
  )


def calls() -> int:
  """How many convolutions this process has run on oneDNN."""
  loaded = _load()
  return 0 if isinstance(loaded, str) else loaded.CovidFlaxOnednnConvCalls()


def seconds() -> float:
  """Wall time this process has spent in oneDNN convolutions (summed over threads)."""
  loaded = _load()
  return 0.0 if isinstance(loaded, str) else loaded.CovidFlaxOnednnConvNanoseconds() / 1e9


def blocked_weight_gradients() -> bool:
  """Whether weight gradients reorder their activations into oneDNN's blocked layout (on a CPU
  without AVX-512, where oneDNN's NHWC kernel for them is up to 3.7x slower; layers with channels
  in multiples of 8) instead of running on NHWC as every other pass does."""
  loaded = _load()
  return not isinstance(loaded, str) and bool(loaded.CovidFlaxOnednnConvBlockedWeightGradients())


def _threads_and_slots() -> tuple[int, int]:
  """oneDNN threads per call (this process's cores shared by its devices, which run at once) and
  how many calls may run at once (the cores' worth): the two never oversubscribe the cores."""
  cores = len(os.sched_getaffinity(0))
  threads = max(1, cores // max(1, jax.local_device_count()))
  return threads, max(1, cores // threads)


def _vary_alike(*arrays: jax.Array) -> list[jax.Array]:
  """`arrays` made varying over the same manual mesh axes (inside `shard_map`), as lax's own
  primitives do to their operands: an FFI call needs its operands alike and gives its results
  the type it is told (`_ffi`)."""
  varying = [jax.typeof(a).mat.varying for a in arrays]
  union = frozenset().union(*varying)
  return [
    lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
    for a, v in zip(arrays, varying)
  ]


def _ffi(target: str, shape, dtype, a, b, strides, padding, dilation):
  out = jax.typeof(a).update(shape=tuple(shape), dtype=dtype)  # Keeps a's varying axes.
  threads, slots = _threads_and_slots()
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
    a,
    b,
    strides=np.asarray(strides, np.int64),
    padding=np.asarray(padding, np.int64).ravel(),
    dilation=np.asarray(dilation, np.int64),
    threads=np.int64(threads),
    slots=np.int64(slots),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, dilation, out_dtype):
  out = jax.eval_shape(
    lambda: lax.conv_general_dilated(x, w, strides, padding, None, dilation, _NHWC)
  )
  return _ffi(_FORWARD, out.shape, out_dtype, x, w, strides, padding, dilation)


def _conv_fwd(x, w, strides, padding, dilation, out_dtype):
  return _conv(x, w, strides, padding, dilation, out_dtype), (x, w)


def _conv_bwd(strides, padding, dilation, out_dtype, residuals, dy):
  x, w = residuals
  dy, w_ = _vary_alike(dy.astype(x.dtype), w)  # A float32 output's gradient, back to bfloat16.
  dx = _ffi(_BACKWARD_DATA, x.shape, x.dtype, dy, w_, strides, padding, dilation)
  x_, dy = _vary_alike(x, dy)
  dw = _ffi(_BACKWARD_WEIGHTS, w.shape, w.dtype, x_, dy, strides, padding, dilation)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  return lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers) == _NHWC


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
  out_sharding=None,
) -> jax.Array:
  """`lax.conv_general_dilated` on oneDNN where the kernel covers the case: 2-D, NHWC/HWIO,
  float32 or bfloat16 (both operands alike), no input dilation or groups, padding >= 0."""
  dtype = jnp.result_type(lhs)
  pads = (
    lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    if isinstance(padding, str)
    else [tuple(p) for p in padding]
  )
  covered = (
    lhs.ndim == 4
    and _is_nhwc(dimension_numbers)
    and dtype in (jnp.float32, jnp.bfloat16)
    and jnp.result_type(rhs) == dtype
    and (preferred_element_type in (None, dtype) or preferred_element_type == jnp.float32)
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and feature_group_count == 1
    and batch_group_count == 1
    and all(p >= 0 for pair in pads for p in pair)
    and out_sharding is None
    and unavailable_reason() is None
    and supports(dtype)
  )
  if not covered:
    return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type,
      out_sharding=out_sharding,
    )  # fmt: skip
  dilation = tuple(rhs_dilation or (1, 1))
  lhs, rhs = _vary_alike(lhs, rhs)
  out_dtype = jnp.dtype(preferred_element_type or dtype)
  return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, pads)), dilation, out_dtype)


def conv_path(cpu_conv: str, dtype=jnp.float32) -> str:
  """Where convolutions of `dtype` run with `config.cpu_conv`: 'oneDNN', or 'XLA (why)'."""
  if cpu_conv != "onednn":
    return f"XLA (config.cpu_conv={cpu_conv!r})"
  if jax.default_backend() != "cpu":
    return f"XLA (the backend is {jax.default_backend()}, oneDNN is for the CPU)"
  if reason := unavailable_reason():
    return f"XLA (oneDNN unavailable: {reason})"
  if not supports(dtype):
    return (
      f"XLA (oneDNN has no {jnp.dtype(dtype).name} convolutions on this CPU: they need AVX-512)"
    )
  return "oneDNN"


def use_onednn(model: nnx.Module, cpu_conv: str) -> str:
  """Point every `nnx.Conv` of `model` at oneDNN when `conv_path` says so; returns (and logs) which
  path the convolutions take.

  bfloat16 convolutions then give float32 outputs (oneDNN's accumulators, unrounded), so the bias,
  activations, pooling and dropout between them run in float32: XLA:CPU runs bfloat16 elementwise
  work far slower than float32 (the study CNN's bfloat16 step: 1,050 ms with bfloat16 outputs, 640
  with float32 ones; its float32 step 790). Each convolution still reads bfloat16 operands."""
  convs = [module for _, module in nnx.iter_graph(model) if isinstance(module, nnx.Conv)]
  bf16 = any(conv.dtype == jnp.bfloat16 for conv in convs)
  path = conv_path(cpu_conv, jnp.bfloat16 if bf16 else jnp.float32)
  if path == "oneDNN":
    for module in convs:
      module.conv_general_dilated = conv_general_dilated
      if module.dtype == jnp.bfloat16:  # See the docstring.
        module.preferred_element_type = jnp.float32
  blocked = path == "oneDNN" and blocked_weight_gradients()
  layouts = " (weight gradients in blocked layouts: no AVX-512)" if blocked else ""
  logging.log_first_n(logging.INFO, "Convolutions run on %s%s.", 1, path, layouts)
  return path
