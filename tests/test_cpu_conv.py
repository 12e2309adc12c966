"""oneDNN convolutions (covid_flax/cpu_conv) equal lax's, forward and both gradients, for every
convolution of every registry model, and the models really run on them where the kernel loads."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config
from jax import lax

from covid_flax import cpu_conv, models

needs_onednn = pytest.mark.skipif(
  cpu_conv.unavailable_reason() is not None,
  reason=f"oneDNN kernel unavailable here: {cpu_conv.unavailable_reason()}",
)
needs_onednn_bf16 = pytest.mark.skipif(
  cpu_conv.unavailable_reason() is not None or not cpu_conv.supports(jnp.bfloat16),
  reason="oneDNN has no bfloat16 convolutions on this CPU (they need AVX-512)",
)


def _registry_convolutions() -> set[tuple]:
  """(in, out, kernel, strides, padding) of every nnx.Conv in the registry's models."""
  found = set()
  for name in models.MODELS:
    model = nnx.eval_shape(lambda n=name: models.create_model(n, image_size=64, rngs=nnx.Rngs(0)))
    for _, module in nnx.iter_graph(model):
      if isinstance(module, nnx.Conv):
        pad, strides = module.padding, module.strides or 1
        if isinstance(pad, int):
          pad = ((pad, pad),) * 2
        elif not isinstance(pad, str):
          pad = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        found.add(
          (module.in_features, module.out_features, tuple(module.kernel_size), strides, pad)
        )
  return found


# Every registry convolution, channels cut to at most 8 (the geometry is what differs), plus the
# cases no model has yet: 3 input channels, explicit asymmetric padding, dilation.
_CASES = sorted(
  {(min(i, 8), min(o, 8), k, s, p, (1, 1)) for i, o, k, s, p in _registry_convolutions()}
  | {
    (3, 8, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    (4, 5, (3, 3), (1, 1), ((0, 2), (1, 0)), (2, 2)),
  },
  key=str,
)


def _conv_and_grads(conv, x, w, strides, padding, dilation, out_dtype):
  dimension_numbers = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  f = jax.jit(
    lambda x, w: conv(
      x, w, strides, padding, None, dilation, dimension_numbers, preferred_element_type=out_dtype
    )
  )
  y, vjp = jax.vjp(f, x, w)
  dy = jax.random.normal(jax.random.key(2), y.shape).astype(y.dtype)
  return jax.block_until_ready((y, *vjp(dy)))


@needs_onednn
@pytest.mark.parametrize(
  "dtype, out_dtype",
  [
    pytest.param(jnp.float32, None, id="f32"),
    pytest.param(jnp.bfloat16, None, id="bf16", marks=needs_onednn_bf16),
    # How the models run bfloat16 on oneDNN.
    pytest.param(jnp.bfloat16, jnp.float32, id="bf16 to f32", marks=needs_onednn_bf16),
  ],
)
@pytest.mark.parametrize("case", _CASES, ids=str)
def test_forward_and_gradients_equal_lax(case, dtype, out_dtype):
  cin, cout, kernel, strides, padding, dilation = case
  x = jax.random.normal(jax.random.key(0), (3, 15, 14, cin)).astype(dtype)  # Odd and uneven.
  w = jax.random.normal(jax.random.key(1), (*kernel, cin, cout)).astype(dtype)
  calls = cpu_conv.calls()
  args = (x, w, strides, padding, dilation, out_dtype)
  ours = _conv_and_grads(cpu_conv.conv_general_dilated, *args)
  assert cpu_conv.calls() == calls + 3, "forward, input and weight gradient each ran on oneDNN"
  theirs = _conv_and_grads(lax.conv_general_dilated, *args)
  # bfloat16: both round the same float32 sums to 8 bits of mantissa, so they may differ by about
  # one rounding step of the largest values; float32: summation order only.
  tolerance = 2**-7 if dtype == jnp.bfloat16 else 1e-5
  for name, a, b in zip(("forward", "input gradient", "weight gradient"), ours, theirs):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tolerance * np.abs(b).max(), name


@needs_onednn
@pytest.mark.parametrize(
  "kwargs",
  [dict(lhs_dilation=(2, 2)), dict(feature_group_count=2)],
  ids=["input dilation", "groups"],
)
def test_what_the_kernel_does_not_cover_falls_back_to_lax(kwargs):
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 4 // kwargs.get("feature_group_count", 1), 4))
  w = w.astype(jnp.bfloat16)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def f(conv):
    return jax.jit(
      lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, **kwargs)
    )

  assert "covid_flax_onednn" not in f(cpu_conv.conv_general_dilated).lower(x, w).as_text()
  np.testing.assert_array_equal(
    f(cpu_conv.conv_general_dilated)(x, w), f(lax.conv_general_dilated)(x, w)
  )


@needs_onednn
@pytest.mark.parametrize(
  "half_precision",
  [pytest.param(False, id="f32"), pytest.param(True, id="bf16", marks=needs_onednn_bf16)],
)
def test_a_models_train_step_runs_on_onednn_unless_told_xla(half_precision):
  x = jax.random.normal(jax.random.key(0), (2, 40, 40, 1))

  def lowered(cpu_conv_field):
    config = tiny_config("", model="seed_cnn", image_size=40, half_precision=half_precision,
                         cpu_conv=cpu_conv_field)  # fmt: skip
    model = models.from_config(config)
    loss = lambda m: jnp.sum(m(x))  # noqa: E731
    return nnx.jit(nnx.grad(loss)), model

  step, model = lowered("onednn")
  calls = cpu_conv.calls()
  jax.block_until_ready(step(model))
  assert cpu_conv.calls() == calls + 4 * 3 - 1  # 4 layers x 3 passes, no image gradient.
  step, model = lowered("xla")
  jax.block_until_ready(step(model))
  assert cpu_conv.calls() == calls + 11


def test_no_compiler_means_xla_with_the_reason(tmp_path, monkeypatch):
  try:
    cpu_conv.libdnnl()
  except cpu_conv.Unavailable as error:
    pytest.skip(str(error))
  monkeypatch.setenv("COVID_FLAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
  with pytest.raises(cpu_conv.Unavailable, match="no C\\+\\+ compiler .*no-such-g\\+\\+"):
    cpu_conv.build()
  assert not list(tmp_path.glob("*.so"))  # Nothing half-built left behind.


def test_use_onednn_says_which_path_runs():
  model = models.create_model("tiny_cnn", image_size=40, rngs=nnx.Rngs(0))
  assert cpu_conv.use_onednn(model, "xla") == "XLA (config.cpu_conv='xla')"
  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  assert all(c.conv_general_dilated is lax.conv_general_dilated for c in convs)
  path = cpu_conv.use_onednn(model, "onednn")
  if cpu_conv.unavailable_reason() is None:
    assert path == "oneDNN"
    assert all(c.conv_general_dilated is cpu_conv.conv_general_dilated for c in convs)
  else:
    assert path == f"XLA (oneDNN unavailable: {cpu_conv.unavailable_reason()})"


def test_a_cpu_without_bfloat16_convolutions_keeps_a_bfloat16_model_on_xla(monkeypatch):
  # An AVX2-only CPU: oneDNN makes no bfloat16 convolution there (it fails when asked for one).
  monkeypatch.setattr(cpu_conv, "unavailable_reason", lambda: None)
  monkeypatch.setattr(cpu_conv, "supports", lambda dtype: jnp.dtype(dtype) == jnp.float32)

  def model(half_precision):
    return models.from_config(tiny_config("", model="tiny_cnn", image_size=40,
                                          half_precision=half_precision, cpu_conv="onednn"))  # fmt: skip

  bf16_model = model(half_precision=True)
  convs = [m for _, m in nnx.iter_graph(bf16_model) if isinstance(m, nnx.Conv)]
  assert all(c.conv_general_dilated is lax.conv_general_dilated for c in convs)
  expected = "XLA (oneDNN has no bfloat16 convolutions on this CPU: they need AVX-512)"
  assert cpu_conv.use_onednn(bf16_model, "onednn") == expected
  assert cpu_conv.use_onednn(model(half_precision=False), "onednn") == "oneDNN"
  x, w = jnp.ones((1, 9, 9, 2), jnp.bfloat16), jnp.ones((3, 3, 2, 4), jnp.bfloat16)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  conv = jax.jit(
    lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
  )
  assert "covid_flax_onednn" not in conv.lower(x, w).as_text().lower()  # A direct call falls back.


def _bfloat16_passes_run() -> bool:
  """Whether the custom VJP's bfloat16 passes run on oneDNN, asked directly (no `supports`): the
  forward pass to float32 and to bfloat16, and both gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4)).astype(jnp.bfloat16)
  geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))

  def loss(x, w):
    to_f32 = cpu_conv._conv(x, w, *geometry, jnp.dtype(jnp.float32))
    return to_f32.sum() + cpu_conv._conv(x, w, *geometry, jnp.dtype(jnp.bfloat16)).sum()

  try:
    jax.block_until_ready(jax.grad(loss, argnums=(0, 1))(x, w))
  except Exception as e:  # XLA's runtime error, with oneDNN's status in it.
    assert "descriptor" in str(e), e
    return False
  return True


@needs_onednn
def test_supports_says_whether_the_bfloat16_passes_run():
  """bfloat16 on oneDNN exactly where it runs, i.e. with AVX-512 (oneDNN 3.x); a probe asking for
  other types than the VJP's once said no on an AVX-512 CPU and sent bfloat16 models to XLA."""
  assert cpu_conv.supports(jnp.float32)
  assert not cpu_conv.supports(jnp.int8)
  assert cpu_conv.supports(jnp.bfloat16) == _bfloat16_passes_run() == _has_avx512()


def _has_avx512() -> bool:
  """What oneDNN calls avx512_core (unless ONEDNN_MAX_CPU_ISA holds it below that)."""
  if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("SSE", "AVX2", "AVX_")):
    return False
  with open("/proc/cpuinfo") as cpuinfo:
    flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
  return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags)


@needs_onednn
def test_weight_gradients_take_blocked_layouts_exactly_without_avx512():
  assert cpu_conv.blocked_weight_gradients() == (not _has_avx512())


@needs_onednn
def test_without_avx512_the_blocked_weight_gradients_equal_lax():
  """The blocked weight-gradient path on any CPU: oneDNN told to use at most AVX2, then the float32
  cases of test_forward_and_gradients_equal_lax (on an AVX2-only CPU they already ran it), and
  bfloat16 refused there as it runs."""
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
     "-k", "test_forward_and_gradients_equal_lax and not bf16 or exactly_without_avx512 or "
     "bfloat16_passes_run"],
    env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert f"{len(_CASES) + 2} passed" in proc.stdout
