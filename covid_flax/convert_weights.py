"""Converts a PyTorch checkpoint (`.pth`, a pickle) into safetensors, which training reads:

  pip install -e '.[torch]'
  python -m covid_flax.convert_weights resnet50-11ad3fa6.pth resnet50.safetensors

Unpickles with `torch.load(weights_only=True)` (tensors and plain containers only, no code), takes
the state dict (also from inside a training checkpoint's 'state_dict'/'model' entry), fixes the
names of old torchvision DenseNet files and DataParallel's 'module.' prefix, widens every tensor to
float32 and writes OUT atomically; OUT must not exist yet. Training never unpickles.
"""

import os
import sys

import numpy as np
from absl import app

from covid_flax import config_lib, errors
from covid_flax.torch_weights import canonical_names

_WRAPPERS = ("state_dict", "model_state_dict", "model", "net")


class ConversionError(errors.UserError):
  pass


def _state_dict(obj, path: str) -> dict:
  for key in _WRAPPERS:  # A training checkpoint: {'state_dict': {...}, 'epoch': ..., ...}.
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
      break
  if not isinstance(obj, dict):
    raise ConversionError(
      f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
    )
  return obj


def convert(src: str, dst: str) -> int:
  """Writes the weights of the PyTorch file `src` to the safetensors file `dst`; returns their count."""
  try:
    import torch
    from safetensors.numpy import save_file
  except ImportError as e:
    raise ConversionError(f"converting needs torch ({e}): pip install -e '.[torch]'") from e
  if not os.path.isfile(src):
    raise ConversionError(f"{src} does not exist")
  if os.path.exists(dst):
    raise ConversionError(f"{dst} exists; remove it or choose another output name")
  try:
    obj = torch.load(src, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 (torch raises many types for a bad or unsafe pickle)
    raise ConversionError(
      f"{src} does not load with torch.load(weights_only=True) ({str(e).splitlines()[0][:300]}); "
      "if it pickles a whole model (torchxrayvision does), load it in its own library and save "
      "model.state_dict() with safetensors.torch.save_file"
    ) from e
  state = _state_dict(obj, src)
  tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
  skipped = sorted(set(state) - set(tensors))
  if not tensors:
    raise ConversionError(f"{src} holds no tensors (keys: {sorted(state)[:8]})")
  if skipped:
    print(f"skipped {len(skipped)} entries that are not tensors: {skipped[:8]}")
  arrays = {
    k: np.ascontiguousarray(v.detach().to(torch.float32).numpy())
    for k, v in canonical_names(tensors).items()
  }
  tmp = f"{dst}.partial"
  try:
    save_file(arrays, tmp, metadata={"converted_from": os.path.basename(src)})
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(arrays)


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError("usage: python -m covid_flax.convert_weights IN.pth OUT.safetensors")
  try:
    count = convert(argv[1], argv[2])
  except errors.UserError as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {count} tensors to {argv[2]}. Train from them with --config.init_from={argv[2]}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
