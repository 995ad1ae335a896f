import re

import numpy as np
import pytest

from pipeline.data.volumes import make_header, read_volume, write_volume


def centroid(array, label):
    return np.argwhere(array == label).mean(axis=0)


def test_real_spider_mask_reads_in_ras(spider_mask_path):
    volume = read_volume(str(spider_mask_path))
    assert volume.array.dtype == np.int16
    # ITK size (50, 448, 578) with spacing (3.32, 0.625, 0.50) is LR, AP, SI already.
    assert volume.array.shape == (50, 448, 578)
    np.testing.assert_allclose(volume.spacing, (3.3211, 0.625, 0.5006), atol=1e-3)
    superior = [centroid(volume.array, label)[2] for label in range(201, 208)]
    assert all(np.diff(superior) > 0), superior
    canal = centroid(volume.array, 100)
    discs = np.mean([centroid(volume.array, label) for label in range(201, 208)], axis=0)
    assert canal[1] < discs[1], "the canal must lie posterior (lower axis-1) to the discs"


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii"])
@pytest.mark.parametrize("axcodes", ["LPS", "PIR", "RAS", "ASL"])
def test_round_trip_any_stored_orientation(tmp_path, suffix, axcodes):
    rng = np.random.default_rng(0)
    ras = rng.integers(0, 300, size=(5, 7, 9)).astype(np.int16)
    spacing = (3.3, 0.6, 0.8)
    path = str(tmp_path / f"vol{suffix}")
    write_volume(path, ras, make_header(ras.shape, spacing, axcodes))
    back = read_volume(path)
    assert back.header.axcodes == axcodes
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, ras)
    np.testing.assert_allclose(back.spacing, spacing, rtol=1e-6)


def test_write_back_in_files_own_orientation(tmp_path):
    ras = np.zeros((4, 6, 8), dtype=np.uint8)
    ras[0, 0, 7] = 1  # an asymmetric marker: any flip or transpose would move it
    header = make_header(ras.shape, (1.0, 2.0, 3.0), "PIR")
    write_volume(str(tmp_path / "a.mha"), ras, header)
    original = read_volume(str(tmp_path / "a.mha"))
    write_volume(str(tmp_path / "b.mha"), original.array, original.header)
    again = read_volume(str(tmp_path / "b.mha"))
    np.testing.assert_array_equal(again.array, ras)
    np.testing.assert_allclose(again.header.affine, original.header.affine)


def test_same_voxel_same_ras_index_whatever_the_storage(tmp_path):
    ras = np.zeros((4, 6, 8), dtype=np.uint8)
    ras[1, 2, 3] = 1
    found = []
    for axcodes in ("LPS", "PIR", "SAL"):
        path = str(tmp_path / f"{axcodes}.mha")
        write_volume(path, ras, make_header(ras.shape, (1.0, 2.0, 3.0), axcodes))
        found.append(tuple(np.argwhere(read_volume(path).array == 1)[0]))
    assert found == [(1, 2, 3)] * 3


def test_bad_files_raise_clear_errors(tmp_path):
    junk = tmp_path / "junk.mha"
    junk.write_text("this is not an image")
    with pytest.raises(ValueError, match="junk.mha"):
        read_volume(str(junk))
    with pytest.raises(ValueError, match="unsupported file type"):
        read_volume(str(tmp_path / "x.png"))
    good = tmp_path / "good.mha"
    write_volume(str(good), np.zeros((4, 4, 4), np.int16), make_header((4, 4, 4), (1, 1, 1)))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mha"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.mha"):
        read_volume(str(truncated))


def _mhd(tmp_path, data_file: str | None = None):
    """A small .mhd beside its .raw pixel file; `data_file` rewrites where its header points."""
    ras = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = tmp_path / "vol.mhd"
    write_volume(str(path), ras, make_header(ras.shape, (1.0, 2.0, 3.0)))
    if data_file is not None:
        head, _, _ = path.read_text().rpartition("ElementDataFile = ")
        path.write_text(f"{head}ElementDataFile = {data_file}\n")
    return path, ras


@pytest.mark.parametrize("data_file, reason", [
    ("/etc/passwd", "points to '/etc/passwd', outside its own folder"),
    ("../vol.zraw", "points to '../vol.zraw', outside its own folder"),
    ("sub/vol.zraw", "points to 'sub/vol.zraw', outside its own folder"),
    ("LIST", "names a list or pattern of files ('LIST')"),
    ("vol%03d.zraw 1 3 1", "names a list or pattern of files"),
])
def test_a_mhd_may_name_only_a_file_in_its_own_folder(tmp_path, data_file, reason):
    path, _ = _mhd(tmp_path, data_file)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: refused: .*"
                                         rf"{re.escape(reason)}"):
        read_volume(str(path))


def test_a_mha_must_hold_its_own_pixels(tmp_path):
    write_volume(str(tmp_path / "vol.mhd"), np.ones((4, 5, 6), np.int16),
                 make_header((4, 5, 6), (1.0, 1.0, 1.0)))
    head = (tmp_path / "vol.mhd").read_text()
    (tmp_path / "vol.mha").write_text(head)  # names vol.zraw beside it: a .mha may not
    with pytest.raises(ValueError, match=r"vol\.mha: refused: .*points to 'vol\.zraw'.*"
                                         r"ElementDataFile = LOCAL"):
        read_volume(str(tmp_path / "vol.mha"))


def test_a_mhd_reads_its_pixel_file_locally_and_from_a_uri(tmp_path):
    path, ras = _mhd(tmp_path)
    np.testing.assert_array_equal(read_volume(str(path)).array, ras)
    np.testing.assert_array_equal(read_volume(path.as_uri()).array, ras)  # file:// URI


def test_a_volume_over_the_voxel_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "vol.mha"
    write_volume(str(path), np.ones((4, 5, 6), np.uint8), make_header((4, 5, 6), (1, 1, 1)))
    with pytest.raises(ValueError, match=r"vol\.mha: refused: its header declares 120 voxels "
                                         r".*more than the limit of 119"):
        read_volume(str(path), max_voxels=119)
    assert read_volume(str(path), max_voxels=120).array.shape == (4, 5, 6)
    # 2**30 + 2**20 voxels declared over a few bytes of pixels: refused by the default limit
    # from the header alone, never allocated
    path.write_bytes(re.sub(rb"DimSize = [^\n]*", b"DimSize = 1024 1024 1025", path.read_bytes(),
                            count=1))
    with pytest.raises(ValueError, match=r"declares 1074790400 voxels .*limit of 1073741824"):
        read_volume(str(path))
