"""Keras twins of this codebase's models, for `scripts/benchmark.py --reference=keras`: the same
layers, image size, batch and optimizer in TensorFlow (oneDNN convolutions), so a ratio of train
rates compares the two stacks on the same work. Needs the `bench` extra (tensorflow-cpu).

The benchmark runs the twin in a process of its own (`Worker`), one timing window at a time in turn
with ours, each process idle while the other runs: in one process TensorFlow shares our one malloc
heap (`covid_flax/cpu_defaults.py`) and our windows scattered (docs/performance.md)."""

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import ml_collections
import numpy as np

# The config fields the twin is built from, all that crosses to the worker process.
_FIELDS = ("model", "image_size", "batch_size", "half_precision", "learning_rate", "weight_decay",
           "dropout_rate")  # fmt: skip


class Worker:
  """The Keras twin of `config` trained in a child process on a fixed batch; `window(steps)` runs
  `steps` train steps there (after one warm-up step at start) and returns its img/s."""

  def __init__(self, config: ml_collections.ConfigDict):
    _require_twin(config.model)
    if importlib.util.find_spec("tensorflow") is None:
      raise RuntimeError(f"--reference=keras needs TensorFlow in {sys.executable}: "
                         "pip install -e '.[bench]'")  # fmt: skip
    self._log = tempfile.TemporaryFile("w+")  # TensorFlow's start-up chatter, shown on failure.
    self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._log, text=True)  # fmt: skip
    self._request(json.dumps({k: config[k] for k in _FIELDS}))

  def window(self, steps: int) -> float:
    return float(self._request(str(steps)))

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait()
    self._log.close()

  def _request(self, line: str) -> str:
    try:
      self._proc.stdin.write(line + "\n")
      self._proc.stdin.flush()
      reply = self._proc.stdout.readline()
    except BrokenPipeError:
      reply = ""
    if not reply:
      self._log.seek(0)
      tail = self._log.read()[-2000:]
      raise RuntimeError(f"the Keras reference process ({sys.executable} {__file__}) died:\n{tail}")
    return reply.strip()


def _serve() -> None:
  """The worker's loop: a config line, one warm-up step, then one window per line of stdin."""
  config = ml_collections.ConfigDict(json.loads(sys.stdin.readline()))
  step = train_step(config)
  step()
  print("ready", flush=True)
  for line in sys.stdin:
    start = time.perf_counter()
    for _ in range(int(line)):
      step()  # train_on_batch returns the loss as a NumPy value: the step has finished.
    print(int(line) * config.batch_size / (time.perf_counter() - start), flush=True)


def train_step(config: ml_collections.ConfigDict) -> Callable[[], object]:
  """One Keras train step of `config.model` on a fixed random batch, at config's precision."""
  model = keras_model(config)
  import tensorflow as tf

  rng = np.random.default_rng(0)
  size = config.image_size
  x = tf.constant(rng.random((config.batch_size, size, size, 1), np.float32))
  y = tf.constant(rng.integers(0, 2, (config.batch_size,)))
  return lambda: model.train_on_batch(x, y)


def keras_model(config: ml_collections.ConfigDict):
  """The compiled Keras twin of `config.model`."""
  _require_twin(config.model)
  import tensorflow as tf  # Optional: pip install -e ".[bench]"

  # Keras at our precision: bfloat16 compute, float32 variables, like config.half_precision.
  tf.keras.mixed_precision.set_global_policy(
    "mixed_bfloat16" if config.half_precision else "float32"
  )
  inputs = tf.keras.Input((config.image_size, config.image_size, 1))
  model = tf.keras.Model(inputs, _BUILDERS[config.model](tf.keras.layers, inputs, config))
  model.compile(
    optimizer=tf.keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )
  return model


def _require_twin(model: str) -> None:
  if model not in _BUILDERS:
    raise ValueError(f"--reference=keras has no Keras twin of model {model!r}; it has "
                     f"{sorted(_BUILDERS)}")  # fmt: skip


def _seed_cnn(layers, x, config):
  """The study's CNN (`covid_flax/models/seed_cnn.py`)."""
  for i, channels in enumerate((32, 64, 64, 128)):
    x = layers.Conv2D(channels, 3, activation="relu")(x)
    if i > 0:
      x = layers.Dropout(config.dropout_rate)(layers.MaxPooling2D()(x))
  x = layers.Dense(64, activation="relu")(layers.Flatten()(x))
  return layers.Dense(2, dtype="float32")(layers.Dropout(0.5)(x))


def _resnet18(layers, x, config):
  """ResNet-18 (`covid_flax/models/resnet.py`): torchvision's layers, symmetric explicit padding,
  BatchNorm epsilon 1e-5 and momentum 0.9."""

  def conv_bn(x, channels, kernel, strides):
    x = layers.ZeroPadding2D(kernel // 2)(x) if kernel > 1 else x
    x = layers.Conv2D(channels, kernel, strides, use_bias=False)(x)
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)

  x = layers.ReLU()(conv_bn(x, 64, 7, 2))
  x = layers.MaxPooling2D(3, 2)(layers.ZeroPadding2D(1)(x))
  for stage in range(4):
    for block in range(2):
      strides, channels = (2 if stage > 0 and block == 0 else 1), 64 * 2**stage
      y = conv_bn(layers.ReLU()(conv_bn(x, channels, 3, strides)), channels, 3, 1)
      shortcut = conv_bn(x, channels, 1, strides) if x.shape[-1] != channels or strides > 1 else x
      x = layers.ReLU()(layers.Add()([y, shortcut]))
  x = layers.Dropout(config.dropout_rate)(layers.GlobalAveragePooling2D()(x))
  return layers.Dense(2, dtype="float32")(x)


_BUILDERS = {"seed_cnn": _seed_cnn, "resnet18": _resnet18}


if __name__ == "__main__":
  _serve()
