"""The study's CXR setup: its Keras CNN at 224x224, 20 epochs, Adam, on our patient-wise split."""

from configs import ct_study, cxr


def get_config():
  config = ct_study.get_config()
  config.dataset = cxr.get_config().dataset
  return config
