"""Config validation: every field is checked at start, and errors name the field and what is allowed."""

import os
import sys
from typing import Any, Callable

import jax
import ml_collections
from absl import flags

from covid_flax import ct_crop, errors

OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
NAN_POLICIES = ("stop", "skip")
INPUT_NORMS = ("default", "imagenet", "xrv")
INPUT_MODES = ("auto", "cache", "stream")
CPU_CONVS = ("onednn", "xla")
AUG_FILLS = ("edge", "black")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# Fields that decide which images a model sees and how they are prepared (ensemble members must agree).
DATA_FIELDS = ("dataset", "image_size", "center_crop", "equalize", "equalize_over", "clahe",
               "lung_mask", "ct_crop", "ct_window_center", "ct_window_width")  # fmt: skip
# Fields that decide what a run validates on, and so picks its threshold by (ensemble members must
# agree: a member trained on another's validation data would leak into the threshold).
EVAL_DATA_FIELDS = ("eval_split", "train_split", "cv_folds", "cv_fold")
# Fields that make a checkpoint unusable by a run with other values: the train state's shapes or
# structure change (the optimizer's state, clipping on or off), or the data it was trained on and
# the meaning of its step and data-iterator position (batch size, training split).
INCOMPATIBLE_FIELDS = (*DATA_FIELDS, "train_split", "train_sources", "cv_folds", "cv_fold",
                       "model", "half_precision", "optimizer", "batch_size", "ssl_projection_dim",
                       "input_norm")  # fmt: skip


# Fields added after runs were already saved, with the values that reproduce those runs.
ADDED_FIELDS = {
  "mixup_alpha": 0.0,
  "cutmix_alpha": 0.0,
  "init_from": "",
  "ssl_temperature": 0.2,
  "ssl_projection_dim": 128,
  "tta_hflip": False,
  "center_crop": 1.0,
  "equalize": False,
  "clahe": 0.0,
  "lung_mask": False,
  "ct_crop": False,
  "aug_gamma": 0.0,
  "aug_sharpness": 0.0,
  "aug_noise": 0.0,
  "aug_window": 0.0,
  "aug_downscale": 1.0,
  "aug_jpeg": 0.0,
  "aug_fill": "edge",
  "sam_rho": 0.0,
  "cv_folds": 0,
  "cv_fold": 0,
  "train_sources": "",
  "input_norm": "default",
  "backbone_lr_scale": 1.0,
  "frozen_backbone_epochs": 0.0,
  "freeze_bn_stats": False,
  "ct_window_center": -600.0,
  "ct_window_width": 1500.0,
  "input_mode": "auto",
  "cpu_conv": "xla",
  "mixstyle_prob": 0.0,
  "equalize_over": "body",
}


class ConfigError(errors.UserError, ValueError):
  pass


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for every entry point (`app.run(main, flags_parser=parse_flags)`): a bad
  flag value or a config file that does not load (missing, a syntax error, no get_config, ...)
  ends in one line naming it, not in a double traceback."""
  try:
    args = flags.FLAGS(argv)
    config = flags.FLAGS.config if "config" in flags.FLAGS else None
    if config is not None:  # A file that did not load raises on first use (config_flags defers it).
      config.keys()
    return args
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(e).__name__
    sys.exit(f"error: {message}\n(--helpshort lists the flags; configs/default.py every field)")
  except Exception as e:  # What loading a config file raised (SyntaxError, OSError, ...).
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    config = next((a for a in argv if a.startswith("--config=")), "--config")
    sys.exit(f"error: {config}: {type(e).__name__}: {lines[-1] if lines else ''}")


def _in(*allowed) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in allowed), f"one of {list(allowed)}"


def _range(lo=None, hi=None, lo_open=False) -> tuple[Callable[[Any], bool], str]:
  def ok(v):
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or v <= hi

  low = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
  high = "" if hi is None else f"<= {hi}"
  return ok, " and ".join(s for s in (low, high) if s)


_ANY = ((lambda v: True), "")
_POSITIVE = _range(0, lo_open=True)
_NON_NEGATIVE = _range(0)
_FRACTION = _range(0, 1)

# field -> (type, (check, description of allowed values)). Models are checked against the registry.
_SCHEMA: dict[str, tuple[type | tuple[type, ...], tuple[Callable[[Any], bool], str]]] = {
  "dataset": (str, ((lambda v: bool(v)), "a TFDS dataset name")),
  "data_dir": (str, _ANY),
  "manual_dir": (str, _ANY),
  "train_split": (str, _ANY),
  "eval_split": (str, _ANY),
  "train_sources": (str, _ANY),
  "cv_folds": (int, ((lambda v: v == 0 or 2 <= v <= 100), "0 (off) or 2..100")),
  "cv_fold": (int, _NON_NEGATIVE),
  "image_size": (int, _range(32, 1024)),
  "center_crop": ((int, float), _range(0.2, 1)),
  "equalize": (bool, _ANY),
  "equalize_over": (str, _in(*ct_crop.EQUALIZE_OVER)),
  "clahe": ((int, float), _FRACTION),
  "lung_mask": (bool, _ANY),
  "ct_crop": (bool, _ANY),
  "ct_window_center": ((int, float), _range(-2000, 4000)),
  "ct_window_width": ((int, float), _range(1, 10000)),
  "augment": (bool, _ANY),
  "aug_rotate": ((int, float), _range(0, 180)),
  "aug_zoom": ((int, float), _range(0, 0.9)),
  "aug_translate": ((int, float), _range(0, 0.5)),
  "aug_hflip": (bool, _ANY),
  "aug_fill": (str, _in(*AUG_FILLS)),
  "aug_brightness": ((int, float), _FRACTION),
  "aug_contrast": ((int, float), _FRACTION),
  "aug_gamma": ((int, float), _range(0, 2)),
  "aug_sharpness": ((int, float), _FRACTION),
  "aug_noise": ((int, float), _range(0, 0.5)),
  "aug_window": ((int, float), _range(0, 0.45)),
  "aug_downscale": ((int, float), _range(1, 8)),
  "aug_jpeg": ((int, float), _range(0, 95)),
  "mixup_alpha": ((int, float), _range(0, 10)),
  "cutmix_alpha": ((int, float), _range(0, 10)),
  "mixstyle_prob": ((int, float), _FRACTION),
  "model": (str, _ANY),
  "dropout_rate": ((int, float), _range(0, 1)),
  "half_precision": (bool, _ANY),
  "cpu_conv": (str, _in(*CPU_CONVS)),
  "init_from": (str, _ANY),
  "input_norm": (str, _in(*INPUT_NORMS)),
  "backbone_lr_scale": ((int, float), _range(0, 10)),
  "frozen_backbone_epochs": ((int, float), _NON_NEGATIVE),
  "freeze_bn_stats": (bool, _ANY),
  "batch_size": (int, _POSITIVE),
  "input_mode": (str, _in(*INPUT_MODES)),
  "eval_batch_size": (int, _POSITIVE),
  "num_epochs": (int, _POSITIVE),
  "optimizer": (str, _in(*OPTIMIZERS)),
  "learning_rate": ((int, float), _POSITIVE),
  "warmup_epochs": ((int, float), _NON_NEGATIVE),
  "lr_schedule": (str, _in(*LR_SCHEDULES)),
  "momentum": ((int, float), _range(0, 1)),
  "weight_decay": ((int, float), _NON_NEGATIVE),
  "grad_clip_norm": ((int, float), _NON_NEGATIVE),
  "label_smoothing": ((int, float), _range(0, 1)),
  "ema_decay": ((int, float), _range(0, 0.99999)),
  "sam_rho": ((int, float), _NON_NEGATIVE),
  "seed": (int, _NON_NEGATIVE),
  "log_every_steps": (int, _POSITIVE),
  "checkpoint_every_steps": (int, _NON_NEGATIVE),
  "keep_checkpoints": (int, _POSITIVE),
  "progress_bar": (bool, _ANY),
  "nan_policy": (str, _in(*NAN_POLICIES)),
  "overwrite": (bool, _ANY),
  "ssl_temperature": ((int, float), _range(0, 10, lo_open=True)),
  "ssl_projection_dim": (int, _POSITIVE),
  "tta_hflip": (bool, _ANY),
  "target_sensitivity": ((int, float), _range(0, 1, lo_open=True)),
  "distributed": (bool, _ANY),
  "coordinator_address": (str, _ANY),
  "num_processes": (int, _NON_NEGATIVE),
  "process_id": (int, _range(-1)),
  "distributed_timeout_s": (int, _range(5)),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field the code can't honour."""
  from covid_flax import models  # Local import: models import flax, keep this module light.

  unknown = sorted(set(config.keys()) - set(_SCHEMA))
  if unknown:
    raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(_SCHEMA)}")
  for field, (types, (check, allowed)) in _SCHEMA.items():
    if field not in config:
      raise ConfigError(f"config.{field} is missing (configs must start from configs/default.py)")
    value = config[field]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
      raise ConfigError(f"config.{field}={value!r} must be a number, not a bool")
    if not isinstance(value, types):
      names = [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]
      raise ConfigError(
        f"config.{field}={value!r} has type {type(value).__name__}; expected {names}"
      )
    if not check(value):
      raise ConfigError(f"config.{field}={value!r} is not allowed; it must be {allowed}")
  if config.model not in models.MODELS:
    raise ConfigError(
      f"config.model={config.model!r} is unknown; choose one of {sorted(models.MODELS)}"
    )
  if (config.input_norm != "default" or config.freeze_bn_stats) and (
    config.model not in models.TRANSFER_MODELS
  ):
    raise ConfigError(
      f"config.input_norm={config.input_norm!r} and config.freeze_bn_stats="
      f"{config.freeze_bn_stats} are for {list(models.TRANSFER_MODELS)}, not "
      f"config.model={config.model!r}"
    )
  if config.mixstyle_prob > 0 and config.model not in models.STYLE_MODELS:
    raise ConfigError(
      f"config.mixstyle_prob={config.mixstyle_prob} is for {list(models.STYLE_MODELS)}, not "
      f"config.model={config.model!r}"
    )
  if config.cv_folds and config.cv_fold >= config.cv_folds:
    raise ConfigError(
      f"config.cv_fold={config.cv_fold} is not allowed with config.cv_folds={config.cv_folds}; "
      f"it must be 0..{config.cv_folds - 1}"
    )
  if config.equalize_over != "body" and not (config.ct_crop and config.equalize):
    raise ConfigError(
      f"config.equalize_over={config.equalize_over!r} needs config.ct_crop=True and "
      f"config.equalize=True (got {config.ct_crop}, {config.equalize}): only the CT crop finds "
      "lungs"
    )
  if config.ct_crop and config.center_crop < 1.0:
    raise ConfigError(
      f"config.ct_crop=True crops to the lungs itself; config.center_crop={config.center_crop} "
      "would be ignored: leave it at 1.0"
    )
  devices = jax.device_count()
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ConfigError(
        f"config.{field}={config[field]} is not divisible by the {devices} devices; "
        f"use a multiple of {devices}"
      )
  validate_distributed(config)


def check_init_from(path: str) -> None:
  """config.init_from exists and is not a pickle (training never unpickles)."""
  if not os.path.exists(path):
    raise ConfigError(
      f"config.init_from={path!r} does not exist: give a covid_flax.pretrain workdir or a "
      "safetensors file of torchvision/timm weights (docs/transfer.md)"
    )
  if path.endswith(PICKLE_SUFFIXES):
    raise ConfigError(
      f"config.init_from={path!r} is a PyTorch pickle, which training never unpickles; convert it "
      f"once: python -m covid_flax.convert_weights {path} OUT.safetensors (pip install -e "
      "'.[torch]')"
    )


def validate_distributed(config: ml_collections.ConfigDict) -> None:
  """The multi-process fields, checked before `jax.distributed` starts (no devices needed)."""
  if config.coordinator_address and not (
    config.num_processes > 0 and 0 <= config.process_id < config.num_processes
  ):
    raise ConfigError(
      f"config.coordinator_address={config.coordinator_address!r} needs config.num_processes > 0 "
      f"and 0 <= config.process_id < num_processes (got {config.num_processes}, "
      f"{config.process_id})"
    )


def incompatible_fields(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (saved value, new value)} for fields that make a saved run unusable by `config`."""
  diff = {
    f: (saved.get(f), config[f])
    for f in INCOMPATIBLE_FIELDS
    if f in saved and saved.get(f) != config[f]
  }
  for f in ("grad_clip_norm", "sam_rho"):  # Switching these on or off changes the optimizer state.
    if f in saved and (saved[f] > 0) != (config[f] > 0):
      diff[f] = (saved[f], config[f])
  saved_groups = {f: saved.get(f, ADDED_FIELDS[f]) for f in _GROUP_FIELDS}
  if has_param_groups(saved_groups) != has_param_groups(config):
    diff.update({f: (saved_groups[f], config[f]) for f in _GROUP_FIELDS})
  return diff


_GROUP_FIELDS = ("backbone_lr_scale", "frozen_backbone_epochs")


def has_param_groups(config) -> bool:
  """Whether the backbone and the head learn at different rates (another optimizer state)."""
  return config["backbone_lr_scale"] != 1 or config["frozen_backbone_epochs"] > 0


def with_added_fields(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved run's config with the fields added since it was saved (ADDED_FIELDS) filled in."""
  missing = {k: v for k, v in ADDED_FIELDS.items() if k not in saved}
  if not missing:
    return saved
  saved = saved.copy_and_resolve_references()
  saved.update(missing)
  return saved
