"""The study's CT setup: its Keras CNN at 224x224, 20 epochs, Adam, on our patient-wise split."""

from configs import ct, default


def get_config():
  config = default.get_config()
  config.dataset = ct.get_config().dataset
  config.model = "seed_cnn"
  config.image_size = 224
  config.num_epochs = 20
  config.augment = False
  return config
