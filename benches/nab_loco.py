#!/usr/bin/env python3
"""Leave-one-category-out: how well the anomaly detector's defaults generalise.

For each of the four NAB categories we have (artificial = artificialNoAnomaly
+ artificialWithAnomaly, realAWSCloudwatch, realAdExchange, realTweets), the
settings are chosen from GRID on the other three (one threshold over the
three, NAB standard profile), then the held-out category is scored with them
(its own threshold, as NAB does per category). Any sweep of the detector's
settings belongs in GRID, so it always runs inside this protocol.

Scoring uses the functions of ../shared/nab/score.py in-process (the same
numbers as running it), so a grid point costs one replay of the 44 files.

Prints the four held-out scores, their mean, the score of the shipped
defaults on all 44 files and per category, and, last, one JSON line.
Run: bash benches/nab_loco.sh (builds the release binary first; about two
minutes). With --ideas it first reruns the protocol with each component of
the detector taken out (IDEAS), about six minutes more.
"""

import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import tempfile

NAB = os.environ.get("NAB", "../shared/nab")
GATEWAY = os.environ.get("GATEWAY", "target/release/edge-gateway")
sys.path.insert(0, NAB)
import score as nab  # noqa: E402  (the scorer beside the data)

CATEGORIES = {
    "artificial": ["artificialNoAnomaly", "artificialWithAnomaly"],
    "realAWSCloudwatch": ["realAWSCloudwatch"],
    "realAdExchange": ["realAdExchange"],
    "realTweets": ["realTweets"],
}

# The settings swept ([anomaly] keys); the first point is the shipped default.
# What each idea did inside this protocol is in the README ("Anomaly
# detection: what was tried").
GRID_AXES = {
    "level_clip": [3.0, 0.0, 4.0],
    "level_alpha": [0.001, 0.002],
    "refractory": [100, 50],
    "histogram_window": [32, 16],
    "blocks": [[4, 16], [4]],
}
GRID = [dict(zip(GRID_AXES, values)) for values in itertools.product(*GRID_AXES.values())]

# Each component taken out in turn (`--ideas`): the protocol rerun with the
# setting fixed over the grid, so every idea's effect is a held-out one.
IDEAS = {
    "without winsorised level statistics": {"level_clip": 0.0},
    "without the coarse channels": {"blocks": []},
    "without the distribution channel": {"distribution": False},
    "without the out-of-range override": {"out_of_range": 0.0},
}


def toml(value):
    return json.dumps(value) if isinstance(value, (list, bool)) else str(value)


def replay(settings, out_dir):
    """Runs the detector with `settings` over every file; scores per file."""
    config = os.path.join(out_dir, "anomaly.toml")
    with open(config, "w") as f:
        f.write("[anomaly]\n")
        for key, value in settings.items():
            f.write(f"{key} = {toml(value)}\n")
    jobs = []
    for category in sorted(os.listdir(os.path.join(NAB, "data"))):
        for name in sorted(os.listdir(os.path.join(NAB, "data", category))):
            jobs.append(f"{category}/{name}")

    def one(key):
        out = os.path.join(out_dir, key.replace("/", "_"))
        subprocess.run(
            [GATEWAY, "replay", "--config", config, "--input", os.path.join(NAB, "data", key),
             "--output", out],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        return key, [float(r["anomaly_score"]) for r in nab.load_rows(out)]

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        return dict(pool.map(one, jobs))


def load_labels():
    """Per file: its rows after probation as (window or None, sigmoid value)."""
    windows = json.load(open(os.path.join(NAB, "windows.json")))
    labels = {}
    for key in windows:
        ts = [nab.norm_ts(r["timestamp"]) for r in nab.load_rows(os.path.join(NAB, "data", key))]
        pts, wins = nab.file_points(ts, [0.0] * len(ts), windows[key])
        labels[key] = (nab.probation(len(ts)), [(w, v) for _, w, v in pts], len(wins))
    return labels


def score(labels, scores, dirs=None):
    """NAB standard score over the files of `dirs` (all when None)."""
    tp_w, fp_w, fn_w = nab.PROFILES["standard"]
    points, n_windows = [], 0
    for key, (probation, rows, wins) in labels.items():
        if dirs is not None and key.split("/")[0] not in dirs:
            continue
        n_windows += wins
        file_scores = scores[key]
        for i, (window, value) in enumerate(rows):
            points.append((file_scores[probation + i], (key, window) if window else None, value))
    raw, _ = nab.optimise(points, n_windows, tp_w, fp_w, fn_w)
    null, perfect = -fn_w * n_windows, tp_w * n_windows
    return round(100.0 * (raw - null) / (perfect - null), 2)


def protocol(labels, grid):
    """Scores every grid point; returns (settings, held, train, all) each."""
    per_point = []
    with tempfile.TemporaryDirectory(prefix="nab-loco-") as tmp:
        for i, settings in enumerate(grid):
            scores = replay(settings, tmp)
            held = {c: score(labels, scores, dirs) for c, dirs in CATEGORIES.items()}
            train = {
                c: score(labels, scores, [d for o, ds in CATEGORIES.items() if o != c for d in ds])
                for c in CATEGORIES
            }
            everything = score(labels, scores)
            per_point.append((settings, held, train, everything))
            print(f"nab_loco: point {i + 1}/{len(grid)} {settings}: "
                  + " ".join(f"{c}={s:.2f}" for c, s in held.items()) + f" all={everything:.2f}",
                  file=sys.stderr)
    return per_point


def folds_of(per_point):
    """Per held-out category: the point chosen on the other three."""
    folds = {}
    for c in CATEGORIES:
        settings, held, train, _ = max(per_point, key=lambda p: p[2][c])
        folds[c] = {"chosen_on_others": settings, "train_score": train[c], "held_out_score": held[c]}
    return folds, sum(f["held_out_score"] for f in folds.values()) / len(folds)


def main():
    if not os.path.isdir(os.path.join(NAB, "data")):
        sys.exit(f"no NAB data at {NAB} (set NAB=...)")
    labels = load_labels()
    ideas = {}
    if "--ideas" in sys.argv[1:]:
        for idea, fixed in IDEAS.items():
            grid = []
            for point in GRID:
                point = {**point, **fixed}
                if point not in grid:
                    grid.append(point)
            folds, mean = folds_of(protocol(labels, grid))
            ideas[idea] = {"mean_held_out": round(mean, 2),
                           "held_out": {c: f["held_out_score"] for c, f in folds.items()}}
    per_point = protocol(labels, GRID)
    folds, mean = folds_of(per_point)
    defaults = per_point[0]
    for idea, r in ideas.items():
        print(f"{idea:<40} mean held-out {r['mean_held_out']:>6.2f}  "
              + ", ".join(f"{c} {s:.2f}" for c, s in r["held_out"].items()))
    print(f"{'held-out category':<20} {'score':>7} {'train (other 3)':>16}  settings chosen on the other three")
    for c, f in folds.items():
        print(f"{c:<20} {f['held_out_score']:>7.2f} {f['train_score']:>16.2f}  {f['chosen_on_others']}")
    print(f"{'mean held-out':<20} {mean:>7.2f}")
    print(f"shipped defaults {defaults[0]}: all 44 files {defaults[3]:.2f}; "
          + ", ".join(f"{c} {s:.2f}" for c, s in defaults[1].items()))
    print(json.dumps({
        "held_out": {c: f["held_out_score"] for c, f in folds.items()},
        "mean_held_out": round(mean, 2),
        "defaults_all_files": defaults[3],
        "defaults_per_category": defaults[1],
        "grid_points": len(GRID),
        **({"ideas": ideas} if ideas else {}),
    }))


if __name__ == "__main__":
    main()
