#!/usr/bin/env python3
"""Leave-one-category-out: how well the anomaly detector's defaults generalise.

For each of the four NAB categories we have (artificial = artificialNoAnomaly
+ artificialWithAnomaly, realAWSCloudwatch, realAdExchange, realTweets), the
settings are chosen from GRID on the other three (one threshold over the
three, NAB standard profile), then the held-out category is scored with them
(its own threshold, as NAB does per category). Any sweep of the detector's
settings belongs in GRID, so it always runs inside this protocol.

Prints the four held-out scores, their mean, the score of the shipped
defaults on all 44 files and per category, and, last, one JSON line.
Run: bash benches/nab_loco.sh (builds the release binary first).
"""

import itertools
import json
import os
import subprocess
import sys
import tempfile

NAB = os.environ.get("NAB", "../shared/nab")
GATEWAY = os.environ.get("GATEWAY", "target/release/edge-gateway")

CATEGORIES = {
    "artificial": ["artificialNoAnomaly", "artificialWithAnomaly"],
    "realAWSCloudwatch": ["realAWSCloudwatch"],
    "realAdExchange": ["realAdExchange"],
    "realTweets": ["realTweets"],
}

# The settings swept ([anomaly] keys); the first point is the shipped default.
GRID_AXES = {
    "novelty_gain": [16.0, 8.0, 32.0],
    "distribution_weight": [0.5, 0.25, 0.75],
    "refractory": [400, 150, 800],
    # The anomaly-likelihood share as implemented today: adding 0.25 and 0.5
    # to this axis lowered the mean held-out score from 61.12 to 59.24
    # (realTweets 69.72 -> 62.21); kept at 0 until the layer is reworked.
    "likelihood_weight": [0.0],
    # Out-of-range as an override (RESEARCH.md idea 2): in the grid it
    # raised the mean held-out score from 61.12 to 61.42, chosen by one fold
    # (realAdExchange 55.98 -> 57.18); on its own, on all 44 files, 0.02 /
    # 0.05 / 0.1 gave 57.64 / 59.39 / 60.51 against 63.41. Off by default.
    "novelty_override": [0.0, 0.05, 0.02],
}
GRID = [
    point
    for point in (dict(zip(GRID_AXES, values)) for values in itertools.product(*GRID_AXES.values()))
    # The detector refuses weights that add up to more than 1.
    if point["distribution_weight"] + point["likelihood_weight"] <= 1.0
]


def replay(settings, out_dir, config_dir):
    """Runs the detector with `settings` over every file into out_dir."""
    config = os.path.join(config_dir, "anomaly.toml")
    with open(config, "w") as f:
        f.write("[anomaly]\n")
        for key, value in settings.items():
            f.write(f"{key} = {value}\n")
    for category in sorted(os.listdir(os.path.join(NAB, "data"))):
        src = os.path.join(NAB, "data", category)
        dst = os.path.join(out_dir, category)
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            subprocess.run(
                [GATEWAY, "replay", "--config", config, "--input", os.path.join(src, name),
                 "--output", os.path.join(dst, name)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )


def score(results, categories):
    """NAB standard score of `results` over the given data directories."""
    out = subprocess.run(
        [sys.executable, os.path.join(NAB, "score.py"), "--data", os.path.join(NAB, "data"),
         "--windows", os.path.join(NAB, "windows.json"), "--results", results,
         "--categories", ",".join(categories)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["standard"]


def main():
    if not os.path.isdir(os.path.join(NAB, "data")):
        sys.exit(f"no NAB data at {NAB} (set NAB=...)")
    with tempfile.TemporaryDirectory(prefix="nab-loco-") as tmp:
        # Score every grid point on every category and on every set of three.
        per_point = []
        for i, settings in enumerate(GRID):
            results = os.path.join(tmp, f"p{i}")
            replay(settings, results, tmp)
            held = {c: score(results, dirs) for c, dirs in CATEGORIES.items()}
            train = {
                c: score(results, [d for o, dirs in CATEGORIES.items() if o != c for d in dirs])
                for c in CATEGORIES
            }
            per_point.append((settings, held, train))
            print(f"nab_loco: point {i + 1}/{len(GRID)} {settings}: "
                  + " ".join(f"{c}={s:.2f}" for c, s in held.items()), file=sys.stderr)
        default_all = score(os.path.join(tmp, "p0"), [])

    folds = {}
    for c in CATEGORIES:
        settings, held, train = max(per_point, key=lambda p: p[2][c])
        folds[c] = {"chosen_on_others": settings, "train_score": train[c], "held_out_score": held[c]}
    mean = sum(f["held_out_score"] for f in folds.values()) / len(folds)
    defaults = per_point[0]
    print(f"{'held-out category':<20} {'score':>7} {'train (other 3)':>16}  settings chosen on the other three")
    for c, f in folds.items():
        print(f"{c:<20} {f['held_out_score']:>7.2f} {f['train_score']:>16.2f}  {f['chosen_on_others']}")
    print(f"{'mean held-out':<20} {mean:>7.2f}")
    print(f"shipped defaults {defaults[0]}: all 44 files {default_all:.2f}; "
          + ", ".join(f"{c} {s:.2f}" for c, s in defaults[1].items()))
    print(json.dumps({
        "held_out": {c: f["held_out_score"] for c, f in folds.items()},
        "mean_held_out": round(mean, 2),
        "defaults_all_files": default_all,
        "defaults_per_category": defaults[1],
        "grid_points": len(GRID),
    }))


if __name__ == "__main__":
    main()
