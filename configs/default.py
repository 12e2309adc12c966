"""Every config field, with its default. Other configs import this and override a few fields."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data. `dataset` is a TFDS name with its builder config, e.g. 'covid_ct' or 'covid_synthetic/cxr'.
  config.dataset = "covid_synthetic/cxr"
  config.data_dir = ""  # TFDS data_dir; '' means TFDS's default (~/tensorflow_datasets).
  config.manual_dir = ""  # Where the manually downloaded real data lives (real builders only).
  config.train_split = "train"
  config.eval_split = "val"
  # Patient-wise K-fold cross-validation over train_split (`covid_flax.cross_validate` runs every
  # fold): with cv_folds = K > 1 the run trains on train_split without fold cv_fold and validates
  # on that fold instead of on eval_split. 0 is off.
  config.cv_folds = 0
  config.cv_fold = 0
  # Train only on the examples of these sources (comma-separated values of the dataset's `source`
  # feature, e.g. 'paper,crawled' for COVID-CT: both classes cut from papers); '' trains on all.
  # Validation and test stay whole.
  config.train_sources = ""
  config.image_size = 128
  # Keep the central fraction of each side before resizing (1.0: the whole image). Cuts image
  # borders, corner markers and burned-in text, which can identify the source instead of the disease.
  config.center_crop = 1.0
  # Equalise each image's grey-level histogram (after the crop): figures from papers, scanners and
  # screenshots differ in windowing and contrast, which a model can learn instead of the disease.
  config.equalize = False
  # With ct_crop: equalise by the grey-level ranks of the whole body ("body") or of the lung fields
  # only ("lungs": the lungs fill the grey range in every source, brighter tissue saturates).
  config.equalize_over = "body"
  # > 0: then contrast-limited adaptive histogram equalisation (CLAHE, scikit-image's; this is its
  # clip limit, in (0, 1], higher is stronger), with ct_crop over the body only: raises the local
  # contrast of fine texture that a global equalisation spends on large-scale gradients.
  config.clahe = 0.0
  # Keep only the typical lung fields of a frontal chest X-ray (`image_prep.lung_field_mask`:
  # two fixed ellipses; the rest is set to black), after the crop: removes corner text, markers and
  # borders. A documented prior, not a segmentation: for CXR ablations. With ct_crop: black outside
  # the lungs that `ct_crop` finds (closed, holes filled), equalised over them.
  config.lung_mask = False
  # Crop each CT slice to its lungs (`covid_flax.ct_crop`: thresholds and connected components),
  # black outside the body, so page margins, captions, insets, the table and the air around the
  # body never reach the model; `equalize` then equalises over the body's pixels only. Replaces
  # center_crop. For CT, not for CXR.
  config.ct_crop = False
  # CT DICOMs (at evaluation and prediction) are mapped to 8 bits with this window in Hounsfield
  # units, a lung window; radiograph DICOMs use their own VOI LUT or window (datasets/image_io.py).
  config.ct_window_center = -600.0
  config.ct_window_width = 1500.0
  # How images reach the devices. 'cache': every split decoded once and the training set placed
  # whole on every device (fastest; memory O(dataset)). 'stream': each process decodes only its
  # own rows of each batch, in background threads, every epoch (memory O(batch)). 'auto': cache
  # when it fits half the smallest device's and of the host's free memory, else stream (logged).
  # Both give the same batches, so a run may switch between them when resuming.
  config.input_mode = "auto"

  # On-device augmentation (train only): a random affine transform (rotation in degrees, zoom as
  # a fraction, translation as a fraction of the image size), horizontal flips (off: the heart is
  # on the left), brightness/contrast jitter. `aug_fill`: what a zoom-out or shift shows beyond the
  # image's border, its edge pixels repeated ("edge") or black ("black").
  config.augment = True
  config.aug_rotate = 10.0
  config.aug_zoom = 0.1
  config.aug_translate = 0.1
  config.aug_fill = "edge"
  config.aug_hflip = False
  config.aug_brightness = 0.1
  config.aug_contrast = 0.1
  # Appearance randomisation (train only), against cues of the image source: a gamma of
  # exp(U(-aug_gamma, aug_gamma)), blur (negative) or sharpen (positive) by U(-s, s) of a 3x3
  # unsharp mask with s = aug_sharpness, Gaussian noise of standard deviation U(0, aug_noise), a
  # resolution drop by a factor U(1, aug_downscale), a display window [U(0, w), 1 - U(0, w)]
  # stretched to [0, 1] and clipped, w = aug_window, and a JPEG re-compression at a quality of
  # U(aug_jpeg, 95) (0: off).
  config.aug_gamma = 0.0
  config.aug_sharpness = 0.0
  config.aug_noise = 0.0
  config.aug_downscale = 1.0
  config.aug_window = 0.0
  config.aug_jpeg = 0.0
  # Mixup / CutMix of each example with another of the batch: Beta(alpha, alpha) weights; 0 is
  # off. With both on, each example picks one of the two.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  # MixStyle (ResNets, tiny_cnn): with this probability a step mixes each example's early feature
  # statistics (per-channel mean and std, its "style") with a random partner's; 0 is off.
  config.mixstyle_prob = 0.0

  # Model.
  config.model = "seed_cnn"  # One of covid_flax.models.MODELS.
  config.dropout_rate = 0.25
  config.half_precision = False  # bfloat16 compute, float32 params.
  # Convolutions on the CPU: 'onednn' (covid_flax/cpu_conv: oneDNN kernels behind jax.ffi, built on
  # first use; XLA's where they cannot load, with a log line) or 'xla'. Other backends: always XLA.
  config.cpu_conv = "onednn"
  # Start from pretrained weights: a `covid_flax.pretrain` workdir (its encoder), or a safetensors
  # file of torchvision/timm/torchxrayvision weights for resnet18/resnet50/densenet121/densenet169
  # (every variable; the classifier head replaced). docs/transfer.md.
  config.init_from = ""
  # The input convention of those weights: 'default' (ours, 1 channel), 'imagenet' (3-channel stem
  # fed the grey image repeated, ImageNet mean/std) or 'xrv' (torchxrayvision: 1 channel, +-1024).
  config.input_norm = "default"
  # Fine-tuning: the backbone (all but the head) learns at backbone_lr_scale x the learning rate,
  # and not at all for its first frozen_backbone_epochs; freeze_bn_stats normalises with the
  # pretrained running statistics in training too (small batches estimate them badly).
  config.backbone_lr_scale = 1.0
  config.frozen_backbone_epochs = 0.0
  config.freeze_bn_stats = False

  # Optimisation. `batch_size` is global (all devices of all processes).
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 20
  config.optimizer = "adamw"  # 'adamw' or 'sgd' (with momentum).
  config.learning_rate = 1e-3
  config.warmup_epochs = 1.0
  config.lr_schedule = "cosine"  # 'cosine' or 'constant' (both after warmup).
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0  # 0 disables clipping.
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # > 0: evaluate and checkpoint-select with an EMA of the weights.
  config.sam_rho = 0.0  # > 0: sharpness-aware minimisation with this radius (2x compute).
  config.seed = 0

  # Logging and checkpoints.
  config.log_every_steps = 10
  config.checkpoint_every_steps = 0  # 0: at the end of every epoch only.
  config.keep_checkpoints = 3  # The last k, plus the best by validation AUC.
  config.progress_bar = True
  config.nan_policy = "stop"  # On a NaN/Inf loss: 'stop' the run, or 'skip' the step.
  config.overwrite = False  # Allow a workdir whose run has another model/image size/dataset.

  # Self-supervised pretraining (`covid_flax.pretrain`, SimCLR): NT-Xent temperature and the
  # projection head's output size. The pretraining views use the aug_* fields above.
  config.ssl_temperature = 0.2
  config.ssl_projection_dim = 128

  # Evaluation: average each prediction with that of the mirrored image (test-time augmentation).
  config.tta_hflip = False
  # Evaluation: the operating point is the highest threshold with val sensitivity >= this.
  config.target_sensitivity = 0.95

  # Multi-host (jax.distributed). Empty/zero values mean auto-detect or single process.
  config.distributed = False
  config.coordinator_address = ""
  config.num_processes = 0
  config.process_id = -1
  config.distributed_timeout_s = 120  # Start-up wait, and how soon a lost process is noticed.

  return config
