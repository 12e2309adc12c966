"""COVID-19 (ieee8023) vs NORMAL (Kermany) chest X-rays: the study's setup.

Needs the real data: --config.manual_dir=DIR, with DIR/covid-chestxray-dataset/ and
DIR/chest_xray/train/NORMAL/ (see covid_flax/datasets/covid_cxr.py). Use
--config.dataset=covid_cxr/keep_duplicates to keep test images that duplicate a train/val image.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "covid_cxr"
  config.image_size = 224
  config.model = "seed_cnn"
  config.batch_size = 32
  config.num_epochs = 20
  return config
