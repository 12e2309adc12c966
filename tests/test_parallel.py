"""The data-parallel step on 8 devices equals the 1-device step on the same global batch."""

import jax
import numpy as np
import pytest
from helpers import data_mesh, tiny_config

from covid_flax import input_pipeline, optim, parallel, train


def _run(config, mesh, data, batches, streamed=False):
  tx = optim.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  graphdef, state = train.create_train_state(config, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  p_train, p_eval = train.make_parallel_steps(mesh, graphdef, tx, config, streamed)
  cache = input_pipeline.device_cache(mesh, data)
  losses = []
  for batch in batches:
    if streamed:  # The batch carries its images, as stream mode's does.
      batch = {"image": data.images[batch["index"]], "label": batch["label"]}
      state, metrics = p_train(state, parallel.global_batch(mesh, batch))
    else:
      state, metrics = p_train(state, cache, parallel.global_batch(mesh, batch))
    losses.append(float(metrics["loss"]))
  eval_batch = {"image": data.images[:16], "label": data.labels[:16]}
  probs, _ = p_eval(state, parallel.global_batch(mesh, eval_batch))
  return losses, jax.device_get(state), np.asarray(probs)


@pytest.mark.slow
@pytest.mark.parametrize(
  "model,recipe,streamed",
  [
    ("tiny_cnn", {}, False),  # Convolutions on oneDNN where it loads (the default), ...
    ("tiny_cnn", dict(cpu_conv="xla"), False),  # ... and on XLA.
    ("seed_cnn", {}, False),
    ("tiny_cnn", dict(mixup_alpha=0.4, cutmix_alpha=1.0), False),
    ("tiny_cnn", dict(mixstyle_prob=1.0), False),  # Style partners from the global batch.
    # SAM's ascent uses the global gradient: a per-device one would make 8 devices differ.
    ("tiny_cnn", dict(sam_rho=0.5), False),
    ("tiny_cnn", {}, True),
    (
      "tiny_cnn",
      dict(mixup_alpha=0.4, cutmix_alpha=1.0),
      True,
    ),  # Partners gathered across devices.
  ],
)
def test_eight_devices_match_one(model, recipe, streamed):
  assert jax.device_count() == 8, "conftest must fake 8 CPU devices"
  # No gradient clipping: it would hide a gradient off by a factor of the device count.
  config = tiny_config("", model=model, optimizer="sgd", learning_rate=0.01, augment=True,
                       dropout_rate=0.0, image_size=40, grad_clip_norm=0.0, **recipe)  # fmt: skip
  rng = np.random.default_rng(0)
  data = input_pipeline.SplitData(
    images=rng.integers(0, 256, (40, 40, 40, 1), dtype=np.uint8),
    labels=rng.integers(0, 2, (40,)).astype(np.int32),
    patient_ids=np.arange(40).astype(str),
    filenames=np.arange(40).astype(str),
  )
  batches = []
  for _ in range(3):
    index = rng.choice(40, 16, replace=False).astype(np.int32)
    batches.append({"index": index, "label": data.labels[index]})
  losses1, state1, probs1 = _run(config, data_mesh(1), data, batches, streamed)
  losses8, state8, probs8 = _run(config, data_mesh(8), data, batches, streamed)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-6)
  assert losses1[0] != losses1[-1]  # The steps did something.
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(probs8, probs1, rtol=1e-5, atol=1e-6)
  if model == "tiny_cnn":  # BatchNorm statistics moved, identically on both meshes.
    assert np.abs(np.asarray(state1.model_state["bn"]["mean"][...])).max() > 0


def test_eval_batches_pad_and_mask():
  data = input_pipeline.SplitData(
    images=np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 4, 4, 1), np.uint8),
    labels=np.arange(10) % 2,
    patient_ids=np.array([f"p{i}" for i in range(10)]),
    filenames=np.array([f"f{i}" for i in range(10)]),
  )
  batches = list(input_pipeline.eval_batches(data, 8))
  assert len(batches) == 2
  assert batches[1][1].tolist() == [True, True] + [False] * 6
  seen = np.concatenate([b["image"][m, 0, 0, 0] for b, m in batches])
  assert seen.tolist() == list(range(10))


def test_tta_hflip_averages_with_the_mirror_image():
  config = tiny_config("", image_size=32)
  mesh = data_mesh(8)
  tx = optim.create_optimizer(config, 10, 100)
  graphdef, state = train.create_train_state(config, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 32, 32, 1), dtype=np.uint8)
  labels = rng.integers(0, 2, 16).astype(np.int32)

  def probs(cfg, x):
    _, p_eval = train.make_parallel_steps(mesh, graphdef, tx, cfg)
    p, loss = p_eval(state, parallel.global_batch(mesh, {"image": x, "label": labels}))
    return np.asarray(p), np.asarray(loss)

  plain, _ = probs(config, images)
  mirrored, _ = probs(config, images[:, :, ::-1].copy())
  tta_config = tiny_config("", image_size=32, tta_hflip=True)
  tta, loss = probs(tta_config, images)
  np.testing.assert_allclose(tta, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
  assert np.abs(tta - plain).max() > 1e-4
  expected_loss = -np.log(np.where(labels == 1, tta, 1 - tta))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-4, atol=1e-6)
