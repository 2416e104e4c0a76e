"""The ``mlsubtomo`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, no traceback."""


def _prepare_output(path: Path, overwrite: bool) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(f"output folder {path} exists and is not empty; use --overwrite")
        if not path.is_dir():
            raise UserError(f"output path {path} is a file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so no half file remains."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_map(path: Path, volume: np.ndarray, voxel_size: float) -> None:
    import mrcfile

    def write(tmp):
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.asarray(volume, dtype=np.float32))
            mrc.voxel_size = voxel_size

    _write_atomic(path, write)


def _write_slices_png(path: Path, references: np.ndarray, truth: np.ndarray | None) -> bool:
    """Central xy/xz/yz slices of each class average (and the truth); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [("class", r) for r in references]
    if truth is not None:
        rows += [("truth", t) for t in truth]
    c = references.shape[-1] // 2
    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
    for row, (name, vol) in enumerate(rows):
        for col, (title, image) in enumerate(
            (("xy", vol[c]), ("xz", vol[:, c, :]), ("yz", vol[:, :, c]))
        ):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {row % len(references) + 1} {title}", fontsize=8)
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


def _demo(args) -> int:
    from .estimator import MissingDataMLClassifier
    from .metrics import class_purity, classified_orientation_errors
    from .regularization import LinearDecay
    from .sampling import symmetry_group
    from .simulate import demo_dataset

    out = _prepare_output(Path(args.out), args.overwrite)
    start = time.perf_counter()
    data = demo_dataset(n_particles=args.n_particles, random_state=args.seed)
    n, d = data.volumes.shape[0], data.volumes.shape[-1]
    print(
        f"Simulated {n} particles ({d}^3 voxels, {len(data.references)} classes, "
        f"SNR {data.snr:g}, missing wedge {data.masks!r})."
    )
    est = MissingDataMLClassifier(
        n_classes=len(data.references),
        angular_step=args.angular_step,
        max_shift=data.max_shift,
        max_iter=args.iterations,
        regularization=LinearDecay(theta0=5.0, n_steps=5),
        n_jobs=args.n_jobs,
        random_state=args.seed,
        verbose=1,
    )
    est.fit(data.volumes, masks=data.masks)
    purity = class_purity(data.labels, est.labels_)
    # GroEL is D7-symmetric and GroEL-GroES C7: orientations count modulo those groups.
    groups = [symmetry_group(name).as_matrix() for name in ("D7", "C7")]
    errors = classified_orientation_errors(
        data.labels, est.labels_, data.rotations, est.rotations_, groups
    )
    median_error = float(np.median(errors)) if errors.size else float("nan")
    for k, ref in enumerate(est.references_):
        _write_map(out / f"class_{k + 1:02d}.mrc", ref, data.voxel_size)
    png = _write_slices_png(out / "class_averages.png", est.references_, data.references)
    print(f"Class purity against the truth: {purity:.3f}")
    print(f"Median orientation error (correctly classified): {median_error:.1f} degrees")
    print(f"Class weights: {np.round(est.class_weights_, 3).tolist()}, sigma {est.sigma_:.4g}")
    written = sorted(p.name for p in out.iterdir())
    print(f"Wrote {', '.join(written)} to {out}/" + ("" if png else
          " (install the 'plot' extra for class_averages.png)"))
    print(f"Finished in {time.perf_counter() - start:.0f} s.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsubtomo",
        description="Maximum-likelihood alignment and classification of subtomograms.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="classify a built-in simulated data set (GroEL vs GroEL-GroES)",
        description="Simulate GroEL-like and GroEL-GroES-like subtomograms with a missing "
        "wedge, classify them with K = 2, and report the purity against the truth.",
    )
    demo.add_argument("--out", default="mlsubtomo-demo", help="output folder")
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output")
    demo.add_argument("--n-particles", type=int, default=200)
    demo.add_argument("--iterations", type=int, default=12)
    demo.add_argument("--angular-step", type=float, default=30.0)
    demo.add_argument("--n-jobs", type=int, default=-1, help="parallel workers (-1: all cores)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"mlsubtomo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

