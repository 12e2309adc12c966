"""The study's CXR setup on our patient-wise split: as `ct_study.py` (its Keras CNN at 224x224,
20 epochs, Keras' Adam, no augmentation)."""

from configs import ct_study, cxr


def get_config():
  config = ct_study.get_config()
  config.dataset = cxr.get_config().dataset
  return config
