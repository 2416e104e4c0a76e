"""The ``mlsubtomo`` command."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

__all__ = ["main"]

# The STAR and MRC files fit writes into its output folder: those an input could be.
_FIT_OUTPUTS = re.compile(r"particles\.star|class_\d+\.mrc")


class UserError(Exception):
    """A mistake in the command line or its inputs: reported as one line, no traceback."""


def _prepare_output(path: Path, overwrite: bool, resume: bool = False) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"output path {path} is a file, not a folder")
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise UserError(
            f"output folder {path} exists and is not empty; use --overwrite (or --resume)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a parent is a file, or no permission
        raise UserError(f"cannot create output folder {path}: {exc.strerror}") from None
    return path


def _log_to_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("mlsubtomo")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _wedge(values):
    from .masks import MissingWedge

    return None if values is None else MissingWedge(values[0], values[1])


def _simulate(args) -> int:
    from .io import write_maps, write_simulated
    from .masks import MissingWedge
    from .simulate import groel_groes_phantom, groel_phantom, make_dataset

    out = _prepare_output(Path(args.out), args.overwrite)
    d = args.box
    voxel = 240.0 / d  # the particle (about 150 A) fills about 60% of the box
    phantoms = [groel_phantom(d, voxel, 2.5 * voxel), groel_groes_phantom(d, voxel, 2.5 * voxel)]
    phantoms = phantoms[: args.classes]
    wedge = MissingWedge(*args.wedge)
    data = make_dataset(
        phantoms, args.n_particles, masks=wedge, snr=args.snr, max_shift=args.max_shift,
        random_state=args.seed, voxel_size=voxel,
    )
    star = write_simulated(out, data, overwrite=args.overwrite)
    write_maps(out, data.references, voxel, prefix="truth_class", overwrite=args.overwrite)
    print(
        f"Wrote {len(data)} particles ({d}^3 voxels of {voxel:.2f} A, {len(phantoms)} classes, "
        f"SNR {args.snr:g}, {wedge!r}) to {star}, with the true maps as truth_class_*.mrc."
    )
    return 0


def _fit(args) -> int:
    from .estimator import MissingDataMLClassifier
    from .io import read_particles, write_maps, write_particles
    from .plots import write_report
    from .preprocessing import ParticleNormalizer
    from .regularization import LinearDecay

    source = args.particles[0] if len(args.particles) == 1 else args.particles
    particles = read_particles(source, voxel_size=args.voxel_size)
    out = Path(args.out)
    inputs = [Path(p).resolve() for p in ([particles.source] if particles.source else [])]
    inputs += [Path(f).resolve() for f in particles.files]
    if out.resolve() in inputs:
        raise UserError(f"output folder {out} is an input file")
    # write_particles refuses to replace an input too, but only after the whole fit.
    clashes = [
        p.name for p in inputs if p.parent == out.resolve() and _FIT_OUTPUTS.fullmatch(p.name)
    ]
    if clashes:
        raise UserError(
            f"output folder {out} holds input file {clashes[0]}, which fit would replace; "
            "choose another folder"
        )
    out = _prepare_output(out, args.overwrite, args.resume)
    if args.wedge is not None:
        masks = _wedge(args.wedge)
    elif particles.masks is not None and all(m is not None for m in particles.masks):
        masks = particles.masks
    elif args.full_data:
        masks = None
    else:
        raise UserError(
            "the particles carry no missing region: give --wedge MIN MAX (degrees) or --full-data"
        )
    X = particles.volumes
    if not args.no_normalize:
        X = ParticleNormalizer().fit_transform(X)
    handler = _log_to_file(out / "run.log")
    est = MissingDataMLClassifier(
        n_classes=args.classes,
        angular_step=args.angular_step,
        symmetry=args.symmetry,
        max_shift=args.max_shift,
        max_iter=args.iterations,
        regularization=LinearDecay(args.regularization, 5) if args.regularization > 0 else None,
        n_jobs=args.n_jobs,
        random_state=args.seed,
        verbose=1,
        checkpoint_path=out / "checkpoint.pkl",
        resume=args.resume,
    )
    try:
        # run.log is the record of the run: a warning such as a class collapse is
        # logged, so that it goes there as well as to the terminal.
        with warnings.catch_warnings(record=True) as caught:
            est.fit(X, masks=masks)
        for w in caught:
            logging.getLogger("mlsubtomo").warning(f"{w.category.__name__}: {w.message}")
    finally:
        logging.getLogger("mlsubtomo").removeHandler(handler)
        handler.close()
    write_maps(out, est.references_, particles.voxel_size, overwrite=True)
    star = write_particles(
        out / "particles.star", particles.table, est.labels_, est.rotations_, est.shifts_,
        particles.voxel_size, log_likelihood=est.particle_log_likelihood_,
        max_posterior=est.max_posterior_, overwrite=True,
    )
    try:
        write_report(est, out, X=X, masks=masks, voxel_size=particles.voxel_size)
    except ImportError:  # the plots need the 'plot' extra; the fit itself does not
        print("Install the 'plot' extra for convergence, class, orientation and FSC plots.")
    sizes = np.bincount(est.labels_, minlength=est.n_classes).tolist()
    print(
        f"{est.n_iter_} iterations, class sizes {sizes}, sigma {est.sigma_:.4g}; "
        f"wrote {star} and class_*.mrc to {out}/"
    )
    return 0


def _demo(args) -> int:
    from .estimator import MissingDataMLClassifier
    from .io import write_maps
    from .metrics import class_purity, classified_orientation_errors
    from .plots import plot_central_slices
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
    write_maps(out, est.references_, data.voxel_size, overwrite=args.overwrite)
    try:
        plot_central_slices(est.references_, out / "class_averages.png", truth=data.references)
        png = True
    except ImportError:
        png = False
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

    sim = sub.add_parser(
        "simulate",
        help="write a simulated data set (MRC + STAR with the ground truth)",
        description="Simulate GroEL-like (and GroEL-GroES-like) subtomograms with a missing "
        "wedge and write them as MRC volumes with a RELION-style particles.star holding "
        "the true classes and poses.",
    )
    sim.add_argument("--out", required=True, help="output folder")
    sim.add_argument("--overwrite", action="store_true")
    sim.add_argument("--n-particles", type=int, default=100)
    sim.add_argument("--classes", type=int, choices=(1, 2), default=2)
    sim.add_argument("--box", type=int, default=24, help="box size in voxels")
    sim.add_argument("--snr", type=float, default=0.5)
    sim.add_argument("--max-shift", type=int, default=2)
    sim.add_argument("--wedge", type=float, nargs=2, default=(-60.0, 60.0),
                     metavar=("MIN", "MAX"), help="tilt range about y in degrees")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=_simulate)

    fit = sub.add_parser(
        "fit",
        help="classify and align particles from a STAR file or MRC files",
        description="Maximum-likelihood classification and alignment. Writes class "
        "averages (class_*.mrc), particles.star with classes, RELION angles and origins, "
        "per-particle log-likelihood and maximum posterior, run.log and a checkpoint "
        "after every iteration.",
    )
    fit.add_argument("particles", nargs="+", help="a particles STAR file, or MRC files")
    fit.add_argument("--out", required=True, help="output folder")
    fit.add_argument("--classes", type=int, default=2)
    fit.add_argument("--angular-step", type=float, default=15.0, help="degrees")
    fit.add_argument("--iterations", type=int, default=25)
    fit.add_argument("--wedge", type=float, nargs=2, metavar=("MIN", "MAX"),
                     help="one tilt range about y for all particles (degrees)")
    fit.add_argument("--full-data", action="store_true", help="no missing region")
    fit.add_argument("--symmetry", default="C1", help="point group, e.g. C7 or D7")
    fit.add_argument("--max-shift", type=int, default=None, help="voxels")
    fit.add_argument("--regularization", type=float, default=5.0,
                     help="initial strength theta, decreasing to 0 in 5 iterations (0: none)")
    fit.add_argument("--voxel-size", type=float, default=None, help="Angstrom, if not in files")
    fit.add_argument("--no-normalize", action="store_true",
                     help="do not scale each particle to zero mean and unit variance")
    fit.add_argument("--n-jobs", type=int, default=-1)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    fit.add_argument("--overwrite", action="store_true")
    fit.set_defaults(func=_fit)
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
    except (UserError, ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"mlsubtomo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

