"""What every covid_flax TFDS builder shares: labels, features, errors."""

import tensorflow_datasets as tfds

# Index 1 is the positive class everywhere (metrics, thresholds, Grad-CAM).
LABEL_NAMES = ("non_covid", "covid")
POSITIVE_LABEL = 1


class DatasetError(ValueError):
  """Bad or missing input data; the message names the file or field at fault."""


def base_features(**extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
  """The features every builder has (plus `extra`): the input pipeline reads only these."""
  return tfds.features.FeaturesDict(
      {
          "image": tfds.features.Image(shape=(None, None, 1), dtype="uint8", encoding_format="png"),
          "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)),
          "patient_id": tfds.features.Text(),
          "filename": tfds.features.Text(),
          "source": tfds.features.Text(),
          **extra,
      }
  )
