"""`python -m covid_flax.convert_weights`: a torchvision `.pth` becomes safetensors that load into
our model and compute torch's function. Needs the `torch` extra (pip install -e '.[torch]'); CI
does not install it, and the equivalence proof that runs everywhere is tests/test_torch_weights.py."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import REPO_ROOT, tiny_config

from covid_flax import convert_weights, models, preprocess, torch_weights

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
torchvision = pytest.importorskip("torchvision", reason="the torch extra is not installed")


def _old_densenet_names(state: dict) -> dict:
  """How torchvision's original densenet121-a639ec97.pth names its layers ('norm.1')."""
  return {
    k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
  }


def test_a_torchvision_densenet_pth_converts_and_computes_the_same(tmp_path):
  torch.manual_seed(0)
  reference = torchvision.models.densenet121(num_classes=2).eval()
  with torch.no_grad():  # Running statistics that are not the identity.
    for m in reference.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  src = tmp_path / "densenet121.pth"
  torch.save({"epoch": 3, "state_dict": _old_densenet_names(reference.state_dict())}, src)
  dst = tmp_path / "densenet121.safetensors"
  result = subprocess.run([sys.executable, "-m", "covid_flax.convert_weights", str(src), str(dst)],
                          cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"--config.init_from={dst}" in result.stdout

  config = tiny_config("", model="densenet121", input_norm="imagenet")
  model = models.from_config(config)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  model = nnx.merge(graphdef, *torch_weights.load(str(dst), config, params, model_state))
  grey = np.random.default_rng(0).integers(0, 256, (2, 65, 65), np.uint8)
  ours = model(preprocess.normalize(jnp.asarray(grey)[..., None]))
  x = torch.from_numpy(grey / 255.0).float()[:, None].repeat(1, 3, 1, 1)
  x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
    [0.229, 0.224, 0.225]
  ).view(1, 3, 1, 1)
  with torch.no_grad():
    theirs = reference(x).numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_an_existing_output_is_never_overwritten(tmp_path):
  src, dst = tmp_path / "w.pth", tmp_path / "w.safetensors"
  torch.save({"fc.weight": torch.zeros(2, 2)}, src)
  dst.write_bytes(b"keep me")
  with pytest.raises(convert_weights.ConversionError, match="w.safetensors exists"):
    convert_weights.convert(str(src), str(dst))
  assert dst.read_bytes() == b"keep me"


def test_a_pickled_model_is_refused_with_what_to_do(tmp_path):
  src = tmp_path / "model.pth"
  torch.save(torch.nn.Linear(2, 2), src)  # A whole module: weights_only refuses to unpickle it.
  with pytest.raises(convert_weights.ConversionError, match="model.state_dict"):
    convert_weights.convert(str(src), str(tmp_path / "out.safetensors"))
  assert not (tmp_path / "out.safetensors").exists()
  assert not (tmp_path / "out.safetensors.partial").exists()
