"""DICOM input: series written here with pydicom from volumes whose NIfTI geometry is known.

Each series is written from an array and its RAS+ affine the way a scanner would store it
(LPS positions, one file per slice, names in no useful order), read back, and compared with the
same array read as NIfTI: HU, voxel sizes and the world position (mm) of voxels must agree. The
real CT of TotalSegmentator's example (when present) makes the same round trip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS
from test_preprocess_runner import FINDINGS, IMPRESSION, _config, _store, _study_arrays

from fvlm.preprocess.dicom import DicomError, folder_fingerprint, is_dicom, load_dicom
from fvlm.preprocess.geometry import GeometryRule
from fvlm.preprocess.runner import run_preprocess
from fvlm.preprocess.volume import canonicalise, load_nifti, load_volume

EXAMPLE = Path(
    os.environ.get(
        "FVLM_TOTALSEG_EXAMPLE",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg-example",
    )
)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING = (0.7, 0.7, 2.5)


def _ds(value: float) -> DS:
    return DS(float(value), auto_format=True)


def write_series(
    folder: Path,
    hu: np.ndarray,
    affine: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    series_uid: str | None = None,
    number: int = 1,
    description: str = "AX 2.5",
    seed: int = 0,
) -> list[Path]:
    """One file per slice ``k`` of ``hu`` (axes i, j, k of ``affine``), under shuffled names.

    Pixel ``(row r, column c)`` of slice ``k`` is voxel ``(c, r, k)``: rows run along ``j``,
    columns along ``i``, as NIfTI converters read them back.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine
    step_i, step_j = (np.linalg.norm(lps[:3, a]) for a in (0, 1))
    orientation = [*(lps[:3, 0] / step_i), *(lps[:3, 1] / step_j)]
    raw = np.rint((hu - intercept) / slope)
    signed = raw.min() < 0
    raw = raw.astype(np.int16 if signed else np.uint16)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    names = np.random.default_rng(seed).permutation(hu.shape[2])
    paths = []
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, number, description
        ds.InstanceNumber = hu.shape[2] - k  # numbered the other way round, as some scanners do
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.PixelSpacing = [_ds(step_j), _ds(step_i)]  # between rows, between columns
        ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T).tobytes()
        path = folder / f"IM{names[k]:05d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _phantom(shape=(64, 64, 20), seed: int = 0) -> np.ndarray:
    """Integer HU: a body ellipse with an off-centre organ, so every axis and flip shows."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[((i - 30) / 26.0) ** 2 + ((j - 34) / 22.0) ** 2 < 1] = 40
    hu[((i - 42) / 8.0) ** 2 + ((j - 30) / 6.0) ** 2 + ((k - 6) / 4.0) ** 2 < 1] = 700
    return hu + rng.integers(-20, 21, shape).astype(np.int16)


def _oblique_affine() -> np.ndarray:
    """0.7 x 0.7 x 2.5 mm, rotated 10 degrees about the scanner axis, slices stored head first."""
    angle = np.radians(10.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([SPACING[0], SPACING[1], -SPACING[2]])
    affine[:3, 3] = [-21.3, 14.2, 310.0]
    return affine


@pytest.fixture(scope="module")
def phantom_nifti(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """The phantom as NIfTI and as a DICOM series folder, with its array and affine."""
    folder = tmp_path_factory.mktemp("dicom")
    hu, affine = _phantom(), _oblique_affine()
    nifti = folder / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), nifti)
    write_series(folder / "series", hu, affine)
    return nifti, folder / "series", hu, affine


def _world(affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    return nib.affines.apply_affine(affine, voxels)


def test_series_reads_back_as_the_nifti(phantom_nifti):
    nifti, series, hu, _ = phantom_nifti
    reference = load_nifti(nifti).volume
    loaded = load_volume(series)
    volume = loaded.volume
    assert volume.data.dtype == np.int16 and volume.data.shape == (64, 64, 20)
    assert volume.spacing == pytest.approx(SPACING, abs=1e-6)
    # slices were stored head first and numbered backwards: the reader stacks them feet first
    assert np.array_equal(volume.data, hu[:, :, ::-1])
    assert volume.axcodes == ("R", "A", "S") and reference.axcodes == ("R", "A", "I")
    # the same voxels, found by index in each, lie at the same world position (mm)
    voxels = np.array([[0, 0, 0], [42, 30, 6], [63, 5, 19], [10, 50, 13]])
    mirrored = voxels * [1, 1, -1] + [0, 0, 19]
    assert np.abs(_world(volume.affine, mirrored) - _world(reference.affine, voxels)).max() < 1e-3
    assert np.array_equal(volume.data[tuple(mirrored.T)], hu[tuple(voxels.T)])
    # after canonicalisation the two are the same array on the same grid
    a, _ = canonicalise(volume)
    b, record = canonicalise(reference)
    assert np.array_equal(a.data, b.data)
    assert np.abs(a.affine - b.affine).max() < 1e-4
    assert record["obliquity_deg"] == pytest.approx([10, 10, 0], abs=1e-3)
    dicom = loaded.geometry["dicom"]
    assert dicom["modality"] == "CT" and dicom["slices"] == 20 and dicom["files"] == 20
    assert dicom["slice_step_mm"] == pytest.approx(2.5)
    assert dicom["rescale_intercepts"] == [-1024.0] and loaded.scl_inter == -1024.0
    assert loaded.stored_dtype == "uint16"
    assert loaded.geometry["source"] == "header"


def test_same_as_dicom2nifti(phantom_nifti):
    # the converter TotalSegmentator uses: same array layout and affine, so its masks fit
    convert = pytest.importorskip("dicom2nifti.convert_dicom")
    _, series, _, _ = phantom_nifti
    converted = convert.dicom_series_to_nifti(str(series), None, reorient_nifti=False)["NII"]
    volume = load_dicom(series).volume
    assert np.abs(converted.affine - volume.affine).max() < 1e-4
    assert np.array_equal(np.asarray(converted.dataobj), volume.data)


def test_rescale_slope_and_signed_storage(tmp_path):
    hu, affine = _phantom((16, 12, 6)), np.diag([0.8, 0.8, 2.0, 1.0])
    write_series(tmp_path / "s", hu, affine, slope=0.5, intercept=-1000.0)
    loaded = load_dicom(tmp_path / "s")
    assert loaded.stored_dtype == "int16"  # (hu + 1000) / 0.5 goes below 0: stored signed
    assert loaded.volume.data.dtype == np.float32  # a fractional slope gives floats
    assert np.array_equal(loaded.volume.data, hu.astype(np.float32))
    assert loaded.scl_slope == 0.5


def test_single_file_and_one_slice(tmp_path):
    hu, affine = _phantom((16, 12, 1)), np.diag([0.8, 0.9, 3.0, 1.0])
    (path,) = write_series(tmp_path, hu, affine)
    assert is_dicom(path) and is_dicom(tmp_path) and not is_dicom(tmp_path / "x.nii.gz")
    volume = load_volume(path).volume
    assert volume.spacing == pytest.approx((0.8, 0.9, 3.0))  # the step from SliceThickness
    assert np.array_equal(volume.data, hu)
    assert np.allclose(volume.affine, affine, atol=1e-6)


def test_several_series_listed_then_chosen(tmp_path):
    hu, affine = _phantom((16, 12, 6)), np.diag([0.8, 0.8, 2.0, 1.0])
    write_series(tmp_path / "a", hu, affine, number=3, description="AX 2.0", series_uid="1.2.3")
    write_series(tmp_path / "b", hu[::-1], affine, number=4, description="COR", seed=1)
    with pytest.raises(DicomError) as err:
        load_volume(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "2 image series" in message and "\n" not in message
    assert "'AX 2.0'" in message and "'COR'" in message and "uid 1.2.3" in message
    assert message.count("6 slices") == 2
    by_uid = load_volume(tmp_path, dicom_series="1.2.3").volume.data
    by_number = load_volume(tmp_path, dicom_series="4").volume.data
    assert np.array_equal(by_uid, hu) and np.array_equal(by_number, hu[::-1])
    with pytest.raises(DicomError, match="no series has UID or number '7'"):
        load_volume(tmp_path, dicom_series="7")


def test_mr_series_refused(tmp_path):
    write_series(tmp_path, _phantom((8, 8, 4)), np.eye(4), modality="MR", description="T1")
    with pytest.raises(DicomError, match=rf"^{tmp_path}: series .*'T1'.* has modality MR, not CT$"):
        load_dicom(tmp_path)


def test_missing_slice_and_uneven_spacing(tmp_path):
    hu, affine = _phantom((8, 8, 10)), np.diag([1.0, 1.0, 2.5, 1.0])
    paths = write_series(tmp_path / "gap", hu, affine)
    paths[4].unlink()
    with pytest.raises(DicomError, match=r"missing slices: 5\.000 mm between .* median step is 2"):
        load_dicom(tmp_path / "gap")
    paths = write_series(tmp_path / "uneven", hu, affine)
    moved = pydicom.dcmread(paths[5])
    moved.ImagePositionPatient[2] = _ds(float(moved.ImagePositionPatient[2]) + 0.6)
    moved.save_as(paths[5])
    with pytest.raises(DicomError, match=r"uneven slice spacing: steps from 1\.900 to 3\.100 mm"):
        load_dicom(tmp_path / "uneven")
    shutil.copy(paths[2], tmp_path / "uneven" / "copy.dcm")
    with pytest.raises(DicomError, match="two slices at position"):
        load_dicom(tmp_path / "uneven")


def test_gantry_tilt_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    affine[1, 2] = 0.5  # each slice 0.5 mm further anterior: an 11 degree tilt
    write_series(tmp_path, _phantom((8, 8, 6)), affine)
    with pytest.raises(DicomError, match=r"gantry tilt of about 11\.3 degrees"):
        load_dicom(tmp_path)


def test_corrupt_files_named(tmp_path):
    hu, affine = _phantom((8, 8, 5)), np.diag([1.0, 1.0, 2.5, 1.0])
    paths = write_series(tmp_path / "cut", hu, affine)
    paths[3].write_bytes(paths[3].read_bytes()[:-40])  # pixel data cut short
    with pytest.raises(DicomError, match=rf"^{paths[3]}: unreadable pixel data"):
        load_dicom(tmp_path / "cut")
    write_series(tmp_path / "junk", hu, affine)
    (tmp_path / "junk" / "broken.dcm").write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(DicomError, match=r"broken\.dcm: not a"):
        load_dicom(tmp_path / "junk")
    # files that are neither named nor marked as DICOM are left out, and counted
    (tmp_path / "junk" / "broken.dcm").unlink()
    (tmp_path / "junk" / "notes.txt").write_text("exported by PACS")
    assert load_dicom(tmp_path / "junk").geometry["dicom"]["ignored_files"] == 1
    with pytest.raises(DicomError, match="no DICOM image files"):
        load_dicom(tmp_path / "junk" / "notes.txt")


def test_compressed_without_decoder(tmp_path, monkeypatch):
    hu, affine = _phantom((8, 8, 3)), np.diag([1.0, 1.0, 2.5, 1.0])
    paths = write_series(tmp_path, hu, affine)
    ds = pydicom.dcmread(paths[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 16])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[0], enforce_file_format=True)
    if pydicom.pixels.get_decoder(pydicom.uid.HTJ2KLossless).is_available:
        pytest.skip("an HTJ2K decoder is installed here")
    with pytest.raises(DicomError, match=rf"^{paths[0]}: pixel data compressed as High-Through"):
        load_dicom(tmp_path)


def test_geometry_bounds_apply(tmp_path):
    write_series(tmp_path, _phantom((8, 8, 4)), np.diag([0.01, 0.01, 2.5, 1.0]))
    with pytest.raises(ValueError, match="outside the plausible"):
        load_dicom(tmp_path, rule=GeometryRule())


def test_folder_fingerprint(tmp_path):
    paths = write_series(tmp_path, _phantom((8, 8, 3)), np.eye(4))
    first = folder_fingerprint(tmp_path)
    assert first["files"] == 3 and first["size"] == sum(p.stat().st_size for p in paths)
    assert folder_fingerprint(tmp_path, first) == first
    data = bytearray(paths[1].read_bytes())
    data[-1] ^= 1
    paths[1].write_bytes(data)
    os.utime(paths[1], ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    assert folder_fingerprint(tmp_path, first)["sha256"] != first["sha256"]


def test_runner_caches_the_same_arrays_as_for_nifti(tmp_path):
    hu, labels, affine = _study_arrays(3)
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "mask.nii.gz")
    stored = _store(hu, affine, "LPI")  # the scanner stores the slices head first, in LPS
    write_series(tmp_path / "dicom" / "series", np.asarray(stored.dataobj), stored.affine)
    (tmp_path / "dicom" / "DICOMDIR.txt").write_text("index")
    # the mask of the DICOM study lies on the grid the DICOM reader makes (as a converter's)
    grid = load_volume(tmp_path / "dicom").volume.affine
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(grid)
    )
    nib.save(
        nib.Nifti1Image(orientations.apply_orientation(labels, transform), grid),
        tmp_path / "dicom_mask.nii.gz",
    )
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "image", "mask", "findings", "impression"])
        writer.writerow(["nifti", "ct.nii.gz", "mask.nii.gz", FINDINGS, IMPRESSION])
        writer.writerow(["dicom", "dicom", "dicom_mask.nii.gz", FINDINGS, IMPRESSION])
    summary = run_preprocess(_config(manifest, tmp_path / "cache"))
    assert summary.counts == {"ok": 2, "skipped": 0, "failed": 0}, summary.format()
    studies = tmp_path / "cache" / "studies"
    for name in ("image.npy", "anatomy.npy"):
        a, b = np.load(studies / "nifti" / name), np.load(studies / "dicom" / name)
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-3), name
    meta = json.loads((studies / "dicom" / "meta.json").read_text())
    nifti_meta = json.loads((studies / "nifti" / "meta.json").read_text())
    assert np.allclose(meta["affine"], nifti_meta["affine"], atol=1e-4)
    assert meta["geometry"]["dicom"]["slices"] == 20
    assert meta["geometry"]["dicom"]["modality"] == "CT"
    assert meta["inputs"]["image"]["files"] == 21
    assert meta["rescale"]["applied"] is False  # the DICOM rescale already gave HU
    again = run_preprocess(_config(manifest, tmp_path / "cache"))
    assert again.counts == {"ok": 0, "skipped": 2, "failed": 0}, again.format()


def test_runner_dicom_series_column_and_bad_studies(tmp_path):
    hu, labels, affine = _study_arrays(4)
    write_series(tmp_path / "mr", hu, affine, modality="MR")
    write_series(tmp_path / "two" / "a", hu, affine, number=2, description="AX")
    write_series(tmp_path / "two" / "b", hu[::-1], affine, number=5, description="COR", seed=1)
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "image", "mask", "findings", "impression", "dicom_series"])
        writer.writerow(["mr", "mr", "mask.nii.gz", FINDINGS, IMPRESSION, ""])
        writer.writerow(["two", "two", "mask.nii.gz", FINDINGS, IMPRESSION, ""])
        writer.writerow(["picked", "two", "mask.nii.gz", FINDINGS, IMPRESSION, "2"])
        writer.writerow(["nifti", "ct.nii.gz", "mask.nii.gz", FINDINGS, IMPRESSION, ""])
    summary = run_preprocess(_config(manifest, tmp_path / "cache"))
    results = {r.study_id: r for r in summary.results}
    assert results["mr"].status == "failed"
    assert f"{tmp_path / 'mr'}: series" in results["mr"].reason
    assert "has modality MR, not CT" in results["mr"].reason
    assert results["two"].status == "failed" and "2 image series" in results["two"].reason
    assert "'AX'" in results["two"].reason and "'COR'" in results["two"].reason
    assert results["picked"].status == results["nifti"].status == "ok", summary.format()
    studies = tmp_path / "cache" / "studies"
    meta = json.loads((studies / "picked" / "meta.json").read_text())
    assert meta["geometry"]["dicom"]["series_number"] == "2"
    assert meta["geometry"]["dicom"]["other_series"] == 1
    assert meta["inputs"]["dicom_series"] == "2"
    assert np.array_equal(
        np.load(studies / "picked" / "image.npy"), np.load(studies / "nifti" / "image.npy")
    )


@pytest.mark.skipif(
    not (EXAMPLE / "example_ct_sm.nii.gz").is_file(),
    reason=f"real CT example not found in {EXAMPLE} (set FVLM_TOTALSEG_EXAMPLE)",
)
def test_real_ct_round_trip(tmp_path):
    reference = load_nifti(EXAMPLE / "example_ct_sm.nii.gz").volume
    write_series(tmp_path, reference.data, reference.affine, description="TotalSegmentator")
    volume = load_dicom(tmp_path).volume
    assert volume.data.shape == reference.data.shape == (122, 101, 30)
    assert np.array_equal(volume.data, reference.data)
    assert volume.spacing == pytest.approx(reference.spacing, abs=1e-5)
    assert np.abs(volume.affine - reference.affine).max() < 1e-4


def test_enhanced_multiframe_file(tmp_path):
    # one Enhanced CT file: positions and rescale in the functional groups, frames out of order
    hu, affine = _phantom((12, 10, 5)), np.diag([-0.8, 0.9, 2.0, 1.0])
    lps = LPS @ affine
    single = pydicom.dcmread(write_series(tmp_path / "classic", hu, affine)[0])
    order = [3, 0, 4, 1, 2]
    ds = FileDataset(None, {}, file_meta=single.file_meta, preamble=b"\0" * 128)
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns"):
        setattr(ds, keyword, getattr(single, keyword))
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation"):
        setattr(ds, keyword, getattr(single, keyword))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.EnhancedCTImageStorage, generate_uid()
    ds.NumberOfFrames = len(order)
    shared = pydicom.Dataset()
    shared.PlaneOrientationSequence = [pydicom.Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = single.ImageOrientationPatient
    shared.PixelMeasuresSequence = [pydicom.Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = single.PixelSpacing
    shared.PixelValueTransformationSequence = [pydicom.Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 2
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -2048
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = []
    for k in order:
        group = pydicom.Dataset()
        group.PlanePositionSequence = [pydicom.Dataset()]
        group.PlanePositionSequence[0].ImagePositionPatient = [
            _ds(v) for v in lps[:3, 3] + k * lps[:3, 2]
        ]
        ds.PerFrameFunctionalGroupsSequence.append(group)
    raw = ((hu + 2048) // 2).astype(np.uint16)  # the phantom's HU are odd or even: halve them
    ds.PixelData = b"".join(np.ascontiguousarray(raw[:, :, k].T).tobytes() for k in order)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    loaded = load_volume(tmp_path / "enhanced.dcm")
    assert loaded.geometry["dicom"]["slices"] == 5 and loaded.geometry["dicom"]["files"] == 1
    # i x j points to the feet here (LPS rows (1, 0, 0), columns (0, -1, 0)): frames go head first
    assert np.array_equal(loaded.volume.data, raw[:, :, ::-1].astype(np.int32) * 2 - 2048)
    flipped = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 4], [0, 0, 0, 1]])
    assert np.allclose(loaded.volume.affine, flipped, atol=1e-6)
