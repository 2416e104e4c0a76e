"""Speed and scale of the E-step, measured side by side in one run.

Usage::

    python benchmarks/speed.py [--out benchmarks/results] [--parts floor scaling memory]
    python benchmarks/speed.py --quick      # a small check of the script, not a result

Parts:

floor
    The paper's setting (N = 200, K = 2, D = 32, 15 degrees: R = 3108, shifts up to 3
    voxels, +-60 degree wedge, SNR 0.05): the best batched inverse FFT of a 32^3 box
    on one core (pyFFTW, batch 64, best of 20), the FFT floor N K R t, and an
    exhaustive EM iteration of MissingDataMLClassifier with n_jobs = 1 and 2 (times
    from the estimator's per-iteration log line; the fastest of three fits of each,
    taken in turn). Ratios: iteration / floor (one core) and n_jobs = 1 / n_jobs = 2.
scaling
    The fastest of three iterations while one of N, K, R (explicit orientation sets)
    and D varies around N = 400, K = 2, R = 300, D = 24, shifts up to 2, n_jobs = 1;
    for each, the
    time ratio between the largest and smallest size against the size ratio, and for
    N a fit t = a + b N (the per-orientation work, rotating references and rotating
    sums back, does not grow with N).
memory
    N = 2000, D = 64, K = 4, 20 degrees (R = 1372), shifts up to 3, default
    memory_budget, n_jobs = 2, in a child process whose peak resident memory
    (VmHWM) is read while it runs. Every particle chunk of an E-step has the same
    size, so the peak is reached in the first chunk; the child is stopped once its
    progress bar shows the first chunk done, or at the time limit (then the table
    says how far it got).
gpu
    The floor's setting with ``device="gpu"`` against the CPU kernel (n_jobs = 2):
    iteration times, their ratio, and whether the two fits agree. Only where CuPy
    finds a CUDA device; not among the default parts.

modes
    The whole paper run (40 iterations, regularisation 5 -> 0 in 5 iterations,
    n_jobs = all cores) at SNR 0.01 and 0.05, exhaustive and with the accelerated
    options, on the same data:
    run time, purity and median orientation error (up to the phantoms' D7 / C7
    symmetry and one global rotation per class). Modes: ``exhaustive``,
    ``accelerated`` (all three options), ``accelerated_fourier`` (the same with
    ``reference_rotation="fourier"``), ``accelerated_pruned`` (that with
    ``pruning_threshold=1e-4``, which also narrows where local refinement looks),
    and each option alone (``cropped``:
    ``min_box_size=16``, ``coarse``: ``coarse_step=30``, ``local``:
    ``local_refinement=20``). ``--seeds`` repeats each run with other
    ``random_state`` (random initial references and grid perturbations) on the same
    data: a single run's error depends on its trajectory, so modes are compared by
    the mean over seeds of their difference from the exhaustive run of the same seed.

Results go to ``<out>/speed.json`` and ``<out>/speed.md``; parts run separately
are merged into the JSON already there.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyfftw

from mlsubtomo import LinearDecay, MissingDataMLClassifier, MissingWedge
from mlsubtomo.io import atomic_write
from mlsubtomo.kernel import chunk_plan
from mlsubtomo.metrics import class_purity, classified_orientation_errors
from mlsubtomo.sampling import so3_grid, symmetry_group
from mlsubtomo.simulate import groel_groes_phantom, groel_phantom, make_dataset

RESULTS = Path(__file__).resolve().parent / "results"
WEDGE = MissingWedge(-60, 60)
_ITERATION = re.compile(r"^iteration (\d+):.* ([0-9.]+) s$")


class _IterationTimes(logging.Handler):
    """Collects the seconds of each line the estimator logs per iteration."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds = []

    def emit(self, record):
        match = _ITERATION.match(record.getMessage())
        if match:
            self.seconds.append(float(match.group(2)))


def iteration_seconds(estimator, volumes, iterations=1) -> float:
    """Seconds of the fastest of the first EM ``iterations`` of ``estimator`` on ``volumes``.

    The fastest rather than the mean: this machine's speed drifts by 20-40% from one
    minute to the next (seen with identical settings), and drift only slows.
    """
    logger = logging.getLogger("mlsubtomo")
    handler = _IterationTimes()
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        estimator.set_params(max_iter=iterations, tol=0).fit(volumes, masks=WEDGE)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return min(handler.seconds)


def best_inverse_fft(d: int, repeats: int = 20) -> float:
    """Best seconds per volume of a batched complex-to-real FFTW transform, one thread.

    The bare FFTW execution (no copy, no scaling), the best over batches of 1, 8 and
    64 volumes and the MEASURE and PATIENT planners: the strictest floor.
    """
    best = np.inf
    for flag in ("FFTW_MEASURE", "FFTW_PATIENT"):
        for batch in (1, 8, 64):
            spectra = pyfftw.empty_aligned((batch, d, d, d // 2 + 1), dtype=np.complex64)
            volumes = pyfftw.empty_aligned((batch, d, d, d), dtype=np.float32)
            plan = pyfftw.FFTW(spectra, volumes, axes=(-3, -2, -1), direction="FFTW_BACKWARD",
                               flags=(flag,), threads=1)
            spectra[...] = np.random.default_rng(0).normal(size=spectra.shape)
            for _ in range(repeats):
                start = time.perf_counter()
                plan.execute()
                best = min(best, (time.perf_counter() - start) / batch)
    return best


def _warm_up(k, d, step, shift, jobs):
    """Build the FFT plans of an iteration's shapes, so the timed iteration has them."""
    data = make_dataset(_phantoms(d, k), 8, masks=WEDGE, snr=0.05, random_state=9)
    rotations = so3_grid(step).as_matrix()[:40]
    MissingDataMLClassifier(
        k, rotations=rotations, max_shift=shift, max_iter=1, n_jobs=jobs, random_state=0
    ).fit(data.volumes, masks=WEDGE)


def _phantoms(d: int, k: int):
    voxel = 256.0 / d
    maps = [groel_phantom(d, voxel, 2.5 * voxel), groel_groes_phantom(d, voxel, 2.5 * voxel)]
    return [maps[i % 2] if i < 2 else np.roll(maps[i % 2], i, axis=0) for i in range(k)]


def _single_core_iteration(volumes, k, step, shift, barrier, queue):
    """One process's n_jobs = 1 iteration, started with the other's (``barrier``)."""
    _warm_up(k, volumes.shape[-1], step, shift, 1)
    barrier.wait()
    est = MissingDataMLClassifier(k, angular_step=step, max_shift=shift, n_jobs=1,
                                  random_state=0)
    queue.put(iteration_seconds(est, volumes))


def _side_by_side(volumes, k, step, shift) -> float:
    """Seconds until two separate processes have each run the n_jobs = 1 iteration at
    the same time: what the two cores deliver with nothing shared between the jobs."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_single_core_iteration,
                        args=(volumes, k, step, shift, barrier, queue))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    seconds = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    return max(seconds)


def _floor_problem(quick: bool):
    """N, K, D, angular step, largest shift and the particles of the floor's setting."""
    n, k, d, step, shift = (40, 2, 16, 30.0, 1) if quick else (200, 2, 32, 15.0, 3)
    data = make_dataset(_phantoms(d, k), n, masks=WEDGE, snr=0.05, max_shift=shift,
                        random_state=0)
    return n, k, d, step, shift, data


def part_floor(quick: bool) -> dict:
    n, k, d, step, shift, data = _floor_problem(quick)
    rotations = len(so3_grid(step))
    t_fft = best_inverse_fft(d)
    floor = n * k * rotations * t_fft
    for jobs in (1, 2):
        _warm_up(k, d, step, shift, jobs)
    # Alternated and repeated: the machine's speed drifts over minutes, and a
    # speed-up taken from one slow and one fast minute says little.
    times = {1: np.inf, 2: np.inf, "pair": np.inf}
    for _ in range(1 if quick else 3):
        for jobs in (1, 2):
            est = MissingDataMLClassifier(
                k, angular_step=step, max_shift=shift, n_jobs=jobs, random_state=0
            )
            times[jobs] = min(times[jobs], iteration_seconds(est, data.volumes))
        times["pair"] = min(times["pair"], _side_by_side(data.volumes, k, step, shift))
    return {
        "setting": {"N": n, "K": k, "D": d, "angular_step": step, "R": rotations,
                    "max_shift": shift, "snr": 0.05},
        "inverse_fft_seconds": t_fft,
        "floor_seconds": floor,
        "iteration_seconds_n_jobs_1": times[1],
        "iteration_seconds_n_jobs_2": times[2],
        "ratio_to_floor_n_jobs_1": times[1] / floor,
        "ratio_to_floor_n_jobs_2_per_core": 2 * times[2] / floor,
        "speedup_n_jobs_2": times[1] / times[2],
        "side_by_side_seconds": times["pair"],
        "side_by_side_speedup": 2 * times[1] / times["pair"],
    }


def part_gpu(quick: bool) -> dict:
    """The floor's setting on the GPU against the CPU (n_jobs = 2), side by side."""
    from mlsubtomo import gpu

    try:
        gpu.cuda_array_module()
    except (ImportError, RuntimeError) as error:
        return {"skipped": str(error)}
    n, k, d, step, shift, data = _floor_problem(quick)
    fits, times = {}, {"cpu": np.inf, "gpu": np.inf}
    for _ in range(1 if quick else 3):
        for device in ("cpu", "gpu"):
            est = MissingDataMLClassifier(k, angular_step=step, max_shift=shift, n_jobs=2,
                                          random_state=0, device=device)
            times[device] = min(times[device], iteration_seconds(est, data.volumes, 2))
            fits[device] = est
    scale = float(np.abs(fits["cpu"].references_).max())
    return {
        "setting": {"N": n, "K": k, "D": d, "angular_step": step,
                    "R": len(so3_grid(step)), "max_shift": shift, "snr": 0.05},
        "iteration_seconds_cpu_n_jobs_2": times["cpu"],
        "iteration_seconds_gpu": times["gpu"],
        "speedup_gpu": times["cpu"] / times["gpu"],
        "labels_equal": bool(np.array_equal(fits["cpu"].labels_, fits["gpu"].labels_)),
        "max_reference_difference": float(
            np.abs(fits["cpu"].references_ - fits["gpu"].references_).max()) / scale,
    }


def part_scaling(quick: bool) -> dict:
    # N from 400: a real data set's size, where the work per particle dominates the
    # fixed work per (class, orientation); the affine fit separates the two.
    base = {"N": 400, "K": 2, "R": 300, "D": 24}
    sizes = {"N": [400, 800, 1600], "K": [1, 2, 4], "R": [150, 300, 600], "D": [16, 24, 32]}
    if quick:
        base = {"N": 20, "K": 2, "R": 40, "D": 12}
        sizes = {"N": [10, 20], "K": [1, 2], "R": [20, 40], "D": [12, 16]}
    grid = so3_grid(10.0).as_matrix()
    pick = np.random.default_rng(1).permutation(len(grid))
    out = {}
    for name, values in sizes.items():
        rows = []
        for value in values:
            p = dict(base, **{name: value})
            data = make_dataset(_phantoms(p["D"], p["K"]), p["N"], masks=WEDGE, snr=0.05,
                                max_shift=2, random_state=0)
            _warm_up(p["K"], p["D"], 10.0, 2, 1)
            est = MissingDataMLClassifier(
                p["K"], rotations=grid[pick[: p["R"]]], max_shift=2, n_jobs=1, random_state=0
            )
            rows.append({"size": value, "seconds": iteration_seconds(est, data.volumes, 3)})
        small, large = rows[0], rows[-1]
        size_ratio = large["size"] / small["size"]
        time_ratio = large["seconds"] / small["seconds"]
        entry = {"rows": rows, "size_ratio": size_ratio, "time_ratio": time_ratio,
                 "time_ratio_over_size_ratio": time_ratio / size_ratio}
        if name in ("N", "K", "R"):
            # Separates the work shared across the sizes from the work per unit.
            b, a = np.polyfit([r["size"] for r in rows], [r["seconds"] for r in rows], 1)
            entry["affine_fit"] = {"seconds_fixed": a, "seconds_per_unit": b}
        if name == "D":
            # The work per pair grows as D^3 (rotations) to D^3 log D (FFTs).
            entry["size_ratio_cubed"] = size_ratio**3
        out[name] = entry
    return out


# (a) cropping, (b) coarse-to-fine orientations, (c) local search after convergence.
SINGLE_MODES = {
    "cropped": {"min_box_size": 16},
    "coarse": {"coarse_step": 30.0},
    "local": {"local_refinement": 20.0},
}
ACCELERATED = {k: v for options in SINGLE_MODES.values() for k, v in options.items()}
MODES = {
    "exhaustive": {}, "accelerated": ACCELERATED,
    "accelerated_fourier": {**ACCELERATED, "reference_rotation": "fourier"},
    "accelerated_pruned": {
        **ACCELERATED, "reference_rotation": "fourier", "pruning_threshold": 1e-4,
    },
    **SINGLE_MODES,
}


def _modes_data(quick: bool, snr: float, roll: int = 0):
    """The modes part's particles at this SNR (the same for every mode).

    With ``roll`` the phantoms are rolled and the seed kept: the same labels and poses
    (a stored draw order), each particle now drawn from class (label + roll) mod K.
    """
    n, d, _, shift, _ = _modes_setting(quick)
    return make_dataset(np.roll(_phantoms(d, 2), -roll, axis=0), n, masks=WEDGE, snr=snr,
                        max_shift=shift, random_state=1)


def known_pose_purity(quick: bool, data) -> dict:
    """Purity when every particle's orientation and shift are known: each goes to the
    class whose clean phantom, at that pose and behind the same wedge, lies nearest
    (what an ML run with the true references and one noise level for all classes
    would choose). A method that must find the poses is not expected to do better.
    """
    x = data.volumes.astype(np.float64)
    distances = []
    n_classes = 2
    for k in range(n_classes):
        clean = _modes_data(quick, np.inf, roll=k)
        if not np.array_equal(clean.rotations, data.rotations):
            raise RuntimeError("make_dataset no longer draws poses independently of "
                               "the references")
        distances.append(np.sum((x - clean.volumes) ** 2, axis=(1, 2, 3)))
    labels = (data.labels + np.argmin(distances, axis=0)) % n_classes
    return {"purity": class_purity(data.labels, labels),
            "misclassified": np.flatnonzero(labels != data.labels).tolist()}


def modes_estimator(mode: str, seed: int, quick: bool, n_jobs: int = -1):
    """The unfitted estimator of a modes run."""
    _, _, step, shift, iters = _modes_setting(quick)
    extra = dict(MODES[mode])
    if quick and "min_box_size" in extra:
        extra["min_box_size"] = 8
    return MissingDataMLClassifier(
        2, angular_step=step, max_shift=shift, max_iter=iters, n_jobs=n_jobs,
        regularization=LinearDecay(5.0, 5), random_state=seed, **extra,
    )


def _modes_setting(quick: bool):
    """N, D, angular step, largest shift and iterations of the modes part."""
    return (40, 16, 45.0, 1, 6) if quick else (200, 32, 15.0, 3, 40)


def _poses_path(out: Path, row: dict) -> Path:
    """Where a modes run saves its labels and orientations (seed 0: the older name)."""
    seed = row.get("seed", 0)
    suffix = f"_seed{seed}" if seed else ""
    return out / f"modes_{row['mode']}_snr{row['snr']}{suffix}.npz"


def _accuracy(row: dict, data, step: float, out: Path) -> dict:
    """Purity, orientation errors and their floor on the grid, from the run's saved poses.

    The median error on a grid depends on how each class's recovered frame sits
    against it (metrics.orientation_errors), so runs are compared by how far their
    error lies above that floor.
    """
    path = _poses_path(out, row)
    if not path.exists():
        return {}
    poses = np.load(path)
    groups = [symmetry_group("D7").as_matrix(), symmetry_group("C7").as_matrix()]
    errors, floor = classified_orientation_errors(
        data.labels, poses["labels"], data.rotations, poses["rotations"], groups,
        so3_grid(step),
    )
    return {
        "purity": class_purity(data.labels, poses["labels"]),
        "median_orientation_error_deg": float(np.median(errors)),
        "median_error_floor_deg": float(np.median(floor)),
        "fraction_at_floor": float(np.mean(errors <= floor + 1e-6)),
    }


def _save_poses(est, path: Path) -> None:
    # Through a file object: given a name not ending in .npz, numpy would add it.
    with open(path, "wb") as f:
        np.savez_compressed(f, labels=est.labels_, rotations=est.rotations_)


def _commit() -> str:
    """The checkout's commit, with '+' when tracked files other than the results
    differ from it ('?' outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":!benchmarks/results"], cwd=root, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty.strip() else "")


def _run_key(row: dict) -> tuple:
    return row["snr"], row["mode"], row.get("seed", 0)


def part_modes(quick: bool, save, out: Path, modes=("accelerated", "exhaustive"), n_jobs=-1,
               previous=(), seeds=(0,), snrs=(0.05, 0.01), commit="?") -> dict:
    """Whole runs of each mode, SNR and seed; the other rows in ``previous`` are kept.

    Each run's labels and orientations go to ``<out>/modes_<mode>_snr<snr>[_seed<s>].npz``;
    every row's accuracy is measured from those files.
    """
    n, d, step, shift, iters = _modes_setting(quick)
    # The estimator's line per iteration shows how far an hour-long run has got.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runs = {(snr, mode, seed) for snr in snrs for mode in modes for seed in seeds}
    rows = [r for r in previous if _run_key(r) not in runs]
    setting = {"N": n, "K": 2, "D": d, "angular_step": step, "max_shift": shift,
               "max_iter": iters}
    for snr in snrs:
        data = _modes_data(quick, snr)
        for mode, seed in ((m, s) for m in modes for s in seeds):
            est = modes_estimator(mode, seed, quick, n_jobs)
            extra = {key: est.get_params()[key] for key in MODES[mode]}
            handler = _IterationTimes()
            logging.getLogger("mlsubtomo").addHandler(handler)
            start = time.perf_counter()
            try:
                est.fit(data.volumes, masks=WEDGE)
            finally:
                logging.getLogger("mlsubtomo").removeHandler(handler)
            seconds = time.perf_counter() - start
            row = {"snr": snr, "mode": mode, "seed": seed}
            atomic_write(_poses_path(out, row), functools.partial(_save_poses, est))
            rows.append({
                **row, "options": extra, "seconds": seconds,
                "n_jobs": n_jobs, "date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit,
                "load_end": [round(x, 2) for x in os.getloadavg()],
                "iterations": est.n_iter_, "iteration_seconds": handler.seconds,
                "box_sizes": est.box_size_history_,
                "refinement_start": est.refinement_start_,
                # Of the final assignment (pruned searches: a lower bound of the full one).
                "final_log_likelihood": est.lower_bound_,
            })
            rows[-1].update(_accuracy(rows[-1], data, step, out))
            print(json.dumps(rows[-1]), flush=True)
            # An hour's work: keep what is done.
            save({"setting": setting, "rows": rows, "complete": False})
        # Rows kept from earlier runs are measured again from their saved poses.
        for row in rows:
            if row["snr"] == snr and _run_key(row) not in runs:
                row.update(_accuracy(row, data, step, out))
    known = {str(snr): known_pose_purity(quick, _modes_data(quick, snr))
             for snr in sorted({r["snr"] for r in rows} | set(snrs))}
    return {"setting": setting, "rows": rows, "known_pose": known, "complete": True}


_MEMORY_CHILD = r"""
import sys
import numpy as np
from mlsubtomo import MissingDataMLClassifier, MissingWedge
n, d, k, step = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
X = np.random.default_rng(0).standard_normal((n, d, d, d), dtype=np.float32)
est = MissingDataMLClassifier(k, angular_step=step, max_shift=3, max_iter=1, n_jobs=2,
                              random_state=0, verbose=1)
est.fit(X, masks=MissingWedge(-60, 60))
"""


def part_memory(quick: bool, limit: float) -> dict:
    n, d, k, step = (200, 16, 2, 45.0) if quick else (2000, 64, 4, 20.0)
    rotations = len(so3_grid(step))
    budget = MissingDataMLClassifier().memory_budget
    chunk, keep, share = chunk_plan(n, k, rotations, 7**3, d, budget * 2**30)
    first_chunk = chunk / n
    with tempfile.TemporaryDirectory() as tmp:
        err_path = Path(tmp) / "stderr"
        with open(err_path, "w") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", _MEMORY_CHILD, str(n), str(d), str(k), str(step)],
                stdout=subprocess.DEVNULL, stderr=err,
            )
            start = time.perf_counter()
            peak, done = 0, 0.0
            while child.poll() is None:
                peak = max(peak, _vm_hwm(child.pid))
                done = max(done, _progress(err_path))
                if done >= first_chunk or time.perf_counter() - start > limit:
                    break
                time.sleep(0.5)
            peak = max(peak, _vm_hwm(child.pid))
            seconds = time.perf_counter() - start
            finished = child.poll() is not None
            child.kill()
            child.wait()
    return {
        "setting": {"N": n, "D": d, "K": k, "angular_step": step, "R": rotations,
                    "max_shift": 3, "memory_budget_GiB": budget},
        "chunk_size": chunk,
        "scores_kept": keep,
        "transforms_shared": share,
        "peak_GB": peak / 1e9,
        "fraction_of_first_E_step_done": done,
        "first_chunk_fraction": first_chunk,
        "seconds_watched": seconds,
        "child_finished": finished,
        "input_GB": n * d**3 * 4 / 1e9,
    }


def _vm_hwm(pid: int) -> int:
    """Peak resident bytes of a running process (Linux /proc), 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def _progress(err_path: Path) -> float:
    """Largest fraction the child's E-step progress bar has shown so far."""
    text = err_path.read_text(errors="ignore")
    found = re.findall(r"E-step:\s+\d+%\|[^|]*\|\s*([0-9.]+)/(\d+)", text)
    return max((float(a) / float(b) for a, b in found), default=0.0)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.json"
    if path.exists():
        merged = json.loads(path.read_text())
        merged.update(results)
        results = merged
    atomic_write(path, json.dumps(results, indent=2))
    atomic_write(out / "speed.md", markdown(results))


def _previous_rows(out: Path) -> list:
    path = out / "speed.json"
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("modes", {}).get("rows", [])


def _when(part: dict) -> str:
    load = part.get("load", {})
    return (f"Measured {part.get('date', '?')} at commit {part.get('commit', '?')}; load "
            f"average {load.get('start')} at the start, {load.get('end')} at the end.")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Speed and scale of the E-step",
        "",
        f"{m['cpus']} CPU(s), {m['processor']}, Python {m['python']}. The numbers of "
        "each section come from one run of that part, all of them measured side by "
        "side in it; the load average (1, 5, 15 min) at its start and end is given.",
        "",
    ]
    f = results.get("floor")
    if f:
        s = f["setting"]
        lines += [
            "## Exhaustive iteration against the FFT floor",
            "",
            _when(f),
            "",
            f"N = {s['N']}, K = {s['K']}, D = {s['D']}, {s['angular_step']} degrees "
            f"(R = {s['R']}), shifts up to {s['max_shift']} voxels, +-60 wedge, "
            f"SNR {s['snr']}.",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| best batched inverse FFT (bare FFTW c2r), one core | "
            f"{f['inverse_fft_seconds'] * 1e6:.1f} us |",
            f"| FFT floor N K R t | {f['floor_seconds']:.1f} s |",
            f"| iteration, n_jobs = 1 | {f['iteration_seconds_n_jobs_1']:.1f} s |",
            f"| iteration, n_jobs = 2 | {f['iteration_seconds_n_jobs_2']:.1f} s |",
            f"| iteration / floor (one core) | {f['ratio_to_floor_n_jobs_1']:.2f} |",
            f"| 2 x iteration / floor (n_jobs = 2, per core) | "
            f"{f['ratio_to_floor_n_jobs_2_per_core']:.2f} |",
            f"| speed-up n_jobs = 2 over 1 | {f['speedup_n_jobs_2']:.2f} |",
            *([
                f"| two n_jobs = 1 iterations in separate processes at once | "
                f"{f['side_by_side_seconds']:.1f} s |",
                f"| their throughput over one alone (the two cores' ceiling) | "
                f"{f['side_by_side_speedup']:.2f} |",
            ] if "side_by_side_seconds" in f else []),
            "",
            "An iteration is the E-step with statistics and the M-step, as the estimator "
            "logs it. The kernel sums the cross terms over the 7^3 shifts by partial DFTs "
            "(three matrix products), not by inverse FFTs of the whole box, which is how "
            "it can come in under the FFT floor. The two cores' ceiling: two processes "
            "that share nothing, each running the n_jobs = 1 iteration, side by side; "
            "where the cores slow each other down (shared caches, memory bandwidth, "
            "or a virtual machine's vCPUs), no threading can do better.",
            "",
        ]
    g = results.get("gpu")
    if g:
        lines += ["## GPU (device='gpu') against the CPU (n_jobs = 2)", "", _when(g), ""]
        if "skipped" in g:
            lines += [f"Not measured: {g['skipped']}.", ""]
        else:
            lines += [
                "The floor's setting; the faster of two iterations of each, best of three "
                "fits taken in turn.",
                "",
                "| quantity | value |",
                "|---|---|",
                f"| iteration, CPU, n_jobs = 2 | {g['iteration_seconds_cpu_n_jobs_2']:.2f} s |",
                f"| iteration, GPU | {g['iteration_seconds_gpu']:.2f} s |",
                f"| speed-up | {g['speedup_gpu']:.1f} |",
                f"| labels equal after two iterations | {g['labels_equal']} |",
                f"| largest reference difference / largest reference value | "
                f"{g['max_reference_difference']:.1e} |",
                "",
            ]
    sc = results.get("scaling")
    if sc:
        lines += [
            "## Scaling (fastest of three iterations, n_jobs = 1)",
            "",
            _when(sc),
            "",
            "| varied | sizes | seconds | time ratio / size ratio |",
            "|---|---|---|---|",
        ]
        for name in ("N", "K", "R", "D"):
            e = sc[name]
            sizes = ", ".join(str(r["size"]) for r in e["rows"])
            secs = ", ".join(f"{r['seconds']:.2f}" for r in e["rows"])
            lines.append(f"| {name} | {sizes} | {secs} | {e['time_ratio_over_size_ratio']:.2f} |")
        fits = {name: sc[name]["affine_fit"] for name in ("N", "K", "R")
                if "affine_fit" in sc.get(name, {})}
        if fits:
            lines += ["", "Affine fits, t = fixed + per unit x size:", ""]
            for name, a in fits.items():
                lines.append(f"- {name}: t = {a['seconds_fixed']:.3f} s + "
                             f"{a['seconds_per_unit'] * 1e3:.2f} ms x {name}")
            lines += [
                "",
                "The fixed part of N is the work per (class, orientation): rotating the "
                "references and rotating the sums back. That of K is the work the classes "
                "share: each orientation's interpolation weights serve all classes at once, "
                "and the M-step follows the pairs of non-negligible posterior, whose number "
                "depends on the data more than on K.",
            ]
        if "D" in sc:
            lines += [
                "",
                f"D: size ratio cubed {sc['D']['size_ratio_cubed']:.2f}. D is not expected to "
                "scale linearly, and the data change with it: the smaller box's maps are "
                "blurrier, so more pairs keep a non-negligible posterior and the M-step, "
                "which follows those pairs, does more of its work at D = 16 than at D = 24.",
            ]
        lines.append("")
    modes = results.get("modes")
    if modes:
        s = modes["setting"]
        lines += [
            "## Accelerated search against the exhaustive one",
            "",
            _when(modes),
            "",
            f"The whole run: N = {s['N']}, K = {s['K']}, D = {s['D']}, "
            f"{s['angular_step']} degrees, shifts up to {s['max_shift']}, "
            f"{s['max_iter']} iterations, the same data for every mode; the seed is the "
            "estimator's random_state. Rows may come from different runs of the part "
            "(see the last column)."
            + ("" if modes.get("complete", True) else
               " Incomplete: the run had done only these rows when it was stopped."),
            "",
            "The median orientation error on a grid depends on how each class's "
            "recovered frame (arbitrary in a reference-free run) sits against the grid: "
            "for the D7 class on the C1 15-degree grid, which is closed under D7 about "
            "z, from about 3.5 degrees in a tilted frame to 8.3 in one lined up with the "
            "grid. The floor is the median error of the grid orientations nearest to "
            "the truth in the run's own frame; 'at floor' is the fraction of particles "
            "given that orientation.",
            "",
            "| SNR | mode | seed | n_jobs | seconds | iterations | mean iteration (s) "
            "| purity | median orientation error (deg) | floor (deg) | error - floor "
            "| at floor | boxes | local from | measured (commit) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(modes["rows"], key=lambda r: (-r["snr"], r["mode"], r.get("seed", 0))):
            boxes = sorted(set(r["box_sizes"]))
            times = r.get("iteration_seconds")
            per_iteration = np.mean(times) if times else np.nan
            floor = r.get("median_error_floor_deg", np.nan)
            at_floor = r.get("fraction_at_floor", np.nan)
            lines.append(
                f"| {r['snr']} | {r['mode']} | {r.get('seed', 0)} | {r.get('n_jobs', -1)} | "
                f"{r['seconds']:.0f} | "
                f"{r['iterations']} | {per_iteration:.1f} | {r['purity']:.3f} | "
                f"{r['median_orientation_error_deg']:.2f} | {floor:.2f} | "
                f"{r['median_orientation_error_deg'] - floor:.2f} | {at_floor:.2f} | "
                f"{', '.join(map(str, boxes))} | "
                f"{r['refinement_start']} | {r.get('date', modes.get('date', '?'))} "
                f"({r.get('commit', '?')}) |"
            )
        known = modes.get("known_pose")
        if known:
            lines += [
                "",
                "Known poses: each particle given the class whose clean phantom, at its "
                "true orientation and shift and behind the same wedge, lies nearer: "
                + "; ".join(
                    f"SNR {snr}: purity {k['purity']:.3f} (misclassified: "
                    f"{', '.join(map(str, k['misclassified'])) or 'none'})"
                    for snr, k in sorted(known.items(), key=lambda item: -float(item[0]))
                )
                + ". A run that must find the poses and the references is not expected "
                "to classify better.",
            ]
        lines += ["", *_seed_summary(modes["rows"]), ""]
    mem = results.get("memory")
    if mem:
        s = mem["setting"]
        lines += [
            "## Peak memory",
            "",
            _when(mem),
            "",
            f"N = {s['N']}, D = {s['D']}, K = {s['K']}, {s['angular_step']} degrees "
            f"(R = {s['R']}), shifts up to {s['max_shift']}, memory_budget "
            f"{s['memory_budget_GiB']} GiB: chunks of {mem['chunk_size']} particles, scores "
            f"kept: {mem['scores_kept']}, rotated references shared: "
            f"{mem['transforms_shared']}.",
            "",
            f"Peak resident memory {mem['peak_GB']:.2f} GB (the input particles alone are "
            f"{mem['input_GB']:.2f} GB), read over {mem['seconds_watched']:.0f} s, by which "
            f"time {100 * mem['fraction_of_first_E_step_done']:.1f}% of the first E-step "
            f"was done (the first chunk is {100 * mem['first_chunk_fraction']:.1f}%).",
            "",
        ]
    return "\n".join(lines)


# Purity halfway between chance (0.5) and perfect for two equal classes.
_SEPARATED = 0.75


def _seed_summary(rows: list) -> list:
    """Markdown lines: each mode against the exhaustive runs of the same SNR and seeds."""
    exhaustive = {(r["snr"], r.get("seed", 0)): r for r in rows if r["mode"] == "exhaustive"}
    paired = {}
    for r in rows:
        if r["mode"] != "exhaustive" and (r["snr"], r.get("seed", 0)) in exhaustive:
            paired.setdefault((r["snr"], r["mode"]), []).append(r)
    if not paired:
        return []
    lines = [
        "Each mode against the exhaustive run of the same seed, over the seeds both have "
        "(differences: mode minus exhaustive). 'at least as pure': the seeds on which the "
        "mode's purity is at least the exhaustive run's. The orientation errors are "
        "compared only on the seeds where both runs separated the classes (purity at least "
        f"{_SEPARATED}, halfway from chance to perfect for two equal classes): a run that "
        "merged them fits one average to both structures, and its errors are not those of "
        "a classification.",
        "",
        "| SNR | mode | seeds | mean seconds | purity | exhaustive purity | at least as pure "
        "| both separated | error difference (deg) | error - floor difference (deg) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def excess(r):
        return r["median_orientation_error_deg"] - r.get("median_error_floor_deg", np.nan)

    error = "median_orientation_error_deg"
    for (snr, mode), runs in sorted(paired.items(), key=lambda item: (-item[0][0], item[0][1])):
        pairs = [(r, exhaustive[snr, r.get("seed", 0)]) for r in runs]
        purer = sum(r["purity"] >= e["purity"] for r, e in pairs)
        both = [(r, e) for r, e in pairs if min(r["purity"], e["purity"]) >= _SEPARATED]
        differences = (
            f"{np.mean([r[error] - e[error] for r, e in both]):+.2f} | "
            f"{np.mean([excess(r) - excess(e) for r, e in both]):+.2f}"
        ) if both else "- | -"
        lines.append(
            f"| {snr} | {mode} | {', '.join(str(r.get('seed', 0)) for r in runs)} | "
            f"{np.mean([r['seconds'] for r in runs]):.0f} | "
            f"{np.mean([r['purity'] for r in runs]):.3f} | "
            f"{np.mean([e['purity'] for _, e in pairs]):.3f} | {purer} of {len(pairs)} | "
            f"{', '.join(str(r.get('seed', 0)) for r, _ in both) or 'none'} | {differences} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", nargs="+", default=["floor", "scaling", "memory", "modes"],
                        choices=["floor", "scaling", "memory", "modes", "gpu"])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: checks the script, measures nothing of interest")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES),
                        help="which searches the modes part runs; rows of the others "
                        "already in the results are kept (none: only measure them again)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="random_state of the modes part's runs")
    parser.add_argument("--snrs", nargs="+", type=float, default=[0.05, 0.01],
                        help="SNRs of the modes part")
    parser.add_argument("--n-jobs", type=int, default=-1,
                        help="n_jobs of the modes part's runs")
    parser.add_argument("--memory-limit", type=float, default=540.0,
                        help="seconds the memory child may run")
    args = parser.parse_args(argv)
    results = {"machine": {
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }, "quick": args.quick}
    # The code imported now is the code that runs, whatever is committed meanwhile.
    commit = _commit()
    parts = {
        "floor": lambda: part_floor(args.quick),
        "gpu": lambda: part_gpu(args.quick),
        "scaling": lambda: part_scaling(args.quick),
        "memory": lambda: part_memory(args.quick, args.memory_limit),
        "modes": lambda: part_modes(
            args.quick, lambda part: write_results({**results, "modes": part}, args.out),
            args.out, args.modes, args.n_jobs, _previous_rows(args.out), args.seeds,
            args.snrs, commit,
        ),
    }
    for name in args.parts:
        load = [round(x, 2) for x in os.getloadavg()]
        results[name] = parts[name]()
        results[name]["load"] = {"start": load, "end": [round(x, 2) for x in os.getloadavg()]}
        results[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
        results[name]["commit"] = commit
        print(json.dumps(results[name], indent=1), flush=True)
        write_results(results, args.out)
    print((args.out / "speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
