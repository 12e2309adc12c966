"""SimCLR pretraining of configs/ct.py's encoder on the COVID-CT training images (labels unused):

  python -m covid_flax.pretrain --config=configs/ct_ssl.py --config.manual_dir=DIR \
      --workdir=runs/ct_ssl
  python -m covid_flax.main --config=configs/ct.py --config.manual_dir=DIR \
      --config.init_from=runs/ct_ssl --config.num_epochs=60 --workdir=runs/ct_from_ssl

The views are augmented much more strongly than for supervised training (crops by zoom and shift,
rotations, flips, strong intensity jitter): what stays the same between two views of a slice is
what the encoder learns. Pretrained at 96x96 (ResNet convolutions work at any size) to fit more
epochs into the CPU budget; the classifier is fine-tuned at configs/ct.py's 128x128 for 60 epochs
(timings and results: docs/results.md).
"""

from configs import ct


def get_config():
  config = ct.get_config()
  config.image_size = 96
  config.batch_size = 64
  config.num_epochs = 50
  config.warmup_epochs = 5.0
  config.learning_rate = 1e-3
  config.weight_decay = 1e-4
  config.label_smoothing = 0.0
  config.ema_decay = 0.0
  config.aug_rotate = 20.0
  config.aug_zoom = 0.4
  config.aug_translate = 0.15
  config.aug_hflip = True
  config.aug_brightness = 0.3
  config.aug_contrast = 0.4
  config.ssl_temperature = 0.2
  config.log_every_steps = 6
  return config
