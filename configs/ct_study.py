"""The study's CT setup on our patient-wise split: its Keras CNN at 224x224, 20 epochs, Keras' Adam
(learning rate 1e-3, constant, no weight decay, no clipping), no augmentation."""

from configs import ct, default


def get_config():
  config = default.get_config()
  config.dataset = ct.get_config().dataset
  config.model = "seed_cnn"
  config.image_size = 224
  config.num_epochs = 20
  config.augment = False
  config.weight_decay = 0.0  # AdamW without decay is Adam.
  config.lr_schedule = "constant"
  config.warmup_epochs = 0.0
  config.grad_clip_norm = 0.0
  return config
