"""train.py's flags: the table of them, the two recipes that fill the ones left out, and the
checks that refuse a bad value in one line before anything is written.

    python train.py --help                  # every flag, in the paper's words
    >>> import config
    >>> args = config.parse_args(["--dataset", "imagefolder", "--arch", "resnet50"])   # the paper's recipe
    >>> args.alpha, args.temperature, args.queue_size, args.bn_splits
    (2.0, 0.2, 65536, 4)
"""
import math
import os

import torch

import data
import masking
import models
import runs
import saliency
import shapes

LARGE_DATASETS = ("imagefolder",)   # ImageNet-like folders get the paper's recipe; the rest MoCo's CIFAR one
MAX_IMAGE_SIZE = 1024   # views larger than this (20000 px) ran out of memory in a traceback
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# The two recipes, for the flags left out (SPEC.md section 5), chosen by what the data is, not
# by the view size: an image folder (ImageNet-100, the paper's data) gets the paper's; CIFAR,
# STL-10 and shapes, datasets of CIFAR's scale, get MoCo's CIFAR single-GPU recipe with alpha 1
# (fill_defaults says why) at any view size. Either queue is capped at the training set
# (train.py, with a note), so no default refuses to start.
SMALL_RECIPE = {"lr": lambda batch: 0.06 * batch / 512, "weight_decay": 5e-4, "queue_size": 4096,
                "moco_momentum": 0.99, "temperature": 0.1, "alpha": 1.0}
PAPER_RECIPE = {"lr": lambda batch: 0.03 * batch / 256, "weight_decay": 1e-4, "queue_size": 65536,
                "moco_momentum": 0.999, "temperature": 0.2, "alpha": 2.0}
# shapes, a demo for 2 CPU cores: 8 epochs, a warm-up epoch, crops of 85-100 % and a higher
# lr; every other dataset: the paper's 200 epochs and MoCo v2's crops.
SHAPES = {"epochs": 8, "warmup_epochs": 1.0, "crop_scale": [0.85, 1.0], "lr": lambda batch: 0.06 * batch / 128}
OTHER_DATASETS = {"epochs": 200, "warmup_epochs": 0.0, "crop_scale": list(data.CROP_SCALE)}
IMAGE_SIZE = {"shapes": 32, "cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": 224}


def parse_args(argv=None, prog="train.py"):
    """train.py's flags from `argv`, defaults filled and checked (a bad value: one line naming
    `prog`'s --help, exit 2)."""
    p = runs.OneLineParser(prog=prog, description="Pre-train a ResNet with saliency-guided masking and masked hard negatives, "
                                    "on one device or, under torchrun, on several.")
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
    a("--shapes-cache", metavar="DIR",
      help="keep each drawn shapes split in DIR and load it from there in later runs and in evaluate.py (20,000 "
           "images at 144 px take 90 s to draw on two CPU cores; default: draw them in each run)")
    a("--shapes-twins", action="store_true",
      help="each pair's second view is the image's twin: its object (shape, size, rotation, colour) drawn again at "
           "another place on another background, so a pair shares the object alone (default: two crops of one image)")
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
    a("--weight-decay", type=float, default=None, help="default 1e-4 imagefolder (paper), 5e-4 the others")
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
    a("--fg-std-factor", type=float, default=0.6, metavar="F",
      help="foreground rule: a patch is foreground when its saliency score is at least mean - F x std of its "
           "image's scores (paper: 0.6, which marks about 70 %% of the patches; 0 about half, -0.5 about a "
           "third: a sharper foreground). Not for --saliency gt, whose foreground is the patches the object covers")
    a("--mask-ratio", type=float, nargs=2, default=[0.05, 0.25], metavar=("LO", "HI"),
      help="query mask ratio r ~ U(LO, HI) (paper: 0.05 0.25)")
    a("--hard-negative-ratio", type=float, nargs=2, default=[0.4, 0.7], metavar=("LO", "HI"),
      help="share of the key's foreground masked in a hard negative (paper: 0.4 0.7)")
    a("--num-hard-negatives", type=int, default=None,
      help="M hard negatives per image (paper: 1); default 1 with --masking saliency, else 0")
    a("--alpha", type=float, default=None,
      help="weight of the hard-negative logits (paper: 2, the default for --dataset imagefolder; shapes, CIFAR, "
           "STL-10 at any view size: 1, because the only evidence at that scale, shapes at 32 px, says alpha 2 "
           "costs 13 kNN points over three seeds, see the README)")
    a("--hard-negative-pairing", choices=models.PAIRINGS, default="own",
      help="own: each query meets its own image's hard negative (the paper's text); release: what the "
           "released MoCo code computes, each BatchNorm sub-batch standing for a GPU: every query of a "
           "sub-batch meets hard negative m of the sub-batch's image m, embedded as a batch of one image "
           "(needs a last feature map of 2x2 or more, see the README)")
    a("--queue-size", type=int, default=None,
      help="MoCo queue K (default 65536 for imagefolder, the paper's; 4096 for shapes, CIFAR, STL-10; a default "
           "longer than the training set is capped at it, with a note)")
    a("--moco-momentum", type=float, default=None,
      help="momentum m of the key/target encoder (0.999 imagefolder, 0.99 the others); BYOL: the base value, "
           "raised to 1 by a cosine over training")
    a("--temperature", type=float, default=None, help="tau (0.2 imagefolder: the paper's; 0.1 the others)")
    a("--bn-splits", type=int, default=None,
      help="BatchNorm sub-batches of the global batch, simulating Shuffle-BN's GPUs (default: 8 for shapes, "
           "CIFAR, STL-10, MoCo's CIFAR demo; imagefolder: the fewest of at most 32 images, as the release's 4 "
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
    """Defaults per dataset. Image folders: the paper's recipe (SPEC.md section 5). CIFAR,
    STL-10 and shapes: MoCo's CIFAR single-GPU recipe, at any view size. shapes: a demo sized
    for 15 minutes on 2 CPU cores, with a warm-up epoch; without one MoCo collapses while its
    queue still holds random vectors (positive similarity 0.98 after 24 steps, measured; see
    the README). Its crops keep at least 85 % of the image, not MoCo v2's 20 %: a shape covers
    20-64 % of a 32 px image, and crops of a fifth of it can leave view pairs that share
    background but not the object. With 20 % the default run ends 6 kNN points below its
    random-init encoder. Its hard negative enters the loss as an ordinary negative (alpha 1,
    not the paper's 2), and so it does for every dataset of the small recipe: on 32 px shapes a
    hard negative is little more than a noisier key, and with alpha 2 at tau 0.1 its one term
    takes most of the softmax denominator (88 %, the 4,096 queue negatives 11 %). With alpha 2
    the run ends 13 kNN points below alpha 1 over seeds 0-2 (study rows 9-10); nothing
    measured at 32-96 px says otherwise, so image folders alone keep the paper's 2."""
    def default(name, value):                      # an explicit value is kept, then checked: never replaced
        if getattr(args, name) is None:
            setattr(args, name, value)
    default("image_size", IMAGE_SIZE[args.dataset])
    # The recipe follows what the data is. shapes, CIFAR and STL-10 keep the small one at every
    # view size: their 20,000-105,000 images are CIFAR's scale, and the paper's queue of 65,536
    # keys would hold each image's own earlier keys among its negatives.
    shapes = args.dataset == "shapes"
    small = args.dataset not in LARGE_DATASETS
    if args.stem == "auto":                                           # CIFAR stem: ~19x the time at 32 px
        args.stem = "cifar" if args.dataset in ("cifar10", "cifar100") else "imagenet"
    for name, value in recipe_of(args).items():
        default(name, value)
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
    default("num_hard_negatives", int(args.masking == "saliency" and args.framework != "byol"))
    if args.high_pass == "auto":
        args.high_pass = "on" if args.strategy == "hp" and args.masking != "none" else "off"
    default("augment", "split" if args.dataset == "imagefolder" else "batched")   # files: cropped as read
    default("device", "cuda" if torch.cuda.is_available() else "cpu")
    default("amp", "bf16" if args.device.startswith("cuda") else "off")
    default("compile", "off")
    cores = os.cpu_count() or 1
    default("workers", 0 if args.device == "cpu" and cores <= 4 else min(8, cores // 2))


def recipe_of(args):
    """The defaults of the recipe `args.dataset` gets (fill_defaults), for `args.batch_size`."""
    recipe = {**(SMALL_RECIPE if args.dataset not in LARGE_DATASETS else PAPER_RECIPE),
              **(SHAPES if args.dataset == "shapes" else OTHER_DATASETS)}
    return {name: value(args.batch_size) if callable(value) else value for name, value in recipe.items()}


def saved_args(checkpoint_path):
    """The flags of the run that wrote `checkpoint_path`, a dict (None: no such file, or not a
    readable checkpoint; its own load reports that in one line)."""
    if not checkpoint_path:
        return None
    try:
        saved = runs.read_checkpoint(checkpoint_path, mmap=True, needs=())["args"]
    except runs.CheckpointError:
        return None
    return saved if isinstance(saved, dict) else None


def saved_flag(checkpoint_path, flag):
    return (saved_args(checkpoint_path) or {}).get(flag)


# (flag, the smallest value it takes, whether that bound is excluded): values outside their meaning
BOUNDS = [("epochs", 1, False), ("max_steps", 0, False), ("batch_size", 1, False), ("bn_splits", 1, False),
          ("lr", 0, True), ("weight_decay", 0, False), ("warmup_epochs", 0, False), ("alpha", 0, False),
          ("temperature", 0, True), ("queue_size", 1, False), ("num_hard_negatives", 0, False),
          ("moco_momentum", 0, False), ("subset", 0, False), ("workers", 0, False), ("knn_every", 0, False),
          ("log_every", 0, False), ("save_every", 0, False), ("seed", 0, False)]


def check_args(p, args):
    for name, low, strict in BOUNDS:
        value = getattr(args, name)
        if not (value > low if strict else value >= low):            # also refuses NaN
            p.error(f"--{name.replace('_', '-')} {value}: need a value {'>' if strict else '>='} {low}")
        if math.isinf(value) or value > torch.finfo(torch.float32).max:   # inf weights in one step, or a
            p.error(f"--{name.replace('_', '-')} {value}: need a finite value")  # float32 overflow mid-step
    if args.moco_momentum > 1:
        p.error(f"--moco-momentum {args.moco_momentum}: need a value in [0, 1]")
    if (args.augment == "split") != (args.dataset == "imagefolder") and args.augment != "torchvision":
        p.error(f"--augment {args.augment} with --dataset {args.dataset}: use "
                f"{'split' if args.dataset == 'imagefolder' else 'batched'} (or torchvision, the reference)")
    if args.warmup_epochs > args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}")
    if not math.isfinite(args.fg_std_factor):
        p.error(f"--fg-std-factor {args.fg_std_factor}: need a finite number (the paper's is 0.6)")
    lo, hi = args.shapes_object_scale
    if not 0 < lo <= hi <= 0.5:
        p.error(f"--shapes-object-scale {lo} {hi}: need 0 < LO <= HI <= 0.5 (a radius of half the side fills it)")
    least = shapes.MIN_RADIUS_PX                                      # 0.001 drew objects of no pixel
    if args.dataset == "shapes" and args.image_size >= 8 and lo * args.image_size < least:
        p.error(f"--shapes-object-scale {lo} {hi}: at --image-size {args.image_size} an object's radius would be "
                f"{lo * args.image_size:.2g} px; need LO >= {least / args.image_size:.3g} ({least} px) or a larger "
                f"--image-size")
    if args.shapes_twins and args.dataset != "shapes":
        p.error(f"--shapes-twins with --dataset {args.dataset}: only shapes draws its images twice; drop the flag")
    if args.shapes_cache and args.dataset != "shapes":
        p.error(f"--shapes-cache with --dataset {args.dataset}: only shapes draws its images; drop the flag")
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
    queue_gb = args.queue_size * 128 * 4 / 2 ** 30                     # the MoCo queue: K 128-d float32 keys
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    if args.framework == "moco" and queue_gb > memory_gb / 4:
        p.error(f"--queue-size {args.queue_size}: its queue of 128-d keys takes {queue_gb:.0f} GB, more than a "
                f"quarter of this machine's {memory_gb:.0f} GB (the paper's is 65536, 32 MB)")
    if args.framework == "moco" and args.queue_size % args.batch_size:
        p.error(f"--queue-size {args.queue_size} is not a multiple of --batch-size {args.batch_size}")
    if args.num_hard_negatives and args.framework == "byol":
        p.error("BYOL has no negatives: use --num-hard-negatives 0 with --framework byol")
    if args.num_hard_negatives and args.masking != "saliency":
        p.error("hard negatives mask salient patches: they need --masking saliency (or --num-hard-negatives 0)")
    if args.saliency == "gt" and args.masking == "saliency" and args.dataset != "shapes":
        p.error("--saliency gt needs true object masks, which only --dataset shapes has")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no GPU is visible; use --device cpu")
    if not 8 <= args.image_size <= MAX_IMAGE_SIZE or args.grid < 1 or args.grid > args.image_size:
        p.error(f"--image-size {args.image_size} --grid {args.grid}: need 8 <= size <= {MAX_IMAGE_SIZE} and "
                f"1 <= grid <= size")
    side = models.feature_map_size(args.image_size, cifar_stem=args.stem == "cifar")
    smallest = next(size for size in range(8, 1024) if models.feature_map_size(size, cifar_stem=args.stem == "cifar") >= 2)
    larger = f"--image-size {smallest} or more"
    if args.hard_negative_pairing == "release" and args.num_hard_negatives:
        if args.framework != "moco":
            p.error("--hard-negative-pairing release is the released MoCo code's; use it with --framework moco")
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
