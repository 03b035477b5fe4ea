"""Volume canonicalisation, resampling, HU window and the slope/intercept decision, with numbers."""

from __future__ import annotations

import gzip
import itertools
import re

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations

from fvlm.preprocess.geometry import (
    GeometryError,
    GeometryRule,
    MetadataGeometry,
    header_problem,
    resolve_geometry,
)
from fvlm.preprocess.rescale import apply_rescale, decide_rescale
from fvlm.preprocess.volume import (
    CANONICAL_AXCODES,
    Volume,
    canonicalise,
    load_nifti,
    resample,
    voxel_sizes,
    window_hu,
)

CANONICAL_SPACING = (5.0, 2.0, 3.0)


def _canonical_volume(seed: int = 0) -> Volume:
    """A random volume already on the canonical axes, with a non-trivial origin."""
    data = np.random.default_rng(seed).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = CANONICAL_SPACING  # axis0->S, axis1->A, axis2->R
    affine[:, 3] = [-40.0, 12.5, 80.0, 1.0]
    return Volume(data, affine)


def _reoriented(volume: Volume, axcodes: tuple[str, str, str]) -> Volume:
    """The same scan stored with another axis order/direction (what scanners write)."""
    transform = orientations.ornt_transform(
        orientations.io_orientation(volume.affine), orientations.axcodes2ornt(axcodes)
    )
    data = orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ orientations.inv_ornt_aff(transform, volume.data.shape)
    return Volume(np.ascontiguousarray(data), affine)


ORIENTATIONS = [
    ("L", "P", "S"),  # DICOM's LPS
    ("R", "A", "S"),  # nibabel's canonical RAS
    ("L", "A", "S"),  # radiological RAS variant
    ("P", "I", "L"),
    ("A", "L", "I"),
    ("S", "A", "R"),
]


@pytest.mark.parametrize("axcodes", ORIENTATIONS, ids="".join)
def test_every_orientation_gives_the_same_canonical_array(axcodes):
    reference = _canonical_volume()
    stored = _reoriented(reference, axcodes)
    assert stored.axcodes == axcodes
    canonical, record = canonicalise(stored)
    assert canonical.axcodes == CANONICAL_AXCODES
    np.testing.assert_array_equal(canonical.data, reference.data)
    np.testing.assert_allclose(canonical.affine, reference.affine, atol=1e-9)
    assert record["source_axcodes"] == "".join(axcodes)
    assert record["canonical_axcodes"] == "SAR"
    assert canonical.spacing == pytest.approx(CANONICAL_SPACING)


def test_canonical_axes_point_superior_anterior_right():
    # An LPS-stored scan whose value at each voxel is its world coordinate (RAS+, mm): after
    # canonicalisation axis 0 must grow with z (superior), axis 1 with y (anterior) and axis 2
    # with x (patient's right).
    shape = (5, 6, 7)
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])  # i -> Left, j -> Posterior, k -> Superior
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    for axis, coordinate in ((0, 2), (1, 1), (2, 0)):
        canonical, _ = canonicalise(Volume(world[..., coordinate], affine))
        steps = np.diff(canonical.data, axis=axis)
        assert (steps > 0).all(), f"axis {axis} does not grow with world coordinate {coordinate}"


def test_oblique_scan_keeps_its_rotation_in_the_affine():
    angle = np.radians(10)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 2.0])
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    canonical, record = canonicalise(Volume(data, affine))
    ijk = np.array([1, 2, 3, 1.0])
    # the same voxel value sits at the same world position before and after
    value = canonical.data[1, 2, 3]
    source = np.argwhere(data == value)[0]
    np.testing.assert_allclose(canonical.affine @ ijk, affine @ np.array([*source, 1.0]), atol=1e-9)
    assert record["obliquity_deg"][0] == pytest.approx(10.0, abs=1e-6)


def _linear_world(volume_shape, affine, coefficients=(0.5, -0.25, 2.0), offset=7.0):
    ijk = np.stack(np.meshgrid(*map(np.arange, volume_shape), indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (world @ np.array(coefficients) + offset).astype(np.float32)


def test_resample_spacing_shape_and_world_positions():
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2], affine[3, 3] = 2.5, 0.7, 0.7, 1.0
    affine[:3, 3] = [-100.0, -50.0, 30.0]
    shape = (20, 50, 60)
    volume = Volume(_linear_world(shape, affine), affine)
    out = resample(volume, (5.0, 1.0, 1.0), "linear")
    assert out.spacing == pytest.approx((5.0, 1.0, 1.0))
    assert out.data.shape == (10, 35, 42)  # round(20 * 2.5 / 5), round(50 * .7), round(60 * .7)
    assert out.data.dtype == np.float32
    # field of view kept: first/last voxel edges coincide with the input's along each axis
    for axis, (n_in, s_in, n_out) in enumerate(
        zip(shape, (2.5, 0.7, 0.7), out.data.shape, strict=True)
    ):
        assert n_out * out.spacing[axis] == pytest.approx(n_in * s_in, abs=out.spacing[axis] / 2)
    # trilinear interpolation reproduces a linear function of world position exactly, so every
    # output voxel whose centre lies inside the input grid holds the value at its world position
    expected = _linear_world(out.data.shape, out.affine)
    inside = np.ones(out.data.shape, dtype=bool)
    inside[-1], inside[:, -1], inside[:, :, -1] = False, False, False  # edge-clamped samples
    inside[:, 0], inside[:, :, 0] = False, False
    np.testing.assert_allclose(out.data[inside], expected[inside], atol=1e-3)


def test_nearest_keeps_labels_and_shares_the_image_grid():
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    labels = np.zeros((10, 12, 14), dtype=np.uint8)
    labels[2:6, 3:9, 4:12] = 7
    labels[6:9, 1:3, 1:3] = 200
    image = Volume(labels.astype(np.float32), affine)
    out_labels = resample(Volume(labels, affine), (5.0, 1.0, 1.0), "nearest")
    out_image = resample(image, (5.0, 1.0, 1.0), "linear")
    assert out_labels.data.dtype == np.uint8
    assert set(np.unique(out_labels.data)) == {0, 7, 200}
    np.testing.assert_allclose(out_labels.affine, out_image.affine)
    assert out_labels.data.shape == out_image.data.shape == (6, 36, 42)
    # nearest neighbour = the output voxels whose centre lies in the box [6,18)x[9,27)x[12,36) mm;
    # centres sit at 2.5 + 5k mm (3 inside) along axis 0 and 0.5 + k mm in-plane (18 and 24)
    assert (out_labels.data == 7).sum() == 3 * 18 * 24


def test_resample_rejects_bad_arguments():
    volume = _canonical_volume()
    with pytest.raises(ValueError, match="interpolation"):
        resample(volume, (1.0, 1.0, 1.0), "cubic")
    with pytest.raises(ValueError, match="positive"):
        resample(volume, (1.0, 0.0, 1.0), "linear")


def test_window_maps_the_paper_range_to_unit_interval():
    hu = np.array([-1000, -300, 50, 400, 1000, -650], dtype=np.int16)
    out = window_hu(hu, (-300, 400))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 0.0], atol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(window_hu(np.array([0.0, -500.0]), (-1000, 1000)), [0.5, 0.25])
    with pytest.raises(ValueError, match="lo < hi"):
        window_hu(hu, (400, -300))


def _hu_phantom() -> np.ndarray:
    """HU volume: padding corners (-3024), air (-1000), a body of soft tissue (40) and bone."""
    data = np.full((8, 40, 40), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:40, :40]
    data[:, (yy - 20) ** 2 + (xx - 20) ** 2 < 14**2] = 40
    data[:, 18:22, 18:22] = 700
    data[:, (yy - 20) ** 2 + (xx - 20) ** 2 > 19**2] = -3024
    return data


def test_rescale_is_skipped_for_data_already_in_hu():
    # CT-RATE v2: values are HU, but the metadata still says slope 1, intercept -1024
    hu = _hu_phantom()
    decision = decide_rescale(hu, slope=1.0, intercept=-1024.0)
    assert not decision.applied
    assert decision.air_as_stored == pytest.approx(-1000.0)
    assert decision.air_if_rescaled == pytest.approx(-2024.0)
    assert "already HU" in decision.reason
    assert decision.warning is None
    assert apply_rescale(hu, decision) is hu


def test_rescale_is_applied_to_raw_values():
    hu = _hu_phantom()
    raw = np.where(hu == -3024, -2000, hu + 1024).astype(np.int16)  # stored values, padding -2000
    decision = decide_rescale(raw, slope=1.0, intercept=-1024.0)
    assert decision.applied
    assert decision.air_as_stored == pytest.approx(24.0)
    assert decision.air_if_rescaled == pytest.approx(-1000.0)
    restored = apply_rescale(raw, decision)
    body = hu > -1500
    np.testing.assert_array_equal(restored[body], hu[body].astype(np.float32))


def test_rescale_with_another_slope_and_the_override_policies():
    hu = _hu_phantom().astype(np.float32)
    raw = (hu + 1000.0) / 0.5  # slope 0.5, intercept -1000
    decision = decide_rescale(raw, 0.5, -1000.0)
    assert decision.applied
    np.testing.assert_allclose(apply_rescale(raw, decision)[hu > -1500], hu[hu > -1500])
    forced = decide_rescale(hu, 1.0, -1024.0, policy="always")
    assert forced.applied and forced.warning is not None  # air would land at -2024 HU
    assert not decide_rescale(raw, 0.5, -1000.0, policy="never").applied
    assert not decide_rescale(hu, None, None).applied
    assert not decide_rescale(hu, 1.0, 0.0).applied
    with pytest.raises(ValueError, match="policy"):
        decide_rescale(hu, 1.0, -1024.0, policy="sometimes")


def test_nifti_header_scaling_is_applied_once(tmp_path):
    # Stored raw with scl_slope/scl_inter in the header (nibabel applies it) *and* the external
    # metadata repeating the same rescale: the decision must not apply it a second time.
    hu = _hu_phantom()
    image = nib.Nifti1Image((hu + 1024).astype(np.int16), np.diag([-0.8, -0.8, 5.0, 1.0]))
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    loaded = load_nifti(path)
    assert (loaded.scl_slope, loaded.scl_inter) == (1.0, -1024.0)
    np.testing.assert_array_equal(loaded.volume.data, hu.astype(np.float32))
    assert not decide_rescale(loaded.volume.data, 1.0, -1024.0).applied


def test_load_nifti_rejects_broken_files(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(_hu_phantom(), np.diag([0.8, 0.8, 2.0, 1.0])), good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header" * 40))
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.int16), np.eye(4)), four_d)
    for path in (truncated, corrupt, tmp_path / "missing.nii.gz", four_d):
        with pytest.raises(Exception):  # noqa: B017 - nibabel/gzip raise several kinds
            load_nifti(path)
    assert load_nifti(good).volume.data.dtype == np.int16


@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("klass", [nib.Nifti1Image, nib.Nifti2Image])
def test_gzipped_nifti_streams_through_the_fast_decoder(tmp_path, monkeypatch, klass, endianness):
    """``.nii.gz`` is decoded by isal's igzip (stdlib gzip without it), equal to nibabel's read.

    nibabel's own loader must not be used (it decodes with zlib): a header-size sniffing bug once
    sent every file there unnoticed. Chunks smaller than the volume check the chunked reads.
    """
    from fvlm.preprocess import volume as volume_module

    hu = _hu_phantom()
    header = klass.header_class(endianness=endianness)
    image = klass((hu + 1024).astype(np.int16), np.diag([-0.8, -0.8, 5.0, 1.0]), header)
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "scan.nii.gz"
    nib.save(image, path)
    expected = nib.load(path).get_fdata(dtype=np.float32)
    assert nib.load(path).header.endianness == endianness
    monkeypatch.setattr(volume_module, "_READ_CHUNK", 1000)  # not a multiple of the voxel size
    monkeypatch.setattr(volume_module.nib, "load", _refuse)
    decoders = [volume_module._gzip, gzip]  # isal's igzip where installed, then the stdlib
    for decoder in decoders:
        opened = []
        monkeypatch.setattr(volume_module, "_gzip", decoder)
        monkeypatch.setattr(decoder, "open", _spy(decoder.open, opened))
        loaded = load_nifti(path)
        assert opened == [path]  # the file went through this decoder, once
        np.testing.assert_array_equal(loaded.volume.data, expected)
        assert (loaded.scl_slope, loaded.scl_inter) == (1.0, -1024.0)
        np.testing.assert_allclose(loaded.volume.affine, np.diag([-0.8, -0.8, 5.0, 1.0]))


def _refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("nibabel's loader was used instead of the streaming decoder")


def test_resampling_in_threads_and_slabs_equals_one_pass(monkeypatch):
    """Slabs, threads and a strided (canonical view) input give bit-identical output."""
    from fvlm.preprocess import volume as volume_module

    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, size=(23, 31, 37)).astype(np.int16)
    source = Volume(data, np.diag([0.7, 0.8, 1.9, 1.0]))
    reference = resample(source, (1.5, 1.25, 3.0), "linear")
    monkeypatch.setattr(volume_module, "_SLAB_BYTES", 512)  # many slabs
    view = Volume(np.asfortranarray(data)[::-1].transpose(1, 0, 2)[:, ::-1], source.affine)
    for volume, expected in ((source, reference.data), (view, None)):
        one = resample(volume, (1.5, 1.25, 3.0), "linear", threads=1)
        three = resample(volume, (1.5, 1.25, 3.0), "linear", threads=3)
        np.testing.assert_array_equal(one.data, three.data)
        if expected is not None:
            np.testing.assert_array_equal(one.data, expected)
        else:  # the view is the same voxels re-ordered: compare with its contiguous copy
            copy = Volume(np.ascontiguousarray(volume.data), volume.affine)
            np.testing.assert_array_equal(one.data, resample(copy, (1.5, 1.25, 3.0), "linear").data)


def _spy(function, calls: list):  # noqa: ANN001, ANN202
    def wrapper(path, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(path)
        return function(path, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("axcodes", list(itertools.islice(ORIENTATIONS, 3)), ids="".join)
def test_pipeline_order_is_orientation_independent(axcodes):
    # canonicalise + resample + window of the same scan stored in different orientations
    reference = _canonical_volume(seed=3)
    out_ref = resample(canonicalise(reference)[0], (10.0, 1.0, 1.5), "linear")
    stored = _reoriented(reference, axcodes)
    out = resample(canonicalise(stored)[0], (10.0, 1.0, 1.5), "linear")
    np.testing.assert_array_equal(
        window_hu(out.data, (-300, 400)), window_hu(out_ref.data, (-300, 400))
    )
    np.testing.assert_allclose(out.affine, out_ref.affine, atol=1e-9)


# -- geometry: header or metadata ---------------------------------------------------------------


def test_metadata_geometry_gives_the_dicom_affine_in_ras():
    # CT-RATE's default: axial, i -> patient's left, j -> posterior, k -> superior (LPS order)
    geometry = MetadataGeometry((0.7, 0.8, 1.5), (1, 0, 0, 0, 1, 0), (-170.0, -200.0, -300.0))
    affine = geometry.affine()
    np.testing.assert_allclose(affine[:3, :3], np.diag([-0.7, -0.8, 1.5]))
    np.testing.assert_allclose(affine[:3, 3], [170.0, 200.0, -300.0])  # LPS -> RAS
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    assert MetadataGeometry((0.7, 0.8, 1.5)).affine()[:3, 3].tolist() == [0.0, 0.0, 0.0]
    # coronal: i -> left, j -> inferior (column cosine (0, 0, -1)), k along i x j -> posterior
    coronal = MetadataGeometry((1.0, 2.0, 3.0), (1, 0, 0, 0, 0, -1)).affine()
    assert nib.aff2axcodes(coronal) == ("L", "I", "P")
    with pytest.raises(GeometryError, match="orthogonal unit"):
        MetadataGeometry((1.0, 1.0, 1.0), (1, 0, 0, 1, 0, 0))
    with pytest.raises(GeometryError, match="positive"):
        MetadataGeometry((1.0, 0.0, 1.0))


@pytest.mark.parametrize(
    ("affine", "codes", "expected"),
    [
        (np.diag([0.7, 0.7, 1.5, 1.0]), (0, 2), None),
        (np.eye(4), (0, 2), "identity affine"),
        (np.diag([0.7, 0.0, 1.5, 1.0]), (0, 2), r"column\(s\) \[1\] have zero length"),
        (np.diag([0.7, 0.7, 1.5, 1.0]), (0, 0), "qform_code and sform_code are 0"),
        (np.diag([700.0, 700.0, 1500.0, 1.0]), (0, 2), "outside the plausible 0.1-20 mm"),
        (np.array([[1, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), (0, 2), "shear"),
    ],
    ids=["usable", "identity", "zero-column", "no-transform", "metres", "sheared"],
)
def test_uninformative_headers_are_recognised(affine, codes, expected):
    problem = header_problem(affine, transform_codes=codes)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and re.search(expected, problem), problem


def test_resolve_geometry_chooses_and_records():
    metadata = MetadataGeometry((0.75, 0.75, 1.5))
    rule = GeometryRule(target_spacing=(1.5, 0.75, 0.75))
    affine, record = resolve_geometry(np.eye(4), (480, 480, 200), metadata, rule)
    assert record["source"] == "metadata" and "identity" in record["reason"]
    assert voxel_sizes(affine) == pytest.approx((0.75, 0.75, 1.5))
    assert record["output_shape"] == [200, 480, 480]  # 300 mm / 1.5, 360 mm / 0.75
    header = np.diag([-0.75, -0.75, 1.5, 1.0])
    _, record = resolve_geometry(header, (480, 480, 200), metadata, rule)
    assert record["source"] == "header" and record["warning"] is None
    _, record = resolve_geometry(header, (480, 480, 200), MetadataGeometry((0.6, 0.6, 1.5)), rule)
    assert "differs from the metadata's 0.6x0.6x1.5 mm" in record["warning"]
    forced, record = resolve_geometry(header, (4, 4, 4), metadata, GeometryRule("metadata"))
    assert record["source"] == "metadata" and nib.aff2axcodes(forced) == ("L", "P", "S")
    with pytest.raises(GeometryError, match="identity affine .* no spacing for this study"):
        resolve_geometry(np.eye(4), (4, 4, 4), None, rule)
    with pytest.raises(GeometryError, match="'metadata' is set"):
        resolve_geometry(header, (4, 4, 4), None, GeometryRule("metadata"))
    # 'header' trusts an identity affine (1 mm voxels) but never an unusable one
    assert resolve_geometry(np.eye(4), (4, 4, 4), None, GeometryRule("header"))[1]["source"] == (
        "header"
    )
    with pytest.raises(GeometryError, match="zero length"):
        resolve_geometry(np.diag([1.0, 0.0, 1.0, 1.0]), (4, 4, 4), None, GeometryRule("header"))


def test_output_grid_over_budget_fails_before_reading_any_voxel(tmp_path):
    # A header spacing 1000x too small for the target... and a file whose voxels are cut off:
    # the geometry error comes first, so no voxel was read (and nothing was allocated).
    image = nib.Nifti1Image(np.zeros((512, 512, 300), np.int16), np.diag([0.7, 0.7, 1.5, 1.0]))
    path = tmp_path / "big.nii"
    nib.save(image, path)
    with path.open("r+b") as handle:
        handle.truncate(2048)
    rule = GeometryRule(target_spacing=(0.05, 0.05, 0.05), spacing_range_mm=(0.01, 20.0))
    with pytest.raises(GeometryError, match=r"output grid 9000x7168x7168 .* exceeds the budget"):
        load_nifti(path, rule=rule)
    with pytest.raises(GeometryError, match="outside the plausible"):
        load_nifti(path, rule=GeometryRule(spacing_range_mm=(1.0, 20.0)))
    with pytest.raises(OSError, match="Expected 157286400 bytes"):  # sane rule: voxels read
        load_nifti(path, rule=GeometryRule(target_spacing=(1.5, 0.7, 0.7)))


def test_identity_affine_volume_takes_the_metadata_geometry(tmp_path):
    hu = _hu_phantom()
    path = tmp_path / "identity.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), path)
    loaded = load_nifti(path, MetadataGeometry((0.8, 0.8, 2.0)))
    assert loaded.volume.spacing == pytest.approx((0.8, 0.8, 2.0))
    assert loaded.volume.axcodes == ("L", "P", "S")
    assert loaded.geometry["source"] == "metadata"
    assert loaded.geometry["header_problem"].startswith("identity affine")
    np.testing.assert_array_equal(loaded.volume.data, hu)
    with pytest.raises(GeometryError, match="no spacing for this study"):
        load_nifti(path)
