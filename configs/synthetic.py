"""A few epochs on the embedded synthetic CXR-like dataset: the quickstart and the tests' base."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "covid_synthetic/cxr"
  config.image_size = 64
  config.model = "seed_cnn"
  config.dropout_rate = 0.0
  config.aug_rotate = 5.0
  config.aug_zoom = 0.05
  config.aug_translate = 0.05
  config.aug_brightness = 0.05
  config.aug_contrast = 0.05
  config.num_epochs = 5
  config.learning_rate = 1e-3
  config.warmup_epochs = 0.5
  return config
