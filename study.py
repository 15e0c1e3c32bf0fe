"""The reproduction study of the README: every ablation row of the paper's claim on `shapes`,
several seeds, kNN and linear-probe accuracy with mean and spread.

    python study.py                                  # all rows, seeds 0 1; a GPU: ~10 min
    python study.py --rows 1 6 --seeds 0 1 2         # some rows, more seeds
    python study.py --table                          # the README table from results/study.json

Each run is `python train.py FLAGS --seed S --out runs/study/NAME-sS` with the default budget
(`--epochs`, `--shapes-size` of train.py unless given here), then `python evaluate.py
--checkpoint .../last.pt`. Runs go `--jobs` at a time. Each finished run is added to the
results file at once, and runs already there are skipped, so a stopped study continues.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading

# (framework, name, train.py flags): SPEC.md section 5's comparison, numbered as in the issue.
ROWS = [
    ("moco", "MoCo v2", ["--masking", "none"]),
    ("moco", "+ random masking", ["--masking", "random"]),
    ("moco", "+ saliency masking, hp", ["--masking", "saliency", "--num-hard-negatives", "0"]),
    ("moco", "+ saliency masking, blur", ["--masking", "saliency", "--num-hard-negatives", "0", "--strategy", "blur"]),
    ("moco", "+ saliency masking, mean", ["--masking", "saliency", "--num-hard-negatives", "0", "--strategy", "mean"]),
    ("moco", "+ saliency masking + hard negative, hp (the method)", ["--masking", "saliency"]),
    # The ImageNet stem's last map of a 32 px view is 1x1, which train.py refuses for `self`.
    ("moco", "the method, saliency self, CIFAR stem", ["--masking", "saliency", "--saliency", "self", "--stem", "cifar"]),
    ("moco", "the method, saliency gt (oracle)", ["--masking", "saliency", "--saliency", "gt"]),
    ("simclr", "SimCLR", ["--masking", "none"]),
    ("simclr", "+ random masking", ["--masking", "random"]),
    ("simclr", "+ saliency masking + hard negative, hp (the method)", ["--masking", "saliency"]),
    ("byol", "BYOL", ["--masking", "none"]),
    ("byol", "+ random masking", ["--masking", "random"]),
    ("byol", "+ saliency masking, hp", ["--masking", "saliency"]),
]
# Self-saliency quality of the method's own encoder. (Row 1's was measured on high-passed
# views, which that encoder never saw in training, by an evaluate.py since fixed.)
SELF_ROWS = (7,)


def of_row(record, row):
    """A result belongs to a row when it was trained with the row's flags as they are now
    (a row whose flags changed does not inherit the old runs)."""
    flags = ROWS[row - 1][2]
    return record["row"] == row and record["flags"][:len(flags)] == flags


def run_one(row, seed, args, lock):
    framework, name, flags = ROWS[row - 1]
    out = os.path.join(args.out, f"row{row}-s{seed}")
    train_argv = [sys.executable, "train.py", "--framework", framework, *flags, "--seed", str(seed),
                  "--out", out, "--log-every", "60", *args.train_args]
    if os.path.exists(os.path.join(out, "last.pt")):
        train_argv += ["--resume", os.path.join(out, "last.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    os.makedirs(args.out, exist_ok=True)
    with open(out + ".log", "a") as log:
        for argv in (train_argv, [sys.executable, "evaluate.py", "--checkpoint", os.path.join(out, "last.pt")]):
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                return print(f"row {row} seed {seed}: failed, see {out}.log", flush=True)
    with open(os.path.join(out, "eval.json")) as f:
        evaluation = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if r.get("final")][-1]
    record = {"row": row, "framework": framework, "name": name, "flags": flags + args.train_args, "seed": seed,
              "knn_top1": evaluation["knn_top1"], "linear_top1": evaluation["linear_top1"],
              "knn_top1_random_init": final["knn_top1_random_init"], "steps": final["step"],
              "train_minutes": final["minutes"], "saliency_quality": evaluation.get("saliency_quality")}
    with lock:
        results = load(args.results)
        results.append(record)
        save(args.results, results)
    print(f"row {row} seed {seed}: kNN {record['knn_top1']:.2f} %, linear {record['linear_top1']:.2f} % "
          f"({name}, {framework})", flush=True)


def load(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def save(path, results):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def spread(values):
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results):
    """Markdown: one line per row, mean ± standard deviation over seeds; then saliency quality."""
    lines = ["| # | framework | variant | kNN top-1 (%) | linear top-1 (%) | random-init kNN (%) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for row, (framework, name, _) in enumerate(ROWS, 1):
        runs = [r for r in results if of_row(r, row)]
        if runs:
            lines.append(f"| {row} | {framework} | {name} | {spread([r['knn_top1'] for r in runs])} | "
                         f"{spread([r['linear_top1'] for r in runs])} | "
                         f"{spread([r['knn_top1_random_init'] for r in runs])} | {len(runs)} |")
    quality = {}
    for r in results:              # spectral, gt: the same for every run; self: the run's own encoder
        if not of_row(r, r["row"]):
            continue
        for source, figures in (r.get("saliency_quality") or {}).items():
            if source == "self" and r["row"] not in SELF_ROWS:
                continue
            key = f"self, encoder of row {r['row']} ({r['framework']}, {r['name']})" if source == "self" else source
            quality.setdefault(key, []).append(figures)
    if quality:
        lines += ["", "| saliency source | patch IoU (%) | precision (%) | runs |", "|---|---|---|---|"]
        for source, figures in sorted(quality.items()):
            lines.append(f"| {source} | {spread([f['iou'] for f in figures])} | "
                         f"{spread([f['precision'] for f in figures])} | {len(figures)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(1, len(ROWS) + 1)),
                        help=f"row numbers, 1-{len(ROWS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU takes several)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--out", default="runs/study", help="run folders")
    parser.add_argument("--results", default="results/study.json")
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    args, args.train_args = parser.parse_known_args()                # the rest goes to train.py
    if args.table:
        return print(table(load(args.results)))
    bad = [r for r in args.rows if not 1 <= r <= len(ROWS)]
    if bad:
        parser.error(f"--rows {bad[0]}: rows are 1-{len(ROWS)}")
    done = {(r["row"], r["seed"]) for r in load(args.results) if of_row(r, r["row"])}
    todo = [(row, seed) for seed in args.seeds for row in args.rows if (row, seed) not in done]
    print(f"{len(todo)} runs to do, {len(done)} in {args.results}; {args.jobs} at a time", flush=True)
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for future in [pool.submit(run_one, row, seed, args, lock) for row, seed in todo]:
            future.result()
    print(table(load(args.results)))


if __name__ == "__main__":
    main()
