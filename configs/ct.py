"""COVID-CT (UCSD-AI4H) CT slices with the official split: the study's setup.

Needs the real data: --config.manual_dir=DIR, with DIR/COVID-CT/ (see
covid_flax/datasets/covid_ct.py); downloaded from GitHub when absent and online. Use
--config.dataset=covid_ct/keep_duplicates for the official test split unchanged.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "covid_ct"
  config.image_size = 224
  config.model = "seed_cnn"
  config.batch_size = 32
  config.num_epochs = 20
  return config
