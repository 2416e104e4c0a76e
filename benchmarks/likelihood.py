"""How likely the model of each modes run is, under one exhaustive search.

Usage::

    python benchmarks/likelihood.py [--seeds 1] [--snr 0.01] [--out benchmarks/results]
    python benchmarks/likelihood.py --quick     # a small check of the script, not a result

For each seed, the exhaustive and the ``accelerated_pruned`` runs of ``speed.py``'s
modes part are fitted again (same data, settings and ``random_state``), and both
fitted models score every particle by one exhaustive search (no pruning, no
coarse grid) with each reference rotation (``real`` and ``fourier``), in the
accelerated run's last Fourier crop, where both models have their references,
and in the whole box (what ``score`` gives). A run's purity can differ from
another's either because its search lost the better pose or class, or because its
EM went to another model; the scores under one search tell the two apart.

Results go to ``<out>/likelihood.json`` and ``<out>/likelihood.md`` (rows of other
seeds and SNRs already there are kept).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import speed

from mlsubtomo.io import atomic_write
from mlsubtomo.metrics import class_purity

MODES = ("exhaustive", "accelerated_pruned")


def _fit(mode, seed, data, quick):
    est = speed.modes_estimator(mode, seed, quick)
    start = time.perf_counter()
    est.fit(data.volumes, masks=speed.WEDGE)
    return est, time.perf_counter() - start


def _scores(est, data, crop):
    """Total log-likelihood and purity of the fitted model under an exhaustive search in
    the box ``crop``, for each reference rotation."""
    out = {}
    for rotation in ("real", "fourier"):
        est.set_params(pruning_threshold=0.0, coarse_step=None, reference_rotation=rotation)
        prepared, settings = est._prepare_predict(data.volumes, speed.WEDGE)
        _, result, _ = est._e_step(
            prepared, settings, est._orientation_grid(), None, False, crop=crop
        )
        out[rotation] = {
            "log_likelihood": float(np.sum(result.log_likelihood)),
            "purity": class_purity(data.labels, np.argmax(result.class_log_posterior, axis=1)),
        }
    return out


def run(seeds, snr, quick):
    data = speed._modes_data(quick, snr)
    rows = []
    for seed in seeds:
        fits = {mode: _fit(mode, seed, data, quick) for mode in MODES}
        crop = fits["accelerated_pruned"][0]._crop_size
        box = data.volumes.shape[-1]
        for mode, (est, seconds) in fits.items():
            row = {
                "snr": snr, "seed": seed, "mode": mode, "n_particles": len(data.volumes),
                "seconds": round(seconds, 1),
                "fit_purity": class_purity(data.labels, est.labels_),
                "final_crop": est._crop_size, "sigma": est.sigma_,
                "in_crop": {"crop": crop, **_scores(est, data, crop)},
            }
            # A crop of the whole box is the whole box: not scored twice.
            row["whole_box"] = (
                row["in_crop"] if crop == box else {"crop": box, **_scores(est, data, box)}
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows):
    lines = [
        "# Log-likelihood of each run's model under one exhaustive search",
        "",
        "Total over the particles; 'in crop': in the accelerated run's last Fourier "
        "crop, 'whole box': every component of the band (what `score` counts). "
        "Differences: exhaustive minus accelerated_pruned.",
        "",
        "| SNR | seed | mode | fit purity | crop | LL in crop (real / fourier) "
        "| LL whole box (real / fourier) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-r["snr"], r["seed"], r["mode"])):
        c, w = r["in_crop"], r["whole_box"]
        lines.append(
            f"| {r['snr']} | {r['seed']} | {r['mode']} | {r['fit_purity']:.3f} | {c['crop']} "
            f"| {c['real']['log_likelihood']:.1f} / {c['fourier']['log_likelihood']:.1f} "
            f"| {w['real']['log_likelihood']:.1f} / {w['fourier']['log_likelihood']:.1f} "
            f"| {r['seconds']} |"
        )
    pairs = {}
    for r in rows:
        pairs.setdefault((r["snr"], r["seed"]), {})[r["mode"]] = r
    lines += ["", "| SNR | seed | difference in crop, per particle (real / fourier) "
              "| difference whole box, per particle (real / fourier) |", "|---|---|---|---|"]
    for (snr, seed), p in sorted(pairs.items()):
        if set(p) != set(MODES):
            continue
        ex, acc = p["exhaustive"], p["accelerated_pruned"]

        def gap(where, rotation, ex=ex, acc=acc):
            difference = (ex[where][rotation]["log_likelihood"]
                          - acc[where][rotation]["log_likelihood"])
            return f"{difference / ex['n_particles']:+.2f}"

        cells = [" / ".join(gap(where, rot) for rot in ("real", "fourier"))
                 for where in ("in_crop", "whole_box")]
        lines.append(f"| {snr} | {seed} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--snr", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "likelihood.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() and not args.quick else []
    rows = [r for r in rows if not (r["snr"] == args.snr and r["seed"] in args.seeds)]
    rows += run(args.seeds, args.snr, args.quick)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    record = {"rows": rows, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write(path, json.dumps(record, indent=1) + "\n")
    atomic_write(args.out / "likelihood.md", markdown(rows))


if __name__ == "__main__":
    main()
