"""Particles and maps on disk: MRC volumes (``mrcfile``) and RELION STAR tables (``starfile``).

Volumes are ``[z, y, x]`` float32 arrays, as ``mrcfile`` returns them; the voxel
size is in Angstrom. Nothing here parses MRC or STAR by hand.

Pose convention at the file boundary
------------------------------------
Our model of particle i is ``X_i(r) = A_k(R^T (r - t))``: R a 3x3 matrix acting on
``(x, y, z)`` about the box centre voxel ``D//2``, t an ``(x, y, z)`` shift in
voxels. RELION stores the same pose as

- ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi``: ZYZ Euler angles whose
  matrix ``E = Rz(psi) Ry(tilt) Rz(rot)`` brings the reference into the particle
  frame, ``A(E r)``. Hence ``R = E^T`` =
  :func:`mlsubtomo.transform.matrix_from_euler` (the one place angles are
  converted).
- ``rlnOriginXAngst``, ``rlnOriginYAngst``, ``rlnOriginZAngst`` (o, Angstrom): the
  translation that *moves the particle onto the reference*: the particle
  translated by +o, ``X(r - o)``, is the reference rotated into the particle
  frame, ``A(E r)``. So ``X(r) = A(E (r + o))`` and, in voxels of size s,
  ``t = -o / s``, i.e. **o = -t s**, not +t s.

Sources for the origin sign (RELION 3.1 to 5):

- RELION documentation, Reference/Conventions ("Orientations"): the angles
  "rotate the reference into observations (i.e. particle image), while
  translations ... shift observations into the reference projection"; "Origin
  offsets ... translate the image to its center and are applied BEFORE
  rotations".
- ``src/ml_optimiser.cpp`` (``getFourierTransformsAndCtfs``): the particle is
  first translated by the stored offset, ``selfTranslate(img(), my_old_offset)``,
  and only then compared with the rotated reference; ``src/transformations.h``
  documents ``translate(V1, V2, v)`` as moving the content by +v ("Displacement
  of 2 pixels down: translate(vectorR3(0, 0, 2))").
- ``src/jaz/obs_model.cpp`` (``ObservationModel::predictObservation``): the
  predicted particle is the rotated projection shifted by ``s/2 - xoff``, i.e.
  placed at the box centre *minus* the origin (``shiftImageInFourierTransform``
  multiplies by ``exp(-2 pi i k.shift / N)``, a shift of the content by +shift).
- Consistent with downstream tools: the true particle position is
  ``rlnCoordinate - rlnOrigin/pixel size`` (re-centring scripts), and
  ASPIRE-Python issue #1146 ("offset [6, 10] will shift the particle 6 pixels in
  the negative x-direction").

Missing-wedge columns (our own, documented here)
------------------------------------------------
``mlsWedgeTiltMin``, ``mlsWedgeTiltMax`` (degrees) and optional ``mlsWedgeAxis``
(``y`` by default, or ``x``) describe a :class:`~mlsubtomo.masks.MissingWedge`
per particle. RELION ignores labels it does not know, so the STAR files stay
readable by it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

from .masks import MissingWedge
from .transform import euler_from_matrix, matrix_from_euler

__all__ = [
    "ANGLE_COLUMNS",
    "ORIGIN_COLUMNS",
    "WEDGE_COLUMNS",
    "ParticleSet",
    "atomic_write",
    "pose_from_relion",
    "read_particles",
    "relion_from_pose",
    "write_map",
    "write_maps",
    "write_particles",
    "write_simulated",
]

ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
# RELION <= 3.0 stored origins in pixels; read them, never write them.
_ORIGIN_PIXEL_COLUMNS = ("rlnOriginX", "rlnOriginY", "rlnOriginZ")
WEDGE_COLUMNS = ("mlsWedgeTiltMin", "mlsWedgeTiltMax", "mlsWedgeAxis")
# Where a voxel size may be found, best first. rlnImagePixelSize is the size of
# the extracted (possibly binned) subtomogram; the tilt-series pixel size is only
# the fallback of files that lack it.
_PIXEL_SIZE_COLUMNS = ("rlnImagePixelSize", "rlnTomoTiltSeriesPixelSize", "rlnPixelSize")
# Keys of DataFrame.attrs through which a table read here remembers where it came
# from, so that write_particles can protect the inputs and keep image paths valid.
_ATTR_STAR = "mlsubtomo_star"
_ATTR_DIRS = "mlsubtomo_image_dirs"
_ATTR_OPTICS = "mlsubtomo_optics"
# Relative tolerance within which two voxel sizes count as the same.
_VOXEL_RTOL = 1e-4
_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+)$")


# ---------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------


def relion_from_pose(rotations, shifts, voxel_size) -> pd.DataFrame:
    """RELION pose columns from our rotations and shifts.

    Parameters
    ----------
    rotations : array-like of shape (N, 3, 3) or (3, 3), or None
        R of ``X(r) = A(R^T (r - t))``. None: no angle columns.
    shifts : array-like of shape (N, 3) or (3,), or None
        t as ``(x, y, z)`` voxels. None: no origin columns.
    voxel_size : float
        Voxel size in Angstrom.

    Returns
    -------
    DataFrame
        ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` (degrees) and
        ``rlnOriginXAngst``, ``rlnOriginYAngst``, ``rlnOriginZAngst`` with
        ``origin = -t * voxel_size`` (see the module notes for the source).

    Examples
    --------
    >>> import numpy as np
    >>> relion_from_pose(np.eye(3)[None], [[1, 2, 3]], 2.0).iloc[0].tolist()
    [0.0, 0.0, 0.0, -2.0, -4.0, -6.0]
    """
    vs = _check_voxel_size(voxel_size)
    columns: dict = {}
    n = None
    if rotations is not None:
        rot = np.asarray(rotations, dtype=np.float64)
        if rot.shape == (3, 3):
            rot = rot[None]
        if rot.ndim != 3 or rot.shape[1:] != (3, 3):
            raise ValueError(f"rotations must have shape (N, 3, 3), got {rot.shape}")
        angles = euler_from_matrix(rot).reshape(-1, 3) + 0.0  # +0.0 turns -0.0 into 0.0
        columns.update(zip(ANGLE_COLUMNS, angles.T, strict=True))
        n = len(rot)
    if shifts is not None:
        t = np.asarray(shifts, dtype=np.float64)
        if t.shape == (3,):
            t = t[None]
        if t.ndim != 2 or t.shape[1] != 3:
            raise ValueError(f"shifts must have shape (N, 3), got {t.shape}")
        if n is not None and len(t) != n:
            raise ValueError(f"{n} rotations but {len(t)} shifts")
        # The origin moves the particle onto the reference: the opposite of t.
        origins = -t * vs + 0.0
        columns.update(zip(ORIGIN_COLUMNS, origins.T, strict=True))
    return pd.DataFrame(columns)


def pose_from_relion(df: pd.DataFrame, voxel_size):
    """Our rotations and shifts from the RELION pose columns of a particle table.

    Parameters
    ----------
    df : DataFrame
        Particle rows. Angles are read from ``rlnAngleRot/Tilt/Psi`` (a missing one
        counts as 0, as in RELION); origins from ``rlnOriginX/Y/ZAngst`` or, in
        RELION <= 3.0 files, ``rlnOriginX/Y/Z`` in pixels.
    voxel_size : float
        Voxel size in Angstrom, to convert the origins to voxels.

    Returns
    -------
    rotations : ndarray of shape (N, 3, 3) or None
        None if the table has no angle column.
    shifts : ndarray of shape (N, 3), float64, or None
        ``t = -origin / voxel_size`` in voxels (not rounded); None if the table
        has no origin column.

    Raises
    ------
    ValueError
        If a pose value is missing or not finite; the message names the column.
    """
    vs = _check_voxel_size(voxel_size)
    rotations = None
    if any(c in df.columns for c in ANGLE_COLUMNS):
        angles = _numeric_columns(df, ANGLE_COLUMNS)
        rotations = matrix_from_euler(angles).reshape(-1, 3, 3)
    shifts = None
    if any(c in df.columns for c in ORIGIN_COLUMNS):
        shifts = -_numeric_columns(df, ORIGIN_COLUMNS) / vs + 0.0
    elif any(c in df.columns for c in _ORIGIN_PIXEL_COLUMNS):
        shifts = -_numeric_columns(df, _ORIGIN_PIXEL_COLUMNS) + 0.0
    return rotations, shifts


def _numeric_columns(df: pd.DataFrame, names) -> np.ndarray:
    """The named columns as an (N, len(names)) float array; absent columns are 0."""
    out = np.zeros((len(df), len(names)))
    for j, name in enumerate(names):
        if name not in df.columns:
            continue
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"column {name} has a missing or non-numeric value at particle {row + 1}: "
                f"{df[name].iloc[row]!r}"
            )
        out[:, j] = values
    return out


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@dataclass
class ParticleSet:
    """Particles read from disk.

    Attributes
    ----------
    volumes : ndarray of shape (N, D, D, D), float32
        The subtomograms, indexed ``[z, y, x]``.
    voxel_size : float
        Voxel size in Angstrom.
    table : DataFrame
        The particle rows as read (for a STAR file its particle block), to be
        passed back to :func:`write_particles`. Its ``attrs`` remember the
        source, so the outputs never overwrite an input and relative image paths
        stay valid.
    masks : list of Mask or None
        Per-particle missing region from the ``mlsWedge*`` columns, None where
        the file does not say (pass one geometry to the estimator instead).
    names : list of str
        Image names, as in ``rlnImageName`` (``index@file`` for stack members).
    rotations : ndarray of shape (N, 3, 3) or None
        R of ``X(r) = A(R^T (r - t))`` from the angle columns; None if absent.
    shifts : ndarray of shape (N, 3) or None
        t in voxels, ``(x, y, z)``, float (not rounded); None if absent.
    source : Path or None
        The STAR file read, if any.
    files : list of Path
        The resolved image file of each particle.
    """

    volumes: np.ndarray
    voxel_size: float
    table: pd.DataFrame
    masks: list
    names: list
    rotations: np.ndarray | None = None
    shifts: np.ndarray | None = None
    source: Path | None = None
    files: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def euler_angles(self) -> np.ndarray | None:
        """Orientations as ZYZ (rot, tilt, psi) in degrees, RELION's convention, or None."""
        return None if self.rotations is None else euler_from_matrix(self.rotations)


def read_particles(source, *, voxel_size=None) -> ParticleSet:
    """Read subtomograms and their metadata.

    Parameters
    ----------
    source : path, glob pattern or list of paths
        A STAR file (``.star``: RELION 3.1 to 5 with ``data_optics`` and
        ``data_particles`` blocks, or a single block), a glob pattern such as
        ``"subtomos/*.mrc"`` (sorted), one MRC file, or a list of MRC files. An
        MRC file holding a volume stack contributes all its volumes.
    voxel_size : float, optional
        Voxel size in Angstrom, used when neither the STAR file (``rlnImagePixelSize``
        or ``rlnTomoTiltSeriesPixelSize`` of the particle's optics group) nor the
        MRC headers give one. A value that disagrees with the files gives a warning.

    Returns
    -------
    ParticleSet

    Raises
    ------
    FileNotFoundError
        If the STAR file or an image it names does not exist (the message names
        both), or a glob pattern matches nothing.
    ValueError
        If the STAR file lacks ``rlnImageName``, a path given as an MRC file is a
        folder, an MRC file is corrupt or truncated, a volume is not cubic or
        differs in size from the others, a particle holds NaN or infinite values,
        or the voxel size is unknown or ambiguous; the message names the file,
        column or particle.

    Notes
    -----
    In a STAR file, ``rlnImageName`` is a path to one MRC volume or
    ``index@stack.mrcs`` (1-based) into an MRC volume stack. Relative paths are
    looked up from the STAR file's folder first, then from the current directory
    (RELION's project-directory convention).
    """
    if isinstance(source, list | tuple):
        if not source:
            raise ValueError("read_particles needs at least one file, got an empty list")
        return _read_mrc_files([Path(p) for p in source], voxel_size)
    text = os.fspath(source)
    if text.lower().endswith(".star"):
        return _read_star(Path(text), voxel_size)
    if glob.has_magic(text):
        matches = sorted(glob.glob(text))
        if not matches:
            raise FileNotFoundError(f"no file matches the pattern {text!r}")
        return _read_mrc_files([Path(p) for p in matches], voxel_size)
    return _read_mrc_files([Path(text)], voxel_size)


def _read_star(path: Path, voxel_size) -> ParticleSet:
    if not path.is_file():
        raise FileNotFoundError(f"STAR file not found: {path}")
    arg_vs = None if voxel_size is None else _check_voxel_size(voxel_size)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed input
        raise ValueError(f"{path}: cannot parse STAR file: {exc}") from exc
    loops = {name: b for name, b in blocks.items() if isinstance(b, pd.DataFrame)}
    particles = _particle_block(loops, path)
    optics = loops.get("optics")
    table = particles.reset_index(drop=True)

    names = [str(v) for v in table["rlnImageName"]]
    dirs = [path.parent.resolve(), Path.cwd().resolve()]
    entries = []
    for i, name in enumerate(names):
        index, file = _split_image_name(name, f"particle {i + 1} of {path}")
        entries.append((index, _resolve(file, dirs, name, path), name))
    volumes, header_sizes = _load_volumes(entries, str(path))

    star_vs = _star_voxel_size(table, optics, path)
    vs = _choose_voxel_size(star_vs, header_sizes, arg_vs, str(path))
    rotations, shifts = pose_from_relion(table, vs)
    masks = _masks_from_table(table, path)

    table.attrs[_ATTR_STAR] = str(path.resolve())
    table.attrs[_ATTR_DIRS] = [str(d) for d in dirs]
    if optics is not None and len(optics) == 1:
        # One optics group: remember it, so the output keeps e.g. rlnVoltage.
        table.attrs[_ATTR_OPTICS] = {k: _plain(v) for k, v in optics.iloc[0].items()}
    return ParticleSet(
        volumes=volumes,
        voxel_size=vs,
        table=table,
        masks=masks,
        names=names,
        rotations=rotations,
        shifts=shifts,
        source=path,
        files=[e[1] for e in entries],
    )


def _particle_block(loops: dict, path: Path) -> pd.DataFrame:
    """The particle table: ``data_particles``, else the one block with rlnImageName."""
    if "particles" in loops:
        block = loops["particles"]
    else:
        with_names = [b for b in loops.values() if "rlnImageName" in b.columns]
        others = [b for n, b in loops.items() if n != "optics"]
        if with_names:
            block = with_names[0]
        elif len(others) == 1:
            block = others[0]
        else:
            raise ValueError(
                f"{path}: no particle table (a data_particles block or a block with an "
                f"rlnImageName column); blocks found: {sorted(loops) or 'none'}"
            )
    if "rlnImageName" not in block.columns:
        raise ValueError(
            f"{path}: the particle table has no rlnImageName column, so the subtomograms "
            "cannot be found (RELION 5 particles need 'Extract subtomos' first); columns: "
            f"{', '.join(map(str, block.columns))}"
        )
    if len(block) == 0:
        raise ValueError(f"{path}: the particle table is empty")
    return block


def _split_image_name(name: str, where: str) -> tuple[int | None, str]:
    """``"12@stack.mrcs"`` -> (12, "stack.mrcs"); a plain path -> (None, path)."""
    match = _IMAGE_NAME.match(name)
    if match is None:
        return None, name.strip()
    index = int(match.group(1))
    if index < 1:
        raise ValueError(f"{where}: image index must start at 1 (RELION), got {name!r}")
    return index, match.group(2).strip()


def _resolve(file: str, dirs: Sequence[Path], name: str, star: Path | None) -> Path:
    """The existing file a (possibly relative) image path refers to."""
    p = Path(file)
    candidates = [p] if p.is_absolute() else [d / p for d in dirs]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates)
    origin = f" (rlnImageName {name!r} in STAR file {star})" if star is not None else ""
    raise FileNotFoundError(f"image file {file} not found{origin}; looked for: {looked}")


def _read_mrc_files(paths: list[Path], voxel_size) -> ParticleSet:
    arg_vs = None if voxel_size is None else _check_voxel_size(voxel_size)
    entries = []
    for p in paths:
        if p.is_dir():
            raise ValueError(f"{p} is a folder, not an MRC file; pass a pattern like '{p}/*.mrc'")
        if not p.is_file():
            raise FileNotFoundError(f"MRC file not found: {p}")
        n = _stack_length(p)
        if n is None:
            entries.append((None, p.resolve(), str(p)))
        else:
            entries.extend((i, p.resolve(), f"{i}@{p}") for i in range(1, n + 1))
    volumes, header_sizes = _load_volumes(entries, "the MRC files")
    vs = _choose_voxel_size(None, header_sizes, arg_vs, "the MRC headers")
    names = [e[2] for e in entries]
    table = pd.DataFrame({"rlnImageName": names})
    table.attrs[_ATTR_DIRS] = [str(Path.cwd().resolve())]
    return ParticleSet(
        volumes=volumes,
        voxel_size=vs,
        table=table,
        masks=[None] * len(names),
        names=names,
        files=[e[1] for e in entries],
    )


def _open_mrc(path: Path):
    """Open an MRC file read-only (memory-mapped), or raise ValueError naming it.

    Permissive mode lets slightly non-conforming headers through (old software
    omits the map ID), with a warning; a file whose data block cannot be read
    (truncated, corrupt, unknown mode) is an error.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{path}: not a readable MRC file: {exc}") from exc
    problems = [str(w.message) for w in caught]
    if mrc.data is None:
        mrc.close()
        # The memory map only says that it failed; a plain read says why.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mrcfile.open(path, mode="r", permissive=True).close()
            except (ValueError, OSError, EOFError) as exc:
                problems.append(str(exc))
        problems += [str(w.message) for w in caught]
        detail = "; ".join(dict.fromkeys(problems)) or "no data"
        raise ValueError(f"{path}: corrupt or truncated MRC file ({detail})")
    if problems:
        warnings.warn(
            f"{path}: read permissively despite: {'; '.join(problems)}",
            UserWarning,
            stacklevel=3,
        )
    return mrc


def _stack_length(path: Path) -> int | None:
    """Number of volumes if the file is a volume stack, None for a single volume."""
    with _open_mrc(path) as mrc:
        return len(mrc.data) if mrc.data.ndim == 4 else None


def _load_volumes(entries, where: str):
    """Stack the volumes of ``entries`` = [(index or None, file, name)] into float32.

    Each file is opened once, however many particles it holds. Returns the
    volumes and, per file, the voxel size in its header (None if unset).
    """
    by_file: dict[Path, list[int]] = {}
    for i, (_, file, _) in enumerate(entries):
        by_file.setdefault(file, []).append(i)
    volumes = None
    box_file = None
    header_sizes: dict[Path, tuple | None] = {}
    for file, rows in by_file.items():
        with _open_mrc(file) as mrc:
            data = mrc.data
            header_sizes[file] = _header_voxel_size(mrc)
            if data.dtype.kind not in "fiu":
                raise ValueError(f"{file}: MRC mode {int(mrc.header.mode)} is not a real map")
            if data.ndim not in (3, 4):
                raise ValueError(
                    f"{file}: holds a {data.ndim}-D array of shape {data.shape}, not a 3-D "
                    "volume or a volume stack"
                )
            shape = data.shape[-3:]
            if not shape[0] == shape[1] == shape[2]:
                raise ValueError(f"{file}: volumes must be cubic, got shape {shape} (z, y, x)")
            if volumes is None:
                volumes = np.empty((len(entries), *shape), dtype=np.float32)
                box_file = file
            elif shape != volumes.shape[1:]:
                raise ValueError(
                    f"{file}: box size {shape[0]} differs from {volumes.shape[1]} in {box_file}; "
                    "all particles must share one box size"
                )
            for i in rows:
                index, _, name = entries[i]
                volumes[i] = _select_volume(data, index, file, name)
                if not np.all(np.isfinite(volumes[i])):
                    raise ValueError(
                        f"particle {i + 1} ({name}) in {where} contains NaN or infinite values"
                    )
    return volumes, header_sizes


def _select_volume(data, index, file: Path, name: str) -> np.ndarray:
    if data.ndim == 4:
        if index is None:
            raise ValueError(
                f"{file} holds a stack of {len(data)} volumes; name one as index@file "
                f"(1-based), got {name!r}"
            )
        if index > len(data):
            raise ValueError(f"{name}: index {index} beyond the {len(data)} volumes in {file}")
        return data[index - 1]
    if index not in (None, 1):
        raise ValueError(
            f"{name}: index {index} but {file} holds a single volume of shape {data.shape} "
            "(stacks of volumes must be 4-D MRC volume stacks, ispg 401)"
        )
    return data


def _header_voxel_size(mrc) -> tuple | None:
    vs = mrc.voxel_size
    sizes = (float(vs.x), float(vs.y), float(vs.z))
    return None if all(s == 0 for s in sizes) else sizes


def _star_voxel_size(table: pd.DataFrame, optics, path: Path) -> float | None:
    """The voxel size the STAR file gives its particles, or None."""
    values = None
    for column in _PIXEL_SIZE_COLUMNS:
        if column in table.columns:
            values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
            break
    if values is None and optics is not None:
        column = next((c for c in _PIXEL_SIZE_COLUMNS if c in optics.columns), None)
        if column is not None:
            sizes = pd.to_numeric(optics[column], errors="coerce").to_numpy(dtype=float)
            if "rlnOpticsGroup" in table.columns and "rlnOpticsGroup" in optics.columns:
                lookup = dict(zip(optics["rlnOpticsGroup"].tolist(), sizes, strict=True))
                groups = table["rlnOpticsGroup"].tolist()
                missing = sorted({g for g in groups if g not in lookup}, key=str)
                if missing:
                    raise ValueError(
                        f"{path}: optics group(s) {missing} used by particles are not in "
                        "data_optics"
                    )
                values = np.array([lookup[g] for g in groups], dtype=float)
            elif len(optics) == 1:
                values = np.full(len(table), sizes[0])
            else:
                raise ValueError(
                    f"{path}: {len(optics)} optics groups but the particles have no "
                    "rlnOpticsGroup column"
                )
    if values is None:
        return None
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{path}: the pixel size must be a positive number, got {values}")
    if np.any(np.abs(values - values[0]) > _VOXEL_RTOL * values[0]):
        raise ValueError(
            f"{path}: particles have different pixel sizes {sorted(set(values.tolist()))}; "
            "split the file by pixel size"
        )
    return float(values[0])


def _choose_voxel_size(star_vs, header_sizes: dict, arg_vs, where: str) -> float:
    """STAR file, else MRC headers, else the argument; warn if the argument disagrees."""
    vs = star_vs
    if vs is None:
        known = {f: s for f, s in header_sizes.items() if s is not None}
        first = None
        for file, sizes in known.items():
            if max(sizes) - min(sizes) > _VOXEL_RTOL * max(sizes):
                raise ValueError(f"{file}: anisotropic voxel size {sizes} is not supported")
            if first is None:
                first, vs = file, sizes[0]
            elif abs(sizes[0] - vs) > _VOXEL_RTOL * vs:
                raise ValueError(
                    f"voxel sizes differ between {first} ({vs:g} A) and {file} "
                    f"({sizes[0]:g} A); pass a STAR file with the pixel size"
                )
    if vs is None:
        if arg_vs is None:
            raise ValueError(
                f"no voxel size in {where}: pass voxel_size= (Angstrom) to read_particles"
            )
        return arg_vs
    if arg_vs is not None and abs(arg_vs - vs) > _VOXEL_RTOL * vs:
        warnings.warn(
            f"voxel_size={arg_vs:g} ignored: {where} gives {vs:g} A", UserWarning, stacklevel=3
        )
    return float(vs)


def _masks_from_table(table: pd.DataFrame, path: Path) -> list:
    """Per particle, the MissingWedge of the ``mlsWedge*`` columns, or None."""
    n = len(table)
    has_min, has_max = WEDGE_COLUMNS[0] in table.columns, WEDGE_COLUMNS[1] in table.columns
    if not (has_min or has_max):
        return [None] * n
    if not (has_min and has_max):
        missing = WEDGE_COLUMNS[1] if has_min else WEDGE_COLUMNS[0]
        raise ValueError(f"{path}: wedge columns incomplete, {missing} is missing")
    lows = pd.to_numeric(table[WEDGE_COLUMNS[0]], errors="coerce").to_numpy(dtype=float)
    highs = pd.to_numeric(table[WEDGE_COLUMNS[1]], errors="coerce").to_numpy(dtype=float)
    axes = table[WEDGE_COLUMNS[2]].astype(str) if WEDGE_COLUMNS[2] in table else ["y"] * n
    cache: dict = {}
    out = []
    for i, (lo, hi, axis) in enumerate(zip(lows, highs, axes, strict=True)):
        if np.isnan(lo) and np.isnan(hi):
            out.append(None)
            continue
        key = (float(lo), float(hi), str(axis).strip().lower())
        if key not in cache:
            try:
                cache[key] = MissingWedge(*key)
            except ValueError as exc:
                raise ValueError(
                    f"{path}: particle {i + 1}: invalid wedge columns: {exc}"
                ) from exc
        out.append(cache[key])
    return out


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def write_map(path, volume, voxel_size, overwrite=False, *, protect=()) -> Path:
    """Write one map (or a 4-D volume stack) as float32 MRC, atomically.

    Parameters
    ----------
    path : path
        Output file; its folder is created if needed.
    volume : array-like of shape (D, D, D) or (N, D, D, D)
        Indexed ``[z, y, x]``; written as mode 2 (float32). A 4-D array becomes an
        MRC volume stack, readable as ``index@path``.
    voxel_size : float
        Voxel size in Angstrom, stored in the header.
    overwrite : bool, default=False
        Replace an existing file.
    protect : iterable of paths, optional
        Files that must not be replaced (the inputs), even with ``overwrite``.

    Returns
    -------
    Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError
        If ``path`` is one of ``protect``, or the array or voxel size is invalid.

    Notes
    -----
    The map is written to a temporary file in the same folder and moved into
    place with ``os.replace``, so a reader never sees a half-written file and a
    crash leaves any previous file intact.
    """
    path = Path(path)
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4) or vol.dtype.kind not in "fiu":
        raise ValueError(
            f"volume must be a real 3-D map or 4-D stack, got {vol.dtype} {vol.shape}"
        )
    vs = _check_voxel_size(voxel_size)
    _check_output(path, overwrite, protect)
    data = np.ascontiguousarray(vol, dtype=np.float32)

    def write(tmp: Path) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)  # also sets the mode, dimensions and statistics
            # mrcfile averages in float32, and its own validator, which averages in
            # float64, then rejects maps of mean near zero (class averages are).
            mrc.header.dmean = np.float32(data.mean(dtype=np.float64))
            mrc.voxel_size = vs

    atomic_write(path, write)
    return path


def write_maps(folder, volumes, voxel_size, prefix="class", overwrite=False) -> list[Path]:
    """Write K maps as ``{prefix}_01.mrc``, ``{prefix}_02.mrc``, ... in ``folder``.

    Parameters
    ----------
    folder : path
        Created if needed.
    volumes : array-like of shape (K, D, D, D)
    voxel_size : float
        Voxel size in Angstrom.
    prefix : str, default="class"
    overwrite : bool, default=False
        Replace existing files; otherwise nothing is written if any exists.

    Returns
    -------
    list of Path
    """
    vols = np.asarray(volumes)
    if vols.ndim != 4:
        raise ValueError(f"volumes must have shape (K, D, D, D), got {vols.shape}")
    folder = Path(folder)
    width = max(2, len(str(len(vols))))
    paths = [folder / f"{prefix}_{k + 1:0{width}d}.mrc" for k in range(len(vols))]
    # Check every target first, so a refusal leaves no partial set behind.
    for p in paths:
        _check_output(p, overwrite, ())
    return [
        write_map(p, v, voxel_size, overwrite=overwrite) for p, v in zip(paths, vols, strict=True)
    ]


def write_particles(
    path,
    table,
    labels,
    rotations,
    shifts,
    voxel_size,
    log_likelihood=None,
    max_posterior=None,
    overwrite=False,
    *,
    protect=(),
    box_size=None,
) -> Path:
    """Write a RELION-style particle STAR file with the classification results.

    Parameters
    ----------
    path : path
        Output STAR file.
    table : DataFrame or None
        The input particle rows (e.g. :attr:`ParticleSet.table`); all their
        columns are kept. None writes only the result columns.
    labels : array-like of shape (N,)
        0-based classes, written as ``rlnClassNumber`` (1-based).
    rotations : array-like of shape (N, 3, 3) or None
        Written as ``rlnAngleRot/Tilt/Psi``.
    shifts : array-like of shape (N, 3) or None
        t in voxels, written as ``rlnOriginX/Y/ZAngst = -t * voxel_size``.
    voxel_size : float
        Angstrom; the ``rlnImagePixelSize`` of the single optics group written.
    log_likelihood : array-like of shape (N,), optional
        Written as ``rlnLogLikeliContribution``.
    max_posterior : array-like of shape (N,), optional
        Largest posterior probability per particle, as ``rlnMaxValueProbDistribution``.
    overwrite : bool, default=False
        Replace an existing output file (never an input).
    protect : iterable of paths, optional
        More input files that must not be overwritten. The STAR file and image
        files a table from :func:`read_particles` came from are always protected.
    box_size : int, optional
        Written as ``rlnImageSize`` (with ``rlnImageDimensionality`` 3).

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        If ``path`` is an input file ("output ... is an input file") or the
        arrays do not match the table.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.

    Notes
    -----
    Relative ``rlnImageName`` paths that would no longer resolve from the output
    file's folder (or the current directory) are rewritten relative to it.
    """
    path = Path(path)
    vs = _check_voxel_size(voxel_size)
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.all(np.equal(np.mod(labels, 1), 0))):
        raise ValueError(f"labels must be a 1-D array of integers, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be 0-based class indices (>= 0)")
    n = len(labels)
    if table is None:
        out = pd.DataFrame(index=range(n))
        attrs: dict = {}
    else:
        if len(table) != n:
            raise ValueError(f"table has {len(table)} rows but labels has {n}")
        attrs = dict(table.attrs)
        out = table.reset_index(drop=True).copy()
        out.attrs = {}
    _check_output(path, overwrite, list(protect) + _input_files(table, attrs))

    if "rlnImageName" in out.columns and attrs.get(_ATTR_DIRS):
        out["rlnImageName"] = _relocate_names(out["rlnImageName"], attrs[_ATTR_DIRS], path)
    out["rlnOpticsGroup"] = 1
    out["rlnClassNumber"] = labels.astype(np.int64) + 1
    pose = relion_from_pose(rotations, shifts, vs)
    if len(pose.columns) and len(pose) != n:
        raise ValueError(f"{len(pose)} poses for {n} particles")
    for column in pose.columns:
        out[column] = pose[column].to_numpy()
    for column, values in (
        ("rlnLogLikeliContribution", log_likelihood),
        ("rlnMaxValueProbDistribution", max_posterior),
    ):
        if values is not None:
            arr = np.asarray(values, dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"{column} values must have shape ({n},), got {arr.shape}")
            out[column] = arr

    optics = dict(attrs.get(_ATTR_OPTICS) or {})
    optics.update(
        rlnOpticsGroup=1,
        rlnOpticsGroupName=optics.get("rlnOpticsGroupName", "opticsGroup1"),
        rlnImagePixelSize=vs,
    )
    if box_size is not None:
        optics.update(rlnImageSize=int(box_size), rlnImageDimensionality=3)
    _write_star(path, {"optics": pd.DataFrame([optics]), "particles": out})
    return path


def write_simulated(folder, dataset, voxel_size=None, overwrite=False) -> Path:
    """Write a simulated data set as RELION-style particles with its ground truth.

    Writes ``folder/particles/particle_000001.mrc``, ... (one MRC volume per
    particle) and then ``folder/particles.star`` with an optics block and, per
    particle, ``rlnImageName``, the true ``rlnClassNumber`` (1-based), the true
    pose (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/Y/ZAngst`` in RELION's convention)
    and, when the missing region is a :class:`~mlsubtomo.masks.MissingWedge`, the
    ``mlsWedgeTiltMin``, ``mlsWedgeTiltMax``, ``mlsWedgeAxis`` columns.

    Parameters
    ----------
    folder : path
        Created if needed.
    dataset : SimulatedDataset
    voxel_size : float, optional
        Angstrom; default ``dataset.voxel_size``.
    overwrite : bool, default=False
        Replace existing files.

    Returns
    -------
    Path
        The STAR file; :func:`read_particles` reads it back.
    """
    folder = Path(folder)
    vs = _check_voxel_size(dataset.voxel_size if voxel_size is None else voxel_size)
    volumes = np.asarray(dataset.volumes)
    n, d = len(volumes), volumes.shape[-1]
    star = folder / "particles.star"
    _check_output(star, overwrite, ())
    width = max(6, len(str(n)))
    names = [f"particles/particle_{i + 1:0{width}d}.mrc" for i in range(n)]
    for name in names:
        _check_output(folder / name, overwrite, ())

    table = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})
    table["rlnClassNumber"] = np.asarray(dataset.labels, dtype=np.int64) + 1
    pose = relion_from_pose(dataset.rotations, dataset.shifts, vs)
    for column in pose.columns:
        table[column] = pose[column].to_numpy()
    for column, values in _wedge_columns(dataset.masks, n).items():
        table[column] = values

    for name, vol in zip(names, volumes, strict=True):
        write_map(folder / name, vol, vs, overwrite=overwrite)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [vs],
            "rlnImageSize": [d],
            "rlnImageDimensionality": [3],
        }
    )
    # The STAR file comes last: if it exists, every volume it names does too.
    _write_star(star, {"optics": optics, "particles": table})
    return star


def _wedge_columns(masks, n: int) -> dict:
    """``mlsWedge*`` columns for one MissingWedge or a list of them; {} otherwise."""
    if masks is None:
        return {}
    if isinstance(masks, np.ndarray):
        kinds = ["boolean array"]
    else:
        items = list(masks) if isinstance(masks, list | tuple) else [masks] * n
        if all(isinstance(m, MissingWedge) for m in items):
            return {
                WEDGE_COLUMNS[0]: [m.tilt_min for m in items],
                WEDGE_COLUMNS[1]: [m.tilt_max for m in items],
                WEDGE_COLUMNS[2]: [m.axis for m in items],
            }
        kinds = sorted({type(m).__name__ for m in items})
    warnings.warn(
        f"missing-data geometry {', '.join(kinds)} has no STAR representation (only "
        "MissingWedge has, as mlsWedge* columns); it is not written",
        UserWarning,
        stacklevel=3,
    )
    return {}


def _write_star(path: Path, blocks: dict) -> None:
    # Six decimals: 1e-6 degree and 1e-6 A are far below any meaningful precision.
    atomic_write(path, lambda tmp: starfile.write(blocks, tmp, float_format="%.6f"))


def atomic_write(path, content) -> Path:
    """Write ``path`` through a fresh file in its folder, then move it onto ``path``,
    so that a reader never sees a half-written file and an interrupted run leaves
    the old one whole.

    Parameters
    ----------
    path : str or Path
    content : str, bytes or callable
        The text or bytes to write, or ``content(tmp)``, which writes the file
        ``tmp`` itself (e.g. ``mrcfile.new`` or ``Figure.savefig``).

    Returns
    -------
    Path

    Notes
    -----
    The temporary name is unique and created by the writer itself (not
    ``mkstemp``), so the file gets the usual permissions under the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _check_output(path: Path, overwrite: bool, protect: Iterable) -> None:
    """Refuse to write onto an input file, or onto an existing file without ``overwrite``."""
    target = path.resolve()
    for p in protect:
        q = Path(p)
        same = q.resolve() == target
        if not same and q.exists() and target.exists():
            same = os.path.samefile(q, target)  # hard links, case-insensitive file systems
        if same:
            raise ValueError(f"output {path} is an input file ({p}); choose another path")
    if path.is_dir():
        raise FileExistsError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def _input_files(table, attrs: dict) -> list[Path]:
    """The STAR file and image files a table from read_particles was read from."""
    files: list[Path] = []
    if attrs.get(_ATTR_STAR):
        files.append(Path(attrs[_ATTR_STAR]))
    dirs = attrs.get(_ATTR_DIRS)
    if table is not None and dirs and "rlnImageName" in table.columns:
        for name in pd.unique(table["rlnImageName"].astype(str)):
            match = _IMAGE_NAME.match(name)
            file = match.group(2).strip() if match else name
            for d in [None] if Path(file).is_absolute() else dirs:
                c = Path(file) if d is None else Path(d) / file
                if c.exists():
                    files.append(c)
                    break
    return files


def _relocate_names(names: pd.Series, dirs: list, out: Path) -> list[str]:
    """Image names that still resolve from the output STAR file's folder or the cwd."""
    out_dir = out.parent.resolve()
    here = [out_dir, Path.cwd().resolve()]
    result = []
    for name in names.astype(str):
        match = _IMAGE_NAME.match(name)
        prefix, file = (f"{match.group(1)}@", match.group(2).strip()) if match else ("", name)
        p = Path(file)
        if p.is_absolute():
            result.append(name)
            continue
        source = next((Path(d) / p for d in dirs if (Path(d) / p).is_file()), None)
        if source is None or any(
            (h / p).is_file() and (h / p).resolve() == source.resolve() for h in here
        ):
            result.append(name)
        else:
            result.append(prefix + os.path.relpath(source.resolve(), out_dir))
    return result


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _check_voxel_size(voxel_size) -> float:
    ok = isinstance(voxel_size, Real | np.floating | np.integer) and not isinstance(
        voxel_size, bool
    )
    if not ok or not np.isfinite(voxel_size) or voxel_size <= 0:
        raise ValueError(f"voxel_size must be a positive number (Angstrom), got {voxel_size!r}")
    return float(voxel_size)


def _plain(value):
    """A numpy scalar as a plain Python value (DataFrame.attrs are deep-copied)."""
    return value.item() if isinstance(value, np.generic) else value
