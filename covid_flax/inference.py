"""Loading a trained run for inference: checkpoint choice, restore, batched prediction, the
operating point, and folders of external images. Shared by `evaluate` and `predict`."""

import csv
import dataclasses
import hashlib
import json
import os
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from covid_flax import (
  checkpointing,
  config_lib,
  image_prep,
  input_pipeline,
  metrics,
  models,
  optim,
  parallel,
  report,
  train,
)
from covid_flax.datasets import common, image_io

# Fields of the run's saved config that a `--config` given to evaluation may change: where the data
# lives, and evaluation-only options.
EVAL_FIELDS = ("data_dir", "manual_dir", "eval_batch_size", "progress_bar", "tta_hflip")
_DATA_PATHS = ("data_dir", "manual_dir")


@dataclasses.dataclass
class Run:
  """A restored checkpoint, ready to predict."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  graphdef: nnx.GraphDef
  state: train.TrainState
  mesh: jax.sharding.Mesh
  p_eval: Callable

  def predict(self, data: input_pipeline.SplitData) -> np.ndarray:
    probs, _ = train.predict_split(self.p_eval, self.state, data, self.mesh, self.batch_size)
    return probs

  @property
  def batch_size(self) -> int:
    n = jax.device_count()
    return max(n, -(-self.config.eval_batch_size // n) * n)

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.device_get(train.eval_params(self.state, self.config)),
                     jax.device_get(self.state.model_state))  # fmt: skip

  @property
  def tag(self) -> str:
    """Names this checkpoint's outputs in workdir/eval (and whether they use test-time flips)."""
    return f"{self.step}-tta" if self.config.tta_hflip else str(self.step)

  def describe(self) -> dict:
    return {"workdir": self.workdir, "step": self.step, "tta_hflip": self.config.tta_hflip}


@dataclasses.dataclass
class Ensemble:
  """Several runs on the same data (e.g. seeds) as one model: the mean of their probabilities.
  Its outputs go to the first run's workdir/eval, tagged with the members; Grad-CAM shows the
  first member."""

  runs: list[Run]

  def __post_init__(self):
    first = self.runs[0].config
    for run in self.runs[1:]:
      for field in (*config_lib.DATA_FIELDS, *config_lib.EVAL_DATA_FIELDS, "target_sensitivity"):
        if run.config[field] != first[field]:
          raise config_lib.ConfigError(
            f"ensemble members differ in config.{field}: {self.runs[0].workdir} has "
            f"{first[field]!r}, {run.workdir} has {run.config[field]!r}"
          )

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.runs[0].config

  @property
  def workdir(self) -> str:
    return self.runs[0].workdir

  @property
  def step(self) -> int:
    return self.runs[0].step

  @property
  def tag(self) -> str:
    members = ",".join(f"{os.path.abspath(r.workdir)}@{r.tag}" for r in self.runs)
    return f"ensemble{len(self.runs)}-{hashlib.sha256(members.encode()).hexdigest()[:8]}"

  def describe(self) -> dict:
    return {"ensemble": [r.describe() for r in self.runs]}

  def predict(self, data: input_pipeline.SplitData) -> np.ndarray:
    return np.mean([run.predict(data) for run in self.runs], axis=0)

  def model(self) -> nnx.Module:
    return self.runs[0].model()


def _select_step(manager, workdir: str, checkpoint: str) -> int:
  steps = manager.all_steps()
  if not steps:
    raise checkpointing.CheckpointError(
      f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}: train first with "
      f"python -m covid_flax.main --workdir={workdir} --config=..."
    )
  if checkpoint == "latest":
    return manager.latest_step()
  if checkpoint == "best":
    return manager.best_step() if manager.best_step() is not None else manager.latest_step()
  if not checkpoint.isdigit() or int(checkpoint) not in steps:
    raise checkpointing.CheckpointError(
      f"--checkpoint={checkpoint!r}: use 'best', 'latest' or one of the steps {sorted(steps)}"
    )
  return int(checkpoint)


def load_run(
  workdir: str,
  checkpoint: str = "best",
  config: ml_collections.ConfigDict | None = None,
  *,
  strict: bool = True,
) -> Run:
  """Restores `checkpoint` ('best', 'latest' or a step) of `workdir` with its saved config. A
  `config` given here may only change EVAL_FIELDS (data paths where non-empty, eval batch size,
  test-time flips); with `strict=False` its other fields are ignored instead of checked (ensemble
  members)."""
  if not os.path.isdir(workdir):
    raise checkpointing.CheckpointError(f"workdir {workdir} does not exist")
  manager = checkpointing.create_manager(workdir, read_only=True)
  step = _select_step(manager, workdir, checkpoint)
  # 'latest' falls back to the newest checkpoint that restores, as resuming a training run does.
  steps = [step]
  if checkpoint == "latest":
    steps = sorted(manager.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      return _load_step(manager, workdir, step, config, strict)
    except checkpointing.CheckpointError as e:
      if i + 1 == len(steps):
        raise
      logging.warning("%s; evaluating the previous checkpoint, step %d, instead", e, steps[i + 1])
  raise AssertionError("unreachable")


def _load_step(
  manager, workdir: str, step: int, config: ml_collections.ConfigDict | None, strict: bool
) -> Run:
  saved = config_lib.with_added_fields(checkpointing.load_saved_config(workdir, step))
  if config is not None and strict:
    differ = {
      k: (saved.get(k), config.get(k))
      for k in sorted(set(saved.keys()) | set(config.keys()))
      if k not in EVAL_FIELDS and saved.get(k) != config.get(k)
    }
    if differ:
      listing = "; ".join(
        f"{k}: checkpoint {a!r} vs --config {b!r}" for k, (a, b) in differ.items()
      )
      raise config_lib.ConfigError(
        f"--config conflicts with the config saved in {workdir} at step {step}: {listing}. "
        "Leave --config out to use the saved one."
      )
  if config is not None:
    saved = saved.copy_and_resolve_references()
    for k in EVAL_FIELDS:
      if config[k] or k not in _DATA_PATHS:  # An empty path keeps the run's own.
        saved[k] = config[k]
  mesh = parallel.create_mesh()
  graphdef, abstract = train.abstract_train_state(saved, mesh)
  try:
    state, _ = checkpointing.restore(manager, step, abstract)
  except Exception as e:
    raise checkpointing.CheckpointError(
      f"checkpoint step {step} in {manager.directory} does not restore as a {saved.model!r} "
      f"model at image size {saved.image_size} (is it from another model, or damaged?): "
      f"{checkpointing.describe_error(e)}"
    ) from e
  _, p_eval = train.make_parallel_steps(
    mesh, graphdef, optim.create_optimizer(saved, 1, 2, models.head_modules(saved.model)), saved
  )
  return Run(workdir, saved, step, graphdef, state, mesh, p_eval)


def operating_point_path(workdir: str, tag: str) -> epath.Path:
  return epath.Path(report.eval_dir(workdir, "operating_point", tag) + ".json")


def operating_point(run: Run | Ensemble) -> dict:
  """The decision threshold of this checkpoint, chosen on the validation split (the highest
  threshold with val sensitivity >= config.target_sensitivity); computed once and stored."""
  path = operating_point_path(run.workdir, run.tag)
  if path.exists():
    return json.loads(path.read_text())
  val = input_pipeline.load_eval(run.config)
  probs = run.predict(val)
  threshold = metrics.choose_threshold(val.labels, probs, run.config.target_sensitivity)
  not_held_out = ""
  if not input_pipeline.eval_is_held_out(run.config):
    not_held_out = f" (part of the training split {run.config.train_split!r}: not held out)"
  point = {
    "threshold": float(threshold),
    "target_sensitivity": run.config.target_sensitivity,
    "chosen_on": f"{run.config.dataset}:{input_pipeline.eval_name(run.config)}{not_held_out}",
    **run.describe(),
    "val_at_threshold": metrics.compute_metrics(val.labels, probs, threshold),
  }
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(point, indent=2, default=float))
    os.replace(tmp, path)
  return point


# Images with a side under this many pixels are scored but warned about: upscaled to the model's
# size, they hold next to nothing of what it learned from.
MIN_SIDE = 32


def load_usable_images(
  paths: list[str], config: ml_collections.ConfigDict
) -> tuple[np.ndarray, dict[str, str]]:
  """Files -> ((N, S, S, 1) uint8 of the files that load, {path: why not} of those that do not).
  Each is opened by content and cropped and resized as the run's training data was (`config` is
  the run's); a tiny image is loaded with a warning."""
  size = config.image_size
  out = np.empty((len(paths), size, size, 1), np.uint8)
  usable, failures = [], {}
  window = (config.ct_window_center, config.ct_window_width)
  for i, path in enumerate(paths):
    try:
      image = np.asarray(image_io.load_grayscale(path, ct_window=window))
    except (common.DatasetError, OSError) as e:
      failures[path] = str(e)
      continue
    if min(image.shape[:2]) < MIN_SIDE:
      logging.warning("%s is only %dx%d pixels: its prediction means little", path,
                      image.shape[1], image.shape[0])  # fmt: skip
    out[i] = image_prep.prepare_image(image, config)
    usable.append(i)
  return out[usable], failures


def load_images(paths: list[str], config: ml_collections.ConfigDict) -> np.ndarray:
  """`load_usable_images`, where every file must load: one error lists each that does not."""
  images, failures = load_usable_images(paths, config)
  if failures:
    raise common.DatasetError(unusable_listing(failures))
  return images


def unusable_listing(failures: dict[str, str]) -> str:
  lines = [f"{path}: {why}" if path not in why else why for path, why in failures.items()]
  return f"{len(failures)} images cannot be used:\n  " + "\n  ".join(lines)


# The label names people write in a labels.csv (case-insensitive): COVIDx's 'positive'/'negative'
# and 3-way 'normal'/'pneumonia'/'COVID-19', and 0/1.
LABEL_SYNONYMS = {
  **{name: 1 for name in ("covid", "covid-19", "covid19", "positive", "1")},
  **{
    name: 0
    for name in ("non_covid", "non-covid", "noncovid", "normal", "negative", "pneumonia", "0")
  },  # fmt: skip
}


def _parse_label(value: str, where: str) -> int:
  key = value.strip().lower()
  if key in LABEL_SYNONYMS:
    return LABEL_SYNONYMS[key]
  covid = [n for n, v in LABEL_SYNONYMS.items() if v == 1]
  other = [n for n, v in LABEL_SYNONYMS.items() if v == 0]
  raise common.DatasetError(
    f"{where}: unknown label {value!r}; COVID-19 is one of {covid}, not COVID-19 one of {other}"
  )


def load_images_dir(
  images_dir: str, config: ml_collections.ConfigDict, labels_csv: str | None = None
) -> input_pipeline.SplitData:
  """A folder of images listed in a labels.csv (relpath,label[,patient_id][,source][,view]...;
  default `images_dir/labels.csv`, relpaths relative to `images_dir`) as a split. Without a
  patient_id (column or cell) an image is its own patient; with it, the patient bootstrap keeps each
  patient's images together. Columns named in `input_pipeline.GROUP_FEATURES` (source, view,
  finding) give results by group."""
  labels_csv = labels_csv or os.path.join(images_dir, "labels.csv")
  if not os.path.isfile(labels_csv):
    raise common.DatasetError(
      f"{labels_csv} not found: --images_dir needs a labels.csv (relpath,label[,patient_id])"
    )
  relpaths, labels, patients = [], [], []
  with open(labels_csv, newline="") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {"relpath", "label"} <= set(reader.fieldnames):
      raise common.DatasetError(
        f"{labels_csv}: needs the header 'relpath,label[,patient_id]', got {reader.fieldnames}"
      )
    groups = {g: [] for g in input_pipeline.GROUP_FEATURES if g in reader.fieldnames}
    problems = []  # Every bad row, reported together.
    for line, row in enumerate(reader, start=2):
      where = f"{labels_csv} line {line}"
      path = os.path.join(images_dir, row["relpath"] or "")
      if not row["relpath"] or not os.path.isfile(path):
        problems.append(f"{where}: image {row['relpath']!r} not found in {images_dir}")
        continue
      try:
        labels.append(_parse_label(row["label"] or "", where))
      except common.DatasetError as e:
        problems.append(str(e))
        continue
      relpaths.append(row["relpath"])
      patients.append((row.get("patient_id") or "").strip() or row["relpath"])
      for g, values in groups.items():
        values.append((row[g] or "").strip())
  if problems:
    raise common.DatasetError(f"{len(problems)} rows of {labels_csv} cannot be used:\n  "
                              + "\n  ".join(problems))  # fmt: skip
  if not relpaths:
    raise common.DatasetError(f"{labels_csv} lists no images")
  images = load_images([os.path.join(images_dir, p) for p in relpaths], config)
  return input_pipeline.SplitData(
    images,
    np.asarray(labels, np.int32),
    np.asarray(patients),
    np.asarray(relpaths),
    {g: np.asarray(v, dtype=str) for g, v in groups.items()},
  )
