"""COVID-CT fine-tuned from ImageNet weights that you bring (none are downloaded here):

  python -m covid_flax.main --config=configs/ct_transfer.py --config.manual_dir=DATA \
      --config.init_from=densenet121.safetensors --workdir=runs/ct_transfer

DenseNet-121 at 224 px as the COVID-CT authors' baseline, torchvision/timm ImageNet weights (see
docs/transfer.md for the files and the conversion of a torchvision .pth). The fine-tuning values are
the usual ones (head first, then the backbone at a tenth of the learning rate, running statistics
kept), not tuned here: no ImageNet weights were available to this project's machines.
"""

from configs import ct


def get_config():
  config = ct.get_config()
  config.model = "densenet121"
  config.image_size = 224
  config.input_norm = "imagenet"  # The grey slice repeated to RGB, ImageNet mean/std.
  config.num_epochs = 40
  config.warmup_epochs = 1.0
  config.frozen_backbone_epochs = 2.0  # Train the new head on a fixed backbone first.
  config.backbone_lr_scale = 0.1
  config.freeze_bn_stats = True  # Batches of 32 CT slices estimate ImageNet statistics badly.
  config.weight_decay = 1e-4
  return config
