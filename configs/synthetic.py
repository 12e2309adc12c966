"""A few epochs on the embedded synthetic CXR-like dataset: the quickstart and the tests' base."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "covid_synthetic/cxr"
  config.image_size = 64
  config.model = "seed_cnn"
  config.batch_size = 32
  config.num_epochs = 4
  config.learning_rate = 2e-3
  config.warmup_epochs = 0.5
  return config
