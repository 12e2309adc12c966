"""CPU roofline for the study CNN: peak matrix-product GFLOP/s, and each convolution's speed.

  python scripts/roofline.py [--image_size=128] [--batch_size=32] [--dtype=float32]
      [--cpu_conv=xla,onednn,tf]

Prints one JSON object per line: `matmul` (a 2048^3 product, float32 and bfloat16) and, for each of
the seed CNN's four 3x3 convolutions at this image size, the median ms and GFLOP/s of its forward
pass, input gradient and weight gradient, each jitted alone, on each convolution path of
`--cpu_conv` (XLA's, covid_flax/cpu_conv's oneDNN kernel, or TensorFlow's own ops, `tf`, which
need the `bench` extra: the kernels Keras trains with), layer by layer. Together with `benchmark.py` this says
how far the train step is from what the machine can do (docs/performance.md). Run it with the
XLA flags under test in XLA_FLAGS; `covid_flax.cpu_defaults` apply unless COVID_FLAX_CPU_DEFAULTS=0.
"""

import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from covid_flax import cpu_conv, cpu_defaults  # noqa: E402

flags.DEFINE_integer("image_size", 128, "Input image size of the seed CNN.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Convolution dtype.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measure (the median is reported).")
flags.DEFINE_list("cpu_conv", ["xla"], "Convolution paths to time: xla, onednn, tf.")
FLAGS = flags.FLAGS


def _median_seconds(fn, *args) -> float:
  """Median wall time of `fn(*args)` (a jitted function or a `tf.function`, whose results are
  ready when it returns)."""
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def _conv_on(path: str):
  conv = cpu_conv.conv_general_dilated if path == "onednn" else jax.lax.conv_general_dilated
  dimension_numbers = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return lambda x, w: conv(x, w, (1, 1), "VALID", dimension_numbers=dimension_numbers)


def _tf_passes(x, w, g) -> dict:
  """TensorFlow's forward, input-gradient and weight-gradient ops on the same arrays, each a
  `tf.function` (graph mode: oneDNN's kernels where TensorFlow has them, as under Keras)."""
  import tensorflow as tf  # The `bench` extra; only for --cpu_conv=tf.

  x, w, g = (tf.constant(np.asarray(a)) for a in (x, w, g))
  strides = [1, 1, 1, 1]
  forward = tf.function(lambda x, w: tf.nn.conv2d(x, w, strides, "VALID"))
  input_grad = tf.function(
    lambda w, g: tf.raw_ops.Conv2DBackpropInput(
      input_sizes=x.shape, filter=w, out_backprop=g, strides=strides, padding="VALID"
    )
  )
  weight_grad = tf.function(
    lambda x, g: tf.raw_ops.Conv2DBackpropFilter(
      input=x, filter_sizes=w.shape, out_backprop=g, strides=strides, padding="VALID"
    )
  )
  return {"forward": (forward, (x, w)), "input_grad": (input_grad, (w, g)),
          "weight_grad": (weight_grad, (x, g))}  # fmt: skip


def _seed_cnn_convs(size: int) -> list[tuple[int, int, int]]:
  """(input size, in channels, out channels) of the seed CNN's convolutions (models/seed_cnn.py)."""
  return [
    (size, 1, 32),
    (size - 2, 32, 64),
    ((size - 4) // 2, 64, 64),
    ((size - 4) // 2 // 2 - 1, 64, 128),
  ]


def main(argv):
  del argv
  key = jax.random.key(0)
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jax.random.normal(key, (2048, 2048), dtype)
    product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    seconds = _median_seconds(product, a, a)
    record = {"measure": "matmul", "n": 2048, "dtype": jnp.dtype(dtype).name}
    print(json.dumps({**record, "gflop_s": round(2 * 2048**3 / seconds / 1e9, 1)}), flush=True)
  dtype = jnp.dtype(FLAGS.dtype)
  if unknown := set(FLAGS.cpu_conv) - {"xla", "onednn", "tf"}:
    raise app.UsageError(f"--cpu_conv: unknown path(s) {sorted(unknown)}; use xla, onednn, tf")
  if "tf" in FLAGS.cpu_conv and importlib.util.find_spec("tensorflow") is None:
    raise app.UsageError(
      f"--cpu_conv=tf needs TensorFlow in {sys.executable}: pip install -e '.[bench]'"
    )
  if "onednn" in FLAGS.cpu_conv and (path := cpu_conv.conv_path("onednn", dtype)) != "oneDNN":
    raise app.UsageError(f"--cpu_conv=onednn: convolutions would run on {path}")
  for size, cin, cout in _seed_cnn_convs(FLAGS.image_size):
    x = jax.random.normal(key, (FLAGS.batch_size, size, size, cin), dtype)
    w = jax.random.normal(key, (3, 3, cin, cout), dtype) * 0.1
    flop = 2 * FLAGS.batch_size * (size - 2) ** 2 * cin * cout * 9
    for path in FLAGS.cpu_conv:
      conv = _conv_on("xla" if path == "tf" else path)
      g = conv(x, w)
      passes = (
        _tf_passes(x, w, g)
        if path == "tf"
        else {
          "forward": (jax.jit(conv), (x, w)),
          "input_grad": (
            jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
            (x, w, g),
          ),
          "weight_grad": (
            jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]),
            (x, w, g),
          ),
        }
      )
      record = {"measure": "conv", "layer": f"{cin}->{cout}@{size}", "dtype": dtype.name,
                "cpu_conv": path}  # fmt: skip
      for name, (fn, args) in passes.items():
        seconds = _median_seconds(fn, *args)
        # 3 significant digits, so the tiny layers of a test run never print 0.
        record[f"{name}_ms"] = float(f"{seconds * 1e3:.3g}")
        record[f"{name}_gflop_s"] = float(f"{flop / seconds / 1e9:.3g}")
      print(json.dumps(record), flush=True)
  print(json.dumps({"measure": "environment", "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "jax": jax.__version__, "device_kind": jax.devices()[0].device_kind}))  # fmt: skip


if __name__ == "__main__":
  cpu_defaults.apply()  # Before the backend starts.
  app.run(main)
