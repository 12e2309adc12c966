"""covid_flax: COVID-19 detection in chest X-ray and CT images with JAX/Flax."""

import setuptools

setuptools.setup(
  name="covid_flax",
  version="0.1.0",
  description="Data-parallel JAX/Flax training and evaluation for COVID-19 CXR and CT classifiers.",
  python_requires=">=3.10",
  packages=setuptools.find_packages(include=["covid_flax", "covid_flax.*"]),
  install_requires=[
    "jax>=0.8,<0.12",
    "flax>=0.12,<0.14",
    "optax>=0.2.5",  # optax.tree
    "orbax-checkpoint>=0.11.20,<0.13",
    "ml-collections>=0.1.1",
    "absl-py>=2.1",
    "tensorflow-datasets>=4.9.9,<4.11",
    "importlib_resources>=6.0",
    "grain>=0.2.12,<0.3",
    "array-record>=0.8.1",
    "numpy>=1.26",
    "pillow>=10.0",
    "scikit-learn>=1.7",  # brier_score_loss(labels=...)
    "scipy>=1.11",  # ndimage: the CT lung crop
    "scikit-image>=0.24",  # CLAHE (config.clahe)
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "safetensors>=0.4",  # PyTorch weights (config.init_from)
    "pydicom>=3.0",
    "python-gdcm>=3.0.22",  # pydicom's decoder for compressed DICOM (JPEG lossless, JPEG-LS, J2K)
    "openpyxl>=3.1",
    # oneDNN (CPU only, GNU OpenMP) for covid_flax/cpu_conv; without it the CPU runs XLA's convs.
    'onednn-cpu-gomp==2023.2.0; platform_system == "Linux" and platform_machine == "x86_64"',
  ],
  package_data={"covid_flax.cpu_conv": ["*.cc"]},
  extras_require={
    "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "ruff>=0.6"],
    "cuda": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    "bench": ["tensorflow-cpu>=2.16"],
    "torch": ["torch>=2.1", "torchvision>=0.16"],  # convert_weights, scripts/make_torch_fixture.py
  },
)
