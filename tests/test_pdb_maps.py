"""Tests of mlsubtomo.simulate.density_from_pdb (maps from atomic models) and lowpass."""

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from mlsubtomo.metrics import fsc, fsc_resolution
from mlsubtomo.simulate import density_from_pdb, groel_phantom, lowpass
from mlsubtomo.transform import rotate_volume

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "groel_pdb"
SIGMA_PER_RESOLUTION = np.sqrt(np.log(2.0) / 2.0) / np.pi  # Gaussian std / resolution

needs_data = pytest.mark.skipif(
    not (DATA / "1oel.pdb.gz").is_file(), reason=f"GroEL models not found in {DATA}"
)

_CACHE: dict = {}


def _gemmi():
    return pytest.importorskip("gemmi")


def _map(name, box=24, voxel=10.0, resolution=25.0, **kwargs):
    key = (name, box, voxel, resolution, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        _CACHE[key] = density_from_pdb(DATA / name, voxel, box, resolution, **kwargs)
    return _CACHE[key]


def _write_pdb(path, atoms):
    """A minimal PDB file: atoms as (element, x, y, z) in Angstrom, one residue each."""
    lines = []
    for i, (element, x, y, z) in enumerate(atoms, start=1):
        name = f" {element:<3s}"
        lines.append(
            f"ATOM  {i:5d} {name} ALA A{i:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
            f"{1.0:6.2f}{20.0:6.2f}          {element:>2s}"
        )
    lines.append("END")
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        Path(path).write_text(text)
    return path


def _centre_of_mass(volume):
    grid = np.indices(volume.shape).astype(np.float64)
    return np.array([(volume * g).sum() / volume.sum() for g in grid])  # (z, y, x)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rotz(volume, degrees):
    matrix = Rotation.from_rotvec([0.0, 0.0, np.radians(degrees)]).as_matrix()
    return rotate_volume(volume, matrix, order=3)


# ---------------------------------------------------------------------------
# lowpass
# ---------------------------------------------------------------------------


def test_lowpass_transfer_is_one_half_at_resolution():
    d, voxel, resolution = 32, 2.0, 8.0  # 1 / resolution is Fourier pixel 8
    rng = np.random.default_rng(0)
    v = rng.standard_normal((d, d, d))
    w = lowpass(v, voxel, resolution)
    ratio = np.fft.rfftn(w) / np.fft.rfftn(v)
    assert np.allclose(ratio.imag, 0.0, atol=1e-10)
    assert ratio[0, 0, 8].real == pytest.approx(0.5)
    assert ratio[8, 0, 0].real == pytest.approx(0.5)
    assert ratio[0, 0, 0].real == pytest.approx(1.0)
    assert ratio[0, 0, 16].real == pytest.approx(2.0**-4)


def test_lowpass_matches_the_phantom_gaussian():
    """A point filtered by lowpass is the Gaussian the phantoms are convolved with."""
    d, voxel, resolution = 48, 1.0, 8.0
    point = np.zeros((d, d, d))
    point[d // 2, d // 2, d // 2] = 1.0
    w = lowpass(point, voxel, resolution)
    s = SIGMA_PER_RESOLUTION * resolution
    r = (np.arange(d) - d // 2) * voxel
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    g = np.exp(-(x**2 + y**2 + z**2) / (2 * s**2)) / (2 * np.pi * s**2) ** 1.5
    assert np.abs(w - g).max() < 1e-3 * g.max()


def test_lowpass_dtype_stack_and_errors():
    v = np.random.default_rng(1).standard_normal((2, 8, 8, 8)).astype(np.float32)
    w = lowpass(v, 1.0, 4.0)
    assert w.dtype == np.float32 and w.shape == v.shape
    assert np.allclose(w[1], lowpass(v[1], 1.0, 4.0))
    with pytest.raises(ValueError, match="cubic"):
        lowpass(np.zeros((8, 8, 9)), 1.0, 4.0)
    with pytest.raises(ValueError, match="resolution"):
        lowpass(np.zeros((8, 8, 8)), 1.0, 0.0)


# ---------------------------------------------------------------------------
# Synthetic models: axes, centre, accuracy, errors
# ---------------------------------------------------------------------------


def test_axis_convention_and_centre(tmp_path):
    """An atom at (x, y, z) A from the centre of mass lies at [c + z/v, c + y/v, c + x/v]."""
    _gemmi()
    # Equal masses: the centre of mass is (20, 30, -10); offsets are whole voxels.
    atoms = [("C", 60.0, 0.0, 0.0), ("C", 0.0, 90.0, 0.0), ("C", 0.0, 0.0, -30.0)]
    path = _write_pdb(tmp_path / "three.pdb", atoms)
    d, v = 24, 10.0
    c = d // 2
    m = density_from_pdb(path, v, d, resolution=20.0)
    assert m.shape == (d, d, d) and m.dtype == np.float32
    expected = [(c + 1, c - 3, c + 4), (c + 1, c + 6, c - 2), (c - 2, c - 3, c - 2)]
    for z, y, x in expected:
        assert m[z, y, x] == pytest.approx(1.0, abs=1e-3)  # the three equal peaks
        neighbourhood = m[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2]
        assert m[z, y, x] == neighbourhood.max()
    assert np.allclose(_centre_of_mass(m), c, atol=1e-3)
    # A rigid translation of the model changes nothing (the map is centred).
    moved = [(e, x + 101.3, y - 57.9, z + 12.6) for e, x, y, z in atoms]
    path2 = _write_pdb(tmp_path / "moved.pdb.gz", moved)
    assert np.allclose(density_from_pdb(path2, v, d, resolution=20.0), m, atol=1e-5)


def test_single_atom_on_the_x_axis(tmp_path):
    """Two atoms of equal mass 2a apart along x sit at [c, c, c -+ a/v]."""
    _gemmi()
    path = _write_pdb(tmp_path / "pair.pdb", [("O", -7.0, 3.0, 5.0), ("O", 43.0, 3.0, 5.0)])
    d, v, c = 16, 5.0, 8
    m = density_from_pdb(path, v, d, resolution=10.0)
    peaks = np.argwhere(m > 0.9)
    assert {tuple(p) for p in peaks} == {(c, c, c - 5), (c, c, c + 5)}


def test_density_is_sampled_gaussian_of_atomic_numbers(tmp_path):
    """Unnormalised, the map is sum_j Z_j N(r; r_j, s^2) at the voxel centres (electrons/A^3)."""
    _gemmi()
    atoms = [("C", 1.3, -2.2, 0.7), ("N", 9.1, 4.4, -6.3), ("S", -8.0, -1.1, 7.9)]
    path = _write_pdb(tmp_path / "mix.pdb", atoms)
    z_numbers = np.array([6.0, 7.0, 16.0])
    xyz = np.array([a[1:] for a in atoms])
    xyz -= z_numbers @ xyz / z_numbers.sum()
    for d, v, resolution in [(24, 2.0, 4.0), (24, 2.0, 5.0), (24, 2.0, 8.0), (20, 3.0, 20.0)]:
        m = density_from_pdb(path, v, d, resolution, normalize=False)
        s = SIGMA_PER_RESOLUTION * resolution
        r = (np.arange(d) - d // 2) * v
        gz, gy, gx = np.meshgrid(r, r, r, indexing="ij")
        ref = np.zeros((d, d, d))
        for zn, (x, y, z) in zip(z_numbers, xyz, strict=True):
            q = (gx - x) ** 2 + (gy - y) ** 2 + (gz - z) ** 2
            ref += zn * np.exp(-q / (2 * s**2)) / (2 * np.pi * s**2) ** 1.5
        assert _rel(m, ref) < 0.005, (d, v, resolution, _rel(m, ref))
        assert m.sum() == pytest.approx(ref.sum(), rel=5e-3)


def test_errors(tmp_path):
    _gemmi()
    path = _write_pdb(tmp_path / "far.pdb", [("C", -60.0, 0.0, 0.0), ("C", 60.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="box_size=12"):
        density_from_pdb(path, 10.0, 12, 25.0)  # radius 60 A > 5 voxels * 10 A
    density_from_pdb(path, 10.0, 14, 25.0)  # 6 voxels of room: fits
    with pytest.raises(ValueError, match="Nyquist"):
        density_from_pdb(path, 10.0, 14, 15.0)
    with pytest.raises(ValueError, match="assembly"):
        density_from_pdb(path, 10.0, 14, 25.0, assembly="first")  # no REMARK 350
    with pytest.raises(FileNotFoundError):
        density_from_pdb(tmp_path / "missing.pdb", 10.0, 14, 25.0)


def test_missing_gemmi_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_gemmi(name, *args, **kwargs):
        if name == "gemmi":
            raise ImportError("No module named 'gemmi'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gemmi)
    with pytest.raises(ImportError, match=r"mlsubtomo\[sim\]"):
        density_from_pdb(tmp_path / "x.pdb", 10.0, 16, 25.0)


# ---------------------------------------------------------------------------
# GroEL (1OEL) and GroEL-GroES (1AON)
# ---------------------------------------------------------------------------


@needs_data
def test_1oel_assembly_is_the_tetradecamer():
    gemmi = _gemmi()
    st = gemmi.read_structure(str(DATA / "1oel.pdb.gz"))
    st.remove_hydrogens()
    st.remove_waters()
    model = gemmi.make_assembly(st.assemblies[0], st[0], gemmi.HowToNameCopiedChain.AddNumber)
    assert len(model) == 14
    assert model.count_atom_sites() == 53858
    ring = _map("1oel.pdb.gz")
    double = _map("1oel.pdb.gz", assembly="first")
    assert _rel(ring, double) > 0.3
    # Unnormalised, the mass doubles with the second ring.
    m1 = _map("1oel.pdb.gz", normalize=False)
    m2 = _map("1oel.pdb.gz", assembly="first", normalize=False)
    assert m2.sum() == pytest.approx(2 * m1.sum(), rel=1e-3)


@needs_data
@pytest.mark.parametrize("align", [False, True])
def test_1oel_centre_of_mass_at_box_centre(align):
    _gemmi()
    m = _map("1oel.pdb.gz", assembly="first", align_principal_axes=align)
    assert m.shape == (24, 24, 24) and m.max() == pytest.approx(1.0)
    assert np.all(np.abs(_centre_of_mass(m) - 12) < 0.5)


@needs_data
def test_1oel_d7_symmetry_after_principal_axis_alignment():
    """The tetradecamer is close to D7 about z with the crystallographic two-fold about x.

    The two-fold (a BIOMT operator) is exact. The seven-fold is not crystallographic
    (subunit-to-subunit rotations in 1OEL range from 50.9 to 52.4 degrees) and the
    unique inertia axis of this nearly isotropic particle (covariance eigenvalues
    about 1240, 1242 and 1562 A^2) sits about 1.2 degrees off the best seven-fold
    axis, so a C7 step changes the map by 9-13 % here, against about 58 % for a
    rotation by half a step. The GroEL-GroES complex, which is elongated, aligns
    better (next test).
    """
    _gemmi()
    m = _map("1oel.pdb.gz", assembly="first", align_principal_axes=True)
    two_fold = m[::-1, ::-1, :]  # (x, y, z) -> (x, -y, -z) about voxel 12 ...
    two_fold = np.roll(two_fold, 1, axis=(0, 1))  # ... index i -> 24 - i, i.e. 2c - i
    assert _rel(two_fold, m) < 1e-5
    steps = [_rel(_rotz(m, 360.0 * k / 7), m) for k in range(1, 4)]
    half_step = _rel(_rotz(m, 180.0 / 7), m)
    assert max(steps) < 0.15, steps
    assert steps[0] < 0.10, steps
    assert half_step > 0.4
    unaligned = _map("1oel.pdb.gz", assembly="first")
    assert max(_rel(_rotz(unaligned, 360.0 * k / 7), unaligned) for k in (1, 2, 3)) > max(steps)
    # The phantom was designed after this particle: same size and shape at 25 A.
    phantom = groel_phantom(24, 10.0, 25.0)
    assert np.corrcoef(phantom.ravel(), m.ravel())[0, 1] > 0.8


@needs_data
def test_1aon_groes_cap_on_plus_z_and_differs_from_groel():
    _gemmi()
    d = 32
    with pytest.raises(ValueError, match="box_size=24"):
        density_from_pdb(DATA / "1aon.pdb.gz", 10.0, 24, 25.0)  # radius 115 A > 110 A
    complex_ = _map("1aon.pdb.gz", box=d, align_principal_axes=True)
    groel = _map("1oel.pdb.gz", box=d, assembly="first", align_principal_axes=True)
    assert np.all(np.abs(_centre_of_mass(complex_) - d // 2) < 0.5)
    assert _rel(complex_, groel) > 0.3
    assert np.corrcoef(complex_.ravel(), groel.ravel())[0, 1] < 0.9
    # C7 about z: well aligned (the complex is elongated), half a step is not symmetric.
    steps = [_rel(_rotz(complex_, 360.0 * k / 7), complex_) for k in range(1, 4)]
    assert max(steps) < 0.10, steps
    assert _rel(_rotz(complex_, 180.0 / 7), complex_) > 0.4
    # The cap makes the complex reach further along +z than along -z, and skews its
    # mass towards +z; GroEL alone is symmetric under z -> -z (up to the two-fold).
    c = d // 2

    def reach(volume):
        profile = volume.sum(axis=(1, 2)) / volume.sum()
        occupied = np.flatnonzero(profile > 0.005)
        return occupied.max() - c, c - occupied.min()

    def skew(volume):
        z = np.arange(d) - c
        return float((volume.sum(axis=(1, 2)) * z**3).sum() / volume.sum())

    up, down = reach(complex_)
    assert up >= down + 2, (up, down)
    assert skew(complex_) > 10.0
    assert abs(skew(groel)) < 0.05 * skew(complex_)
    up, down = reach(groel)
    assert abs(up - down) <= 1


@needs_data
def test_1oel_ring_agrees_with_imp_map():
    """Our map of one 1OEL ring against IMP's independent simulation (in PDB coordinates).

    IMP's "10 A" map matches our Gaussian at about 16 A (conventions for the
    resolution of a Gaussian differ). Resampling IMP's map onto our grid, placed
    at the centre of mass of the atoms, checks the axes and the centring: a shift
    by one voxel or an axis permutation correlates less.
    """
    gemmi = _gemmi()
    mrcfile = pytest.importorskip("mrcfile")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # IMP writes no machine stamp
        with mrcfile.open(DATA / "1oel_ring_10A_imp.mrc.gz", permissive=True) as f:
            imp = f.data.astype(np.float64)
            origin = np.array([f.header.origin.x, f.header.origin.y, f.header.origin.z])
            imp_voxel = float(f.voxel_size.x)
    st = gemmi.read_structure(str(DATA / "1oel.pdb.gz"))
    st.remove_hydrogens()
    st.remove_waters()
    st.remove_alternative_conformations()
    xyz = np.array([a.pos.tolist() for ch in st[0] for r in ch for a in r])
    weights = np.array([a.element.atomic_number for ch in st[0] for r in ch for a in r])
    com = weights @ xyz / weights.sum()

    d, v = 128, 1.5
    ours = density_from_pdb(DATA / "1oel.pdb.gz", v, d, 16.0)
    r = (np.arange(d) - d // 2) * v
    z, y, x = np.meshgrid(r + com[2], r + com[1], r + com[0], indexing="ij")
    coords = np.stack([(z - origin[2]), (y - origin[1]), (x - origin[0])]) / imp_voxel
    theirs = map_coordinates(imp, coords, order=1, cval=0.0)
    assert theirs.sum() == pytest.approx(imp.sum(), rel=1e-3)  # all of it is in our box

    def corr(a):
        return np.corrcoef(theirs.ravel(), a.ravel())[0, 1]

    best = corr(ours)
    assert best > 0.999
    for axis in range(3):
        for step in (-1, 1):
            assert corr(np.roll(ours, step, axis=axis)) < best
    assert corr(ours.transpose(2, 1, 0)) < 0.5
    assert corr(ours[:, :, ::-1]) < 0.9
    freq, curve = fsc(theirs, ours, v)
    assert fsc_resolution(freq, curve, 0.5) < 10.0
