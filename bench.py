"""Speed benchmarks. Figures in the README come from here.

    python bench.py                                    # a training step, split into its parts
    python bench.py --amp bf16 --channels-last         # on a GPU: the fast settings
    python bench.py --augment torchvision --workers 8  # per-image augmentation in the loader instead
    python bench.py --part masking                     # masks and fills against a per-image loop
    python bench.py --part encoder --amp bf16          # the encoder alone: layouts, BatchNorm sub-batches

`step` (the default): MoCo v2 at ResNet-18, 32 px, batch 256, on the current device (the
CIFAR stem on a GPU, the cheaper ImageNet stem on a CPU). First each part of a step of the
paper's method alone (data, augmentation, saliency, mask building and filling, query
forward+backward, key forward, hard-negative forward, optimizer; `--no-parts` skips this),
then whole training steps (`train.train_step`, what train.py runs) for three configurations
in the same process, in turns: the plain framework, + saliency-balanced masking, + one
masked hard negative. Images/s are medians over `--repeats` turns, so the ratios hold on a
noisy machine. The overhead of the method's views is the step's view pipeline
(`make_views`, compiled under `--compile`) of the method less that of a plain step:
saliency, masks, fills and the high-pass filter, as a share of a plain step.

`encoder`: the encoder's forward + backward alone, per memory layout, with and without
BatchNorm sub-batches.

`masking`: the batched masks and fills of masking.py against a straightforward per-image
loop (a randperm per image, patches filled one at a time), on the same inputs. Medians of
`--repeats` runs.

`--json PATH` also writes what was printed, with the device, the commit and the
configuration (results/bench-GPUNAME.json holds a GPU's). The warm-up of each whole-step
configuration is timed apart: with `--compile` it is the compile time. `--sync-debug` (a
GPU) records every host synchronisation inside the timed steps; a step should have none.
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import contextlib
import math
import os
import platform
import statistics
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import config
import data
import masking
import models
import runs
import shapes
import train
from losses import l2norm


def median_seconds(fn, repeats, device, *, warmup=True):
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------- per-image reference

def loop_balanced_masks(fg, ratio):
    """Reference: SPEC.md section 3 counts with a randperm per image. bool [B, N]."""
    B, N = fg.shape
    masks = torch.zeros_like(fg)
    for i in range(B):
        fg_idx, bg_idx = fg[i].nonzero()[:, 0], (~fg[i]).nonzero()[:, 0]
        r = float(ratio[i])
        n_fg = min(round(r * len(fg_idx)), len(fg_idx))
        n_bg = min(max(math.floor(r * N) - n_fg, 0), len(bg_idx))
        masks[i, fg_idx[torch.randperm(len(fg_idx), device=fg.device)[:n_fg]]] = True
        masks[i, bg_idx[torch.randperm(len(bg_idx), device=fg.device)[:n_bg]]] = True
    return masks


def loop_noise_fill_(images, masks, grid, std):
    """Reference: each masked patch of each image gets its own noise tensor."""
    B, C, H, W = images.shape
    for i in range(B):
        for patch in masks[i].nonzero()[:, 0].tolist():
            row, col = divmod(patch, grid)
            y0, y1 = -(-row * H // grid), -(-(row + 1) * H // grid)      # ceil, as patch_to_pixel_mask
            x0, x1 = -(-col * W // grid), -(-(col + 1) * W // grid)
            images[i, :, y0:y1, x0:x1] = torch.randn(C, y1 - y0, x1 - x0, device=images.device) * std
    return images


def bench_masking(args, device):
    B, S, g = args.batch_size, args.image_size, args.grid
    gen = torch.Generator(device=device).manual_seed(0)
    views = torch.randn(B, 3, S, S, device=device)
    fg = torch.rand(B, g * g, device=device, generator=gen) < 0.6
    ratio = masking.sample_ratios(B, *masking.POSITIVE_RATIO, gen, device=device)
    std = masking.NOISE_STD["positive"]

    def batched_masks():
        return masking.balanced_mask(fg, ratio, gen)

    def batched_masks_and_fill():
        patch_mask = masking.balanced_mask(fg, ratio, gen)[:, None]          # spatial: all channels
        return masking.fill_noise_(views.clone(), patch_mask, g, std, gen)

    def loop_masks_and_fill():
        return loop_noise_fill_(views.clone(), loop_balanced_masks(fg, ratio), g, std)

    def clone_only():                                                  # both sides copy the views
        return views.clone()

    hp = masking.Masker("hp", g)
    rows = [
        ("masks, batched", median_seconds(batched_masks, args.repeats, device)),
        ("masks, per-image loop", median_seconds(lambda: loop_balanced_masks(fg, ratio), args.repeats, device)),
        ("masks + hp noise fill, batched", median_seconds(batched_masks_and_fill, args.repeats, device)),
        ("masks + hp noise fill, per-image loop", median_seconds(loop_masks_and_fill, args.repeats, device)),
        ("(copy of the views, in both)", median_seconds(clone_only, args.repeats, device)),
        ("Masker('hp') positive, full", median_seconds(lambda: hp(views, fg, "positive", gen), args.repeats, device)),
        ("Masker('hp') negative, full", median_seconds(lambda: hp(views, fg, "negative", gen), args.repeats, device)),
    ]
    for strategy in ("blur", "mean"):
        masker = masking.Masker(strategy, g)
        rows.append((f"Masker('{strategy}') positive, full",
                     median_seconds(lambda: masker(views, fg, "positive", gen), args.repeats, device)))
    print(f"masking, {B} views of 3x{S}x{S}, grid {g}, {device} ({describe(device)}), "
          f"median of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:40s} {seconds * 1e3:9.2f} ms")
    t = dict(rows)
    speedups = {"masks": t["masks, per-image loop"] / t["masks, batched"],
                "masks + noise fill": t["masks + hp noise fill, per-image loop"] / t["masks + hp noise fill, batched"]}
    for name, ratio in speedups.items():
        print(f"  speed-up, {name + ':':20s} {ratio:6.1f}x")
    return {"ms": {name: round(seconds * 1e3, 3) for name, seconds in rows},
            "speed_up": {name: round(ratio, 2) for name, ratio in speedups.items()}}


# ----------------------------------------------------------------------------- the encoder alone

def bench_encoder(args, device):
    """The model part of a step alone: the encoder's forward + backward and its no-grad forward,
    for each memory layout with SplitBatchNorm2d (8 sub-batches, train.py's default for small
    images) and with plain BatchNorm. What the sub-batches cost, and which layout is faster."""
    B, S = args.batch_size, args.image_size
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    rows = {}
    for layout, memory_format in [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)]:
        for splits in (8, 1):
            torch.manual_seed(0)
            encoder = models.ResNetEncoder(args.arch, cifar_stem=args.stem == "cifar", bn_splits=splits)
            encoder = encoder.to(device, memory_format=memory_format)
            x = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=memory_format)

            def forward_backward():
                with autocast():
                    encoder(x).float().sum().backward()

            def forward():
                with torch.no_grad(), autocast():
                    encoder(x)
            name = f"{layout}, {'SplitBatchNorm2d (8)' if splits > 1 else 'BatchNorm2d'}"
            rows[name] = {"forward_backward_ms": round(median_seconds(forward_backward, args.repeats, device) * 1e3, 3),
                          "forward_ms": round(median_seconds(forward, args.repeats, device) * 1e3, 3)}
    print(f"encoder: {args.arch} ({args.stem} stem), {S} px, batch {B}, amp {args.amp}; {device} "
          f"({describe(device)}); medians of {args.repeats}")
    for name, ms in rows.items():
        print(f"  {name:38s} forward + backward {ms['forward_backward_ms']:8.2f} ms   forward {ms['forward_ms']:8.2f} ms")
    return {"encoder_ms": rows}


# ----------------------------------------------------------------------------- training step

CONFIGS = {"plain": ["--masking", "none"],
           "+ masking": ["--masking", "saliency", "--num-hard-negatives", "0"],
           "+ hard negative": ["--masking", "saliency", "--num-hard-negatives", "1"]}


def train_flags(args, setting):
    """train.py's flags for one configuration of the benchmark; a bad value stops bench.py in
    one line (before anything is timed: main checks them first)."""
    argv = ["--framework", args.framework, "--arch", args.arch, "--stem", args.stem,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--device", args.device, "--amp", args.amp, "--saliency", args.saliency,
            "--strategy", args.strategy, "--augment", args.augment, "--compile", args.compile,
            "--out", "bench-not-written", *(["--workers", str(args.workers)] if args.workers is not None else []),
            *(["--bn-splits", str(args.bn_splits)] if args.bn_splits is not None else []),
            *(["--channels-last"] if args.channels_last else []),
            *CONFIGS[setting]]
    flags = config.parse_args(argv, prog="bench.py")
    flags.epochs, flags.warmup_epochs = 1, 0.0
    return flags


def step_setup(args, setting):
    """train.py's flags, objects and data for one configuration of the benchmark."""
    flags = train_flags(args, setting)
    dataset = data.pretrain_dataset("shapes", image_size=args.image_size, augment=args.augment,
                                    crop_scale=tuple(flags.crop_scale), shapes_size=(args.batch_size * 8, 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=flags.workers, pin_memory=flags.device.startswith("cuda"),
                                         persistent_workers=flags.workers > 0)
    return flags, train.build(flags, steps_per_epoch=10 ** 6), loader


def batches(loader):
    """The loader's batches, epoch after epoch; an epoch with no batch (fewer images than one,
    with drop_last) is an error, not an endless loop."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise data.DataError(f"{len(loader.dataset)} images make no batch of {loader.batch_size}: use a smaller "
                                 f"--batch-size or more images")


def profile_parts(args, device):
    """Seconds per batch of each part of a step of the method (MoCo), each timed alone."""
    flags, parts, loader = step_setup(args, "+ hard negative")
    compiled = train.compile_with(flags.compile)                      # each part on its own
    model, sal, masker = parts.model, parts.sal, parts.masker
    stream = batches(loader)
    raw = [t.to(device) for t in next(stream)]
    views = {}

    def augment():
        if parts.augment is None:                  # --augment torchvision: done in the loader (data)
            views.update(v1=raw[0], m1=raw[2], v2=raw[1], m2=raw[3])
            return
        views["v1"], views["m1"] = parts.augment(raw[0], raw[2])
        views["v2"], views["m2"] = parts.augment(raw[1], raw[3])

    def saliencies():
        encoder = model.saliency_encoder
        views["fg1"] = sal(views["v1"], encoder=encoder, masks=views["m1"])
        views["fg2"] = sal(views["v2"], encoder=encoder, masks=views["m2"])

    def mask_and_fill():
        views["query"] = masker(views["v1"], views["fg1"], "positive")[0]
        views["key"] = masker.filter(views["v2"])
        views["negatives"] = masker(views["key"], views["fg2"], "negative", filtered=True)[0]

    def layout(x):
        return x.contiguous(memory_format=torch.channels_last) if flags.channels_last else x

    def query_forward_backward():
        with parts.autocast():
            l2norm(model.head_q(model.encoder_q(layout(views["query"])))).sum().backward()

    def key_forward():
        with torch.no_grad(), parts.autocast():
            model.encode_keys(layout(views["key"]))

    def negative_forward():
        with torch.no_grad(), parts.autocast(), models.batch_stats_only(model.encoder_k):
            models.forward_shuffled(model.key_network, layout(views["negatives"]))

    def optimizer_step():
        parts.optimizer.step()

    data_seconds = median_seconds(lambda: [t.to(device, non_blocking=True) for t in next(stream)],
                                  args.repeats, device)
    for fill in (augment, saliencies, mask_and_fill):                 # the inputs of the later parts
        fill()
    rows = [("data (loader, to device)", data_seconds)]
    for name, fn in [("augmentation (2 views)", compiled(augment)), ("saliency (2 views)", compiled(saliencies)),
                     ("mask building + filling", compiled(mask_and_fill)),
                     ("query forward + backward", compiled(query_forward_backward)),
                     ("key forward (+ momentum update)", compiled(key_forward)),
                     ("hard-negative forward", compiled(negative_forward)), ("optimizer", optimizer_step)]:
        rows.append((name, median_seconds(fn, args.repeats, device)))
    return rows


def bench_step(args, device):
    B = args.batch_size
    print(f"training step: {args.framework} {args.arch} ({args.stem} stem), {args.image_size} px, batch {B}, "
          f"saliency {args.saliency}, fill {args.strategy}, amp {args.amp}, channels_last {args.channels_last}, "
          f"compile {args.compile}; {device} ({describe(device)}); medians of {args.repeats}")
    parts = dict(profile_parts(args, device)) if args.framework == "moco" and not args.no_parts else {}
    for name, seconds in parts.items():
        print(f"  {name:34s} {seconds * 1e3:9.2f} ms")

    setups = {setting: step_setup(args, setting) for setting in CONFIGS}
    args.workers = setups["plain"][0].workers                          # as resolved, for --json
    streams = {setting: batches(loader) for setting, (_, _, loader) in setups.items()}

    def steps(setting):
        flags, objects, _ = setups[setting]
        for _ in range(args.steps):
            train.train_step(flags, next(streams[setting]), objects)
    warmup = {setting: median_seconds(lambda: steps(setting), 1, device, warmup=False)   # and compile
              for setting in CONFIGS}
    times = {setting: [] for setting in CONFIGS}
    with synchronisations_recorded(args.sync_debug) as syncs:
        for _ in range(args.repeats):                                 # in turns: noise hits all alike
            for setting in CONFIGS:
                times[setting].append(median_seconds(lambda: steps(setting), 1, device, warmup=False) / args.steps)
    step = {setting: statistics.median(t) for setting, t in times.items()}
    plain = step["plain"]
    report = {"parts_ms": {name: round(seconds * 1e3, 3) for name, seconds in parts.items()},
              "whole_steps": {setting: {"images_per_s": round(B / seconds, 1), "ms_per_step": round(seconds * 1e3, 3),
                                       "against_plain": round(seconds / plain, 3),
                                       "warmup_seconds": round(warmup[setting], 2)}
                              for setting, seconds in step.items()}}
    print(f"whole steps ({args.steps} per turn), images/s:")                # printed as written: rounded once
    for setting, figures in report["whole_steps"].items():
        print(f"  {setting:34s} {figures['images_per_s']:9.0f} img/s  {figures['ms_per_step']:8.1f} ms/step  "
              f"{figures['against_plain']:5.2f}x plain  (warm-up{'' if args.compile == 'off' else ' + compile'}: "
              f"{figures['warmup_seconds']:.1f} s)")
    # The overhead: make_views of the method (saliency, masks, fills, the filter) less make_views
    # of a plain step (augmentation alone), each as the step runs it (compiled under --compile).
    views = {setting: views_seconds(*setups[setting][:2], next(streams[setting]), args.repeats, device)
             for setting in ("plain", "+ hard negative")}
    overhead = views["+ hard negative"] - views["plain"]
    report["views_ms"] = {setting: round(seconds * 1e3, 3) for setting, seconds in views.items()}
    report["overhead_share_of_plain"] = round(overhead / plain, 4)

    def kernels(setting):                                  # a proxy for launches, eager only; no loading
        flags, objects, _ = setups[setting]
        batch = [t.to(device) for t in next(streams[setting])]
        with torch.no_grad():
            views = kernel_ops(lambda: objects.views_fn(flags, batch, objects))
        return {"views": views, "step": kernel_ops(lambda: train.train_step(flags, batch, objects))}
    if args.compile == "off":
        report["kernel_ops"] = {setting: kernels(setting) for setting in ("plain", "+ hard negative")}
    print(f"  views (make_views): plain {views['plain'] * 1e3:.2f} ms, the method "
          f"{views['+ hard negative'] * 1e3:.2f} ms; saliency + masks + fills: {overhead * 1e3:.2f} ms, "
          f"{100 * report['overhead_share_of_plain']:.1f} % of a plain step (target <= 10 %)")
    print(f"  the method: {step['+ hard negative'] / plain:.2f}x plain (target <= 1.45x)")
    if "kernel_ops" in report:
        print("  operators run on the device (about one kernel launch each): "
              + "; ".join(f"{setting}: views {ops['views']}, whole step {ops['step']}"
                          for setting, ops in report["kernel_ops"].items()))
    if args.sync_debug:
        report["host_synchronisations"] = syncs
        print(f"  host synchronisations in {args.repeats * args.steps * len(CONFIGS)} timed steps: {len(syncs)}"
              + "".join(f"\n    {where}" for where in sorted(set(syncs))))
    return report


# ----------------------------------------------------------------------------- the paper's recipe

def per_image_ms(dataset, count, repeats):
    """Median (over `repeats` passes) of the mean ms one process spends per item: a loader
    worker's cost per image."""
    def one_pass():
        for i in range(count):
            dataset[i]
    return 1000 * median_seconds(one_pass, repeats, torch.device("cpu")) / count


def loader_images_per_s(dataset, batch_size, workers, batches_timed):
    """Images/s a DataLoader delivers with `workers` processes, after its first batch (the
    workers' start is not timed), over at least 4 batches more than its workers hold ready."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    stream = batches(loader)
    next(stream)
    batches_timed = max(batches_timed, 2 * workers + 4)               # 2 prefetched per worker
    start = time.perf_counter()
    for _ in range(batches_timed):
        next(stream)
    return batch_size * batches_timed / (time.perf_counter() - start)


def peak_host_mb():
    """Peak resident memory of this process and of its (ended) children, MB."""
    import resource
    return {who: round(resource.getrusage(which).ru_maxrss / 1024)
            for who, which in (("main", resource.RUSAGE_SELF), ("workers", resource.RUSAGE_CHILDREN))}


IMAGENET100_TRAIN_IMAGES = 126_689                    # the paper's pre-training set


def bench_recipe(args, device):
    """`--recipe paper`: ResNet-50, 224 px, an ImageFolder of JPEGs (`--data-dir`, or a
    temporary `shapes` one at ImageNet's sizes), SCDA saliency from a ResNet-50 (random
    weights: the cost is the same; or `--saliency-weights`), the hard negative, hp. Times (a) the loader alone, per
    image in one process and in images/s with 1 and 2 workers, for the reference augmentation
    and the split one; (b) the training step alone on uint8 views already in memory; (c) both
    together, the split loader with `--workers` feeding train_step; and says which bounds, the
    share of time the device is busy (end to end over the step alone) and the hours that 200
    epochs of ImageNet-100 take at the end-to-end rate."""
    import shutil
    import tempfile
    from torchvision.models import resnet50
    workdir = tempfile.mkdtemp(prefix="bench-recipe-")
    try:
        folder = args.data_dir
        if folder is None:
            folder = os.path.join(workdir, "jpegs")
            shapes.write_shapes_folder(folder, (max(4 * args.batch_size, 40), 10))
        weights = args.saliency_weights or os.path.join(workdir, "resnet50.pth")
        if not args.saliency_weights:
            torch.save(resnet50().state_dict(), weights)
        argv = ["--dataset", "imagefolder", "--data-dir", folder, "--arch", args.arch, "--image-size",
                str(args.image_size), "--batch-size", str(args.batch_size), "--device", args.device, "--amp", args.amp,
                "--saliency", "pretrained", "--saliency-weights", weights,
                "--compile", args.compile, "--out", os.path.join(workdir, "run"),
                *(["--workers", str(args.workers)] if args.workers is not None else []),
                *(["--bn-splits", str(args.bn_splits)] if args.bn_splits is not None else []),
                *(["--channels-last"] if args.channels_last else [])]
        flags = config.parse_args(argv, prog="bench.py")
        flags.epochs, flags.warmup_epochs = 1, 0.0
        datasets = {augment: data.pretrain_dataset("imagefolder", folder, args.image_size, augment=augment)
                    for augment in ("torchvision", "split")}
        count = min(len(datasets["split"]), 2 * args.batch_size)
        loader = {}
        for augment, dataset in datasets.items():
            ms = per_image_ms(dataset, count, args.repeats)
            loader[augment] = {"ms_per_image_one_process": round(ms, 2)}
            for workers in (1, 2):
                loader[augment][f"images_per_s_{workers}_workers"] = round(
                    loader_images_per_s(dataset, args.batch_size, workers, args.steps), 1)
        ratio = loader["torchvision"]["ms_per_image_one_process"] / loader["split"]["ms_per_image_one_process"]
        print(f"the loader alone ({folder}, {args.image_size} px, two views per image):")
        for augment, row in loader.items():
            print(f"  {augment:12s} {row['ms_per_image_one_process']:8.2f} ms per image in one process, "
                  f"{row['images_per_s_1_workers']:7.1f} images/s with 1 worker, "
                  f"{row['images_per_s_2_workers']:7.1f} with 2")
        print(f"  the split augmentation costs a worker {ratio:.1f}x less per image than the reference")

        parts = train.build(flags, steps_per_epoch=10 ** 6)
        split_loader = torch.utils.data.DataLoader(datasets["split"], batch_size=args.batch_size, shuffle=True,
                                                   drop_last=True, num_workers=flags.workers,
                                                   pin_memory=device.type == "cuda",
                                                   persistent_workers=flags.workers > 0)
        stream = batches(split_loader)
        held = [t.to(device) for t in next(stream)]                     # (b): the same batch every step

        def steps(next_batch):
            for _ in range(args.steps):
                train.train_step(flags, next_batch(), parts)
        step_s = median_seconds(lambda: steps(lambda: held), args.repeats, device)
        step_rate = args.batch_size * args.steps / step_s
        whole_s = median_seconds(lambda: steps(lambda: [t.to(device, non_blocking=True) for t in next(stream)]),
                                 args.repeats, device)
        whole_rate = args.batch_size * args.steps / whole_s
        # What the loader feeds with this many workers (one process's own rate for 0 workers).
        feed = loader["split"][f"images_per_s_{flags.workers}_workers"] if flags.workers in (1, 2) else \
            1000 / loader["split"]["ms_per_image_one_process"] * (flags.workers or 1)
        bound = "the loader" if feed < step_rate else "the training step"
        print(f"the training step alone ({args.arch}, batch {args.batch_size}, the method, SCDA saliency): "
              f"{step_rate:.1f} images/s; the split loader with {flags.workers} workers: {feed:.1f}: {bound} bounds")
        # The step alone runs back to back, so end to end over alone is the share of time the
        # device is busy with steps (the rest it waits for the loader or the host). From the
        # rates as reported, so that the JSON's figures agree with each other.
        step_rate, whole_rate = round(step_rate, 1), round(whole_rate, 1)
        busy = min(1.0, whole_rate / step_rate)
        hours = IMAGENET100_TRAIN_IMAGES * 200 / whole_rate / 3600
        print(f"end to end (the split loader, {flags.workers} workers, feeding the step): {whole_rate:.1f} images/s, "
              f"the device busy {100 * busy:.0f} % of the time; 200 epochs of ImageNet-100 at this rate: {hours:.1f} h")
        memory = peak_host_mb()
        if device.type == "cuda":
            memory["gpu"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        print(f"peak memory, MB: {memory}")
        return {"loader": loader, "split_cheaper_per_image": round(ratio, 2), "workers": flags.workers,
                "step_images_per_s": round(step_rate, 1), "loader_feeds_images_per_s": round(feed, 1),
                "end_to_end_images_per_s": round(whole_rate, 1), "busy_share": round(busy, 3),
                "hours_for_200_imagenet100_epochs": round(hours, 2),
                "bound_by": bound, "peak_memory_mb": memory, "folder": args.data_dir or "a temporary shapes folder"}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def views_seconds(flags, objects, batch, repeats, device):
    """Median time of the step's view pipeline (`objects.views_fn`, as train_step calls it) on one batch."""
    batch = [t.to(device) for t in batch]

    def views():
        with torch.no_grad():
            objects.views_fn(flags, batch, objects)
    return median_seconds(views, repeats, device)


class OpCounter(TorchDispatchMode):
    """Counts the operators that reach the device's kernels, views excluded, backward included."""
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def kernel_ops(fn):
    """How many operators `fn()` runs on its tensors' device (no views): a count of kernel
    launches, near enough. At 32 px on a GPU a step waits for its launches, so fewer is faster."""
    with OpCounter() as counter:
        fn()
    return counter.count


@contextlib.contextmanager
def synchronisations_recorded(on):
    """With `on` (a GPU), the host synchronisations inside the block, as the places that caused
    them (torch's sync debug mode, "warn"); else nothing is recorded."""
    found = []
    if not on:
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


def describe(device):
    """The device's name: the GPU's, or the CPU's with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "CPU"
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None):
    parser = runs.OneLineParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["step", "masking", "encoder"], default="step", help="what to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (--recipe paper: 128, CPU 8)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 (step), 224 (masking)")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=7)
    step = parser.add_argument_group("--part step")
    step.add_argument("--framework", choices=list(models.FRAMEWORKS), default="moco",
                      help="the part-by-part split is for moco; whole steps for any")
    step.add_argument("--arch", choices=models.ARCHS, default=None, help="default resnet18 (--recipe paper: resnet50)")
    step.add_argument("--stem", choices=["cifar", "imagenet"], default=None,
                      help="cifar: MoCo's CIFAR recipe (default on a GPU); imagenet: train.py's stem for "
                           "shapes, 19x cheaper at 32 px (default on a CPU, where a CIFAR-stem step takes ~12 s)")
    step.add_argument("--saliency", choices=["spectral", "self", "gt"], default="spectral")
    step.add_argument("--strategy", choices=masking.STRATEGIES, default="hp")
    step.add_argument("--amp", choices=["bf16", "fp16", "off"], default="off")
    step.add_argument("--channels-last", action="store_true")
    step.add_argument("--compile", nargs="?", const="default", default="off", choices=config.COMPILE_MODES,
                      metavar="MODE", help="as train.py's: the framework and the view pipeline (each part on its "
                                           "own in the part-by-part split); the optimizer stays eager")
    step.add_argument("--augment", choices=["batched", "torchvision"], default="batched",
                      help="batched: on the device (train.py's default); torchvision: per image in the loader")
    step.add_argument("--bn-splits", type=int, default=None,
                      help="BatchNorm sub-batches (default: train.py's, 8 at 32 px: --batch-size must divide by it)")
    step.add_argument("--workers", type=int, default=None,
                      help="loader workers (default: train.py's; the batched augmentation runs on the device)")
    step.add_argument("--steps", type=int, default=10, help="steps per timed turn")
    step.add_argument("--no-parts", action="store_true",
                      help="whole steps only: no part-by-part split (under --compile each part compiles on its own)")
    step.add_argument("--sync-debug", action="store_true",
                      help="a GPU: record the host synchronisations inside the timed steps (torch's sync debug mode)")
    recipe = parser.add_argument_group("--recipe paper")
    recipe.add_argument("--recipe", choices=["paper"], default=None,
                        help="the paper's recipe end to end (ResNet-50, 224 px, JPEGs, SCDA): the loader, the step, "
                             "both, and which bounds (--batch-size default 128 on a GPU, 8 on a CPU)")
    recipe.add_argument("--data-dir", default=None,
                        help="an ImageFolder (DIR/train/<class>/*.jpg); default: a temporary shapes one")
    recipe.add_argument("--saliency-weights", default=None,
                        help="the saliency network (default: a random-init ResNet-50, which costs what the paper's does)")
    parser.add_argument("--json", metavar="PATH", help="also write what was printed, with device, commit and flags")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = (128 if args.device.startswith("cuda") else 8) if args.recipe else 256
    if args.recipe:                                                   # what it runs, for the JSON record
        if args.part != "step":
            runs.fail(f"--recipe paper times the recipe's own parts: leave out --part {args.part}")
        args.image_size, args.arch = args.image_size or 224, args.arch or "resnet50"
        args.saliency, args.augment, args.stem, args.part = "pretrained", "split", "imagenet", "recipe"
    for flag in ("batch_size", "grid", "repeats", "steps", "image_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            runs.fail(f"--{flag.replace('_', '-')} {value}: need at least 1 (see python bench.py --help)")
    if args.workers is not None and args.workers < 0:
        runs.fail(f"--workers {args.workers}: need at least 0")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        runs.fail(f"--device {args.device}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        runs.fail("--device cuda: no GPU is visible; use --device cpu")
    if args.sync_debug and device.type != "cuda":
        runs.fail("--sync-debug: host synchronisations are a GPU's; leave it out on a CPU")
    if args.json and os.path.isdir(args.json):
        runs.fail(f"--json {args.json}: is a folder; give a file name, e.g. results/bench-h100.json")
    if args.json and not runs.can_write(args.json):                   # before the benchmark, not after it
        runs.fail(f"--json {args.json}: cannot write there; pick another path")
    if args.recipe:
        try:
            report = bench_recipe(args, device)
        except data.DataError as error:                               # a folder, a file, too few images
            runs.fail(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1])
        except RuntimeError as error:                                 # saliency weights: say the fix
            if "--saliency" not in str(error):
                raise
            runs.fail(error)
    elif args.part == "masking":
        args.image_size = args.image_size or 224
        report = bench_masking(args, device)
    else:
        args.image_size, args.arch = args.image_size or 32, args.arch or "resnet18"
        args.stem = args.stem or ("cifar" if device.type == "cuda" else "imagenet")
        if args.part == "step":
            train_flags(args, "+ hard negative")                      # bad values: one line, before any timing
        report = (bench_step if args.part == "step" else bench_encoder)(args, device)
    if args.json:
        runs.write_json(args.json, {"device": describe(device), "commit": runs.code_commit(),
                                        "torch": torch.__version__, "configuration": vars(args), **report})
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    runs.run_script(main)
