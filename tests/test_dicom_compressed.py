"""Compressed DICOM through the project's reader with the `[dicom]` extra (pydicom's pylibjpeg
plugins: pip install -e '.[dicom]'); skipped without it. Test files ship with pydicom (no download).

Lossless files must read exactly like their uncompressed twin (values, dtype and affine); the
12-bit JPEG Extended file, which only the extra decodes, is compared with a lossy JPEG 2000 copy
of the same image."""

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
for _module in ("pylibjpeg", "libjpeg", "openjpeg", "rle"):
    pytest.importorskip(_module, reason="the [dicom] extra is not installed")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.pixels import pixel_array  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402
from pydicom.uid import JPEGExtended12Bit  # noqa: E402
from pydicom.uid import RLELossless  # noqa: E402

from isimed.data import readers  # noqa: E402


def _read(path: str) -> tuple[np.ndarray, np.ndarray]:
    return readers.read_image(path)


def _assert_same(got, want):
    (array, affine), (ref, ref_affine) = got, want
    assert array.dtype == ref.dtype and array.shape == ref.shape
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_array_equal(affine, ref_affine)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_file_reads_like_its_uncompressed_twin(name):
    path = get_testdata_file(name)
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed and "pylibjpeg" in get_decoder(syntax).available_plugins
    twin = _read(get_testdata_file("MR_small.dcm"))
    _assert_same(_read(path), twin)
    # The extra's decoder alone gives the same stored values (reader arrays are (column, row)).
    np.testing.assert_array_equal(pixel_array(path, decoding_plugin="pylibjpeg").T, twin[0][..., 0])


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=lambda s: s.name)
def test_ct_compressed_by_the_extra_reads_back_in_the_same_hu(syntax, tmp_path):
    source = get_testdata_file("CT_small.dcm")  # Uncompressed, RescaleIntercept -1024.
    ds = pydicom.dcmread(source)
    ds.compress(syntax, encoding_plugin="pylibjpeg")
    path = str(tmp_path / "ct.dcm")
    ds.save_as(path)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    want = _read(source)
    assert want[0].dtype == np.int16 and want[0].min() < -800  # HU, not stored values.
    _assert_same(_read(path), want)


def test_12bit_jpeg_extended_is_read_and_matches_its_jpeg2000_copy():
    path = get_testdata_file("JPGExtended.dcm")
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == JPEGExtended12Bit
    # Pillow decodes only 8-bit JPEG: without the extra this file raises "cannot decode".
    assert "pylibjpeg" in get_decoder(syntax).available_plugins
    array, affine = _read(path)
    copy, copy_affine = _read(get_testdata_file("JPEG2000.dcm"))  # The same image, lossy J2K.
    assert array.shape == copy.shape == (256, 1024, 1)
    np.testing.assert_array_equal(affine, copy_affine)
    a, b = array.astype(np.float64).ravel(), copy.astype(np.float64).ravel()
    # Two lossy codecs of one image (values 0..~260): measured r = 0.954, median |diff| = 2.
    assert np.corrcoef(a, b)[0, 1] > 0.9
    assert np.median(np.abs(a - b)) <= 3
