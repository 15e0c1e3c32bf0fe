"""The study: which part of the method does what on `shapes`, with seeds and controls.

    python study.py                                  # every row and seed not yet in results/study.json
    python study.py --rows 1 9 --seeds 0 1 2         # some rows, some seeds
    python study.py --jobs 8 --device cuda           # a GPU: several runs at a time
    python study.py --table                          # the README's table, from the results file
    python study.py --rows 9 10 --seeds 0 1 --split val --results results/defaults-val.json   # tuning: validation
    python study.py --mechanism                      # how much of the object a query's mask hides, by object size
    python study.py --rows 3 5 4 1 --shapes-object-scale 0.08 0.15 --image-size 96   # smaller objects (SCALES)
    python study.py --mechanism --mask-ratio 0.05 0.25 0.25 0.5 0.5 0.75 --grid 7 4 3 --strategy hp blur \\
        --fg-std-factor 0.6 0 -0.5 --shapes-object-scale 0.25 0.45 --mechanism-json results/mechanism-ratio.json
    python study.py --rows 3 4 5 6 7 8 --mask-ratio 0.25 0.5     # where a random mask hides more of the object
    python study.py --gain-figure results/gain.png   # balanced against random masking, every setting
    python study.py --figure results/views.png       # the README's picture of the views

Each run is `python train.py FLAGS --seed S` at the default budget of train.py (flags this
script does not know go to train.py), then `python evaluate.py` on its checkpoint. A run is
identified by every flag train.py resolves from the row's flags (its args.json), less where
and how it ran (output folder, device, precision, loader workers): a run already in the
results file is skipped, and a row whose flags or defaults change gets new runs. Each
finished run is added to the results file at once, so a stopped study continues where it
stopped. Ctrl-C starts no new run (those in flight save their checkpoints and stop) and exits
with status 130. A study in which a run failed lists the failures and exits with status 1.
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import concurrent.futures
import functools
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading

import torch

import config
import data
import masking
import runs
import saliency
import shapes
import train

# (framework, variant, train.py flags). Each question of the paper gets the rows that answer it.
ROWS = [
    # Does masking help a ConvNet contrastive learner? Is it the masking or the hp filter?
    ("moco", "MoCo v2", ["--masking", "none"]),
    ("moco", "MoCo v2 on high-passed views, no masking (the filter alone)", ["--masking", "none", "--high-pass", "on"]),
    # Does saliency tell you where? Random against balanced masking (spectral, and the oracle).
    ("moco", "+ random masking, hp", ["--masking", "random"]),
    ("moco", "+ balanced masking (spectral), hp", ["--num-hard-negatives", "0"]),
    ("moco", "+ balanced masking (gt oracle), hp", ["--saliency", "gt", "--num-hard-negatives", "0"]),
    ("moco", "+ random masking, blur", ["--masking", "random", "--strategy", "blur"]),
    ("moco", "+ balanced masking (spectral), blur", ["--num-hard-negatives", "0", "--strategy", "blur"]),
    ("moco", "+ balanced masking (gt oracle), blur", ["--saliency", "gt", "--num-hard-negatives", "0",
                                                      "--strategy", "blur"]),
    # Do hard negatives help? Alpha 1 (the shapes default), 2 (the paper's), the release's pairing.
    ("moco", "the method: + hard negative, alpha 1, hp", []),
    ("moco", "the method, alpha 2 (the paper's)", ["--alpha", "2"]),
    # The release's pairing embeds each hard negative as a batch of one image, whose BatchNorm
    # needs a 2x2 map or more: 48 px (ImageNet stem) is the smallest size where it runs; row 20
    # is its twin with the paper's pairing, so that the two differ in nothing else.
    ("moco", "the method, alpha 2, the release's pairing, 48 px", ["--alpha", "2", "--hard-negative-pairing",
                                                                   "release", "--image-size", "48"]),
    # Fills.
    ("moco", "the method, blur", ["--strategy", "blur"]),
    ("moco", "the method, mean", ["--strategy", "mean"]),
    # Other frameworks.
    ("simclr", "SimCLR", ["--masking", "none"]),
    ("simclr", "+ random masking, hp", ["--masking", "random"]),
    ("simclr", "the method, hp", []),
    ("byol", "BYOL", ["--masking", "none"]),
    ("byol", "+ random masking, hp", ["--masking", "random"]),
    ("byol", "+ balanced masking (spectral), hp", []),
    ("moco", "the method, alpha 2, own pairing, 48 px (row 11's twin)", ["--alpha", "2", "--image-size", "48"]),
]
SEEDS = {"moco": [0, 1, 2], "simclr": [0, 1], "byol": [0, 1]}
# Resolved flags that say where and how a run ran, not what it is.
NOT_THE_EXPERIMENT = ("out", "resume", "device", "amp", "channels_last", "compile", "workers", "log_every",
                      "knn_every", "save_every", "data_dir", "download", "shapes_cache", "world_size")


def resolve(row, seed, train_args):
    """train.py's resolved flags for a row and seed (train.parse_args, in this process; bad
    flags stop the study with train.py's one-line error)."""
    framework, _, flags = ROWS[row - 1]
    argv = ["--framework", framework, *flags, *train_args, "--seed", str(seed), "--out", os.devnull]
    return vars(config.parse_args(argv))


# Flags added after runs were recorded, with the value those runs had: a run that does not
# name one, or names it at that value, is the same experiment (and keeps its run folder).
LATER_FLAGS = {"shapes_object_scale": [0.25, 0.45], "shapes_twins": False, "fg_std_factor": 0.6}


def identity(args, *, with_seed=True):
    """What makes two runs the same experiment: every resolved flag but NOT_THE_EXPERIMENT
    (and a LATER_FLAGS flag at its old value)."""
    drop = NOT_THE_EXPERIMENT + (() if with_seed else ("seed",))
    return json.dumps({k: v for k, v in args.items() if k not in drop and LATER_FLAGS.get(k, k) != v},
                      sort_keys=True)


def run_one(row, seed, args, lock):
    """Train and evaluate one run; add its record to the results file. Returns None, or why it failed."""
    framework, name, _ = ROWS[row - 1]
    digest = hashlib.sha1(identity(resolve(row, seed, args.train_args)).encode()).hexdigest()[:8]
    out = os.path.join(args.out, f"row{row:02d}-{framework}-s{seed}-{digest}")
    train_argv = ["--framework", framework, *ROWS[row - 1][2], *args.train_args, "--seed", str(seed),
                  "--out", out, "--log-every", "60"]
    if os.path.exists(os.path.join(out, "last.pt")):
        train_argv += ["--resume", os.path.join(out, "last.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    os.makedirs(args.out, exist_ok=True)
    evaluate_argv = ["evaluate.py", "--checkpoint", os.path.join(out, "last.pt"), "--split", args.split]
    with open(out + ".log", "a") as log:
        for argv in (["train.py", *train_argv], evaluate_argv):
            if subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                return f"row {row} seed {seed}: {argv[0]} failed, see {out}.log"
    with open(os.path.join(out, "args.json")) as f:
        resolved = json.load(f)
    with open(os.path.join(out, "eval.json" if args.split == "test" else "eval-shapes-fast-val.json")) as f:
        evaluation = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        final = [r for r in map(json.loads, f) if r.get("final")][-1]
    record = {"row": row, "framework": framework, "name": name, "commit": runs.code_commit(), "args": resolved,
              "split": args.split,
              "knn_top1": evaluation["knn_top1"], "linear_top1": evaluation["linear_top1"],
              "knn_top1_random_init": final["knn_top1_random_init"], "steps": final["step"],
              "train_minutes": final["minutes"], "saliency_quality": evaluation.get("saliency_quality")}
    with lock:
        results = load(args.results)
        results.append(record)
        runs.write_json(args.results, results, indent=1)
    print(f"row {row} seed {seed}: kNN {record['knn_top1']:.2f} % (random init {record['knn_top1_random_init']:.2f}), "
          f"linear {record['linear_top1']:.2f} % ({framework}, {name})", flush=True)


def load(path):
    """The results file's records (a JSON list); none when it does not exist yet."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError) as error:
        runs.fail(f"--results {path}: unreadable ({type(error).__name__}); restore it from git or pass "
                  f"another --results")
    if not isinstance(results, list) or not all(isinstance(r, dict) and isinstance(r.get("args"), dict)
                                                for r in results):
        runs.fail(f"--results {path}: not a JSON list of study.py's run records (each with its flags under 'args'); "
                  f"restore it from git or pass another --results")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    fields = {"knn_top1": number, "linear_top1": number, "knn_top1_random_init": number,
              "commit": lambda v: isinstance(v, str), "seed": lambda v: isinstance(v, int) and not isinstance(v, bool)}
    for index, record in enumerate(results):
        for field, usable in fields.items():
            value = record["args"].get("seed") if field == "seed" else record.get(field)
            if not usable(value):                     # --table would end in a traceback on it
                runs.fail(f"--results {path}: record {index} has no usable {field} ({value!r}); restore the file "
                          f"from git or remove that record")
    return results


def spread(values):
    mean = statistics.mean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def split_of(record):
    """The split a record's figures were read on (records from before validation existed: test)."""
    return record.get("split", "test")


def runs_of_row(results, row, train_args, split="test"):
    """The records trained with the row's flags as train.py resolves them today, any seed,
    evaluated on `split`."""
    wanted = identity(resolve(row, 0, train_args), with_seed=False)
    by_seed = {r["args"]["seed"]: r for r in results if "args" in r and split_of(r) == split
               and identity(r["args"], with_seed=False) == wanted}         # a seed recorded twice counts once
    return list(by_seed.values())                                        # (its latest record)


def table(results, train_args=(), split="test"):
    """Markdown: a line per row with runs on `split`, mean ± standard deviation over its seeds."""
    lines = ["| # | framework | variant | kNN top-1 (%) | linear top-1 (%) | kNN over random init (points) | seeds |",
             "|---|---|---|---|---|---|---|"]
    commits = set()
    for row, (framework, name, _) in enumerate(ROWS, 1):
        runs = runs_of_row(results, row, train_args, split)
        if runs:
            commits |= {r["commit"] for r in runs}
            lines.append(f"| {row} | {framework} | {name} | {spread([r['knn_top1'] for r in runs])} | "
                         f"{spread([r['linear_top1'] for r in runs])} | "
                         f"{spread([r['knn_top1'] - r['knn_top1_random_init'] for r in runs])} | "
                         f"{', '.join(str(r['args']['seed']) for r in sorted(runs, key=lambda r: r['args']['seed']))} |")
    return "\n".join(lines + ["", f"{split} split. Commits: {', '.join(sorted(commits)) or 'none'}."])


# Object scale's question: random against balanced masking (no hard negative, hp), paired by
# seed, as objects shrink. Smaller objects get larger views, so that an object keeps the
# default's size in pixels (a radius of about 8-14 px) while its share of the view shrinks: at
# 32 px an object of radius 0.08-0.15 is 5-10 px across, and random masking learned nothing
# there (kNN 14.1 % against 15.0 % for random init, chance 10 %).
SCALES = {(0.25, 0.45): 32, (0.15, 0.25): 56, (0.08, 0.15): 96, (0.05, 0.1): 144}   # radius: view size (px)
MECHANISM_SCALES = tuple(SCALES)                     # the default, then smaller objects
SCALE_ROWS = {"random": 3, "spectral": 4, "gt": 5}


def scale_flags(scale):
    """train.py's flags for the study at `scale` (a radius range of SCALES) and its view size."""
    return ["--shapes-object-scale", str(scale[0]), str(scale[1]), "--image-size", str(SCALES[scale])]


# Where saliency tells you where: each setting in which balanced masking meets random masking
# (no hard negative), paired by seed. The object scales above with the paper's query mask (hp,
# r ~ U(0.05, 0.25)); and at the default objects and 32 px, each fill at each query mask ratio:
# a higher ratio is the cheap way to let a random mask hide most of an object (--mechanism).
FILL_ROWS = {"hp": SCALE_ROWS, "blur": {"random": 6, "spectral": 7, "gt": 8}}
MASK_RATIOS = (masking.POSITIVE_RATIO, (0.25, 0.5), (0.5, 0.75))


def ratio_flags(ratio):
    """train.py's flags for a query mask ratio range (none for the paper's)."""
    return [] if tuple(ratio) == masking.POSITIVE_RATIO else ["--mask-ratio", str(ratio[0]), str(ratio[1])]


def settings():
    """[(label, (object scale, fill, mask ratio), train.py flags, rows)], one per setting where
    balanced and random masking meet: every object scale (hp, the paper's ratio), then every
    other fill and ratio at the default objects."""
    found = [(f"radius {lo}-{hi}", ((lo, hi), "hp", masking.POSITIVE_RATIO), scale_flags((lo, hi)), SCALE_ROWS)
             for lo, hi in MECHANISM_SCALES]
    found += [(f"{fill}, mask {lo}-{hi}", (shapes.OBJECT_SCALE, fill, (lo, hi)), ratio_flags((lo, hi)), rows)
              for fill, rows in FILL_ROWS.items() for lo, hi in MASK_RATIOS if (fill, (lo, hi)) != (
                  "hp", masking.POSITIVE_RATIO)]
    return found


def setting_tables(results, split="test"):
    """The table of each setting other than the default objects at the paper's ratio (the
    main table) that has runs in `results`: each object scale, each query mask ratio."""
    named = [(f"objects of radius {lo}-{hi} of the side", scale_flags((lo, hi))) for lo, hi in MECHANISM_SCALES[1:]]
    named += [(f"query mask ratio {lo}-{hi}", ratio_flags((lo, hi))) for lo, hi in MASK_RATIOS[1:]]
    return [f"{name} ({' '.join(flags)}):\n\n" + table(results, flags, split) for name, flags in named
            if any(runs_of_row(results, row, flags, split) for row in range(1, len(ROWS) + 1))]


def paired_gains(results, flags, rows, split="test"):
    """kNN top-1 of balanced masking (spectral, gt) minus random masking's, in points, for
    each seed that ran both with `flags`: {"spectral": [gain per seed], "gt": [...]}."""
    knn = {name: {r["args"]["seed"]: r["knn_top1"] for r in runs_of_row(results, row, flags, split)}
           for name, row in rows.items()}
    return {name: [knn[name][seed] - knn["random"][seed] for seed in sorted(knn[name]) if seed in knn["random"]]
            for name in ("spectral", "gt")}


def gains_by_scale(results, split="test"):
    """paired_gains at each object scale of MECHANISM_SCALES: {scale: {"spectral": [...],
    "gt": [...]}} (scales with no pair left out)."""
    gains = {scale: paired_gains(results, scale_flags(scale), SCALE_ROWS, split) for scale in MECHANISM_SCALES}
    return {scale: pairs for scale, pairs in gains.items() if any(pairs.values())}


def tails(mechanism_results):
    """{(object scale, fill, mask ratio): {masking: % of views with over half of the object
    hidden}} from --mechanism's JSON files, grid 7 and the paper's foreground rule (entries
    from before the sweep were measured with hp and the paper's ratio)."""
    found = {}
    for measured in mechanism_results:
        for entry in measured["scales"]:
            if entry.get("grid", 7) == 7 and entry.get("std_factor", 0.6) == 0.6:
                key = (tuple(entry["object_scale"]), entry.get("strategy", "hp"),
                       tuple(entry.get("mask_ratio", masking.POSITIVE_RATIO)))
                found[key] = {name: share["over_half"] for name, share in entry["shares"].items()}
    return found


def gain_figure(path, results, mechanism_results, split="test"):
    """results/gain.png, the study's answer in one picture. Left: balanced masking's kNN gain
    over random masking (mean and standard deviation over seeds, each seed paired) against how
    often a random query mask hides over half of the object, one point per setting (object
    scale, fill and mask ratio) with runs, true foreground and spectral saliency apart.
    Right: that share for random and balanced masking, by setting (--mechanism's JSON files)."""
    try:
        import matplotlib
    except ImportError:
        runs.fail("--gain-figure draws with matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tail = tails(mechanism_results)
    measured = [(label, key, flags, rows) for label, key, flags, rows in settings() if key in tail]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    labelled = set()                                                 # one label per setting: its gt point's
    for name, marker, colour, shift in (("gt", "o", "tab:green", 1.0), ("spectral", "s", "tab:orange", 1.15)):
        points = [(tail[key]["random"] * shift, gains[name], label) for label, key, flags, rows in measured   # apart
                  for gains in [paired_gains(results, flags, rows, split)] if gains[name]]
        if not points:
            continue
        x, gains, labels = zip(*points)
        mean = [statistics.mean(g) for g in gains]
        std = [statistics.stdev(g) if len(g) > 1 else 0 for g in gains]
        left.errorbar(x, mean, yerr=std, fmt=marker, color=colour, capsize=4, ms=7,
                      label=f"balanced ({'true foreground' if name == 'gt' else 'spectral saliency'}) - random")
        for xi, yi, g, label in zip(x, mean, gains, labels):
            if label not in labelled:
                labelled.add(label)
                left.annotate(f"{label} (n={len(g)})", (xi, yi), textcoords="offset points", xytext=(8, 4), fontsize=8)
    left.axhline(0, color="grey", lw=0.8)
    left.set_xscale("log")
    left.set(xlim=(0.01, 150), xlabel="views whose random query mask hides over half of the object (%, log scale)",
             ylabel="kNN top-1: balanced minus random (points)",
             title="Does saliency tell you where? (mean ± std over seeds, paired by seed)")
    left.legend(loc="upper left", fontsize=9)
    order = sorted(measured, key=lambda m: tail[m[1]]["random"])
    names = [("random", "random", "tab:blue"), ("balanced, true foreground (gt)", "balanced, gt", "tab:green"),
             ("balanced, spectral saliency", "balanced, spectral", "tab:orange")]
    for i, (key, label, colour) in enumerate(names):
        right.barh([j - 0.27 * (i - 1) for j in range(len(order))], [tail[m[1]].get(key, 0) for m in order],
                   height=0.27, label=label, color=colour)
    right.set_yticks(range(len(order)), [m[0] for m in order], fontsize=8)
    right.set(xlabel="views with over half of the object hidden (%)", title="The mechanism, no training (grid 7)")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    runs.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def read_mechanism(path):
    """--mechanism's JSON, or one line that says how to write it."""
    try:
        with open(path) as f:
            measured = json.load(f)
        entries = measured["scales"]
        if not entries or not all(isinstance(e["shares"]["random"]["over_half"], (int, float))
                                  and len(e["object_scale"]) == 2 for e in entries):
            raise ValueError("no measurement")
    except (OSError, ValueError, KeyError, TypeError) as error:
        runs.fail(f"--mechanism-json {path}: unreadable or not --mechanism's ({type(error).__name__}); write it "
                  f"with python study.py --mechanism")
    return measured


@functools.lru_cache(maxsize=2)
def _shapes_views(num_images, image_size, seed, object_scale, crop_scale):
    """`shapes` training views and their object masks, as train.py draws them (cached: a
    sweep measures many masks on the same views)."""
    torch.manual_seed(seed)
    images, object_masks, _ = shapes.make_shapes(num_images, image_size, seed=seed + 1, object_scale=object_scale)
    return data.BatchedMoCoV2(image_size, crop_scale)(images, object_masks)


@torch.no_grad()
def mechanism(num_images=5000, image_size=32, grid=7, seed=0, *, object_scale=shapes.OBJECT_SCALE,
              crop_scale=tuple(config.SHAPES["crop_scale"]), saliency_weights=None, strategy="hp",
              mask_ratio=masking.POSITIVE_RATIO, std_factor=0.6):
    """The paper's argument, measured without training: the share of the object that a
    query's mask hides, for uniform random masking and for balanced masking with spectral,
    true (gt) and, with `saliency_weights`, SCDA foreground. Views are `shapes` training
    views at `object_scale` (the batched MoCo v2 augmentation, crops of `crop_scale` of the
    image: 0.85-1 is the `shapes` default; MoCo v2's 0.2-1 zooms in on part of it); masks
    are the query masks of `strategy` as train.py draws them on a `grid` (r ~ U(`mask_ratio`);
    for `hp` the 0.55 cap, channel-wise masks and the focal masks that keep only a square), so
    a share is of the object's pixel values (a pixel hidden in one channel of three counts a
    third). Spectral and SCDA foreground follow the rule mean - `std_factor` std (the paper's
    0.6); the true foreground is the patches the object covers by half. Every masking draws
    the same random numbers, so two calls that differ in `std_factor` alone give random
    masking's figures twice, equal.
    Returns ({masking: {"median", "p90", "p99", "over_half"}}, {source: {"foreground",
    "iou", "precision"}}), shares, foreground shares and quality in %."""
    views, object_masks = _shapes_views(num_images, image_size, seed, tuple(object_scale), tuple(crop_scale))
    sources = {"spectral saliency": saliency.Saliency("spectral", grid, std_factor=std_factor),
               "true foreground (gt)": saliency.Saliency("gt", grid)}
    if saliency_weights:
        sources["SCDA, supervised network"] = saliency.Saliency("pretrained", grid, weights=saliency_weights,
                                                                std_factor=std_factor)
    truth = saliency.gt_foreground_patches(object_masks, grid)
    foregrounds, quality = {"random": None}, {}
    for name, source in sources.items():
        fg = torch.cat([source(views[i:i + 500], masks=object_masks[i:i + 500]) for i in range(0, num_images, 500)])
        foregrounds[f"balanced, {name}"] = fg
        overlap = (fg & truth).sum(1).float()
        quality[name] = {"foreground": round(100 * float(fg.float().mean()), 1),
                         "iou": round(100 * float((overlap / (fg | truth).sum(1).clamp(min=1)).mean()), 1),
                         "precision": round(100 * float((overlap / fg.sum(1).clamp(min=1)).mean()), 1)}
    masker, shares = masking.Masker(strategy, grid, positive_ratio=tuple(mask_ratio)), {}
    for name, fg in foregrounds.items():
        _, pixel_mask = masker(views, fg, "positive", torch.Generator().manual_seed(seed + 2))   # [B, 1 or 3, H, W]
        hidden = (pixel_mask & object_masks[:, None]).float().mean(1).sum((1, 2))
        share = 100 * hidden / object_masks.sum((1, 2)).clamp(min=1)
        q = torch.quantile(share, torch.tensor([0.5, 0.9, 0.99]))
        shares[name] = {"median": round(float(q[0]), 1), "p90": round(float(q[1]), 1),
                        "p99": round(float(q[2]), 1), "over_half": round(100 * float((share > 50).float().mean()), 2)}
    return shares, quality


MECHANISM_FLAGS = ("--image-size", "--crop-scale", "--shapes-object-scale")
SWEEP_FLAGS = ("--grid", "--strategy", "--mask-ratio", "--fg-std-factor")


def mechanism_views(train_args):
    """What --mechanism measures, from the train.py flags it was given: the views (only the
    flags of MECHANISM_FLAGS: the others change training, not the views) {"image_size",
    "crop_scale", "object_scales"}, train.py's defaults for `shapes` where a flag is absent;
    and the masks, each flag of SWEEP_FLAGS with one value or several (--mask-ratio: LO HI
    pairs) {"grids", "strategies", "mask_ratios", "std_factors"}, train.py's default where absent."""
    parser = runs.OneLineParser(prog="study.py --mechanism", add_help=False)
    parser.add_argument("--grid", type=int, nargs="+", default=[7])
    parser.add_argument("--strategy", choices=masking.STRATEGIES, nargs="+", default=["hp"])
    parser.add_argument("--mask-ratio", type=float, nargs="+", default=list(masking.POSITIVE_RATIO))
    parser.add_argument("--fg-std-factor", type=float, nargs="+", default=[0.6])
    sweep, view_args = parser.parse_known_args(train_args)
    other = [a for a in view_args if a.startswith("-") and a.split("=")[0] not in MECHANISM_FLAGS]
    if other:
        runs.fail(f"{other[0]}: --mechanism measures views and masks and reads only "
                  f"{', '.join(MECHANISM_FLAGS + SWEEP_FLAGS)}; drop the other train.py flags")
    if len(sweep.mask_ratio) % 2:
        runs.fail(f"--mask-ratio {' '.join(map(str, sweep.mask_ratio))}: give LO HI pairs, one per ratio range")
    mask_ratios = [tuple(sweep.mask_ratio[i:i + 2]) for i in range(0, len(sweep.mask_ratio), 2)]
    for lo, hi in mask_ratios:                           # train.py's checks, for each value of the sweep
        for grid, factor in zip(sweep.grid, sweep.fg_std_factor + sweep.fg_std_factor[-1:] * len(sweep.grid)):
            config.parse_args(["--device", "cpu", "--out", os.devnull, "--mask-ratio", str(lo), str(hi),
                               "--grid", str(grid), "--fg-std-factor", str(factor), *view_args], prog="study.py")
    flags = config.parse_args(["--device", "cpu", "--out", os.devnull, *view_args], prog="study.py")
    given = any(a.split("=")[0] == "--shapes-object-scale" for a in view_args)
    return {"image_size": flags.image_size, "crop_scale": tuple(flags.crop_scale),
            "object_scales": [tuple(flags.shapes_object_scale)] if given else list(MECHANISM_SCALES),
            "grids": sweep.grid, "strategies": sweep.strategy, "mask_ratios": mask_ratios,
            "std_factors": sweep.fg_std_factor}


def mechanism_table(shares, quality):
    lines = ["| query mask | share of the object hidden: median | 90th percentile | 99th percentile | "
             "views with over half hidden |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['median']} % | {s['p90']} % | {s['p99']} % | {s['over_half']} % |"
              for name, s in shares.items()]
    lines += ["", "| foreground source | foreground share | patch IoU with gt | precision |", "|---|---|---|---|"]
    lines += [f"| {name} | {q.get('foreground', '-')} % | {q['iou']} % | {q['precision']} % |"
              for name, q in quality.items()]
    return "\n".join(lines)


def sweep_tables(settings):
    """Markdown for a sweep's `settings` (main's records: one per grid, fill, mask ratio and
    foreground rule): the tail (views with over half of the object hidden) by fill, grid and
    ratio at the first rule; then, per grid, each source under each rule: its foreground
    share, patch IoU and precision against gt, and its tail at each fill and ratio."""
    first = settings[0]["std_factor"]
    names = list(settings[0]["shares"])
    short = lambda name: name.replace("balanced, ", "").replace("true foreground (gt)", "gt")
    lines = [f"Views with over half of the object hidden (foreground rule mean - {first} std):", "",
             "| fill, grid | mask ratio | " + " | ".join(map(short, names)) + " |",
             "|---|---|" + "---|" * len(names)]
    lines += [f"| {s['strategy']}, {s['grid']} | {s['mask_ratio'][0]}-{s['mask_ratio'][1]} | "
              + " | ".join(f"{s['shares'][n]['over_half']} %" for n in names) + " |"
              for s in settings if s["std_factor"] == first]
    for grid in dict.fromkeys(s["grid"] for s in settings):
        at = [s for s in settings if s["grid"] == grid]
        masks = list(dict.fromkeys((s["strategy"], tuple(s["mask_ratio"])) for s in at))
        lines += ["", f"Grid {grid}: the foreground rule mean - F std, and the tail it leaves:", "",
                  "| source | F | foreground | patch IoU with gt | precision | "
                  + " | ".join(f"over half, {fill} {lo}-{hi}" for fill, (lo, hi) in masks) + " |",
                  "|---|---|---|---|---|" + "---|" * len(masks)]
        tail = {(s["strategy"], tuple(s["mask_ratio"]), s["std_factor"]): s["shares"] for s in at}
        factors = list(dict.fromkeys(s["std_factor"] for s in at))
        rows = [("random", first)] + [(name, factor) for name in at[0]["quality"]
                                      for factor in (factors if "gt" not in name else [first])]
        for name, factor in rows:
            q = next(s for s in at if s["std_factor"] == factor)["quality"].get(name)
            key = "random" if name == "random" else f"balanced, {name}"
            lines.append(f"| {short(name)} | {factor if q and 'gt' not in name else '-'} | "
                         + (f"{q['foreground']} % | {q['iou']} % | {q['precision']} %" if q else "- | - | -") + " | "
                         + " | ".join(f"{tail[(fill, ratio, factor)][key]['over_half']} %" for fill, ratio in masks)
                         + " |")
    return "\n".join(lines)


def figure(path, train_args=(), count=6, seed=0):
    """The views of one batch of the default run (or of `train_args`), drawn as train.py
    draws its per-epoch grids: view, foreground, query mask, query, key, hard negative."""
    args = config.parse_args(["--batch-size", "16", "--bn-splits", "2", "--queue-size", "64", "--device", "cpu",
                             "--out", os.devnull, *train_args])
    parts = train.build(args, steps_per_epoch=1)
    images, masks, labels = shapes.make_shapes(16, args.image_size, seed=seed + 2)
    torch.manual_seed(seed)
    with torch.no_grad():
        query, key, negatives, _, figures = train.make_views(args, (images, images, masks, masks, labels), parts)
    masking.save_view_grid(path, figures, query, key, negatives, args.grid, count=count)


def measure_mechanism(args, views):
    """--mechanism: every setting of the sweep at each object scale, printed and written."""
    sweep = [views.pop(name) for name in ("grids", "strategies", "mask_ratios", "std_factors")]
    measured = []
    for scale in views.pop("object_scales"):
        print(f"\nobjects of radius {scale[0]}-{scale[1]} of the side{' (the default)' * (scale == shapes.OBJECT_SCALE)}:")
        at_scale = []
        for grid, strategy, ratio, factor in itertools.product(*sweep):
            shares, quality = mechanism(object_scale=scale, saliency_weights=args.saliency_weights, grid=grid,
                                        strategy=strategy, mask_ratio=ratio, std_factor=factor, **views)
            at_scale.append({"object_scale": list(scale), "grid": grid, "strategy": strategy,
                             "mask_ratio": list(ratio), "std_factor": factor, "shares": shares, "quality": quality})
        print(mechanism_table(shares, quality) if len(at_scale) == 1 else sweep_tables(at_scale), flush=True)
        measured += at_scale
    runs.write_json(args.mechanism_json, {"commit": runs.code_commit(), "saliency_weights": args.saliency_weights,
                                          **views, "scales": measured})
    return measured


def main(argv=None):
    parser = runs.OneLineParser(prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(1, len(ROWS) + 1)),
                        help=f"row numbers, 1-{len(ROWS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 0 1 2 for MoCo rows, 0 1 for SimCLR and BYOL rows")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU takes several)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--out", default="runs/study", help="run folders")
    parser.add_argument("--results", default="results/study.json")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="what the runs are evaluated on: test (reported results) or val (tuning defaults)")
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    parser.add_argument("--mechanism", action="store_true",
                        help="only measure how much of the object a query mask hides (no training), at each "
                             "object scale of MECHANISM_SCALES (or the one --shapes-object-scale names), in "
                             "the views of train.py's --image-size and --crop-scale")
    parser.add_argument("--saliency-weights", metavar="PATH",
                        help="with --mechanism: also SCDA saliency from this network (evaluate.py --supervised "
                             "--stem cifar --save-weights PATH)")
    parser.add_argument("--mechanism-json", nargs="+", default=["results/mechanism.json", "results/mechanism-ratio.json"],
                        help="where --mechanism writes its figures (one file; default results/mechanism.json) and "
                             "--gain-figure reads them (every file given)")
    parser.add_argument("--figure", metavar="PNG", help="only draw the views of one batch (the README's picture)")
    parser.add_argument("--gain-figure", metavar="PNG",
                        help="only draw balanced masking's gain over random against how often a random mask hides "
                             "most of the object, every setting with runs (needs matplotlib)")
    args, args.train_args = parser.parse_known_args(argv)             # the rest goes to train.py
    bad = [r for r in args.rows if not 1 <= r <= len(ROWS)]
    if bad:
        runs.fail(f"--rows {bad[0]}: rows are 1-{len(ROWS)}")
    if args.jobs < 1 or args.threads < 1:
        runs.fail(f"--jobs {args.jobs} --threads {args.threads}: need at least 1 of each")
    if args.mechanism:
        if len(args.mechanism_json) != 1 and args.mechanism_json != parser.get_default("mechanism_json"):
            runs.fail("--mechanism writes one --mechanism-json file: give one path")
        args.mechanism_json = args.mechanism_json[0]
        if not runs.can_write(args.mechanism_json):                  # before the measurement, not after it
            runs.fail(f"--mechanism-json {args.mechanism_json}: cannot write there; pick another path")
    if args.mechanism:
        views = mechanism_views(args.train_args)
        try:
            return measure_mechanism(args, views)
        except RuntimeError as error:                                 # --saliency-weights: say the fix
            if "--saliency" not in str(error):
                raise
            runs.fail(error)
    for flag, path in (("--figure", args.figure), ("--gain-figure", args.gain_figure)):
        if path is not None and (not path or os.path.isdir(path) or not runs.can_write(path)
                                 or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            runs.fail(f"{flag} {path!r}: cannot write a picture there (a folder, or a folder that does not exist); "
                      f"give a file name such as results/views.png")
    if args.figure:
        return figure(args.figure, args.train_args)
    results = load(args.results)
    if args.gain_figure:
        return gain_figure(args.gain_figure, results, [read_mechanism(p) for p in args.mechanism_json], args.split)
    if args.table:
        print(table(results, args.train_args, args.split))
        if not args.train_args:
            print(*("\n" + t for t in setting_tables(results, args.split)), sep="\n")
        return None
    done = {identity(r["args"]) for r in results if "args" in r and split_of(r) == args.split}
    todo = [(row, seed) for row in args.rows for seed in (args.seeds or SEEDS[ROWS[row - 1][0]])
            if identity(resolve(row, seed, args.train_args)) not in done]
    print(f"{len(todo)} runs to do, {len(results)} in {args.results}; {args.jobs} at a time", flush=True)
    lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        failures = [f for f in pool.map(lambda job: run_one(*job, args, lock), todo) if f]
    except KeyboardInterrupt:                # no new run; those in flight got Ctrl-C too: they save and stop
        print("Ctrl-C: starting no new run, waiting for those in flight to save and stop", file=sys.stderr, flush=True)
        pool.shutdown(cancel_futures=True)
        print(f"stopped: {len(load(args.results))} runs in {args.results}; the same command continues where "
              f"the study stopped", file=sys.stderr)
        sys.exit(130)
    pool.shutdown()
    print(table(load(args.results), args.train_args, args.split))
    if failures:
        print(f"{len(failures)} of {len(todo)} runs failed:", *failures, sep="\n", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    runs.run_script(main)
