"""Self-supervised pretraining: the NT-Xent loss, device-count invariance, the command line, and
fine-tuning from its checkpoint (`config.init_from`)."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import REPO_ROOT, data_mesh, fill_disk, tiny_config
from jax.sharding import PartitionSpec as P

from covid_flax import config_lib, input_pipeline, optim, parallel, simclr, train

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).


def _reference_nt_xent(z1, z2, temperature):
  """Textbook NT-Xent (SimCLR, eq. 1) over 2N views, in numpy."""
  z = np.concatenate([z1, z2])
  n = len(z1)
  sim = z @ z.T / temperature
  np.fill_diagonal(sim, -np.inf)
  positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  log_softmax = sim - np.log(np.exp(sim).sum(axis=1, keepdims=True))
  return -log_softmax[np.arange(2 * n), positive].mean()


@pytest.mark.parametrize("devices", [1, 8])
def test_nt_xent_matches_reference_on_any_mesh(devices):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 16, 8)).astype(np.float32)
  z1 /= np.linalg.norm(z1, axis=1, keepdims=True)
  z2 = z1 + 0.3 * z2
  z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
  loss_fn = jax.shard_map(
    lambda a, b: jax.lax.pmean(simclr.nt_xent(a, b, 0.5), parallel.DATA_AXIS),
    mesh=data_mesh(devices),
    in_specs=(P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
    out_specs=P(),
  )
  loss, accuracy = jax.jit(loss_fn)(z1, z2)
  np.testing.assert_allclose(float(loss), _reference_nt_xent(z1, z2, 0.5), rtol=1e-5)
  assert 0.5 < float(accuracy) <= 1.0  # Views are close: most positives score highest.


def _pretrain_steps(config, mesh, data, batches):
  tx = optim.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  graphdef, state = simclr.create_pretrain_state(config, tx)
  state = jax.device_put(state, parallel.replicated(mesh))
  step = simclr.make_parallel_step(mesh, graphdef, tx, config)
  cache = input_pipeline.device_cache(mesh, data)
  losses = []
  for batch in batches:
    state, metrics = step(state, cache, parallel.global_batch(mesh, batch))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state)


def test_pretrain_step_eight_devices_match_one():
  """The all-gathered contrastive loss and its gradient do not depend on the device count."""
  config = tiny_config("", optimizer="sgd", learning_rate=0.05, augment=True, image_size=32,
                       ssl_projection_dim=16, grad_clip_norm=0.0, warmup_epochs=0.0)  # fmt: skip
  rng = np.random.default_rng(0)
  data = input_pipeline.SplitData(
    images=rng.integers(0, 256, (32, 32, 32, 1), dtype=np.uint8),
    labels=np.zeros(32, np.int32),
    patient_ids=np.arange(32).astype(str),
    filenames=np.arange(32).astype(str),
  )
  batches = [{"index": rng.choice(32, 16, replace=False).astype(np.int32),
              "label": np.zeros(16, np.int32)} for _ in range(3)]  # fmt: skip
  losses1, state1 = _pretrain_steps(config, data_mesh(1), data, batches)
  losses8, state8 = _pretrain_steps(config, data_mesh(8), data, batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses1[0] != losses1[-1]
  for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def _ssl_flags(data_dir):
  return dict(model="tiny_cnn", image_size=48, num_epochs=2, batch_size=64, warmup_epochs=0.2,
              progress_bar=False, data_dir=data_dir, ssl_projection_dim=16)  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(synthetic_data_dir, tmp_path_factory) -> str:
  """A pretraining run through the command line (2 epochs of the tiny model)."""
  workdir = str(tmp_path_factory.mktemp("ssl"))
  flags = _ssl_flags(synthetic_data_dir)
  cmd = [sys.executable, "-m", "covid_flax.pretrain", "--config=configs/ct_ssl.py",
         f"--workdir={workdir}", "--config.dataset=covid_synthetic/cxr",
         *[f"--config.{k}={v}" for k, v in flags.items()]]  # fmt: skip
  result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Pretrained encoder in" in result.stdout
  return workdir


def test_pretraining_lowers_the_contrastive_loss(pretrained):
  from covid_flax import plots

  rows = [r for r in plots.load_jsonl(f"{pretrained}/metrics.jsonl") if r["split"] == "pretrain"]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert rows[-1]["step"] == 2 * (618 // 64)


def test_finetune_starts_from_the_pretrained_encoder(pretrained, synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_data_dir, init_from=pretrained, num_epochs=1)
  tx = optim.create_optimizer(config, 10, 100)
  _, fresh = train.create_train_state(config, tx)
  loaded = train.init_from_pretrained(fresh, config)
  saved = simclr.abstract_pretrain_state(simclr.checkpointing.load_saved_config(pretrained))
  manager = simclr.checkpointing.create_manager(pretrained, read_only=True, track_best=False)
  pre, _ = simclr.checkpointing.restore(manager, manager.latest_step(), saved)
  for path, value in nnx.to_flat_state(loaded.params):
    expected = pre.params["encoder"] if path[0] != "out" else fresh.params
    for key in path:
      expected = expected[key]
    np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(expected[...]))
  np.testing.assert_array_equal(  # BatchNorm statistics come along.
    np.asarray(loaded.model_state["bn"]["mean"][...]),
    np.asarray(pre.model_state["encoder"]["bn"]["mean"][...]),
  )
  assert float(np.abs(np.asarray(pre.model_state["encoder"]["bn"]["mean"][...])).max()) > 0
  train.train_and_evaluate(config, str(tmp_path))  # And the whole run works.


def test_init_from_errors_name_the_field(pretrained, synthetic_data_dir, tmp_path):
  tx = optim.create_optimizer(tiny_config(""), 10, 100)
  (tmp_path / "empty").mkdir()
  empty = tiny_config(synthetic_data_dir, init_from=str(tmp_path / "empty"))
  with pytest.raises(config_lib.ConfigError, match="config.init_from=.*has no checkpoints"):
    train.init_from_pretrained(train.create_train_state(empty, tx)[1], empty)
  missing = tiny_config(synthetic_data_dir, init_from=str(tmp_path / "nope"))
  with pytest.raises(config_lib.ConfigError, match="config.init_from=.*does not exist"):
    train.init_from_pretrained(train.create_train_state(missing, tx)[1], missing)
  other = tiny_config(synthetic_data_dir, init_from=pretrained, model="seed_cnn")
  with pytest.raises(config_lib.ConfigError, match="pretrained a 'tiny_cnn' encoder, but config"):
    train.init_from_pretrained(train.create_train_state(other, tx)[1], other)


def test_pretraining_resumes_where_it_stopped(pretrained, synthetic_data_dir, tmp_path):
  import shutil

  from configs import ct_ssl
  from covid_flax import plots

  workdir = str(tmp_path / "ssl")
  shutil.copytree(pretrained, workdir)
  config = ct_ssl.get_config()
  config.dataset = "covid_synthetic/cxr"
  for key, value in {**_ssl_flags(synthetic_data_dir), "num_epochs": 3}.items():
    config[key] = value
  state = simclr.pretrain(config, workdir)
  assert int(state.step) == 3 * (618 // 64)
  steps = [r["step"] for r in plots.load_jsonl(f"{workdir}/metrics.jsonl")]
  assert steps == sorted(set(steps)) and steps[-1] == 27  # Continued, not restarted.


def test_disk_full_stops_pretraining_cleanly_and_resumes(
  pretrained, synthetic_data_dir, small_disk
):
  import shutil

  from configs import ct_ssl

  workdir = small_disk / "ssl"
  shutil.copytree(pretrained, workdir)
  config = ct_ssl.get_config()
  config.dataset = "covid_synthetic/cxr"
  for key, value in {**_ssl_flags(synthetic_data_dir), "num_epochs": 3}.items():
    config[key] = value
  with fill_disk(small_disk), pytest.raises(simclr.checkpointing.CheckpointError, match="intact"):
    simclr.pretrain(config, str(workdir))
  assert int(simclr.pretrain(config, str(workdir)).step) == 3 * (618 // 64)  # Resumes.


def test_pretraining_and_training_name_an_unknown_train_source(synthetic_data_dir, tmp_path):
  from configs import ct_ssl

  config = ct_ssl.get_config()
  config.dataset = "covid_synthetic/cxr"
  for key, value in {**_ssl_flags(synthetic_data_dir), "train_sources": "paper"}.items():
    config[key] = value
  message = (
    r"config.train_sources='paper': .* has source \['paper'\]; its sources are \['synthetic'\]"
  )
  with pytest.raises(config_lib.ConfigError, match=message):
    simclr.pretrain(config, str(tmp_path / "ssl"))
  with pytest.raises(config_lib.ConfigError, match=message):
    train.train_and_evaluate(tiny_config(synthetic_data_dir, train_sources="paper"), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
