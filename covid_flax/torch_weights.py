"""PyTorch weights (torchvision, timm, torchxrayvision state dicts in safetensors) for our models.

Each model that has a torchvision counterpart names its modules there (`model.torch_name(path)`);
the variable names map as PyTorch's (`weight`, `bias`, `running_mean`, `running_var`), convolution
kernels go from OIHW to HWIO and linear weights from (out, in) to (in, out). A checkpoint must hold
exactly the model's variables: anything missing, extra or of another shape is refused with the list.
The classifier head is the exception: it is loaded when its shape is ours (a checkpoint of this
binary task) and otherwise replaced by a fresh one (an ImageNet head of 1000 classes).

Only safetensors are read here: a `.pth` is a pickle, unpickled only by the optional converter
(`python -m covid_flax.convert_weights`, the `torch` extra).
"""

import re

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from covid_flax import config_lib, models

_VARIABLE_NAMES = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}
# Buffers that are not weights: BatchNorm's step counter, torchxrayvision's operating thresholds.
_IGNORED = re.compile(r"(^|\.)(num_batches_tracked|op_threshs)$")
# torchvision's old DenseNet files name 'denselayer1.norm.1.weight' for 'denselayer1.norm1.weight'.
_OLD_DENSENET = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")  # fmt: skip
_LIST_LIMIT = 8


def canonical_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`state_dict` with torchvision's current names: DataParallel's 'module.' prefix and the old
  DenseNet names fixed, buffers that are not weights dropped."""
  out = {}
  for name, value in state_dict.items():
    name = name.removeprefix("module.")
    name = _OLD_DENSENET.sub(lambda m: m.group(1) + m.group(2), name)
    if not _IGNORED.search(name):
      out[name] = value
  return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file as float32 numpy arrays (bfloat16/float16 widened)."""
  where = f"config.init_from={path!r}"
  config_lib.check_init_from(path)
  from safetensors import SafetensorError
  from safetensors.flax import load_file  # Reads bfloat16 too (numpy has no bfloat16).

  try:
    tensors = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise config_lib.ConfigError(f"{where} is not a readable safetensors file ({e})") from e
  return {k: np.asarray(v.astype(jnp.float32)) for k, v in tensors.items()}


def torch_layout(model: nnx.Module) -> dict[str, tuple[tuple, tuple[int, ...]]]:
  """{PyTorch name: (our flat state path, shape in PyTorch's layout)} for every variable of
  `model` (trained parameters and BatchNorm statistics)."""
  layout = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    shape = tuple(variable.shape)
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:  # (in, out) -> (out, in)
      shape = shape[::-1]
    layout[f"{model.torch_name(path[:-1])}.{_VARIABLE_NAMES[path[-1]]}"] = (path, shape)
  return layout


def to_ours(value: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in our layout (OIHW -> HWIO, (out, in) -> (in, out))."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if value.ndim == 2 else value


def _listing(kind: str, names: list[str]) -> str:
  shown = ", ".join(names[:_LIST_LIMIT]) + (" ..." if len(names) > _LIST_LIMIT else "")
  return f"{len(names)} {kind} ({shown})"


def load(
  path: str, config: ml_collections.ConfigDict, params: nnx.State, model_state: nnx.State
) -> tuple[nnx.State, nnx.State]:
  """`params` and `model_state` of a fresh `config.model` with every variable taken from the
  PyTorch state dict in the safetensors file `path` (the head only where its shape is ours)."""
  where = f"config.init_from={path!r}"
  config_lib.check_init_from(path)
  model = nnx.eval_shape(lambda: models.from_config(config))
  if not hasattr(model, "torch_name"):
    raise config_lib.ConfigError(
      f"{where}: config.model={config.model!r} has no torchvision counterpart; choose one of "
      f"{list(models.TRANSFER_MODELS)}"
    )
  state_dict = canonical_names(read_safetensors(path))
  layout = torch_layout(model)
  head = {name for name, (p, _) in layout.items() if p[0] in model.HEAD_MODULES}
  head_prefixes = {name.split(".")[0] for name in head}  # 'fc', 'classifier'
  ckpt_head = {name for name in state_dict if name.split(".")[0] in head_prefixes}
  missing = sorted(set(layout) - set(state_dict) - head)
  extra = sorted(set(state_dict) - set(layout) - ckpt_head)
  misshaped = sorted(
    f"{n} {tuple(state_dict[n].shape)} (ours {layout[n][1]})"
    for n in set(layout) & set(state_dict) - head
    if tuple(state_dict[n].shape) != layout[n][1]
  )
  if missing or extra or misshaped:
    problems = [_listing(k, v) for k, v in
                (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)) if v]  # fmt: skip
    hint = ""
    for n, (_, ours) in layout.items():  # The stem: the one convolution of 1 or 3 input channels.
      theirs = tuple(state_dict[n].shape) if n in state_dict else ()
      if len(ours) == 4 and ours[1] in (1, 3) and len(theirs) == 4 and theirs[1] != ours[1]:
        norm = "imagenet" if theirs[1] == 3 else "xrv"
        hint = f"; its first convolution takes {theirs[1]} channels: --config.input_norm={norm}"
    raise config_lib.ConfigError(
      f"{where} does not match config.model={config.model!r}: " + "; ".join(problems) + hint
    )
  load_head = all(n in state_dict and tuple(state_dict[n].shape) == layout[n][1] for n in head)
  if not load_head:
    shapes = {n: tuple(v.shape) for n, v in state_dict.items() if n in ckpt_head}
    logging.info("%s: classifier head %s not loaded; a new %d-class head is trained", where,
                 shapes or "absent", models.NUM_CLASSES)  # fmt: skip
  by_path = {
    p: to_ours(state_dict[n]) for n, (p, _) in layout.items() if load_head or n not in head
  }

  def transfer(state: nnx.State) -> nnx.State:
    flat = []
    for p, variable in nnx.to_flat_state(state):
      if p in by_path:
        variable = variable.replace(jnp.asarray(by_path[p], variable.dtype))
      flat.append((p, variable))
    return nnx.from_flat_state(flat)

  logging.info("%s: %d tensors loaded", where, len(by_path))
  return transfer(params), transfer(model_state)
