"""Throughput benchmark: compile time, train and eval img/s, input pipeline img/s, peak RSS.

  python scripts/benchmark.py --config=configs/cxr.py [--model=seed_cnn] [--image_size=224]
      [--batch_size=32] [--steps=10] [--windows=5] [--reference=keras] [--input_split=train]
  python scripts/benchmark.py --config=configs/synthetic.py --epoch_scaling=1,2,4 [--epochs=2]
  python scripts/benchmark.py --config=configs/synthetic.py --scaling --input_mode=stream \
      --dataset=covid_synthetic/cxr_n100000 --image_size=128 --model=resnet18

Prints one JSON object per line. Train and eval steps run on in-memory random uint8 images (the
same bytes the input pipeline hands the step), through the real jitted, data-parallel step with
on-device augmentation; img/s is the median over `--windows` windows of `--steps` steps, after a
warm-up window, each closed by `block_until_ready`; `conv_ms` is the oneDNN convolutions' share
of our step (0 on XLA's). `--reference=keras` (needs the `bench` extra,
tensorflow-cpu) times the same model (seed_cnn or resnet18, `scripts/keras_reference.py`), image
size, batch and optimizer in Keras, in a process of its own (not sharing our malloc heap),
alternating windows with ours, each process idle while the other runs, and prints the ratio.
`--epoch_scaling=1,2,4`
instead times whole epochs (grain iterator included) on the config's training split repeated 1, 2, 4
times. `--scaling` measures one training setup as `train` runs it, real data and all (one per
process, so that peak RSS is its own): time to first step, steady train img/s, the input pipeline's
img/s alone (no model), peak host RSS and device memory. `--modes_ab` times cache against stream
mode on the same data in one process, alternating windows.
Never trust numbers from fake devices
(XLA_FLAGS=--xla_force_host_platform_device_count): they share the same cores.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import keras_reference  # noqa: E402  (scripts/, beside this file)
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from covid_flax import (
  cpu_conv,
  cpu_defaults,
  input_pipeline,
  metric_writers,
  models,
  optim,
  parallel,
  train,
)  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/cxr.py", "Config to benchmark.")
flags.DEFINE_string("model", None, "Override config.model.")
flags.DEFINE_integer("image_size", None, "Override config.image_size.")
flags.DEFINE_integer("batch_size", None, "Override config.batch_size (global).")
flags.DEFINE_integer("steps", 10, "Steps per timing window.")
flags.DEFINE_integer("windows", 5, "Timing windows (the median is reported).")
flags.DEFINE_multi_enum("reference", [], ["keras", "xla"], "Also time a reference: 'keras' (the "
                        "same model in Keras, seed_cnn or resnet18, in a process of its own; "
                        "mixed_bfloat16 when half_precision), 'xla' (ours with "
                        "config.cpu_conv='xla'). Repeatable.")  # fmt: skip
flags.DEFINE_list("epoch_scaling", None, "Instead: time whole epochs on the training split "
                  "repeated k times, for each k of this list (e.g. 1,2,4).")  # fmt: skip
flags.DEFINE_integer("epochs", 2, "Epochs timed per size with --epoch_scaling (after one warm-up).")
flags.DEFINE_bool("scaling", False, "Instead: time to first step, train and input img/s, memory "
                  "of config.dataset in config.input_mode (see --dataset, --input_mode).")  # fmt: skip
flags.DEFINE_bool("modes_ab", False, "Instead: cache vs stream train img/s on the same data in one "
                  "process, alternating windows.")  # fmt: skip
flags.DEFINE_string("dataset", None, "Override config.dataset.")
flags.DEFINE_enum("input_mode", None, ["auto", "cache", "stream"], "Override config.input_mode.")
flags.DEFINE_string("input_split", None, "Also time the input pipeline on this split of the real "
                    "builder (decode + resize, then index batches for the device cache).")  # fmt: skip


def _emit(config, measure: str, **fields) -> None:
  record = {
    "measure": measure,
    "model": config.model,
    "image_size": config.image_size,
    "batch_size": config.batch_size,
    "half_precision": config.half_precision,
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    **fields,
  }
  print(json.dumps(record), flush=True)


def _windows(step_fn, n_windows: int, steps: int, batch: int):
  """Per-window img/s of `step_fn` (which returns something to block on)."""
  rates = []
  for _ in range(n_windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = step_fn()
    jax.block_until_ready(out)
    rates.append(steps * batch / (time.perf_counter() - start))
  return rates


def _conv_run(config) -> str:
  """Where our convolutions ran: 'onednn' or 'xla' (config.cpu_conv, unless oneDNN could not)."""
  dtype = models.compute_dtype(config)
  return "onednn" if cpu_conv.conv_path(config.cpu_conv, dtype) == "oneDNN" else "xla"


def _jax_steps(config, mesh, cache, device_batch):
  """Our compiled train step (a closure over its state) and eval step, for `config`."""
  tx = optim.create_optimizer(config, 100, 10_000, models.head_modules(config.model))
  graphdef, state = train.create_train_state(config, tx)
  holder = {"state": jax.device_put(state, parallel.replicated(mesh))}
  p_train, p_eval = train.make_parallel_steps(mesh, graphdef, tx, config)
  start = time.perf_counter()
  compiled = p_train.lower(holder["state"], cache, device_batch).compile()
  _emit(config, "compile", seconds=time.perf_counter() - start, what="train_step",
        cpu_conv=_conv_run(config))  # fmt: skip

  def train_step():
    holder["state"], metrics = compiled(holder["state"], cache, device_batch)
    return metrics["loss"]

  return train_step, lambda batch: p_eval(holder["state"], batch)[0]


def benchmark_train_eval(config, references=()) -> None:
  mesh = parallel.create_mesh()
  rng = np.random.default_rng(0)
  size, batch = config.image_size, config.batch_size
  data = input_pipeline.SplitData(  # 4 batches of random images, device-resident like training.
    images=rng.integers(0, 256, (4 * batch, size, size, 1), dtype=np.uint8),
    labels=rng.integers(0, 2, (4 * batch,)).astype(np.int32),
    patient_ids=np.arange(4 * batch).astype(str),
    filenames=np.arange(4 * batch).astype(str),
  )
  cache = input_pipeline.device_cache(mesh, data)
  host = {"index": np.arange(batch, dtype=np.int32), "label": data.labels[:batch]}
  device_batch = parallel.global_batch(mesh, host)
  eval_batch = parallel.global_batch(mesh, {"image": data.images[:batch], "label": host["label"]})

  ours, ours_eval = _jax_steps(config, mesh, cache, device_batch)
  # Warm-up: a whole window, as the first after a restart is slow (huge pages gathered, cpu_defaults).
  _windows(ours, 1, FLAGS.steps, batch)
  conv_seconds = []  # oneDNN convolution time of each of our windows.

  def ours_window():
    before = cpu_conv.seconds()
    rate = _windows(ours, 1, FLAGS.steps, batch)[0]
    conv_seconds.append(cpu_conv.seconds() - before)
    return rate

  windows = {"ours": ours_window}
  keras = keras_reference.Worker(config) if "keras" in references else None
  for name in references:
    if name == "keras":
      keras.window(FLAGS.steps)  # Its warm-up window.
      windows[name] = lambda: keras.window(FLAGS.steps)
    else:
      xla_config = config.copy_and_resolve_references()
      xla_config.cpu_conv = "xla"
      xla = _jax_steps(xla_config, mesh, cache, device_batch)[0]
      _windows(xla, 1, FLAGS.steps, batch)
      windows[name] = lambda xla=xla: _windows(xla, 1, FLAGS.steps, batch)[0]
  rates = {name: [] for name in windows}
  for _ in range(FLAGS.windows):  # Alternate windows so all see the same machine state.
    for name, window in windows.items():
      rates[name].append(window())
  if keras is not None:
    keras.close()
  img_s = statistics.median(rates["ours"])
  # Convolution ms a step (summed over the calls XLA runs side by side), over all our windows.
  conv_ms = 1000 * sum(conv_seconds) / (FLAGS.steps * FLAGS.windows)
  _emit(config, "train", cpu_conv=_conv_run(config), img_per_s=img_s, step_ms=1000 * batch / img_s,
        conv_ms=round(conv_ms, 1), windows=[round(r, 2) for r in rates["ours"]])  # fmt: skip
  for name in references:
    ref = statistics.median(rates[name])
    _emit(config, "train_reference", reference=name, img_per_s=ref, step_ms=1000 * batch / ref,
          windows=[round(r, 2) for r in rates[name]], ratio=img_s / ref)  # fmt: skip

  eval_rates = _windows(lambda: ours_eval(eval_batch), FLAGS.windows + 1, FLAGS.steps, batch)[1:]
  _emit(config, "eval", img_per_s=statistics.median(eval_rates))


def benchmark_input(config, split: str) -> None:
  """Decode + resize once (the cache), then index batches from grain (what the host feeds each
  train step; images stay on the device): host rates, no model. In stream mode: the streamed
  batches (read, decode, resize in grain's threads)."""
  if input_pipeline.resolve_input_mode(config, split) == "stream":
    data = input_pipeline.load_split(config, split, stream=True, metadata=False)
    batch = min(config.batch_size, len(data))
    dataset = input_pipeline.train_dataset(data, batch, 0)
    iterator = input_pipeline.train_iterator(dataset, streamed=True)
    next(iterator)
    n, start = max(20, 2 * FLAGS.steps), time.perf_counter()
    for _ in range(n):
      next(iterator)
    _emit(config, "input", stage="stream_batches", split=split,
          img_per_s=n * batch / (time.perf_counter() - start))  # fmt: skip
    return
  start = time.perf_counter()
  data = input_pipeline.load_split(config, split)
  seconds = time.perf_counter() - start
  _emit(config, "input", stage="decode_resize", split=split, img_per_s=len(data) / seconds,
        images=len(data))  # fmt: skip
  batch = min(config.batch_size, len(data))
  iterator = input_pipeline.train_iterator(input_pipeline.train_dataset(data, batch, 0))
  next(iterator)
  n = max(200, 5 * len(data) // batch)
  start = time.perf_counter()
  for _ in range(n):
    next(iterator)
  _emit(config, "input", stage="batches_from_cache", split=split,
        img_per_s=n * batch / (time.perf_counter() - start))  # fmt: skip


def benchmark_epochs(config, multipliers: list[int], epochs: int) -> None:
  """Wall time per training epoch (grain batches -> jitted step, as in `train`, cache mode) on the
  training split repeated k times, for each k: it should grow linearly with k."""
  base = input_pipeline.load_split(config, config.train_split)
  mesh = parallel.create_mesh()
  tx = optim.create_optimizer(config, 100, 10_000, models.head_modules(config.model))
  graphdef, _ = train.create_train_state(config, tx)
  p_train, _ = train.make_parallel_steps(mesh, graphdef, tx, config)
  for k in multipliers:
    data = base.subset(np.tile(np.arange(len(base)), k))
    cache = input_pipeline.device_cache(mesh, data)
    # A fresh state each time: the step donates (deletes) the one it is given.
    run_state = jax.device_put(train.create_train_state(config, tx)[1], parallel.replicated(mesh))
    iterator = input_pipeline.train_iterator(
      input_pipeline.train_dataset(data, config.batch_size, config.seed)
    )
    steps = len(data) // config.batch_size
    seconds = []
    for _ in range(epochs + 1):  # The first epoch includes compilation: not reported.
      start = time.perf_counter()
      for _ in range(steps):
        run_state, metrics = p_train(run_state, cache, parallel.global_batch(mesh, next(iterator)))
      jax.block_until_ready(metrics)
      seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds[1:])
    _emit(config, "epoch", size_multiplier=k, train_examples=len(data), steps=steps,
          epoch_s=median, img_per_s=steps * config.batch_size / median,
          epochs_s=[round(x, 2) for x in seconds[1:]],
          peak_rss_mib=metric_writers.peak_rss_mib())  # fmt: skip


def benchmark_scaling(config) -> None:
  """One training setup as `train.train_and_evaluate` builds it (data loading, device cache or
  stream, first step), then its steady rates (module docstring)."""
  start = time.perf_counter()
  streamed = input_pipeline.resolve_input_mode(config) == "stream"
  train_data, _ = input_pipeline.load_train_and_eval(config, stream=streamed)
  loaded_s = time.perf_counter() - start
  mesh = parallel.create_mesh()
  tx = optim.create_optimizer(config, 100, 10_000, models.head_modules(config.model))
  graphdef, state = train.create_train_state(config, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  p_train, _ = train.make_parallel_steps(mesh, graphdef, tx, config, streamed)
  if streamed:
    step = p_train
  else:
    cache = input_pipeline.device_cache(mesh, train_data)
    step = lambda state, batch: p_train(state, cache, batch)  # noqa: E731
  dataset = input_pipeline.train_dataset(train_data, config.batch_size, config.seed)
  iterator = input_pipeline.train_iterator(dataset, streamed)
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], parallel.global_batch(mesh, next(iterator)))
    return metrics["loss"]

  jax.block_until_ready(one_step())
  first_step_s = time.perf_counter() - start
  train_rates = _windows(one_step, FLAGS.windows, FLAGS.steps, config.batch_size)
  # The pipeline alone, from a fresh iterator further into the data (no model, same threads).
  alone = input_pipeline.train_iterator(dataset, streamed)
  alone.set_state(iterator.get_state())
  next(alone)
  n, t = 4 * FLAGS.steps, time.perf_counter()
  for _ in range(n):
    next(alone)
  input_img_s = n * config.batch_size / (time.perf_counter() - t)
  stats = jax.local_devices()[0].memory_stats() or {}
  _emit(config, "scaling", dataset=config.dataset, input_mode="stream" if streamed else "cache",
        train_examples=len(train_data), load_s=round(loaded_s, 1),
        time_to_first_step_s=round(first_step_s, 1),
        train_img_per_s=round(statistics.median(train_rates), 1),
        train_windows=[round(r, 1) for r in train_rates], input_img_per_s=round(input_img_s, 1),
        input_threads=(os.cpu_count() or 1) if streamed else 1,
        peak_rss_mib=metric_writers.peak_rss_mib(),
        device_bytes_in_use=stats.get("bytes_in_use"))  # fmt: skip


def benchmark_modes_ab(config) -> None:
  """Cache and stream mode on the same data in one process, alternating timed windows (A B A B)
  so that both see the same machine state: the fair comparison of their train img/s."""
  mesh = parallel.create_mesh()
  tx = optim.create_optimizer(config, 100, 10_000, models.head_modules(config.model))
  graphdef, _ = train.create_train_state(config, tx)
  steps = {}
  for mode in ("cache", "stream"):
    streamed = mode == "stream"
    data = input_pipeline.load_split(config, config.train_split, stream=streamed, metadata=False)
    p_train, _ = train.make_parallel_steps(mesh, graphdef, tx, config, streamed)
    iterator = input_pipeline.train_iterator(
      input_pipeline.train_dataset(data, config.batch_size, config.seed), streamed
    )
    fresh = train.create_train_state(config, tx)[1]  # Each step donates its own state.
    holder = {"state": jax.device_put(fresh, parallel.replicated(mesh))}
    cache = None if streamed else input_pipeline.device_cache(mesh, data)

    def one_step(p_train=p_train, iterator=iterator, holder=holder, cache=cache):
      batch = parallel.global_batch(mesh, next(iterator))
      args = (batch,) if cache is None else (cache, batch)
      holder["state"], metrics = p_train(holder["state"], *args)
      return metrics["loss"]

    jax.block_until_ready(one_step())
    steps[mode] = one_step
  rates = {mode: [] for mode in steps}
  for _ in range(FLAGS.windows):
    for mode, one_step in steps.items():
      rates[mode] += _windows(one_step, 1, FLAGS.steps, config.batch_size)
  medians = {mode: statistics.median(r) for mode, r in rates.items()}
  _emit(config, "modes_ab", dataset=config.dataset,
        **{f"{m}_img_per_s": round(v, 2) for m, v in medians.items()},
        **{f"{m}_windows": [round(x, 1) for x in r] for m, r in rates.items()},
        stream_over_cache=round(medians["stream"] / medians["cache"], 3))  # fmt: skip


def main(argv):
  del argv
  config = FLAGS.config
  for field in ("model", "image_size", "batch_size", "dataset", "input_mode"):
    if getattr(FLAGS, field) is not None:
      config[field] = getattr(FLAGS, field)
  _emit(config, "environment", xla_flags=os.environ.get("XLA_FLAGS", ""),
        jax=jax.__version__, backend=jax.default_backend())  # fmt: skip
  if FLAGS.epoch_scaling:
    benchmark_epochs(config, [int(k) for k in FLAGS.epoch_scaling], FLAGS.epochs)
    return
  if FLAGS.scaling:
    benchmark_scaling(config)
    return
  if FLAGS.modes_ab:
    benchmark_modes_ab(config)
    return
  benchmark_train_eval(config, FLAGS.reference)
  if FLAGS.input_split:
    benchmark_input(config, FLAGS.input_split)
  peak_mib = metric_writers.peak_rss_mib()
  _emit(config, "memory", peak_rss_mib=peak_mib)


if __name__ == "__main__":
  cpu_defaults.apply(restart=True)  # Malloc tunables: restarts once, before any work.
  app.run(main)
