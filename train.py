"""Pre-train a ResNet with saliency-guided masking and masked hard negatives, on one device
or, under torchrun, on several.

    python train.py                                  # shapes, MoCo v2 + the method, 6-11 min on 2 CPU cores
    python train.py --dataset cifar10 --data-dir data --download --epochs 200
    python train.py --masking none                   # the plain MoCo v2 baseline
    python train.py --resume runs/shapes-moco/last.pt
    torchrun --nproc_per_node 8 train.py --dataset imagefolder ...   # several GPUs (or nodes)

Per step: saliency of both views -> the query masked in proportion between foreground and
background (`masking.balanced_mask`) -> M hard negatives from the key with most of its
salient patches masked -> the framework's loss (SPEC.md sections 2-4).
Writes OUT/metrics.jsonl, OUT/views_epochN.png and OUT/last.pt (atomically, every epoch).
"""
import argparse
import atexit
import contextlib
import fcntl
import inspect
import json
import math
import multiprocessing.util
import os
import random
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed

import data
import evaluate
import masking
import models
import saliency

SMALL = 96          # images up to this size get the CIFAR single-GPU recipe's defaults
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):                                         # one line, exit code 2
        evaluate.fail(f"{message} (see python train.py --help)")


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--framework", choices=list(models.FRAMEWORKS), default="moco", help="contrastive framework (default moco = MoCo v2)")
    a("--arch", choices=models.ARCHS, default="resnet18", help="torchvision ResNet (paper: resnet50)")
    a("--stem", choices=["auto", "cifar", "imagenet"], default="auto",
      help="cifar: 3x3 stride-1 stem, no max-pool (MoCo's CIFAR demo); auto: cifar for cifar10/100")
    a("--dataset", choices=data.DATASETS, default="shapes", help="shapes is generated; the others read --data-dir")
    a("--data-dir", default="data", help="where the real datasets are (or go, with --download)")
    a("--download", action="store_true", help="let torchvision download cifar10/cifar100/stl10")
    a("--subset", type=int, default=0, help="pre-train on the first N images only (smoke runs)")
    a("--shapes-size", type=int, nargs=2, default=[20000, 5000], metavar=("TRAIN", "TEST"),
      help="number of generated shapes images per split")
    a("--shapes-object-scale", type=float, nargs=2, default=[0.25, 0.45], metavar=("LO", "HI"),
      help="a shapes object's radius as a share of the side, drawn uniformly (default 0.25 0.45: objects that "
           "fill the frame; smaller ones are where a random mask can hide them)")
    a("--augment", choices=data.AUGMENTATIONS, default=None,
      help="batched: MoCo v2 augmentation of the whole batch on the device (tensor datasets, the default "
           "there); split: crop and flip per image in the loader, colour for the batch on the device "
           "(imagefolder, the default there); torchvision: all per image in the loader (the reference)")
    a("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
      help="share of the image area a view's random crop keeps (paper: 0.2 1, the default; "
           "shapes: 0.85 1, see the README)")
    a("--image-size", type=int, default=None, help="view size (default: shapes 32, cifar 32, stl10 96, imagefolder 224)")
    a("--epochs", type=int, default=None, help="default: 8 for shapes, 200 otherwise (the paper)")
    a("--max-steps", type=int, default=0, help="stop after N optimizer steps (smoke runs); 0 = no limit")
    a("--batch-size", type=int, default=128)
    a("--warmup-epochs", type=float, default=None,
      help="linear lr warm-up before the cosine decay (default 1 for shapes, 0 otherwise: the release has none)")
    a("--lr", type=float, default=None,
      help="SGD lr; default 0.06 x batch/128 (shapes), 0.06 x batch/512 (CIFAR recipe), 0.03 x batch/256 (paper)")
    a("--weight-decay", type=float, default=None, help="default 5e-4 small images, 1e-4 large (paper)")
    a("--masking", choices=["saliency", "random", "none"], default="saliency",
      help="saliency: the paper's balanced masking; random: uniform masking; none: the plain framework")
    a("--saliency", choices=saliency.SOURCES, default="spectral",
      help="where foreground comes from; paper: pretrained (needs weights, see --saliency-weights)")
    a("--saliency-weights", default=None,
      help="local torchvision ResNet state_dict for --saliency pretrained (the paper's: ImageNet's ResNet-50; "
           "evaluate.py --supervised --save-weights writes one)")
    a("--strategy", choices=masking.STRATEGIES, default="hp", help="fill of masked patches (paper's best: hp)")
    a("--high-pass", choices=["auto", "on", "off"], default="auto",
      help="high-pass filter every view the encoders see, and the evaluation inputs; auto: on for "
           "--strategy hp with masking (the paper), else off. '--masking none --high-pass on' is "
           "the filter-only control: the plain framework on high-passed views")
    a("--grid", type=int, default=7, help="patch grid g x g (paper: 7)")
    a("--mask-ratio", type=float, nargs=2, default=[0.05, 0.25], metavar=("LO", "HI"),
      help="query mask ratio r ~ U(LO, HI) (paper: 0.05 0.25)")
    a("--hard-negative-ratio", type=float, nargs=2, default=[0.4, 0.7], metavar=("LO", "HI"),
      help="share of the key's foreground masked in a hard negative (paper: 0.4 0.7)")
    a("--num-hard-negatives", type=int, default=None,
      help="M hard negatives per image (paper: 1); default 1 with --masking saliency, else 0")
    a("--alpha", type=float, default=None,
      help="weight of the hard-negative logits (paper: 2, the default at 224 px; small images up to 96 px, "
           "shapes, CIFAR, STL: 1, because the only evidence at that size, shapes at 32 px, says alpha 2 "
           "costs 13 kNN points over three seeds, see the README)")
    a("--hard-negative-pairing", choices=models.PAIRINGS, default="own",
      help="own: each query meets its own image's hard negative (the paper's text); release: what the "
           "released MoCo code computes, each BatchNorm sub-batch standing for a GPU: every query of a "
           "sub-batch meets hard negative m of the sub-batch's image m, embedded as a batch of one image "
           "(needs a last feature map of 2x2 or more, see the README)")
    a("--queue-size", type=int, default=None, help="MoCo queue K (default 4096 small images, 65536 large)")
    a("--moco-momentum", type=float, default=None,
      help="momentum m of the key/target encoder (0.99 small, 0.999 large); BYOL: the base value, "
           "raised to 1 by a cosine over training")
    a("--temperature", type=float, default=None, help="tau (0.1 small images, 0.2 large: paper)")
    a("--bn-splits", type=int, default=None,
      help="BatchNorm sub-batches of the global batch, simulating Shuffle-BN's GPUs (default: 8 for small "
           "images, MoCo's CIFAR demo; large images: the fewest of at most 32 images, as the release's 4 "
           "GPUs at batch 128; under torchrun a multiple of the number of processes)")
    a("--amp", choices=["bf16", "fp16", "off"], default=None, help="autocast dtype (default bf16 on cuda, off on cpu)")
    a("--channels-last", action="store_true", help="channels_last memory format")
    a("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
      help="torch.compile the model and the view pipeline (saliency, masks, fills); MODE is "
           "torch.compile's, 'default' when left out, 'off' to turn it off (default: off)")
    a("--workers", type=int, default=None,
      help="data loader workers (default: 0 on a CPU with <= 4 cores, where a worker would take "
           "cores from the model; else min(8, cores / 2))")
    a("--seed", type=int, default=0)
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    a("--out", default=None, help="output folder (default: with --resume PATH the checkpoint's folder, else "
                                  "runs/DATASET-FRAMEWORK)")
    a("--resume", default=None,
      help="a last.pt to continue from (the same flags, but for where and how it runs); 'auto': "
           "OUT/last.pt when it exists, else start (a requeued job needs no edit)")
    a("--save-every", type=float, default=10.0,
      help="also checkpoint inside an epoch every N minutes (0: at epoch ends only)")
    a("--knn-every", type=int, default=0, help="kNN accuracy every N epochs (0: at the end only)")
    a("--log-every", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    fill_defaults(args)
    check_args(p, args)
    return args


def fill_defaults(args):
    """Defaults per dataset. Large images: the paper's recipe (SPEC.md section 5). CIFAR-size
    images: MoCo's CIFAR single-GPU recipe. shapes: a demo sized for 15 minutes on 2 CPU cores,
    with a warm-up epoch; without one MoCo collapses while its queue still holds random
    vectors (positive similarity 0.98 after 24 steps, measured; see the README). Its crops keep
    at least 85 % of the image, not MoCo v2's 20 %: a shape covers 20-64 % of a 32 px image,
    and crops of a fifth of it can leave view pairs that share background but not the object.
    With 20 % the default run ends 6 kNN points below its random-init encoder. Its hard
    negative enters the loss as an ordinary negative (alpha 1, not the paper's 2), and so it
    does for every small-image recipe (up to 96 px): on 32 px shapes a hard negative is little
    more than a noisier key, and with alpha 2 at tau 0.1 its one term takes most of the
    softmax denominator (88 %, the 4,096 queue negatives 11 %). With alpha 2 the run ends 13
    kNN points below alpha 1 over seeds 0-2 (study rows 9-10); nothing measured at 32-96 px
    says otherwise, so 224 px alone keeps the paper's 2."""
    size = {"shapes": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": 224}

    def default(name, value):                      # an explicit value is kept, then checked: never replaced
        if getattr(args, name) is None:
            setattr(args, name, value)
    default("image_size", size[args.dataset])
    small, shapes = args.image_size <= SMALL, args.dataset == "shapes"
    if args.stem == "auto":                                           # CIFAR stem: ~19x the time at 32 px
        args.stem = "cifar" if args.dataset in ("cifar10", "cifar100") else "imagenet"
    default("epochs", 8 if shapes else 200)
    default("crop_scale", [0.85, 1.0] if shapes else list(data.CROP_SCALE))
    default("alpha", 1.0 if small else 2.0)
    default("lr", 0.06 * args.batch_size / (128 if shapes else 512) if small else 0.03 * args.batch_size / 256)
    default("warmup_epochs", 1.0 if shapes else 0.0)
    default("weight_decay", 5e-4 if small else 1e-4)
    resumed_from = os.path.dirname(args.resume) or "." if args.resume not in (None, "auto") else None
    default("out", resumed_from or os.path.join("runs", f"{args.dataset}-{args.framework}"))
    if args.resume == "auto":                                         # under torchrun process 0's decision holds
        args.resume = os.path.join(args.out, "last.pt") if os.path.isfile(os.path.join(args.out, "last.pt")) else None
    # Small images: 8 (MoCo's CIFAR demo). Large: the fewest sub-batches of at most 32 images (the
    # release's GPUs: 4 at batch 128, 8 at 256). Under torchrun a multiple of the number of
    # processes. A resumed run keeps its checkpoint's grouping, on any number of processes that divides it.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fits = [d for d in range(world, args.batch_size + 1, world) if args.batch_size % d == 0] or [world]
    default("bn_splits", saved_flag(args.resume, "bn_splits"))
    default("bn_splits", (8 if 8 % world == 0 else world) if small else
            next((d for d in fits if args.batch_size // d <= 32), fits[-1]))
    default("queue_size", 4096 if small else 65536)
    default("moco_momentum", 0.99 if small else 0.999)
    default("temperature", 0.1 if small else 0.2)
    default("num_hard_negatives", int(args.masking == "saliency" and args.framework != "byol"))
    if args.high_pass == "auto":
        args.high_pass = "on" if args.strategy == "hp" and args.masking != "none" else "off"
    default("augment", "split" if args.dataset == "imagefolder" else "batched")   # files: cropped as read
    default("device", "cuda" if torch.cuda.is_available() else "cpu")
    default("amp", "bf16" if args.device.startswith("cuda") else "off")
    default("compile", "off")
    cores = os.cpu_count() or 1
    default("workers", 0 if args.device == "cpu" and cores <= 4 else min(8, cores // 2))


def saved_args(checkpoint_path):
    """The flags of the run that wrote `checkpoint_path`, a dict (None: no such file, or not a
    readable checkpoint; its own load reports that in one line)."""
    if not checkpoint_path:
        return None
    try:
        saved = evaluate.read_checkpoint(checkpoint_path, mmap=True)["args"]
    except evaluate.CheckpointError:
        return None
    return saved if isinstance(saved, dict) else None


def saved_flag(checkpoint_path, flag):
    return (saved_args(checkpoint_path) or {}).get(flag)


# (flag, the smallest value it takes, whether that bound is excluded): values outside their meaning
BOUNDS = [("epochs", 1, False), ("max_steps", 0, False), ("batch_size", 1, False), ("bn_splits", 1, False),
          ("lr", 0, True), ("weight_decay", 0, False), ("warmup_epochs", 0, False), ("alpha", 0, False),
          ("temperature", 0, True), ("queue_size", 1, False), ("num_hard_negatives", 0, False),
          ("moco_momentum", 0, False), ("subset", 0, False), ("workers", 0, False), ("knn_every", 0, False),
          ("log_every", 0, False), ("save_every", 0, False)]


def check_args(p, args):
    for name, low, strict in BOUNDS:
        value = getattr(args, name)
        if not (value > low if strict else value >= low):            # also refuses NaN
            p.error(f"--{name.replace('_', '-')} {value}: need a value {'>' if strict else '>='} {low}")
        if math.isinf(value):                                         # inf weights in one step
            p.error(f"--{name.replace('_', '-')} {value}: need a finite value")
    if args.moco_momentum > 1:
        p.error(f"--moco-momentum {args.moco_momentum}: need a value in [0, 1]")
    if (args.augment == "split") != (args.dataset == "imagefolder") and args.augment != "torchvision":
        p.error(f"--augment {args.augment} with --dataset {args.dataset}: use "
                f"{'split' if args.dataset == 'imagefolder' else 'batched'} (or torchvision, the reference)")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}")
    lo, hi = args.shapes_object_scale
    if not 0 < lo <= hi <= 0.5:
        p.error(f"--shapes-object-scale {lo} {hi}: need 0 < LO <= HI <= 0.5 (a radius of half the side fills it)")
    if min(args.shapes_size) < 1:
        p.error(f"--shapes-size {args.shapes_size[0]} {args.shapes_size[1]}: need at least 1 image per split")
    if not args.out:
        p.error("--out '': give an output folder")
    try:
        device = torch.device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError
    except (RuntimeError, ValueError):
        p.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    world = int(os.environ.get("WORLD_SIZE", "1"))                   # torchrun's processes
    if args.resume and args.bn_splits % world and args.bn_splits == saved_flag(args.resume, "bn_splits"):
        counts = [str(d) for d in range(1, args.bn_splits + 1) if args.bn_splits % d == 0 and args.batch_size % d == 0]
        p.error(f"--resume {args.resume} trained with --bn-splits {args.bn_splits} BatchNorm sub-batches, which do not "
                f"divide over {world} processes: resume it on {', '.join(counts[:-1])} or {counts[-1]} processes")
    if args.batch_size % world or args.bn_splits % world:
        p.error(f"--batch-size {args.batch_size} and --bn-splits {args.bn_splits} count the global batch and "
                f"its BatchNorm sub-batches: both must divide by the {world} processes")
    if args.batch_size // args.bn_splits < 2:
        p.error(f"--batch-size {args.batch_size} with --bn-splits {args.bn_splits} leaves BatchNorm fewer "
                f"than 2 images per sub-batch: use a larger batch or fewer splits")
    for flag, (lo, hi) in [("--mask-ratio", args.mask_ratio), ("--hard-negative-ratio", args.hard_negative_ratio)]:
        if not 0 <= lo <= hi <= 1:
            p.error(f"{flag} {lo} {hi}: need 0 <= LO <= HI <= 1")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        p.error(f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]}: need 0 < LO <= HI <= 1")
    if args.batch_size % args.bn_splits:
        p.error(f"--batch-size {args.batch_size} does not divide into --bn-splits {args.bn_splits}")
    if args.framework == "moco" and args.queue_size % args.batch_size:
        p.error(f"--queue-size {args.queue_size} is not a multiple of --batch-size {args.batch_size}")
    if args.num_hard_negatives and args.framework == "byol":
        p.error("BYOL has no negatives: use --num-hard-negatives 0 with --framework byol")
    if args.num_hard_negatives and args.masking != "saliency":
        p.error("hard negatives mask salient patches: they need --masking saliency (or --num-hard-negatives 0)")
    if args.saliency == "gt" and args.masking == "saliency" and args.dataset != "shapes":
        p.error(f"--saliency gt needs true object masks, which only --dataset shapes has")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no GPU is visible; use --device cpu")
    if args.image_size < 8 or args.grid < 1 or args.grid > args.image_size:
        p.error(f"--image-size {args.image_size} --grid {args.grid}: need 8 <= size and 1 <= grid <= size")
    side = models.feature_map_size(args.image_size, cifar_stem=args.stem == "cifar")
    smallest = next(size for size in range(8, 1024) if models.feature_map_size(size, cifar_stem=args.stem == "cifar") >= 2)
    larger = f"--image-size {smallest} or more"
    if args.hard_negative_pairing == "release" and args.num_hard_negatives:
        if args.framework != "moco":
            p.error(f"--hard-negative-pairing release is the released MoCo code's; use it with --framework moco")
        if side < 2:                               # BatchNorm over one image of one position: torch refuses
            p.error(f"--hard-negative-pairing release embeds each hard negative as a batch of one image, whose "
                    f"BatchNorm needs a last feature map of 2x2 or more; it is {side}x{side} at --image-size "
                    f"{args.image_size} with --stem {args.stem}: use {'--stem cifar or ' * (args.stem == 'imagenet')}{larger}")
        if args.num_hard_negatives * args.bn_splits > args.batch_size:
            p.error(f"--hard-negative-pairing release takes hard negative m from image m of each of the --bn-splits "
                    f"{args.bn_splits} sub-batches: --num-hard-negatives {args.num_hard_negatives} needs a batch of "
                    f"{args.num_hard_negatives * args.bn_splits} or more")
    if args.saliency == "self" and args.masking == "saliency" and side < 2:
        p.error(f"--saliency self: the encoder's last feature map is {side}x{side} at --image-size "
                f"{args.image_size} with --stem {args.stem}, which cannot say where the object is; "
                f"use {'--stem cifar or ' * (args.stem == 'imagenet')}{larger}")
    if args.resume and os.path.realpath(os.path.dirname(args.resume) or ".") != os.path.realpath(args.out) \
            and os.path.isdir(args.out) and os.listdir(args.out) and saved_args(args.resume) is not None:
        p.error(f"--resume {args.resume} would write into --out {args.out}, which holds another run: resume into "
                f"the checkpoint's own folder (leave out --out) or an empty --out")
    if not args.resume and os.path.exists(os.path.join(args.out, "last.pt")):
        p.error(f"{args.out}/last.pt exists: continue it with --resume auto (or --resume {args.out}/last.pt), "
                f"or pick another --out")


# ----------------------------------------------------------------------------- one step

def make_views(args, batch, parts):
    """Saliency, masking and hard negatives for one batch (SPEC.md sections 2-3), no grad.

    `batch`: the loader's tensors, on the device. Returns query [B,3,H,W], key [B,3,H,W], hard
    negatives [B,M,3,H,W] or None, the keys when they are already encoded (MoCo with
    `--saliency self`; else None), and the figures to log (foreground ratio, masked fraction)
    plus what the PNG grid shows.
    """
    augment, sal, masker, model = parts.augment, parts.sal, parts.masker, parts.model
    view1, view2, mask1, mask2, _ = batch                             # on the device
    if augment is not None:                                           # batched, split: uint8 in
        (view1, mask1), (view2, mask2) = augment(view1, mask1 if mask1.numel() else None), \
            augment(view2, mask2 if mask2.numel() else None)
    if args.masking == "none":                                        # the filter alone, when asked for
        return masker.filter(view1), masker.filter(view2), None, None, {"view1": view1}
    key, keys, fg_k = masker.filter(view2), None, None
    self_saliency = args.saliency == "self"        # the encoder's own maps: feed it what it trains on
    if self_saliency and args.num_hard_negatives and isinstance(model, models.MoCo):
        with parts.autocast():                     # the key pass also gives the key's saliency
            keys = model.encode_keys(key)
        fg_k = sal.from_map(saliency.scda_saliency(keys[1].float()))
    seen = masker.filter(view1)                                        # what the encoders see

    def foreground(view, filtered_view, masks):
        if not self_saliency:
            return sal(view, masks=masks)
        # The pass normalises with its batch's statistics, as the key pass does, but leaves the
        # running statistics to the step's own passes.
        with models.batch_stats_only(model.saliency_encoder):
            return sal(filtered_view, encoder=model.saliency_encoder)
    fg_q = None
    if args.masking == "saliency":
        fg_q = foreground(view1, seen, mask1)
    query, query_mask = masker(seen, fg_q, "positive", filtered=True)
    figures = {"masked_fraction": query_mask.float().mean(), "query_mask": query_mask, "view1": view1, "fg": fg_q}
    negatives = None
    if args.num_hard_negatives:
        if fg_k is None:
            fg_k = foreground(view2, key, mask2)
        negatives = torch.stack([masker(key, fg_k, "negative", filtered=True)[0]
                                 for _ in range(args.num_hard_negatives)], 1)
        figures["fg_ratio"] = (fg_q.float().mean() + fg_k.float().mean()) / 2
    elif fg_q is not None:
        figures["fg_ratio"] = fg_q.float().mean()
    return query, key, negatives, keys, figures


def build(args, steps_per_epoch):
    """What a training step needs, from the flags: model, optimizer, lr schedule (linear
    warm-up, then cosine), grad scaler, autocast, augmentation, saliency and masker.
    bench.py times the same objects. The cosine steps with every optimizer step; the release
    (MoCo's `adjust_learning_rate`) steps once per epoch, which differs by at most one epoch's
    worth of decay and matters only for runs of a few epochs."""
    device = torch.device(args.device)
    model = models.build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    total_steps = args.epochs * steps_per_epoch                       # the lr schedule's length
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step):
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay_steps) / decay_steps))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[args.amp]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True                         # fixed shapes: time the conv algorithms once
    compiler = compile_with(args.compile)
    return argparse.Namespace(
        device=device, model=model, optimizer=optimizer, total_steps=total_steps,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"),
        step_fn=compiler(distributed(model, device)), views_fn=compiler(make_views),
        autocast=lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
        augment=None if args.augment == "torchvision" else data.BatchedMoCoV2(
            args.image_size, tuple(args.crop_scale), geometry=args.augment == "batched"),
        sal=saliency.Saliency(args.saliency, args.grid, weights=args.saliency_weights).to(device),
        masker=masking.Masker(args.strategy, args.grid, high_pass=args.high_pass == "on",
                              positive_ratio=tuple(args.mask_ratio),
                              negative_ratio=tuple(args.hard_negative_ratio)))


def compile_with(mode):
    """`torch.compile` in `mode` (train.py's `--compile`), or nothing for 'off'. The step
    compiles two pieces: the framework's forward (its backward follows) and `make_views`.
    The optimizer stays eager. Compiled random draws come from inductor's own generator,
    seeded from torch's: the same distributions, other numbers than eager."""
    if mode in (None, "off"):
        return lambda fn: fn
    return lambda fn: torch.compile(fn, mode=None if mode == "default" else mode)


def distributed(step_fn, device):
    """Under torchrun, the framework in DistributedDataParallel (gradients averaged over the
    processes; each keeps its own BatchNorm statistics until `models.average_running_stats`);
    with one process, itself."""
    if models.process_group()[1] == 1:
        return step_fn
    for tensor in [*step_fn.parameters(), *step_fn.buffers()]:        # the same start everywhere, the queue too
        torch.distributed.broadcast(tensor.data, 0)
    ddp = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(step_fn, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


class SplitTimer:
    """Seconds spent in each part of the steps of an epoch. On a GPU the marks are CUDA events,
    read once at the end of the epoch, so timing the parts costs no synchronisation."""

    def __init__(self, device):
        self.cuda, self.events = device.type == "cuda", []
        self.seconds = {"data": 0.0, "saliency+masking": 0.0, "model": 0.0}

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, name, start, end):
        if self.cuda:
            self.events.append((name, start, end))
        else:
            self.seconds[name] += end - start

    def totals(self):
        if self.events:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000
            self.events.clear()
        return self.seconds


def train_step(args, batch, parts, timer=None):
    """One optimizer step on `batch`: views, then the framework's loss, backward, SGD, lr.
    Returns the loss (a tensor: no sync), the figures and the views. `timer`: a SplitTimer
    that gets the time of saliency+masking and of the model step."""
    start = timer.mark() if timer else None
    batch = [t.to(parts.device, non_blocking=True) for t in batch]
    with torch.no_grad():
        query, key, negatives, keys, figures = parts.views_fn(args, batch, parts)
    middle = timer.mark() if timer else None
    if args.channels_last:
        query, key = (x.contiguous(memory_format=torch.channels_last) for x in (query, key))
    if isinstance(parts.model, models.BYOL):          # the target's momentum rises to 1 by a cosine
        parts.model.momentum = models.cosine_momentum(args.moco_momentum, parts.scheduler.last_epoch,
                                                      parts.total_steps)
    with parts.autocast():
        loss, model_figures = parts.step_fn(query, key, negatives, **({"keys": keys} if keys is not None else {}))
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.scheduler.step()
    if timer:
        end = timer.mark()
        timer.add("saliency+masking", start, middle)
        timer.add("model", middle, end)
    return loss, {**figures, **model_figures}, (query, key, negatives)


def save_view_grid(path, figures, query, key, negatives, grid, *, count=6, cell=96):
    """A labelled PNG, one image per row: the augmented view, its foreground patches (green),
    its query mask (red), the query and the key as the encoders see them, the first hard
    negative (the columns that the run has). Views are scaled to `cell` px (nearest, so 32 px patches stay sharp); filtered
    (hp) images are stretched to [0, 1] per image."""
    from PIL import Image, ImageDraw, ImageFont

    def stretch(x):
        x = x[:count].float().cpu()
        low, high = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        return (x - low) / (high - low + 1e-6)

    def tint(x, mask, colour):                                        # mask: [n, 1 or C, H, W]
        mask = mask[:count].float().mean(1, keepdim=True).cpu()
        return x * (1 - 0.6 * mask) + torch.tensor(colour).view(1, 3, 1, 1) * 0.6 * mask

    view = stretch(figures["view1"])
    H, W = view.shape[-2:]
    columns = [("view", view)]
    if figures.get("fg") is not None:
        fg = masking.patch_to_pixel_mask(figures["fg"][:count, None].cpu(), grid, H, W)
        columns.append(("foreground", tint(view, fg, [0.1, 0.9, 0.1])))
    if "query_mask" in figures:
        columns.append(("query mask", tint(view, figures["query_mask"], [0.95, 0.1, 0.1])))
    columns += [("query", stretch(query)), ("key", stretch(key))]
    if negatives is not None:
        columns.append(("hard negative", stretch(negatives[:, 0])))
    rows, header, footer, gap = len(view), 22, 34, 4
    sheet = Image.new("RGB", (len(columns) * (cell + gap) + gap, header + rows * (cell + gap) + footer), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=11)
    except (TypeError, OSError):                                      # a Pillow without FreeType
        font = ImageFont.load_default()
    for c, (label, images) in enumerate(columns):
        x = gap + c * (cell + gap)
        draw.text((x, 5), label, fill="black", font=font)
        big = torch.nn.functional.interpolate(images, size=(cell, cell), mode="nearest")
        for r in range(rows):
            pixels = (big[r].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            sheet.paste(Image.fromarray(pixels), (x, header + r * (cell + gap)))
    draw.text((gap, header + rows * (cell + gap) + 3), "query, key, hard negative: as the encoders see them "
              "(high-passed views stretched to full contrast).\nThe key is the image's other view; the hard "
              "negative is the key with most of its foreground masked.", fill="black", font=font)
    sheet.save(path)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """Atomic: a half-written file never replaces a good one. A write that fails (a full disk,
    a folder that went away) or is interrupted removes its temporary file; a failure stops the
    run in one line (exit 1), with the previous checkpoint as it was."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(error, (OSError, RuntimeError)):                # a signal, a SystemExit: pass it on
            raise
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
        print(f"error: could not write {path} ({reason}); the previous checkpoint is as it was: make room "
              f"(or fix the folder) and continue with --resume auto", file=sys.stderr)
        sys.exit(1)


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Flags that say where and how a run runs, not what it computes: a resumed run may change them.
FREE_ON_RESUME = ("resume", "out", "device", "amp", "channels_last", "compile", "workers", "log_every",
                  "knn_every", "save_every", "max_steps", "data_dir", "download")


def resume_checkpoint(args):
    """The checkpoint to continue from (None: a fresh start). Under torchrun process 0's
    --resume (its `auto` decision) holds for every process, and every process must read that
    file at the same step, or they all stop with one line: on nodes without a shared --out
    the others would start from step 0 with other weights."""
    rank, world = models.process_group()
    if world > 1:
        decision = [args.resume]
        torch.distributed.broadcast_object_list(decision, 0)
        args.resume = decision[0]
    if not args.resume:
        return None
    try:
        checkpoint, problem = evaluate.read_checkpoint(args.resume, "--resume"), None
    except evaluate.CheckpointError as error:
        checkpoint, problem = None, str(error)
    if world > 1:
        seen = [None] * world
        torch.distributed.all_gather_object(seen, (problem, checkpoint and checkpoint["step"]))
        bad = [r for r, (trouble, step) in enumerate(seen) if trouble or step != seen[0][1]]
        if bad:
            if rank != 0:
                sys.exit(2)
            evaluate.fail(f"process {bad[0]} {'cannot read' if seen[bad[0]][0] else 'reads another step in'} "
                          f"{args.resume}, which process 0 resumes from: give every process the same --out, on a "
                          f"file system they share")
    if problem:
        evaluate.fail(problem)
    return checkpoint


def check_resume(args, checkpoint):
    """A resumed run is the run that was started: every other flag must be the same (flags
    that a checkpoint predates are not compared)."""
    for flag, saved in checkpoint["args"].items():                    # in the order of --help
        if flag in FREE_ON_RESUME or not hasattr(args, flag) or saved == getattr(args, flag):
            continue
        show = lambda value: " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        evaluate.fail(f"--resume {args.resume} was trained with --{flag.replace('_', '-')} {show(saved)}, "
                      f"not {show(getattr(args, flag))}: resume with the same flags, or start another --out")
    return checkpoint


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) ask the run to stop: the step (or
    kNN pass) in flight finishes, train() checkpoints and exits with 128 + the signal's number.
    A second signal stops at once."""

    def __init__(self, quiet=False):
        self.signum, self.previous, self.quiet = None, {}, quiet           # quiet: processes other than 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            print(f"{signal.Signals(signum).name} again: stopping at once", file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        self.signum = signum
        if not self.quiet:
            print(f"{signal.Signals(signum).name}: finishing the step in flight, then saving "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals(worker_id):
    """Loader workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly: a
    cluster's preemption signals every process of the job, and a worker that died of it
    would take the main process down before it could save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register            # runs before multiprocessing's own exit handler, registered at its import
def end_loader_workers():
    """At exit, end the loader workers that are still alive with SIGKILL. Python ends daemonic
    children with SIGTERM, which ours ignore, and then waits for them: a loader that an error
    left running (its iterator held by the traceback) hung the process after its one-line error.
    The loader's SIGCHLD handler would report these deaths as a crash: it goes first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
        child.join()


def lock_out_folder(out):
    """Hold OUT/train.lock for the run's life: an OS lock (fcntl.flock) that the kernel drops
    when the process ends, however it ends, so a dead run's lock is free whatever its file
    says (a requeued job in a container may find its old PID alive as another process), and
    two live runs never both hold it. The file names its holder (pid and host) for the
    message. A live holder: one line, exit 2. Returns the function that releases it."""
    path = os.path.join(out, "train.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "starting"
            os.close(fd)
            evaluate.fail(f"--out {out}: another run ({holder}) is writing there; wait for it to end or pick "
                          f"another --out")
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:          # not a file its last holder removed meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release():
        with contextlib.suppress(OSError):
            os.remove(path)                                           # while still held: see the inode check above
        os.close(fd)
    return release


def open_metrics(path, checkpoint):
    """metrics.jsonl for appending. A resumed run first drops the records written after its
    checkpoint (a killed run logs steps that the resumed run repeats); a fresh run starts it anew."""
    kept, damaged = [], 0
    if checkpoint and os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    step = record.get("step", 0)
                except (ValueError, AttributeError):                  # cut short by a kill or a full disk, blank
                    damaged += 1
                    continue
                if step <= checkpoint["step"]:
                    kept.append(line if line.endswith("\n") else line + "\n")
    if damaged:
        print(f"note: {path}: {damaged} damaged or blank line(s) dropped (a write cut short by a kill or a "
              f"full disk); the {len(kept)} complete records up to the checkpoint are kept", file=sys.stderr)
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


# ----------------------------------------------------------------------------- the run

def train(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    checkpoint = resume_checkpoint(args)
    if checkpoint:
        check_resume(args, checkpoint)

    train_set = data.pretrain_dataset(args.dataset, args.data_dir, args.image_size, download=args.download,
                                      augment=args.augment, crop_scale=tuple(args.crop_scale),
                                      shapes_size=tuple(args.shapes_size),
                                      object_scale=tuple(args.shapes_object_scale))
    if args.subset:
        train_set = torch.utils.data.Subset(train_set, range(min(args.subset, len(train_set))))
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        evaluate.fail(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images, so "
                      f"an epoch has no step: use a smaller batch (or more images)")
    first = models.process_group()[0] == 0                            # process 0 writes, the others compute
    with out_folder(args.out) if first else contextlib.nullcontext(), StopRequest(quiet=not first) as stop:
        return run(args, checkpoint, train_set, steps_per_epoch, stop)


@contextlib.contextmanager
def out_folder(out):
    """The output folder, made and locked for this run (one line when it cannot be written)."""
    try:
        os.makedirs(out, exist_ok=True)
        release = lock_out_folder(out)
    except OSError as error:
        evaluate.fail(f"--out {out}: cannot write there ({error.strerror or error}); pick another --out")
    try:
        yield
    finally:
        release()


def run(args, checkpoint, train_set, steps_per_epoch, stop):
    """The training loop: epochs of steps, logs, checkpoints (at epoch ends, every
    --save-every minutes, and on a stop request), then the final kNN."""
    device = torch.device(args.device)
    rank, world = models.process_group()
    say = print if rank == 0 else (lambda *a, **k: None)               # process 0 prints and writes
    parts = build(args, steps_per_epoch)                               # the same model in every process
    if world > 1:                                                      # then each draws its own views
        torch.manual_seed(args.seed + rank)
        np.random.seed(args.seed + rank)
        random.seed(args.seed + rank)
    model, optimizer, scheduler, scaler, masker = parts.model, parts.optimizer, parts.scheduler, \
        parts.scaler, parts.masker
    stop_at = min(parts.total_steps, args.max_steps) if args.max_steps else parts.total_steps   # --max-steps: a kill
    last_pt = os.path.join(args.out, "last.pt")

    epoch, step, knn_before = 0, 0, None
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        epoch, step, knn_before = checkpoint["epoch"], checkpoint["step"], checkpoint.get("knn_random_init")
        rngs = checkpoint.get("rng_per_process", [checkpoint["rng"]])
        if len(rngs) == world:                        # each process continues its own random streams
            set_rng_state(rngs[rank])
        else:                                         # another number of processes: the same data order, new draws
            torch.manual_seed(args.seed + rank + 1000 * step)
            say(f"the checkpoint was written by {len(rngs)} processes, this run has {world}: the batches "
                f"are the same, the augmentation draws are new")
        say(f"resumed {args.resume}: epoch {epoch}, step {step}")
    if knn_before is None:
        knn_before = knn(args, model, masker, device)                 # None on processes other than 0
        if rank == 0:
            print(f"kNN top-1 of the random-init encoder: {knn_before:.2f} %")
    if rank == 0:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({**vars(args), "world_size": world}, f, indent=2)
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), checkpoint) if rank == 0 else None

    def log(record):
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save():
        if not evaluate.finite_weights(model):       # never a checkpoint that cannot be used
            stop_not_finite(args, step, "the weights are")
        models.average_running_stats(model)           # what one process with the whole batch holds
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if rank == 0:
            save_checkpoint(last_pt, {
                "args": vars(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "step": step, "rng": rngs[0], "rng_per_process": rngs, "knn_random_init": knn_before})

    def stop_here(signum):
        save()
        say(f"stopped by {signal.Signals(signum).name} at step {step} of {stop_at} (epoch {epoch + 1}); "
            f"{last_pt} is saved: run the same command with --resume auto to continue", file=sys.stderr)
        sys.exit(128 + signum)

    # Under torchrun the processes agree, after every step, on whether to stop or to save: a
    # signal reaches each one at its own moment, and --save-every reads each one's clock.
    agree_group = torch.distributed.new_group(backend="gloo") if world > 1 else None

    def agree(signum, save_now):
        if world == 1:
            return signum, save_now
        flags = torch.tensor([signum or 0, int(save_now)])
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=agree_group)
        return int(flags[0]), bool(flags[1])

    say(f"{args.framework} {args.arch} on {args.dataset} ({len(train_set)} images, {args.image_size} px), "
          f"masking {args.masking}/{args.saliency}/{args.strategy}, M={args.num_hard_negatives}, "
          f"{steps_per_epoch} steps/epoch, {args.epochs} epochs, batch {args.batch_size}"
          f"{f' on {world} processes' if world > 1 else ''}, {device}; out {args.out}")
    start_time, last_log, last_save, done, unchecked = time.time(), 0.0, time.time(), step >= stop_at, None
    signum, _ = agree(stop.signum, False)
    if signum:                                                        # a signal during the first kNN
        stop_here(signum)
    while epoch < args.epochs and not done:
        # The epoch's order depends on (seed, epoch) only, and a run stopped inside an epoch
        # (--max-steps, a signal, --save-every) resumes at its next batch: the same batches.
        # Under torchrun each process takes every W-th image of each global batch (models.py's layout).
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        skip = (step - epoch * steps_per_epoch) * args.batch_size
        batches = order[skip:][:(len(order) - skip) // args.batch_size * args.batch_size].view(-1, args.batch_size)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=args.batch_size // world, sampler=batches[:, rank::world].flatten().tolist(),
            num_workers=args.workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        timer = SplitTimer(device)
        epoch_start = tick = time.perf_counter()
        epoch_first_step = step
        for batch in loader:
            timer.seconds["data"] += time.perf_counter() - tick          # host time waiting for the loader
            loss, figures, (query, key, negatives) = train_step(args, batch, parts, timer)
            step += 1
            # The loss of the step before is checked once this step is queued: the check waits for
            # the GPU without leaving it idle. A bad step stops the run before any checkpoint.
            if unchecked:
                stop_if_not_finite(args, *unchecked)
            unchecked = (step, loss)
            if step == 1 or time.time() - last_log >= args.log_every or step == stop_at:
                last_log = time.time()
                record = {"epoch": epoch + 1, "step": step, "loss": round(loss.item(), 5),
                          "lr": scheduler.get_last_lr()[0]}
                record.update({k: round(float(v), 4) for k, v in figures.items()
                               if v is not None and v.numel() == 1})
                rate = (step - epoch_first_step) * args.batch_size / (time.perf_counter() - epoch_start)
                eta = (stop_at - step) * args.batch_size / rate
                shares = "".join(f" {name} {record[key]:.2f}" for name, key in
                                 (("fg", "fg_ratio"), ("masked", "masked_fraction")) if key in record)
                say(f"epoch {epoch + 1}/{args.epochs} step {step}/{stop_at} loss {record['loss']:.4f} "
                      f"{rate:.0f} img/s eta {eta / 60:.1f} min{shares}", flush=True)
                log({**record, "images_per_s": round(rate, 1)})
            if step >= stop_at:
                done = True
                break
            signum, save_now = agree(stop.signum, args.save_every and time.time() - last_save >= 60 * args.save_every)
            if signum or save_now:
                stop_if_not_finite(args, *unchecked)                   # never checkpoint a bad step
                if signum:
                    stop_here(signum)
                save()                                                # inside the epoch: its position too
                last_save = time.time()
            tick = time.perf_counter()
        if unchecked:
            stop_if_not_finite(args, *unchecked)
            unchecked = None
        if step == (epoch + 1) * steps_per_epoch:                     # the epoch is complete
            epoch += 1
            if args.knn_every and epoch % args.knn_every == 0 and not done:
                split = monitoring_split(args.dataset)                # never the test split, where there is another
                accuracy = knn(args, model, masker, device, split)
                if rank == 0:
                    print(f"epoch {epoch}: kNN top-1 {accuracy:.2f} % ({split} split)")
                log({"epoch": epoch, "step": step, f"knn_top1_{split}": accuracy})
        seconds = timer.totals()
        split = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
        say(f"epoch {epoch} done in {time.perf_counter() - epoch_start:.0f} s: {split}")
        log({"epoch": epoch, "step": step, "time": {k: round(v, 2) for k, v in seconds.items()}})
        if step > epoch_first_step and rank == 0:                     # a batch of this epoch ran here
            save_view_grid(os.path.join(args.out, f"views_epoch{epoch}.png"), figures, query, key, negatives,
                           args.grid)
        save()
        last_save = time.time()
        signum, _ = agree(stop.signum, False)
        if signum and not done:
            stop_here(signum)

    knn_after = knn(args, model, masker, device)
    log({"final": True, "step": step, "knn_top1": knn_after, "knn_top1_random_init": knn_before,
         "minutes": round((time.time() - start_time) / 60, 2)})
    if rank != 0:
        return {"step": step}
    metrics.close()
    print(f"kNN top-1 on the {args.dataset} test split: {knn_after:.2f} % after {step} steps, "
          f"{knn_before:.2f} % for the random-init encoder ({knn_after - knn_before:+.2f} points); "
          f"{(time.time() - start_time) / 60:.1f} min. Checkpoint: {last_pt}")
    if knn_after < knn_before:
        print(f"warning: the trained encoder is {knn_before - knn_after:.2f} kNN points BELOW its random-init "
              f"encoder: this run learned features worse than none. See the README, 'When the method hurts'",
              file=sys.stderr)
    return {"knn_top1": knn_after, "knn_top1_random_init": knn_before, "step": step}


def stop_if_not_finite(args, step, loss):
    if not torch.isfinite(loss):
        stop_not_finite(args, step, f"the loss is {loss.item()}")


def stop_not_finite(args, step, what):
    """Exit 1 without saving: a run whose loss or weights are NaN or inf."""
    last_pt = os.path.join(args.out, "last.pt")
    kept = f"the last good checkpoint {last_pt} is kept" if os.path.exists(last_pt) else "no checkpoint was written"
    print(f"error: {what} not finite at step {step}; stopped, {kept} (try a lower --lr or --amp off)",
          file=sys.stderr)
    sys.exit(1)


def monitoring_split(dataset):
    """What --knn-every reads: shapes' validation split; datasets without one, their test split."""
    return "val" if dataset == "shapes" else "test"


def knn(args, model, masker, device, split="test"):
    """kNN top-1 (%) of the current backbone, train split as memory, `split` as queries.
    Under torchrun process 0 computes it (with the running statistics averaged over the
    processes) and the others wait; they get None."""
    rank, world = models.process_group()
    if world > 1:
        models.average_running_stats(model)
        accuracy = knn_of_one_process(args, model, masker, device, split) if rank == 0 else None
        torch.distributed.barrier()
        return accuracy
    return knn_of_one_process(args, model, masker, device, split)


def knn_of_one_process(args, model, masker, device, split):
    train_set, test_set = data.eval_datasets(args.dataset, args.data_dir, args.image_size, split=split,
                                             shapes_size=tuple(args.shapes_size),
                                             object_scale=tuple(args.shapes_object_scale))
    loader = lambda d: torch.utils.data.DataLoader(d, batch_size=256, num_workers=args.workers,
                                                   worker_init_fn=ignore_stop_signals)
    transform = masker.filter if args.high_pass == "on" else None
    train_features, train_labels = evaluate.extract_features(model.backbone, loader(train_set), device, transform=transform)
    test_features, test_labels = evaluate.extract_features(model.backbone, loader(test_set), device, transform=transform)
    labelled = train_labels >= 0
    return evaluate.knn_accuracy(train_features[labelled], train_labels[labelled], test_features, test_labels)


def start_processes(args):
    """Under torchrun (WORLD_SIZE > 1 in the environment) join the process group: NCCL with one
    GPU per process (LOCAL_RANK), gloo on CPUs. `python train.py` takes no distributed path."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    if args.device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            evaluate.fail(f"process {local_rank} of this node has no GPU ({torch.cuda.device_count()} visible): "
                          f"start at most that many with torchrun --nproc_per_node")
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")


def main(argv=None):
    args = parse_args(argv)
    start_processes(args)
    try:
        return train(args)
    except data.DataError as error:
        # raised in a loader worker, it arrives with the worker's traceback: keep its last line
        evaluate.fail(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1])
    except RuntimeError as error:                                     # saliency weights: say the fix
        if "--saliency" not in str(error):
            raise
        evaluate.fail(error)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
