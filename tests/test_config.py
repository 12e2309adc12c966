"""Configs the code can't honour fail at start with a message naming the field."""

import importlib
import pathlib
import subprocess
import sys

import pytest

from configs import synthetic
from covid_flax import config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "__init__"])
def test_shipped_configs_are_valid(name):
  config_lib.validate(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("batch_size", 30, "config.batch_size=30 is not divisible by the 8 devices"),
    ("eval_batch_size", 12, "config.eval_batch_size=12 is not divisible"),
    ("model", "vgg", "config.model='vgg' is unknown; choose one of"),
    ("optimizer", "lamb", "config.optimizer='lamb' is not allowed; it must be one of"),
    ("image_size", 16, "config.image_size=16 is not allowed; it must be >= 32"),
    ("learning_rate", -1.0, "config.learning_rate=-1.0 is not allowed; it must be > 0"),
    ("nan_policy", "ignore", "config.nan_policy='ignore'"),
    ("input_mode", "disk", "config.input_mode='disk' is not allowed; it must be one of"),
    (
      "cpu_conv",
      "mkl",
      "config.cpu_conv='mkl' is not allowed; it must be one of ['onednn', 'xla']",
    ),
    ("augment", 1, "config.augment=1 has type int"),
    ("image_size", 64.0, "config.image_size=64.0 has type float"),
    ("center_crop", 0.1, "config.center_crop=0.1 is not allowed; it must be >= 0.2 and <= 1"),
    ("equalize", "yes", "config.equalize='yes' has type str"),
    (
      "equalize_over",
      "lung",
      "config.equalize_over='lung' is not allowed; it must be one of ['body', 'lungs']",
    ),
    ("equalize_over", "lungs", "config.equalize_over='lungs' needs config.ct_crop=True"),
    ("sam_rho", -0.05, "config.sam_rho=-0.05 is not allowed; it must be >= 0"),
    ("mixstyle_prob", 1.5, "config.mixstyle_prob=1.5 is not allowed; it must be >= 0 and <= 1"),
    ("aug_window", 0.5, "config.aug_window=0.5 is not allowed; it must be >= 0 and <= 0.45"),
    ("aug_downscale", 0.5, "config.aug_downscale=0.5 is not allowed; it must be >= 1 and <= 8"),
    ("aug_jpeg", 100.0, "config.aug_jpeg=100.0 is not allowed; it must be >= 0 and <= 95"),
    (
      "aug_fill",
      "mirror",
      "config.aug_fill='mirror' is not allowed; it must be one of ['edge', 'black']",
    ),
  ],
)
def test_bad_field_is_named(field, value, message):
  config = synthetic.get_config()
  with config.ignore_type():
    config[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    config_lib.validate(config)


def test_ct_crop_refuses_the_center_crop():
  config = synthetic.get_config()
  config.ct_crop = True
  config.lung_mask = True  # With ct_crop: the lungs it finds.
  config_lib.validate(config)
  config.center_crop = 0.8
  with pytest.raises(config_lib.ConfigError, match="config.ct_crop=True crops to the lungs itself"):
    config_lib.validate(config)


def test_unknown_field_is_named():
  config = synthetic.get_config()
  config.learning_rat = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"unknown config field\(s\) \['learning_rat'\]"):
    config_lib.validate(config)


def test_coordinator_needs_process_count():
  config = synthetic.get_config()
  config.coordinator_address = "127.0.0.1:1234"
  with pytest.raises(config_lib.ConfigError, match="config.num_processes > 0"):
    config_lib.validate(config)


def test_runs_saved_before_a_field_existed_get_its_neutral_value():
  config = synthetic.get_config()
  for field in config_lib.ADDED_FIELDS:
    del config[field]
  filled = config_lib.with_added_fields(config)
  config_lib.validate(filled)
  assert filled.tta_hflip is False and filled.mixup_alpha == 0.0 and filled.init_from == ""


def test_a_cropped_run_cannot_resume_uncropped():
  saved = synthetic.get_config().to_dict()
  config = synthetic.get_config()
  config.center_crop = 0.7
  assert config_lib.incompatible_fields(saved, config) == {"center_crop": (1.0, 0.7)}


@pytest.mark.parametrize(
  "field,saved,now",
  [
    ("optimizer", "adamw", "sgd"),
    ("batch_size", 32, 64),
    ("grad_clip_norm", 0.0, 1.0),
    ("sam_rho", 0.0, 0.05),
    ("equalize", False, True),
    ("clahe", 0.0, 0.01),
    ("equalize_over", "body", "lungs"),
    ("lung_mask", False, True),
    ("train_split", "train", "train+val"),
  ],
)
def test_fields_that_change_the_train_state_block_resume(field, saved, now):
  """Another optimizer or clipping on/off changes the optimizer state's structure (Orbax would
  call every checkpoint unusable); another batch size changes what a step and the data position
  mean."""
  config = synthetic.get_config()
  config[field] = saved
  saved_config = config.to_dict()
  config[field] = now
  assert config_lib.incompatible_fields(saved_config, config) == {field: (saved, now)}


@pytest.mark.parametrize("field", ["grad_clip_norm", "sam_rho"])
def test_another_clipping_norm_or_sam_radius_can_resume(field):
  config = synthetic.get_config()
  config[field] = 1.0
  saved_config = config.to_dict()
  config[field] = 3.0
  assert config_lib.incompatible_fields(saved_config, config) == {}


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"eval_split": "validation"}, r"split 'validation' \(config.train_split"),
    ({"train_split": "train+"}, r"split 'train\+' \(config.train_split.*has \['test', 'train'"),
    ({"dataset": "covid_synthetic/nope"}, r"config.dataset='covid_synthetic/nope'"),
  ],
)
def test_bad_split_or_builder_config_is_named(synthetic_data_dir, tmp_path, overrides, message):
  from helpers import tiny_config

  from covid_flax import train

  config = tiny_config(synthetic_data_dir, **overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "content, expected",
  [
    (None, "No such file or directory"),
    ("def get_config(:\n", "SyntaxError"),
    ("x = 1\n", "no attribute 'get_config'"),
    ("def get_config():\n  raise ValueError('boom')\n", "ValueError: boom"),
  ],
  ids=["missing", "syntax", "no_get_config", "raises"],
)
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, content, expected):
  path = tmp_path / "cfg.py"
  if content is not None:
    path.write_text(content)
  result = subprocess.run(
    [sys.executable, "-m", "covid_flax.main", f"--config={path}", f"--workdir={tmp_path}/w"],
    capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
  )  # fmt: skip
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr
  errors_ = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors_) == 1 and str(path) in errors_[0] and expected in errors_[0], result.stderr
