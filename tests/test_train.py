"""End-to-end training on the synthetic dataset: learning, logs, checkpoints, exact resume."""

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import REPO_ROOT, fill_disk, kill_when_saved, tiny_config

from covid_flax import checkpointing, config_lib, loop, metric_writers, optim, plots, train

pytestmark = pytest.mark.slow  # Trains or starts processes (README: the unit-only run skips it).


def _main_cmd(workdir, data_dir, *extra):
  flags = dict(model="tiny_cnn", image_size=48, num_epochs=3, learning_rate=0.01,
               warmup_epochs=0.2, augment=False, progress_bar=False, data_dir=data_dir)  # fmt: skip
  return [
      sys.executable, "-m", "covid_flax.main", "--config=configs/synthetic.py",
      f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()], *extra,
  ]  # fmt: skip


def _final_params(workdir, step: int | None = None) -> tuple[int, dict]:
  """(step (default: the last), its saved train state as host arrays), whatever topology saved it."""
  import jax

  ckpt = Path(workdir) / "checkpoints"
  step = step or max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  path = (ckpt / str(step) / "state").absolute()
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return step, checkpointer.restore(path, target)


def _assert_identical(a, b):
  import jax

  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_two_epochs_learn_and_write_outputs(synthetic_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(synthetic_data_dir, model="seed_cnn", learning_rate=1e-3, dropout_rate=0.0)
  train.train_and_evaluate(config, workdir)
  records = plots.load_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  assert len(val) == 2 and train_losses[-1] < train_losses[0]
  assert val[-1]["auc"] > 0.65, val  # Chance is 0.5; this setup reaches about 0.8.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tensorboard"))
  steps = sorted(int(p) for p in os.listdir(f"{workdir}/checkpoints") if p.isdigit())
  assert steps[-1] == val[-1]["step"]
  summary = json.load(open(f"{workdir}/train_summary.json"))
  assert summary["num_train_examples"] > 0 and summary["final_val"]["auc"] == val[-1]["auc"]
  assert json.load(open(f"{workdir}/config.json")) == config.to_dict()  # For people to read.


def test_final_fit_on_train_and_val_chooses_no_best_checkpoint(
  synthetic_data_dir, tmp_path, caplog
):
  from covid_flax import evaluation, inference, input_pipeline

  workdir = str(tmp_path / "run")
  config = tiny_config(synthetic_data_dir, train_split="train+val")
  sizes = {s: len(input_pipeline.load_split(config, s)) for s in ("train", "val", "test")}
  assert input_pipeline.count_shared_examples(config, "train[:50%]", "train[25%:]") == (
    sizes["train"] // 2 - sizes["train"] // 4
  )
  train.train_and_evaluate(config, workdir)
  assert "did not provide metrics" not in caplog.text  # Orbax's warning at every untracked save.
  summary = json.load(open(f"{workdir}/train_summary.json"))
  assert summary["num_train_examples"] == sizes["train"] + sizes["val"]
  manager = checkpointing.create_manager(workdir, read_only=True)
  assert manager.best_step() is None  # Val AUC of training data chooses nothing.
  run = inference.load_run(workdir, "best")
  assert run.step == manager.latest_step()
  assert inference.operating_point(run)["chosen_on"].endswith("'train+val': not held out)")
  out = evaluation.evaluate(run, input_pipeline.load_split(run.config, "test"), "test", 20)
  assert json.load(open(f"{out}/metrics.json"))["num_trained_on"] == 0
  assert "Not held out" not in open(f"{out}/report.md").read()
  cli = subprocess.run(
    [sys.executable, "-m", "covid_flax.evaluate", f"--workdir={workdir}", "--split=val",
     "--n_resamples=20", "--gradcam_per_group=1"],
    cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert (
    f"**Not held out**: the run trained on {sizes['val']} of these {sizes['val']}" in cli.stdout
  )


def test_a_best_checkpoint_outlives_a_resume_without_held_out_data(synthetic_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(synthetic_data_dir, keep_checkpoints=1, num_epochs=3)
  train.train_and_evaluate(config, workdir)
  best = checkpointing.create_manager(workdir, read_only=True).best_step()
  assert best is not None and checkpointing.has_best(workdir)
  # Resumed for more epochs, validating on training data: no new best, the old one is kept.
  resumed = tiny_config(synthetic_data_dir, keep_checkpoints=1, num_epochs=5, eval_split="train")
  train.train_and_evaluate(resumed, workdir)
  manager = checkpointing.create_manager(workdir, read_only=True)
  assert manager.latest_step() > best and best in manager.all_steps()


@pytest.mark.parametrize("input_mode", ["cache", "stream"])
def test_kill_and_rerun_gives_identical_parameters(synthetic_data_dir, tmp_path, input_mode):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  mode = f"--config.input_mode={input_mode}"
  straight = tmp_path / "straight"
  subprocess.run(_main_cmd(straight, synthetic_data_dir, mode), cwd=REPO_ROOT, env=env,
                 check=True, capture_output=True)  # fmt: skip
  final_step, expected = _final_params(straight)
  steps_per_epoch = final_step // 3

  resumed = tmp_path / "resumed"
  kill_when_saved(
    _main_cmd(resumed, synthetic_data_dir, mode),
    resumed / "checkpoints" / str(steps_per_epoch),
    env,
  )
  assert not (resumed / "checkpoints" / str(final_step)).exists()
  subprocess.run(_main_cmd(resumed, synthetic_data_dir, mode), cwd=REPO_ROOT, env=env,
                 check=True, capture_output=True)  # fmt: skip
  step, got = _final_params(resumed)
  assert step == final_step
  _assert_identical(expected, got)


@pytest.mark.parametrize("input_mode", ["cache", "stream"])
def test_sigterm_saves_and_resume_message(synthetic_data_dir, tmp_path, input_mode):
  workdir = tmp_path / "run"
  cmd = _main_cmd(workdir, synthetic_data_dir, "--config.num_epochs=50",
                  f"--config.input_mode={input_mode}")  # fmt: skip
  proc = subprocess.Popen(cmd,
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)  # fmt: skip
  ckpt = workdir / "checkpoints"
  deadline = time.time() + 300
  while not (ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())):
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  before = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
  stopped_at = int(re.search(r"Stopped by signal 15 at step (\d+)", out).group(1))
  assert "Run the same command to resume" in out
  saved = {int(p.name) for p in ckpt.iterdir() if p.name.isdigit()}
  assert stopped_at in saved and stopped_at > before  # The step it stopped at is on disk.


def test_rerun_after_completion_resumes_not_restarts(synthetic_data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  config = tiny_config(synthetic_data_dir, num_epochs=1)
  first = train.train_and_evaluate(config, workdir)
  logged = plots.load_jsonl(f"{workdir}/metrics.jsonl")
  again = train.train_and_evaluate(config, workdir)
  assert int(again.step) == int(first.step)
  _assert_identical(first.params, again.params)
  assert "is already complete" in capsys.readouterr().out
  assert plots.load_jsonl(f"{workdir}/metrics.jsonl") == logged  # No step was trained again.


def test_incompatible_workdir_is_refused(synthetic_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(synthetic_data_dir, num_epochs=1), workdir)
  other = tiny_config(synthetic_data_dir, num_epochs=1, image_size=40)
  with pytest.raises(config_lib.ConfigError, match=r"image_size: saved 48 vs now 40"):
    train.train_and_evaluate(other, workdir)
  other.overwrite = True
  train.train_and_evaluate(other, workdir)
  (aside,) = [p for p in os.listdir(workdir) if p.startswith("old-")]
  # The old run's evaluation and logs went with its checkpoints: nothing of it is taken as new.
  assert {"checkpoints", "metrics.jsonl", "train_summary.json"} <= set(
    os.listdir(f"{workdir}/{aside}")
  )
  assert len(plots.load_jsonl(f"{workdir}/metrics.jsonl")) == len(
    plots.load_jsonl(f"{workdir}/{aside}/metrics.jsonl")
  )


def test_nan_loss_stops_with_step(synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_data_dir, num_epochs=1, learning_rate=1e30, grad_clip_norm=0.0)
  with pytest.raises(loop.NonFiniteLossError, match="non-finite loss"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_nan_policy_skip_keeps_the_state_and_counts_the_steps(synthetic_data_dir, tmp_path):
  import jax

  config = tiny_config(synthetic_data_dir, num_epochs=1, learning_rate=1e30, grad_clip_norm=0.0,
                       nan_policy="skip")  # fmt: skip
  workdir = tmp_path / "run"
  state = train.train_and_evaluate(config, str(workdir))
  skipped = sum(
    r["skipped"] for r in plots.load_jsonl(f"{workdir}/metrics.jsonl") if r["split"] == "train"
  )
  assert 0 < skipped < int(state.step)  # The first steps were finite, later ones were skipped.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_no_checkpoint_is_saved_after_a_non_finite_step(synthetic_data_dir, tmp_path):
  """Checkpoints every step, metrics logged rarely: each save must still check the steps since the
  last check, or a NaN state is saved and every restart restores it."""
  import jax

  config = tiny_config(synthetic_data_dir, num_epochs=1, learning_rate=1e30, grad_clip_norm=0.0,
                       checkpoint_every_steps=1, log_every_steps=1000, keep_checkpoints=100)  # fmt: skip
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+);") as e:
    train.train_and_evaluate(config, str(workdir))
  first_bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and max(saved) < first_bad  # (The last save may still be in flight at the error.)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_final_params(workdir)[1]["params"]))


def _garble(step_dir: Path) -> None:
  for f in (step_dir / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage" * 3)


def test_corrupt_latest_checkpoint_falls_back(synthetic_data_dir, tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(synthetic_data_dir)
  expected = train.train_and_evaluate(config, str(workdir))
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  _garble(workdir / "checkpoints" / str(steps[-1]))
  again = train.train_and_evaluate(config, str(workdir))  # Resumes from the epoch-1 checkpoint.
  _assert_identical(expected.params, again.params)
  assert [p.name.split("-")[0] for p in (workdir / "corrupt_checkpoints").iterdir()] == [
    str(steps[-1])
  ]
  (moved,) = (workdir / "corrupt_checkpoints").iterdir()
  assert "Traceback" in (moved / "restore_error.txt").read_text()  # The details, kept with it.


def test_evaluation_of_a_corrupt_latest_checkpoint_falls_back_in_one_line(
  synthetic_data_dir, tmp_path, caplog
):
  from covid_flax import inference

  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(synthetic_data_dir), str(workdir))
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  _garble(workdir / "checkpoints" / str(steps[-1]))
  before = sorted(str(p) for p in workdir.rglob("*"))
  assert inference.load_run(str(workdir), "latest").step == steps[-2]
  assert f"evaluating the previous checkpoint, step {steps[-2]}, instead" in caplog.text
  with pytest.raises(checkpointing.CheckpointError, match=f"checkpoint step {steps[-1]} ") as e:
    inference.load_run(str(workdir), str(steps[-1]))  # A step asked for by number: no fallback.
  assert "\n" not in str(e.value) and len(str(e.value)) < 600
  assert sorted(str(p) for p in workdir.rglob("*")) == before  # Evaluation moves nothing.


def test_all_checkpoints_corrupt_is_an_error_and_keeps_them(synthetic_data_dir, tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(synthetic_data_dir, num_epochs=1)
  train.train_and_evaluate(config, str(workdir))
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      _garble(step_dir)
  before = sorted(str(p) for p in workdir.rglob("*"))
  with pytest.raises(
    checkpointing.CheckpointError, match="could be restored; they were left untouched"
  ):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(str(p) for p in workdir.rglob("*")) == before


def test_checkpoints_hold_no_pickle(synthetic_data_dir, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(synthetic_data_dir, num_epochs=1), str(workdir))
  for f in (workdir / "checkpoints").rglob("*"):
    if f.is_file():
      assert not f.read_bytes()[:2].startswith(b"\x80"), f"{f} looks like a pickle"


def test_disk_full_while_saving(synthetic_data_dir, small_disk):
  workdir = small_disk / "run"
  config = tiny_config(synthetic_data_dir, num_epochs=1)
  train.train_and_evaluate(config, str(workdir))
  config.num_epochs = 2
  with fill_disk(small_disk), pytest.raises(checkpointing.CheckpointError) as info:
    train.train_and_evaluate(config, str(workdir))
  on_disk = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert f"checkpoints {on_disk} are intact" in str(info.value)
  first_epoch = plots.load_jsonl(f"{workdir}/metrics.jsonl")
  again = train.train_and_evaluate(config, str(workdir))  # Resumes from the intact checkpoint.
  assert int(again.step) == 2 * on_disk[-1]
  resumed = plots.load_jsonl(f"{workdir}/metrics.jsonl")[len(first_epoch) :]
  assert min(r["step"] for r in resumed) > on_disk[-1]  # Epoch 1 was not trained again.


def test_batch_larger_than_the_training_split_is_refused(synthetic_data_dir, tmp_path):
  config = tiny_config(synthetic_data_dir, batch_size=1024)
  with pytest.raises(config_lib.ConfigError, match="batch_size=1024 is larger than the 618"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_host_memory_trim_finds_glibc_on_linux():
  """The per-epoch trim must not silently become a no-op on Linux (glibc), where it keeps peak
  RSS flat; elsewhere it does nothing."""
  if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
    pytest.skip("malloc_trim is glibc's; elsewhere the trim is a no-op by design")
  assert metric_writers._libc_malloc_trim() is not None
  metric_writers.trim_host_memory()


def test_sam_steps_with_the_gradient_at_the_ascended_weights(synthetic_data_dir):
  """With SGD, one SAM step is w - lr * grad(w + rho * g / |g|), g = grad(w): checked against that
  formula evaluated by hand on the same batch."""
  import jax
  from flax import nnx
  from helpers import data_mesh
  from jax.sharding import PartitionSpec as P

  from covid_flax import input_pipeline, parallel

  config = tiny_config(synthetic_data_dir, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                       grad_clip_norm=0.0, warmup_epochs=0.0, lr_schedule="constant",
                       dropout_rate=0.0, sam_rho=0.5)  # fmt: skip
  mesh = data_mesh(1)
  data = input_pipeline.load_split(config, "train")
  tx = optim.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  graphdef, state0 = train.create_train_state(config, tx)
  state0 = jax.device_get(state0)  # A host copy: the step donates the device one.
  batch = {"index": np.arange(32, dtype=np.int32), "label": data.labels[:32]}
  p_train, _ = train.make_parallel_steps(mesh, graphdef, tx, config)
  state1, _ = p_train(jax.device_put(state0, parallel.replicated(mesh)),
                      input_pipeline.device_cache(mesh, data), parallel.global_batch(mesh, batch))  # fmt: skip

  images = train.normalize(data.images[:32])

  def grad(params, model_state):
    def loss(model):
      logits = model(images, train=True)
      return train.cross_entropy(logits, batch["label"], config.label_smoothing).mean()

    model = nnx.merge(graphdef, params, model_state)
    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)

  # BatchNorm averages over the `data` axis: evaluate on the same 1-device mesh.
  sharded_grad = jax.shard_map(grad, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
  model_state = jax.tree.map(jax.numpy.asarray, state0.model_state)
  g = sharded_grad(state0.params, model_state)
  scale = config.sam_rho / np.sqrt(sum(float((x**2).sum()) for x in jax.tree.leaves(g)))
  g_sam = sharded_grad(jax.tree.map(lambda w, d: w + scale * d, state0.params, g), model_state)
  expected = jax.tree.map(lambda w, d: w - config.learning_rate * d, state0.params, g_sam)
  plain = jax.tree.map(lambda w, d: w - config.learning_rate * d, state0.params, g)
  for got, want, sgd in zip(*map(jax.tree.leaves, (state1.params, expected, plain))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
  assert any(not np.allclose(w, s) for w, s in zip(*map(jax.tree.leaves, (expected, plain))))


@pytest.mark.parametrize("field", ["sam_rho", "mixstyle_prob"])
def test_pretraining_refuses_sam_and_mixstyle(field, synthetic_data_dir, tmp_path):
  from covid_flax import simclr

  with pytest.raises(
    config_lib.ConfigError, match=rf"config.{field}=0.05 is for `covid_flax.main`"
  ):
    simclr.pretrain(tiny_config(synthetic_data_dir, **{field: 0.05}), str(tmp_path / "ssl"))
  assert not (tmp_path / "ssl").exists()  # Refused before anything is written.


def test_pretraining_refuses_stream_mode(synthetic_data_dir, tmp_path):
  from covid_flax import simclr

  with pytest.raises(config_lib.ConfigError, match=r"input_mode='stream'.*device cache only"):
    simclr.pretrain(tiny_config(synthetic_data_dir, input_mode="stream"), str(tmp_path / "ssl"))
