"""DICOM images (`datasets/image_io.py`): pydicom's own test files and files written here with
pydicom, through the same loader the builders, `evaluate --images_dir` and `predict` use."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covid_flax.datasets import image_io
from covid_flax.errors import DatasetError


def _load(path, **kwargs) -> np.ndarray:
  return np.asarray(image_io.load_grayscale(path, **kwargs))


def _write(path, pixels: np.ndarray, **elements) -> str:
  """A single-frame uncompressed DICOM of unsigned 16-bit `pixels` with `elements` set."""
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage.
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality = "DX"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  for key, value in elements.items():
    setattr(ds, key, value)
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)
  return str(path)


_RAMP = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 12-bit values 0..4032.


def test_ct_is_windowed_in_hounsfield_units():
  path = get_testdata_file("CT_small.dcm")
  ds = pydicom.dcmread(path)
  hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
  for center, width in ((-600.0, 1500.0), (40.0, 400.0)):
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    got = _load(path, ct_window=(center, width))
    np.testing.assert_array_equal(got, np.rint(expected * 255).astype(np.uint8))
  assert len(np.unique(_load(path))) > 50  # 16-bit data keeps its gradations: windowed, not cut.


def test_a_radiograph_window_and_monochrome1_inversion(tmp_path):
  window = dict(WindowCenter=2000, WindowWidth=1000)
  mono2 = _load(_write(tmp_path / "a.dcm", _RAMP, **window))
  expected = np.clip((_RAMP - 1999.5) / 999.0 + 0.5, 0, 1)
  np.testing.assert_array_equal(mono2, np.rint(expected * 255).astype(np.uint8))
  mono1 = _load(
    _write(tmp_path / "b.dcm", _RAMP, PhotometricInterpretation="MONOCHROME1", **window)
  )
  np.testing.assert_array_equal(mono1, np.rint((1 - expected) * 255).astype(np.uint8))


def test_the_files_voi_lut_function_is_honoured(tmp_path):
  sigmoid = _write(tmp_path / "a.dcm", _RAMP, WindowCenter=2000, WindowWidth=1000,
                   VOILUTFunction="SIGMOID")  # fmt: skip
  expected = 1.0 / (1.0 + np.exp(-4.0 * (_RAMP - 2000.0) / 1000.0))
  np.testing.assert_allclose(_load(sigmoid), expected * 255, atol=1.0)


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
  rescaled = _write(tmp_path / "a.dcm", _RAMP, RescaleSlope=2, RescaleIntercept=-1000,
                    WindowCenter=2000, WindowWidth=1000)  # fmt: skip
  expected = np.clip((_RAMP * 2.0 - 1000 - 1999.5) / 999.0 + 0.5, 0, 1)
  np.testing.assert_array_equal(_load(rescaled), np.rint(expected * 255).astype(np.uint8))


def test_a_voi_lut_is_applied(tmp_path):
  lut = Dataset()
  lut.LUTDescriptor = [4096, 0, 12]  # 4096 entries, first value 0, 12-bit output.
  table = np.minimum(np.arange(4096) * 2, 4095)  # Doubles the contrast, saturates at 2048.
  lut.LUTData = table.astype(np.uint16).tobytes()
  path = _write(tmp_path / "a.dcm", _RAMP, VOILUTSequence=[lut])
  expected = np.rint(table[_RAMP] / 4095 * 255).astype(np.uint8)
  np.testing.assert_array_equal(_load(path), expected)


def test_without_a_window_a_robust_percentile_window(tmp_path):
  pixels = _RAMP.copy()
  pixels[0, 0] = 4095  # One hot pixel does not set white.
  got = _load(_write(tmp_path / "a.dcm", pixels))
  lo, hi = np.percentile(pixels.astype(float), (0.5, 99.5))
  expected = np.clip((pixels - lo) / (hi - lo), 0, 1)
  np.testing.assert_array_equal(got, np.rint(expected * 255).astype(np.uint8))
  assert got.min() == 0 and got.max() == 255


@pytest.mark.parametrize(
  "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_compressed_syntaxes_decode_to_the_uncompressed_image(compressed):
  np.testing.assert_array_equal(
    _load(get_testdata_file(compressed)), _load(get_testdata_file("MR_small.dcm"))
  )


def test_colour_and_palette_images_become_luma():
  for name in ("examples_palette.dcm", "SC_rgb_small_odd.dcm"):
    image = _load(get_testdata_file(name))
    assert image.dtype == np.uint8 and image.ndim == 2 and image.max() > image.min()


def test_a_file_without_the_dicom_preamble_still_loads(tmp_path):
  data = open(get_testdata_file("CT_small.dcm"), "rb").read()
  (tmp_path / "bare.dcm").write_bytes(data[132:])  # No 128-byte preamble, no 'DICM'.
  np.testing.assert_array_equal(
    _load(tmp_path / "bare.dcm"), _load(get_testdata_file("CT_small.dcm"))
  )


@pytest.mark.parametrize(
  "name,message",
  [
    ("rtplan.dcm", "without pixel data \\(RT Plan Storage\\)"),
    ("SC_rgb_rle_2frame.dcm", "multi-frame DICOM \\(2 frames\\) where one image is expected"),
    ("JPGExtended.dcm", "JPEG Extended.*1.2.840.10008.1.2.4.51.*pylibjpeg-libjpeg"),
    ("MR_truncated.dcm", "corrupt or truncated DICOM pixel data"),
  ],
)
def test_bad_dicoms_name_the_file_and_the_fault(name, message):
  with pytest.raises(DatasetError, match=f"{name}: .*{message}"):
    _load(get_testdata_file(name))


def test_evaluation_and_prediction_read_dicoms_with_the_runs_window(tmp_path):
  from helpers import tiny_config

  from covid_flax import inference

  path = get_testdata_file("CT_small.dcm")
  config = tiny_config("", ct_window_center=40.0, ct_window_width=400.0)
  images, failures = inference.load_usable_images([path, str(tmp_path / "none.dcm")], config)
  assert list(failures) == [str(tmp_path / "none.dcm")] and images.shape == (1, 48, 48, 1)
  config.ct_window_center, config.ct_window_width = -600.0, 1500.0
  assert not np.array_equal(inference.load_usable_images([path], config)[0], images)
