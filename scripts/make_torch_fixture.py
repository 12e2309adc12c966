"""Writes tests/data/torchvision_equivalence.npz: torchvision's own forward pass on the fixture's
random weights (tests/torch_fixture.py), for `tests/test_torch_weights.py`, which needs no torch.

  pip install -e '.[torch]' && python scripts/make_torch_fixture.py

Loading our name mapping's state dict into torchvision with `strict=True` is itself the check that
the names and shapes are torchvision's. Re-run it when a model or the fixture changes.
"""

import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_fixture  # noqa: E402

from covid_flax.models.inputs import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def torch_input(grey: np.ndarray, input_norm: str) -> torch.Tensor:
  x = torch.from_numpy(grey.astype(np.float32) / 255.0)[:, None]  # (N, 1, H, W)
  if input_norm == "imagenet":
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.repeat(1, 3, 1, 1) - mean) / std
  return (2.0 * x - 1.0) * 1024.0  # 'xrv'


def main() -> None:
  torch.manual_seed(0)
  out = {
    "torch_version": np.array(torch.__version__),
    "torchvision_version": np.array(torchvision.__version__),
  }
  for size in torch_fixture.SIZES:
    out[f"images_{size}"] = torch_fixture.images(size)
  for case, (model_name, input_norm) in torch_fixture.CASES.items():
    model = getattr(torchvision.models, model_name)(num_classes=torch_fixture.NUM_CLASSES)
    if input_norm == "xrv":
      model.features.conv0 = torch.nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    state = torch_fixture.random_state_dict(torch_fixture.torch_shapes(model_name, input_norm))
    state = {k: torch.from_numpy(v) for k, v in state.items()}
    state.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    model.load_state_dict(state, strict=True)
    model.eval()
    head = model.fc if hasattr(model, "fc") else model.classifier
    pooled = {}
    head.register_forward_hook(lambda mod, args, result: pooled.update(x=args[0]))
    for size in torch_fixture.SIZES:
      with torch.no_grad():
        logits = model(torch_input(out[f"images_{size}"], input_norm))
      out[f"{case}_{size}_logits"] = logits.numpy()
      out[f"{case}_{size}_features"] = pooled["x"].numpy()
      print(
        case,
        size,
        "logits",
        logits.numpy().round(4).tolist(),
        "|features| max",
        float(pooled["x"].abs().max()),
      )
  os.makedirs(torch_fixture.FIXTURE.parent, exist_ok=True)
  np.savez_compressed(torch_fixture.FIXTURE, **out)
  print("wrote", torch_fixture.FIXTURE, os.path.getsize(torch_fixture.FIXTURE), "bytes")


if __name__ == "__main__":
  main()
