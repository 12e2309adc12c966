"""COVID-19 (ieee8023) vs NORMAL (Kermany) chest X-rays, patient-wise split: our recipe.

Needs the real data: --config.manual_dir=DIR, with DIR/covid-chestxray-dataset/ and
DIR/chest_xray/train/NORMAL/ (see covid_flax/datasets/covid_cxr.py). Use
--config.dataset=covid_cxr/keep_duplicates to keep test images that duplicate a train/val image.
`configs/cxr_study.py` is the study's setup (its Keras CNN at 224x224) for comparison.
Beware the shortcut (README): the classes differ by age, hospital and file format.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "covid_cxr"
  config.model = "resnet18"
  config.image_size = 128
  config.num_epochs = 80
  config.warmup_epochs = 5.0
  config.learning_rate = 1e-3
  config.weight_decay = 0.05
  config.label_smoothing = 0.1
  config.dropout_rate = 0.2
  config.ema_decay = 0.99
  config.aug_zoom = 0.15
  config.aug_contrast = 0.2
  return config
