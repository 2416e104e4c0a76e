"""Tests of mlsubtomo.io: MRC/STAR reading and writing and the RELION pose convention."""

import io as stdio
import os

import eulerangles
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from eulerangles.base import ConversionMeta
from scipy.spatial.transform import Rotation

from mlsubtomo.io import (
    ANGLE_COLUMNS,
    ORIGIN_COLUMNS,
    atomic_write,
    pose_from_relion,
    read_particles,
    relion_from_pose,
    write_map,
    write_maps,
    write_particles,
    write_simulated,
)
from mlsubtomo.masks import MissingCone, MissingWedge
from mlsubtomo.simulate import make_dataset
from mlsubtomo.transform import matrix_from_euler, rotate_volume, shift_volume

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _xmipp_rz(deg):
    """Xmipp/RELION's Rz: the passive rotation [[c, s, 0], [-s, c, 0], [0, 0, 1]]."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _xmipp_ry(deg):
    """Xmipp/RELION's Ry: [[c, 0, -s], [0, 1, 0], [s, 0, c]]."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _relion_matrix(rot, tilt, psi):
    """RELION's Euler_angles2matrix: E = Rz(psi) Ry(tilt) Rz(rot)."""
    return _xmipp_rz(psi) @ _xmipp_ry(tilt) @ _xmipp_rz(rot)


def _blobs(d=24, sigma=1.6):
    """An asymmetric phantom: three Gaussian blobs of different heights, (x, y, z) positions."""
    c = d // 2
    z, y, x = np.mgrid[0:d, 0:d, 0:d].astype(float) - c
    vol = np.zeros((d, d, d))
    for (bx, by, bz), amp in (((5, 0, 0), 1.0), ((0, -4, 1), 0.7), ((-1, 2, -6), 0.45)):
        vol += amp * np.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def _optics(pixel_size, groups=(1,)):
    return pd.DataFrame(
        {
            "rlnOpticsGroup": list(groups),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups],
            "rlnImagePixelSize": [pixel_size] * len(groups),
        }
    )


def _small_dataset(masks, n=5, d=8, voxel_size=7.3):
    rng = np.random.default_rng(1)
    refs = rng.standard_normal((2, d, d, d)).astype(np.float32)
    return make_dataset(
        refs, n, masks=masks, snr=1.0, max_shift=2, random_state=3, voxel_size=voxel_size
    )


# ---------------------------------------------------------------------------
# Pose convention
# ---------------------------------------------------------------------------


def test_hand_worked_relion_angles():
    # rot = 90: E = Rz(90) = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], R = E^T maps x -> y.
    r = matrix_from_euler([90.0, 0.0, 0.0])
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    # psi alone is the same rotation about z when tilt = 0.
    np.testing.assert_allclose(matrix_from_euler([0.0, 0.0, 90.0]), r, atol=1e-12)
    # tilt = 90: E = Ry(90) = [[0, 0, -1], [0, 1, 0], [1, 0, 0]], R = E^T maps x -> -z, z -> x.
    r = matrix_from_euler([0.0, 90.0, 0.0])
    np.testing.assert_allclose(r, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-12)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 0, -1], atol=1e-12)
    np.testing.assert_allclose(r @ [0, 0, 1], [1, 0, 0], atol=1e-12)
    # rot = 90, tilt = 90: E = Ry(90) Rz(90) = [[0, 0, -1], [-1, 0, 0], [0, 1, 0]].
    r = matrix_from_euler([90.0, 90.0, 0.0])
    np.testing.assert_allclose(r.T, [[0, 0, -1], [-1, 0, 0], [0, 1, 0]], atol=1e-12)
    # General angles: R is the transpose of RELION's Euler_angles2matrix.
    rng = np.random.default_rng(0)
    for rot, tilt, psi in rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3)):
        np.testing.assert_allclose(
            matrix_from_euler([rot, tilt, psi]), _relion_matrix(rot, tilt, psi).T, atol=1e-12
        )


def test_rot_90_moves_a_blob_from_x_to_y_in_the_volume():
    d, c = 16, 8
    vol = np.zeros((d, d, d), dtype=np.float32)
    vol[c, c, c + 4] = 1.0  # [z, y, x]: a voxel at x = +4
    out = rotate_volume(vol, matrix_from_euler([90.0, 0.0, 0.0]))
    assert out[c, c + 4, c] == pytest.approx(1.0)  # now at y = +4


def test_angles_agree_with_eulerangles_relion_convention():
    rng = np.random.default_rng(2)
    angles = rng.uniform([-180, 5, -180], [180, 175, 180], size=(50, 3))
    ours = matrix_from_euler(angles)
    meta = eulerangles.constants.euler_angle_metadata["relion"]
    assert (meta.axes, meta.intrinsic, meta.right_handed_rotation, meta.active) == (
        "zyz",
        True,
        True,
        False,
    )
    # eulerangles' matrix of RELION angles is ours, R ...
    theirs = eulerangles.euler2matrix(
        angles, axes="zyz", intrinsic=True, right_handed_rotation=True
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-10)
    # ... and since RELION's angles are passive, the active rotation they stand for is
    # its inverse, RELION's E = R^T (the documented transpose).
    active = ConversionMeta(
        name="active_zyz", axes="zyz", intrinsic=True, right_handed_rotation=True, active=True
    )
    converted = eulerangles.convert_eulers(angles, "relion", active)
    e = eulerangles.euler2matrix(converted, axes="zyz", intrinsic=True, right_handed_rotation=True)
    np.testing.assert_allclose(e, np.transpose(ours, (0, 2, 1)), atol=1e-10)
    np.testing.assert_allclose(e, np.stack([_relion_matrix(*a) for a in angles]), atol=1e-10)


def test_relion_pose_round_trip():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((40, 4))
    rotations = Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix()
    shifts = rng.uniform(-5, 5, size=(40, 3))
    df = relion_from_pose(rotations, shifts, 3.3)
    assert list(df.columns) == list(ANGLE_COLUMNS + ORIGIN_COLUMNS)
    r2, t2 = pose_from_relion(df, 3.3)
    np.testing.assert_allclose(r2, rotations, atol=1e-10)
    np.testing.assert_allclose(t2, shifts, atol=1e-12)


def test_origin_is_minus_shift_in_angstrom():
    # RELION's origin moves the particle onto the reference, the opposite of t.
    df = relion_from_pose(np.eye(3), [1, 2, -3], 2.0)
    assert df.loc[0, list(ORIGIN_COLUMNS)].tolist() == [-2.0, -4.0, 6.0]
    # RELION <= 3.0 origins in pixels are read too.
    _, t = pose_from_relion(pd.DataFrame({"rlnOriginX": [1.5], "rlnOriginY": [0.0]}), 2.0)
    np.testing.assert_array_equal(t, [[-1.5, 0.0, 0.0]])
    rot, t = pose_from_relion(pd.DataFrame({"rlnImageName": ["a.mrc"]}), 2.0)
    assert rot is None and t is None


def test_pose_from_relion_names_a_bad_column():
    df = pd.DataFrame({"rlnAngleRot": [1.0, np.nan], "rlnAngleTilt": [0.0, 0.0]})
    with pytest.raises(ValueError, match="rlnAngleRot.*particle 2"):
        pose_from_relion(df, 1.0)


def test_asymmetric_phantom_pose_end_to_end(tmp_path):
    """Rotate and shift a phantom, write the pose as RELION would, read it, undo it."""
    d, vs = 24, 4.5
    ref = _blobs(d)
    angles = [35.0, 70.0, -120.0]
    r = matrix_from_euler(angles)
    t = np.array([2, -3, 1])
    particle = shift_volume(rotate_volume(ref, r, order=3), t)
    write_map(tmp_path / "p.mrc", particle, vs)
    table = pd.concat(
        [
            pd.DataFrame({"rlnImageName": ["p.mrc"], "rlnOpticsGroup": [1]}),
            relion_from_pose(r[None], t[None], vs),
        ],
        axis=1,
    )
    starfile.write({"optics": _optics(vs), "particles": table}, tmp_path / "p.star")

    ps = read_particles(tmp_path / "p.star")
    r2, t2 = ps.rotations[0], ps.shifts[0]
    x = ps.volumes[0]
    recovered = rotate_volume(shift_volume(x, -np.rint(t2)), r2.T, order=3)
    assert _corr(recovered, ref) > 0.99
    # The test can fail: the wrong transpose or the wrong shift sign does not recover it.
    assert _corr(rotate_volume(shift_volume(x, -np.rint(t2)), r2, order=3), ref) < 0.5
    assert _corr(rotate_volume(shift_volume(x, np.rint(t2)), r2.T, order=3), ref) < 0.5

    # RELION's own reading of the file, built from its definitions only: translating
    # the particle by +origin (ml_optimiser: selfTranslate(img, old_offset)) gives the
    # reference rotated into the particle frame, A(E r), E = Rz(psi) Ry(tilt) Rz(rot).
    row = starfile.read(tmp_path / "p.star")["particles"].iloc[0]
    e = _relion_matrix(row.rlnAngleRot, row.rlnAngleTilt, row.rlnAnglePsi)
    origin_px = np.rint(
        [row.rlnOriginXAngst / vs, row.rlnOriginYAngst / vs, row.rlnOriginZAngst / vs]
    )
    centred = shift_volume(x, origin_px)
    a_of_e_r = rotate_volume(ref, e.T, order=3)  # (R V)(r) = V(R^T r) with R = E^T
    assert _corr(centred, a_of_e_r) > 0.99


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


def test_write_simulated_read_particles_round_trip(tmp_path):
    masks = [
        MissingWedge(-60, 60),
        MissingWedge(-45, 50, axis="x"),
        MissingWedge(-60, 60),
        MissingWedge(-30, 70),
        MissingWedge(-90, 90),
    ]
    data = _small_dataset(masks)
    star = write_simulated(tmp_path / "sim", data)
    assert star == tmp_path / "sim" / "particles.star"
    assert (tmp_path / "sim" / "particles" / "particle_000001.mrc").is_file()

    ps = read_particles(star)
    assert ps.volumes.dtype == np.float32
    np.testing.assert_array_equal(ps.volumes, data.volumes)
    assert ps.voxel_size == pytest.approx(7.3)
    np.testing.assert_allclose(ps.rotations, data.rotations, atol=1e-6)
    np.testing.assert_allclose(ps.shifts, data.shifts, atol=1e-6)
    assert ps.masks == masks
    assert ps.table["rlnClassNumber"].tolist() == (data.labels + 1).tolist()
    assert ps.names[0] == "particles/particle_000001.mrc"
    assert all(f.is_file() for f in ps.files)
    assert len(ps) == 5


def test_write_simulated_single_geometry_and_unrepresentable_masks(tmp_path):
    data = _small_dataset(MissingWedge(-50, 55), n=3)
    ps = read_particles(write_simulated(tmp_path / "a", data, voxel_size=2.0))
    assert ps.masks == [MissingWedge(-50, 55)] * 3
    assert ps.voxel_size == 2.0
    np.testing.assert_allclose(ps.shifts, data.shifts, atol=1e-6)

    data = _small_dataset(MissingCone(40), n=2)
    with pytest.warns(UserWarning, match="MissingCone"):
        star = write_simulated(tmp_path / "b", data)
    assert read_particles(star).masks == [None, None]


def test_write_particles_then_read_back_from_another_folder(tmp_path):
    data = _small_dataset(MissingWedge(-60, 60), n=4)
    ps = read_particles(write_simulated(tmp_path / "sim", data))
    labels = np.array([1, 0, 1, 1])
    rng = np.random.default_rng(5)
    ll, pmax = rng.normal(size=4) * 1e4, rng.uniform(size=4)
    out = write_particles(
        tmp_path / "run" / "particles.star",
        ps.table,
        labels,
        data.rotations,
        data.shifts,
        ps.voxel_size,
        log_likelihood=ll,
        max_posterior=pmax,
        box_size=8,
    )
    blocks = starfile.read(out, always_dict=True)
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"].tolist() == [pytest.approx(7.3)]
    assert optics["rlnImageSize"].tolist() == [8]
    assert particles["rlnClassNumber"].tolist() == [2, 1, 2, 2]
    np.testing.assert_allclose(particles["rlnLogLikeliContribution"], ll, atol=1e-6)
    np.testing.assert_allclose(particles["rlnMaxValueProbDistribution"], pmax, atol=1e-6)
    assert "mlsWedgeTiltMin" in particles.columns  # input columns kept

    back = read_particles(out)  # image paths rewritten to resolve from the new folder
    np.testing.assert_array_equal(back.volumes, data.volumes)
    np.testing.assert_allclose(back.rotations, data.rotations, atol=1e-6)
    np.testing.assert_allclose(back.shifts, data.shifts, atol=1e-6)
    assert back.masks == [MissingWedge(-60, 60)] * 4


def test_write_particles_overwrites_existing_pose_columns(tmp_path):
    data = _small_dataset(None, n=2)
    ps = read_particles(write_simulated(tmp_path / "sim", data))
    out = write_particles(
        tmp_path / "o.star", ps.table, [0, 0], np.stack([np.eye(3)] * 2), np.zeros((2, 3)), 7.3
    )
    p = starfile.read(out)["particles"]
    assert p[list(ANGLE_COLUMNS + ORIGIN_COLUMNS)].abs().to_numpy().max() == 0.0
    assert p["rlnClassNumber"].tolist() == [1, 1]


# ---------------------------------------------------------------------------
# STAR dialects, stacks, relative paths
# ---------------------------------------------------------------------------


def test_star_with_optics_and_stack_indices(tmp_path, monkeypatch):
    rng = np.random.default_rng(6)
    stack = rng.standard_normal((3, 6, 6, 6)).astype(np.float32)
    sub = tmp_path / "sub"
    write_map(sub / "stack.mrcs", stack, 1.0)  # header voxel size differs from the STAR
    particles = pd.DataFrame(
        {
            "rlnImageName": ["2@stack.mrcs", "000003@stack.mrcs", "1@stack.mrcs"],
            "rlnOpticsGroup": [2, 1, 2],
        }
    )
    optics = _optics(4.2, groups=(1, 2))
    starfile.write({"optics": optics, "particles": particles}, sub / "p.star")
    monkeypatch.chdir(tmp_path)  # paths must be resolved from the STAR file's folder

    ps = read_particles(sub / "p.star")
    np.testing.assert_array_equal(ps.volumes, stack[[1, 2, 0]])
    assert ps.voxel_size == pytest.approx(4.2)
    assert ps.rotations is None and ps.shifts is None
    assert ps.masks == [None, None, None]
    assert ps.names == ["2@stack.mrcs", "000003@stack.mrcs", "1@stack.mrcs"]


def test_star_paths_fall_back_to_the_current_directory(tmp_path, monkeypatch):
    vol = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    write_map(tmp_path / "data" / "x.mrc", vol, 3.0)
    (tmp_path / "a").mkdir()
    # A single data_ block (no optics): the voxel size comes from the MRC header.
    starfile.write(pd.DataFrame({"rlnImageName": ["data/x.mrc"]}), tmp_path / "a" / "p.star")
    monkeypatch.chdir(tmp_path)
    ps = read_particles("a/p.star")
    np.testing.assert_array_equal(ps.volumes[0], vol)
    assert ps.voxel_size == pytest.approx(3.0)


def test_relion5_general_block_and_tilt_series_pixel_size(tmp_path):
    write_map(tmp_path / "x.mrc", np.ones((4, 4, 4)), 1.0)
    blocks = {
        "general": {"rlnTomoSubTomosAre2DStacks": 0},
        "optics": pd.DataFrame({"rlnOpticsGroup": [1], "rlnTomoTiltSeriesPixelSize": [1.35]}),
        "particles": pd.DataFrame({"rlnImageName": ["x.mrc"], "rlnOpticsGroup": [1]}),
    }
    starfile.write(blocks, tmp_path / "p.star")
    ps = read_particles(tmp_path / "p.star")
    assert ps.voxel_size == pytest.approx(1.35)


def test_read_list_glob_and_stack_files(tmp_path):
    rng = np.random.default_rng(7)
    vols = rng.standard_normal((3, 6, 6, 6)).astype(np.float32)
    for i, v in enumerate(vols):
        write_map(tmp_path / f"v{i}.mrc", v, 2.5)
    ps = read_particles(str(tmp_path / "v*.mrc"))
    np.testing.assert_array_equal(ps.volumes, vols)
    assert ps.voxel_size == 2.5
    ps = read_particles([tmp_path / "v2.mrc", tmp_path / "v0.mrc"])
    np.testing.assert_array_equal(ps.volumes, vols[[2, 0]])
    write_map(tmp_path / "s.mrcs", vols, 2.5)
    ps = read_particles(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(ps.volumes, vols)
    assert ps.names[1].startswith("2@")


def test_voxel_size_argument_only_when_files_have_none(tmp_path):
    with mrcfile.new(tmp_path / "x.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4, 4), dtype=np.float32))  # voxel size 0: unset
    with pytest.raises(ValueError, match="voxel_size"):
        read_particles(tmp_path / "x.mrc")
    assert read_particles(tmp_path / "x.mrc", voxel_size=5.0).voxel_size == 5.0
    write_map(tmp_path / "y.mrc", np.zeros((4, 4, 4)), 2.0)
    with pytest.warns(UserWarning, match="ignored"):
        assert read_particles(tmp_path / "y.mrc", voxel_size=5.0).voxel_size == 2.0


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_missing_image_name_column(tmp_path):
    starfile.write(
        {"optics": _optics(1.0), "particles": pd.DataFrame({"rlnAngleRot": [0.0]})},
        tmp_path / "p.star",
    )
    with pytest.raises(ValueError, match="rlnImageName"):
        read_particles(tmp_path / "p.star")


def test_missing_star_and_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.star"):
        read_particles(tmp_path / "nope.star")
    starfile.write(
        {"optics": _optics(1.0), "particles": pd.DataFrame({"rlnImageName": ["nothere.mrc"]})},
        tmp_path / "p.star",
    )
    with pytest.raises(FileNotFoundError) as info:
        read_particles(tmp_path / "p.star")
    assert "nothere.mrc" in str(info.value)
    assert str(tmp_path / "p.star") in str(info.value)
    with pytest.raises(FileNotFoundError, match="matches"):
        read_particles(str(tmp_path / "*.mrc"))


def test_truncated_mrc_is_a_named_error(tmp_path):
    path = tmp_path / "cut.mrc"
    write_map(path, np.ones((8, 8, 8)), 1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 300])
    with pytest.raises(ValueError, match="cut.mrc.*truncated"):
        read_particles([path])
    starfile.write(pd.DataFrame({"rlnImageName": ["cut.mrc"]}), tmp_path / "p.star")
    with pytest.raises(ValueError, match="cut.mrc"):
        read_particles(tmp_path / "p.star")
    path.write_bytes(raw[:100])  # not even a header
    with pytest.raises(ValueError, match="cut.mrc"):
        read_particles([path])


def test_non_cubic_and_mismatched_boxes(tmp_path):
    with mrcfile.new(tmp_path / "flat.mrc") as mrc:
        mrc.set_data(np.zeros((6, 8, 8), dtype=np.float32))
        mrc.voxel_size = 1.0
    with pytest.raises(ValueError, match="flat.mrc.*cubic"):
        read_particles([tmp_path / "flat.mrc"])
    write_map(tmp_path / "a.mrc", np.zeros((8, 8, 8)), 1.0)
    write_map(tmp_path / "b.mrc", np.zeros((6, 6, 6)), 1.0)
    with pytest.raises(ValueError, match="b.mrc.*box size"):
        read_particles([tmp_path / "a.mrc", tmp_path / "b.mrc"])


def test_nan_particle_is_named(tmp_path):
    bad = np.zeros((4, 4, 4), dtype=np.float32)
    bad[1, 2, 3] = np.nan
    write_map(tmp_path / "a.mrc", np.zeros((4, 4, 4)), 1.0)
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's header statistics
        write_map(tmp_path / "b.mrc", bad, 1.0)
    starfile.write(pd.DataFrame({"rlnImageName": ["a.mrc", "b.mrc"]}), tmp_path / "p.star")
    with pytest.raises(ValueError, match=r"particle 2 \(b.mrc\).*NaN"):
        read_particles(tmp_path / "p.star")


def test_stack_index_out_of_range(tmp_path):
    write_map(tmp_path / "s.mrcs", np.zeros((2, 4, 4, 4)), 1.0)
    starfile.write(pd.DataFrame({"rlnImageName": ["3@s.mrcs"]}), tmp_path / "p.star")
    with pytest.raises(ValueError, match="index 3"):
        read_particles(tmp_path / "p.star")


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.mrc"
    write_map(path, np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(FileExistsError, match="m.mrc"):
        write_map(path, np.ones((4, 4, 4)), 1.0)
    write_map(path, np.ones((4, 4, 4)), 1.0, overwrite=True)
    with mrcfile.open(path) as mrc:
        assert mrc.data.max() == 1.0
    star = write_particles(tmp_path / "o.star", None, [0], None, None, 1.0)
    with pytest.raises(FileExistsError):
        write_particles(star, None, [1], None, None, 1.0)
    data = _small_dataset(None, n=2)
    write_simulated(tmp_path / "sim", data)
    with pytest.raises(FileExistsError):
        write_simulated(tmp_path / "sim", data)
    write_maps(tmp_path / "maps", np.zeros((2, 4, 4, 4)), 1.0)
    with pytest.raises(FileExistsError):
        write_maps(tmp_path / "maps", np.zeros((2, 4, 4, 4)), 1.0)


def test_never_writes_onto_an_input(tmp_path):
    data = _small_dataset(None, n=2)
    star = write_simulated(tmp_path / "sim", data)
    ps = read_particles(star)
    args = ([0, 1], data.rotations, data.shifts, ps.voxel_size)
    before = star.read_bytes()
    with pytest.raises(ValueError, match="output .* is an input file"):
        write_particles(star, ps.table, *args, overwrite=True)
    with pytest.raises(ValueError, match="is an input file"):  # an image named in the table
        write_particles(ps.files[0], ps.table, *args, overwrite=True)
    other = tmp_path / "other.star"
    other.write_text("x")
    with pytest.raises(ValueError, match="is an input file"):  # explicitly protected
        write_particles(other, None, *args, overwrite=True, protect=[other])
    with pytest.raises(ValueError, match="is an input file"):
        write_map(ps.files[1], np.zeros((8, 8, 8)), 1.0, overwrite=True, protect=ps.files)
    assert star.read_bytes() == before


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------


def test_a_map_of_mean_zero_is_valid(tmp_path):
    # Class averages have mean near zero, where a float32 mean (mrcfile's, for the
    # header) can differ from the float64 one of its validator by more than that
    # allows: here -7.5e-9 against 4.7e-9.
    z, y, x = np.meshgrid(*[np.arange(32) - 16] * 3, indexing="ij")
    vol = (3.0 * np.exp(-(x**2 + y**2 + z**2) / (2 * (41 / 6) ** 2))).astype(np.float32)
    vol -= np.float32(vol.mean(dtype=np.float64))
    path = write_map(tmp_path / "map.mrc", vol, 1.0)
    assert mrcfile.validate(path, print_file=stdio.StringIO()) is True


def test_write_map_is_valid_and_atomic(tmp_path):
    path = tmp_path / "out" / "map.mrc"
    vol = _blobs(12)
    assert write_map(path, vol, 3.25) == path
    assert mrcfile.validate(path, print_file=stdio.StringIO()) is True
    with mrcfile.open(path) as mrc:
        assert mrc.voxel_size.x == pytest.approx(3.25)
        assert mrc.voxel_size.z == pytest.approx(3.25)
        assert mrc.data.dtype == np.float32
        np.testing.assert_array_equal(mrc.data, vol)
    assert os.listdir(path.parent) == ["map.mrc"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "expected"),
    [("text", "text"), (b"bytes", "bytes"), (lambda tmp: tmp.write_text("made"), "made")],
)
def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path, content, expected):
    path = tmp_path / "out.txt"
    path.write_text("old")
    assert atomic_write(path, content) == path
    assert path.read_text() == expected
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_maps_names(tmp_path):
    vols = np.random.default_rng(8).standard_normal((3, 4, 4, 4))
    paths = write_maps(tmp_path / "avg", vols, 2.0)
    assert [p.name for p in paths] == ["class_01.mrc", "class_02.mrc", "class_03.mrc"]
    ps = read_particles(paths)
    np.testing.assert_allclose(ps.volumes, vols.astype(np.float32))
    assert write_maps(tmp_path / "x", vols[:1], 2.0, prefix="ref")[0].name == "ref_01.mrc"
