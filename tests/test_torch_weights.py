"""PyTorch weights: our models compute torchvision's function on the same weights (against a
committed fixture of torchvision's outputs), mismatching checkpoints are refused with the list,
and fine-tuning from a converted checkpoint trains, freezes and resumes like any run."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_fixture
from flax import nnx
from helpers import REPO_ROOT, kill_when_saved, tiny_config
from safetensors.numpy import save_file

from covid_flax import config_lib, models, optim, preprocess, torch_weights


def _save(path, state_dict) -> str:
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
  return str(path)


def _config(model: str, input_norm: str = "imagenet", **overrides):
  return tiny_config("", model=model, input_norm=input_norm, **overrides)


def _loaded_model(config, path):
  model = models.from_config(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  params, model_state = torch_weights.load(path, config, params, model_state)
  return nnx.merge(graphdef, params, model_state)


@pytest.mark.parametrize("case", sorted(torch_fixture.CASES))
def test_torchvision_forward_pass_is_reproduced(case, tmp_path):
  fixture = np.load(torch_fixture.FIXTURE)
  model_name, input_norm = torch_fixture.CASES[case]
  shapes = torch_fixture.torch_shapes(model_name, input_norm)
  path = _save(tmp_path / "w.safetensors", torch_fixture.random_state_dict(shapes))
  model = _loaded_model(_config(model_name, input_norm), path)
  forward = nnx.jit(lambda m, x: (m.features(x).mean(axis=(1, 2)), m(x)))
  for size in torch_fixture.SIZES:
    images = preprocess.normalize(jnp.asarray(fixture[f"images_{size}"])[..., None])
    features, logits = forward(model, images)
    for name, ours in (("features", features), ("logits", logits)):
      theirs = fixture[f"{case}_{size}_{name}"]
      error = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
      assert error < 1e-4, f"{case} at {size}x{size}: {name} differ by {error:.2e} of their max"


def test_every_fixture_case_was_made():
  fixture = np.load(torch_fixture.FIXTURE)
  for case in torch_fixture.CASES:
    for size in torch_fixture.SIZES:
      assert fixture[f"{case}_{size}_logits"].shape == (torch_fixture.BATCH, 2)


def _resnet_w16_state(head_classes: int = 1000, input_norm: str = "imagenet") -> dict:
  state = torch_fixture.random_state_dict(torch_fixture.torch_shapes("resnet18_w16", input_norm))
  state["fc.weight"] = np.zeros((head_classes, 128), np.float32)
  state["fc.bias"] = np.zeros((head_classes,), np.float32)
  return state


def test_the_backbone_loads_and_an_imagenet_head_is_replaced(tmp_path):
  state = _resnet_w16_state(head_classes=1000)
  state["bn1.num_batches_tracked"] = np.zeros((), np.int64)  # Buffers that are not weights.
  config = _config("resnet18_w16")
  model = _loaded_model(config, _save(tmp_path / "w.safetensors", state))
  np.testing.assert_array_equal(  # OIHW -> HWIO
    np.asarray(model.stem.conv.kernel[...]), state["conv1.weight"].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    np.asarray(model.blocks[2].shortcut.bn.var[...]), state["layer2.0.downsample.1.running_var"]
  )
  fresh = models.from_config(config)
  np.testing.assert_array_equal(
    np.asarray(model.out.kernel[...]), np.asarray(fresh.out.kernel[...])
  )
  assert model.out.kernel.shape == (128, 2)


def test_a_head_of_our_shape_is_loaded(tmp_path):
  state = _resnet_w16_state(head_classes=2)
  state["fc.weight"] = np.arange(256, dtype=np.float32).reshape(2, 128)
  model = _loaded_model(_config("resnet18_w16"), _save(tmp_path / "w.safetensors", state))
  np.testing.assert_array_equal(np.asarray(model.out.kernel[...]), state["fc.weight"].T)


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
  state = _resnet_w16_state()
  del state["layer3.1.bn2.running_mean"]
  state["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  state["layer1.0.conv2.weight"] = np.zeros((16, 16, 5, 5), np.float32)
  with pytest.raises(config_lib.ConfigError) as error:
    _loaded_model(_config("resnet18_w16"), _save(tmp_path / "w.safetensors", state))
  message = str(error.value)
  assert "w.safetensors" in message and "'resnet18_w16'" in message
  assert "1 missing (layer3.1.bn2.running_mean)" in message
  assert "1 unexpected (layer5.0.conv1.weight)" in message
  assert "1 mis-shaped (layer1.0.conv2.weight (16, 16, 5, 5) (ours (16, 16, 3, 3)))" in message


def test_a_three_channel_stem_names_the_input_norm_to_use(tmp_path):
  path = _save(tmp_path / "w.safetensors", _resnet_w16_state(input_norm="imagenet"))
  with pytest.raises(config_lib.ConfigError, match="--config.input_norm=imagenet"):
    _loaded_model(_config("resnet18_w16", input_norm="default"), path)


def test_another_architecture_is_refused_with_counts(tmp_path):
  path = _save(tmp_path / "w.safetensors", _resnet_w16_state())
  with pytest.raises(config_lib.ConfigError, match=r"\d+ missing \(features\.conv0\.weight"):
    _loaded_model(_config("densenet121"), path)


def test_old_densenet_names_and_dataparallel_prefixes_are_canonical():
  names = {
    "module.features.denseblock1.denselayer1.norm.1.weight": 1,
    "features.denseblock2.denselayer3.conv.2.weight": 2,
    "features.norm5.running_var": 3,
    "features.norm0.num_batches_tracked": 4,
    "op_threshs": 5,
  }
  assert torch_weights.canonical_names(names) == {
    "features.denseblock1.denselayer1.norm1.weight": 1,
    "features.denseblock2.denselayer3.conv2.weight": 2,
    "features.norm5.running_var": 3,
  }


def test_bfloat16_checkpoints_are_widened(tmp_path):
  from safetensors.flax import save_file as save_jax

  path = str(tmp_path / "bf16.safetensors")
  save_jax({"w": jnp.array([1.5, -2.25], jnp.bfloat16)}, path)
  read = torch_weights.read_safetensors(path)
  assert read["w"].dtype == np.float32 and read["w"].tolist() == [1.5, -2.25]


def test_bad_init_from_files_name_the_fix(tmp_path):
  pickle = tmp_path / "resnet18-f37072fd.pth"
  pickle.write_bytes(b"PK")
  with pytest.raises(config_lib.ConfigError, match="python -m covid_flax.convert_weights"):
    config_lib.check_init_from(str(pickle))
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.check_init_from(str(tmp_path / "nope.safetensors"))
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x00" * 100)
  with pytest.raises(config_lib.ConfigError, match="garbage.safetensors.*not a readable"):
    torch_weights.read_safetensors(str(garbage))


def test_input_norm_is_refused_for_models_without_a_torch_counterpart():
  config = _config("tiny_cnn")
  with pytest.raises(config_lib.ConfigError, match="config.input_norm='imagenet'"):
    config_lib.validate(config)


def test_backbone_learns_at_its_own_rate_and_not_while_frozen():
  config = _config("resnet18_w16", input_norm="default", optimizer="sgd", momentum=0.0,
                   weight_decay=0.0, grad_clip_norm=0.0, lr_schedule="constant",
                   warmup_epochs=0.0, backbone_lr_scale=0.1, frozen_backbone_epochs=2.0)  # fmt: skip
  params = nnx.state(models.from_config(config), nnx.Param)
  tx = optim.create_optimizer(config, 3, 30, models.head_modules(config.model))
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(8):
    updates, opt_state = tx.update(grads, opt_state, params)
    head = float(updates["out"]["kernel"][...][0, 0])
    stem = float(updates["stem"]["conv"]["kernel"][...][0, 0, 0, 0])
    assert head == pytest.approx(-config.learning_rate)
    assert stem == (0.0 if step < 6 else pytest.approx(-0.1 * config.learning_rate))


def test_param_groups_are_refused_in_pretraining():
  config = _config("resnet18_w16", input_norm="default", backbone_lr_scale=0.1)
  with pytest.raises(config_lib.ConfigError, match="config.backbone_lr_scale=0.1"):
    optim.create_optimizer(config, 3, 30)


def test_frozen_batchnorm_uses_the_running_statistics_in_training():
  config = _config("densenet121", input_norm="default", freeze_bn_stats=True, dropout_rate=0.0)
  model = models.from_config(config)
  x = jax.random.normal(jax.random.key(0), (2, 40, 40, 1))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  np.testing.assert_allclose(model(x, train=True), model(x, train=False), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, before, nnx.state(model, nnx.BatchStat))


def test_a_changed_param_grouping_is_an_incompatible_workdir():
  saved = dict(_config("resnet18_w16"))
  new = _config("resnet18_w16", backbone_lr_scale=0.1)
  assert "backbone_lr_scale" in config_lib.incompatible_fields(saved, new)
  assert not config_lib.incompatible_fields(saved, _config("resnet18_w16", freeze_bn_stats=True))


def _fine_tune_cmd(workdir, data_dir, weights):
  flags = dict(model="resnet18_w16", input_norm="imagenet", init_from=weights, image_size=48,
               num_epochs=3, frozen_backbone_epochs=1, backbone_lr_scale=0.1, freeze_bn_stats=True,
               learning_rate=0.01, warmup_epochs=0.2, augment=False, progress_bar=False,
               data_dir=data_dir)  # fmt: skip
  return [sys.executable, "-m", "covid_flax.main", "--config=configs/synthetic.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]  # fmt: skip


@pytest.mark.slow
def test_fine_tuning_from_torch_weights_freezes_then_resumes_bit_identically(
  synthetic_data_dir, tmp_path
):
  from test_train import _assert_identical, _final_params

  weights = _save(tmp_path / "w.safetensors", _resnet_w16_state())
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  straight = tmp_path / "straight"
  subprocess.run(_fine_tune_cmd(straight, synthetic_data_dir, weights), cwd=REPO_ROOT, env=env,
                 check=True, capture_output=True)  # fmt: skip
  final_step, expected = _final_params(straight)
  epoch = final_step // 3
  _, after_frozen_epoch = _final_params(straight, epoch)
  stem = np.asarray(after_frozen_epoch["params"]["stem"]["conv"]["kernel"]["value"])
  state = _resnet_w16_state()
  np.testing.assert_array_equal(stem, state["conv1.weight"].transpose(2, 3, 1, 0))  # Frozen.
  head = np.asarray(after_frozen_epoch["params"]["out"]["kernel"]["value"])
  assert np.abs(head).max() > 0
  final_stem = np.asarray(expected["params"]["stem"]["conv"]["kernel"]["value"])
  assert not np.array_equal(final_stem, stem)  # It learns after the frozen epoch.
  evaluation = subprocess.run([sys.executable, "-m", "covid_flax.evaluate", f"--workdir={straight}"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True)  # fmt: skip
  assert evaluation.returncode == 0, evaluation.stderr[-2000:]

  resumed = tmp_path / "resumed"
  cmd = _fine_tune_cmd(resumed, synthetic_data_dir, weights)
  kill_when_saved(cmd, resumed / "checkpoints" / str(epoch), env)
  os.remove(weights)  # Resuming needs only the checkpoint.
  subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True)
  step, got = _final_params(resumed)
  assert step == final_step
  _assert_identical(expected, got)


def test_a_downloaded_folder_names_the_weights_file_to_give(tmp_path):
  from covid_flax import train

  (tmp_path / "model.safetensors").write_bytes(b"")  # A Hugging Face snapshot folder.
  config = tiny_config("", init_from=str(tmp_path))
  _, state = train.create_train_state(config, optim.create_optimizer(config, 10, 100))
  with pytest.raises(config_lib.ConfigError, match=r"weights files \['model.safetensors'\]"):
    train.init_from_pretrained(state, config)
