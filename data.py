"""Datasets and the MoCo v2 augmentation, scaled to the image size.

    shapes       generated here: 10 classes of shapes on textured backgrounds, with their
                 true object masks (no download, no files); the default
    cifar10/100  the python pickles of `cifar-10-batches-py` / `cifar-100-python`
    stl10        the binaries of `stl10_binary` (pre-training on `unlabeled` + `train`)
    imagefolder  DATA_DIR/train/<class>/*.jpg and DATA_DIR/val/<class>/*.jpg (ImageNet-100)
    caltech101, flowers102   transfer evaluation only (evaluate.py --dataset), torchvision's readers

    >>> import data
    >>> train = data.pretrain_dataset("shapes", image_size=64)    # two views + masks + label
    >>> view1, view2, mask1, mask2, label = train[0]

Every view is normalised with the ImageNet mean and std (what the pretrained saliency
network expects), whatever the dataset. Depends on torch, torchvision and numpy.
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import contextlib
import functools
import math
import os
import pickle
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import RandomResizedCrop, v2

DATASETS = ("shapes", "cifar10", "cifar100", "stl10", "imagefolder")
TRANSFER = ("caltech101", "flowers102")          # evaluation only: evaluate.py --dataset
CALTECH_TRAIN_PER_CLASS = 30                    # Caltech-101 has no split: 30 per class train, the rest test
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)          # RandomResizedCrop's share of the image area (MoCo v2)
OBJECT_SCALE = (0.25, 0.45)      # a shapes object's radius, a share of the image side
# Ten shapes that differ in structure (holes, arms, corners, elongation), not only in the
# number of polygon sides: at 32 px a rotated pentagon, hexagon and circle look alike.
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "crescent", "bar", "L", "T")
# Six saturated hues: the only colours of the dataset.
PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.9, 0.8, 0.1], [0.3, 0.8, 0.3],
                        [0.2, 0.7, 0.9], [0.4, 0.3, 0.9], [0.9, 0.4, 0.8]])


class DataError(Exception):
    """Missing or unreadable data; the message says what to put where."""


# ----------------------------------------------------------------------------- shapes

@functools.lru_cache(maxsize=4)                  # train.py's kNN and pre-training share them
def make_shapes(num_images, image_size=64, seed=0, *, object_scale=OBJECT_SCALE, chunk=1000):
    """Generate the `shapes` dataset: uint8 images `[n, 3, S, S]`, bool masks `[n, S, S]`,
    labels `[n]` (an index into SHAPE_CLASSES). Deterministic from `seed`, batched.

    A shape of random size (radius `object_scale` of the side, 25-45 % by default: objects
    that fill the frame; smaller ones let a random mask hide them), position, rotation and colour lies
    on a random smooth texture, with a little pixel noise. Object and background colours come
    from one palette of 6 hues for every image, drawn independently of the class, so colour
    gives neither the class nor the instance: a view pair can only be matched by its shape
    (per-image random colours let contrastive learning match views by colour and learn
    nothing about shape; measured in the README).
    """
    g = torch.Generator().manual_seed(seed)
    images, masks, labels = [], [], []
    for start in range(0, num_images, chunk):
        label = torch.randint(len(SHAPE_CLASSES), (min(chunk, num_images - start),), generator=g)
        image, mask = _draw_shapes(label, image_size, g, object_scale)
        images.append(image)
        masks.append(mask)
        labels.append(label)
    return torch.cat(images), torch.cat(masks), torch.cat(labels)


def _draw_shapes(label, size, g, object_scale=OBJECT_SCALE):
    """Images uint8 `[n, 3, S, S]` and masks bool `[n, S, S]` of the shapes `label` `[n]`."""
    n = len(label)
    mask = _shape_masks(label, size, g, object_scale)
    object_colour = PALETTE[torch.randint(len(PALETTE), (n,), generator=g)][:, :, None, None]
    tint = PALETTE[torch.randint(len(PALETTE), (n,), generator=g)][:, :, None, None]
    texture = _texture(n, size, g, cells=4)                           # [n, 1, S, S] luminance
    background = (0.45 + 0.2 * texture) * (0.5 + 0.5 * tint)
    shading = 0.8 + 0.4 * _texture(n, size, g)
    image = torch.where(mask[:, None], object_colour * shading, background)
    image = image + 0.03 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask


def _texture(n, size, g, cells=8):
    """Smooth random luminance fields in [0, 1], `[n, 1, S, S]`: low-resolution noise of
    `cells x cells`, upsampled, so a crop of a fifth of the image sees a different pattern."""
    low = torch.rand(n, 1, cells, cells, generator=g)
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _shape_masks(label, size, g, object_scale=OBJECT_SCALE):
    """bool `[n, S, S]`: shape `label` at a random centre, rotation and radius (a share
    `object_scale` of the side, uniform)."""
    n = len(label)
    lo, hi = object_scale
    radius = size * (lo + (hi - lo) * torch.rand(n, generator=g))
    cy = radius + (size - 2 * radius) * torch.rand(n, generator=g)
    cx = radius + (size - 2 * radius) * torch.rand(n, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y = (coords[None, :, None] - cy[:, None, None]) / radius[:, None, None]     # [n, S, 1]
    x = (coords[None, None, :] - cx[:, None, None]) / radius[:, None, None]     # [n, 1, S]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = x * cos + y * sin, -x * sin + y * cos                                # rotated frame
    rho, theta = torch.sqrt(u ** 2 + v ** 2), torch.atan2(v, u)

    def polygon(sides):                                               # regular polygon, circumradius 1
        wedge = 2 * math.pi / sides
        return rho * torch.cos(torch.remainder(theta, wedge) - wedge / 2) <= math.cos(math.pi / sides)

    def box(u0, u1, v0, v1):
        return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)

    inside = torch.stack([
        rho <= 0.9,                                                   # circle
        box(-0.7, 0.7, -0.7, 0.7),                                    # square
        polygon(3),                                                   # triangle
        box(-0.28, 0.28, -1, 1) | box(-1, 1, -0.28, 0.28),            # cross
        (rho <= 1) & (rho >= 0.6),                                    # ring
        rho <= 0.5 + 0.5 * torch.cos(5 * theta),                      # star
        (rho <= 0.95) & ((u - 0.45) ** 2 + v ** 2 > 0.7 ** 2),        # crescent
        box(-1, 1, -0.25, 0.25),                                      # bar
        box(-0.8, -0.3, -0.9, 0.9) | box(-0.8, 0.8, 0.4, 0.9),        # L
        box(-0.9, 0.9, -0.9, -0.45) | box(-0.25, 0.25, -0.9, 0.9),    # T
    ], dim=1)                                                         # [n, 10, S, S]
    return inside[torch.arange(n), label]


# ----------------------------------------------------------------------------- real datasets

def _unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar(data_dir, name, train, download=False):
    """CIFAR-10/100 from the python pickles: uint8 `[n, 3, 32, 32]`, labels `[n]`."""
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    files = ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]) \
        if name == "cifar10" else (["train"] if train else ["test"])
    paths = [os.path.join(data_dir, folder, f) for f in files]
    if download and not all(map(os.path.isfile, paths)):
        import torchvision.datasets as tvd
        with cleaned_up_on_failure(data_dir, f"--dataset {name} --download"):
            (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(data_dir, train=train, download=True)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"--dataset {name}: missing {missing[0]}; put the python version of "
                        f"{name.upper()} in {os.path.join(data_dir, folder)} or add --download")
    key = "labels" if name == "cifar10" else "fine_labels"
    try:
        batches = [_unpickle(p) for p in paths]
        images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([b[key] for b in batches])
    except Exception as error:
        raise DataError(f"--dataset {name}: cannot read the files in {os.path.join(data_dir, folder)} "
                        f"({type(error).__name__}): they are damaged; delete that folder and run again "
                        f"with --download (or copy good files there)") from None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def load_stl10(data_dir, split, download=False):
    """STL-10 binaries: uint8 `[n, 3, 96, 96]`, labels `[n]` (-1 for `unlabeled`)."""
    folder = os.path.join(data_dir, "stl10_binary")
    if download and not os.path.isdir(folder):
        import torchvision.datasets as tvd
        with cleaned_up_on_failure(data_dir, "--dataset stl10 --download"):
            tvd.STL10(data_dir, split="train", download=True)
    path = os.path.join(folder, f"{split}_X.bin")
    if not os.path.isfile(path):
        raise DataError(f"--dataset stl10: missing {path}; put the STL-10 binaries in {folder} "
                        f"or add --download")
    # Stored column-major per image: [n, 3, 96(w), 96(h)], so swap the last two axes.
    images = np.fromfile(path, dtype=np.uint8)
    if images.size % (3 * 96 * 96):
        raise DataError(f"--dataset stl10: {path} is truncated ({images.size} bytes); re-download it")
    images = torch.from_numpy(images.reshape(-1, 3, 96, 96)).transpose(2, 3).contiguous()
    label_path = os.path.join(folder, f"{split}_y.bin")
    if os.path.isfile(label_path):
        labels = torch.from_numpy(np.fromfile(label_path, dtype=np.uint8).astype(np.int64) - 1)
    else:
        labels = torch.full((len(images),), -1, dtype=torch.long)
    return images, labels


@contextlib.contextmanager
def cleaned_up_on_failure(data_dir, what):
    """A download that fails (no internet, a full disk) or is stopped (Ctrl-C on a stalled
    network) leaves nothing behind: whatever it created under `data_dir` is removed; a failure
    becomes one DataError that says what to do, a stop goes on as it came."""
    existed = os.path.isdir(data_dir)
    before = set(os.listdir(data_dir)) if existed else set()
    try:
        yield
    except BaseException as error:
        for entry in (set(os.listdir(data_dir)) - before) if os.path.isdir(data_dir) else ():
            path = os.path.join(data_dir, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if not existed and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        if not isinstance(error, Exception):                          # Ctrl-C, SystemExit
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{what}: the download failed ({reason}); on a machine without internet, put the "
                        f"files in {data_dir} by hand") from None


def unreadable(path, error):
    """The one-line error for an image file that cannot be decoded."""
    return DataError(f"cannot read the image {path} ({type(error).__name__}); remove or replace it")


def read_image(path):
    """ImageFolder's loader, with one line naming an unreadable file instead of a traceback."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise unreadable(path, error) from None


def load_imagefolder(data_dir, split):
    from torchvision.datasets import ImageFolder
    root = os.path.join(data_dir, split)
    try:
        return ImageFolder(root, loader=read_image)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"--dataset imagefolder: {root} ({error}); expected images as "
                        f"{data_dir}/train/<class>/*.jpg and {data_dir}/val/<class>/*.jpg") from None


class ImageFiles(torch.utils.data.Dataset):
    """`(PIL image in RGB, label)` of a list of image files (Caltech-101 has grey ones)."""

    def __init__(self, paths, labels):
        self.paths, self.labels = list(paths), labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i]), int(self.labels[i])


def load_caltech101(data_dir, train, download=False, *, per_class=CALTECH_TRAIN_PER_CLASS, seed=0):
    """Caltech-101 in torchvision's layout (`DATA_DIR/caltech101/101_ObjectCategories/<class>/
    image_0001.jpg`; BACKGROUND_Google, not a class, is left out when it is there; `--download`
    uses torchvision's downloader). Read here rather than by torchvision's class, which creates
    DATA_DIR/caltech101 before it finds nothing there and fails on a folder without
    BACKGROUND_Google; the classes and the images' order are the same. It has no standard
    split: per class, `per_class` images drawn with `seed` train (at most all but one) and the
    rest test, the protocol of the paper's transfer table. Returns `(ImageFiles, labels)`."""
    folder = os.path.join(data_dir, "caltech101", "101_ObjectCategories")
    if download and not os.path.isdir(folder):
        from torchvision.datasets import Caltech101
        with cleaned_up_on_failure(data_dir, "--dataset caltech101 --download"):
            Caltech101(data_dir, download=True)
    classes = sorted(c for c in os.listdir(folder) if c != "BACKGROUND_Google"
                     and os.path.isdir(os.path.join(folder, c))) if os.path.isdir(folder) else []
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(folder, name)) if not f.startswith("."))
        paths += [os.path.join(folder, name, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"--dataset caltech101: missing {folder}/<class>/image_0001.jpg ...; put Caltech-101 "
                        f"there or add --download")
    labels = torch.tensor(labels)
    generator, chosen = torch.Generator().manual_seed(seed), []
    for c in labels.unique():
        members = (labels == c).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        cut = min(per_class, len(members) - 1)
        chosen.append(members[:cut] if train else members[cut:])
    indices = torch.cat(chosen).sort().values
    return ImageFiles([paths[i] for i in indices], labels[indices]), labels[indices]


def load_flowers102(data_dir, train, download=False):
    """Flowers-102 in torchvision's layout (`DATA_DIR/flowers-102/jpg/image_00001.jpg`,
    `imagelabels.mat`, `setid.mat`; `--download` uses torchvision's downloader) and its standard
    splits: train + val to train, test to test. The labels are .mat files, which scipy reads.
    (Read here rather than by torchvision's class, which also checks the files' md5 sums, so
    that the tests can write a tiny copy.) Returns `(ImageFiles, labels)`."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("--dataset flowers102 reads its labels from .mat files with scipy: pip install scipy") from None
    folder = os.path.join(data_dir, "flowers-102")
    if download and not os.path.isdir(os.path.join(folder, "jpg")):
        from torchvision.datasets import Flowers102
        with cleaned_up_on_failure(data_dir, "--dataset flowers102 --download"):
            Flowers102(data_dir, download=True)
    try:
        labels = loadmat(os.path.join(folder, "imagelabels.mat"))["labels"].reshape(-1).astype(np.int64) - 1
        split = loadmat(os.path.join(folder, "setid.mat"))
    except (OSError, ValueError, KeyError):
        raise DataError(f"--dataset flowers102: missing or unreadable {folder}/imagelabels.mat or setid.mat (with "
                        f"the images in {folder}/jpg/image_00001.jpg ...); put Flowers-102 there or add --download") from None
    ids = np.concatenate([split[k].reshape(-1) for k in (("trnid", "valid") if train else ("tstid",))]).astype(np.int64)
    paths = [os.path.join(folder, "jpg", f"image_{i:05d}.jpg") for i in ids.tolist()]
    return ImageFiles(paths, torch.from_numpy(labels[ids - 1])), torch.from_numpy(labels[ids - 1])


SPLITS = ("train", "val", "test")
SHAPES_SEEDS = {"train": 0, "test": 1, "val": 2}   # three independent draws: disjoint splits


def load_split(name, data_dir, split, *, image_size=64, download=False, shapes_size=(20000, 5000),
               object_scale=OBJECT_SCALE):
    """Raw data of one split (`train`, `val` or `test`): `(images uint8 [n,3,H,W] or an
    ImageFolder, masks or None, labels)`. Only `shapes` has a validation split (drawn like the
    others, as many images as the test split): monitoring and tuning read it, reported
    results the test split. For pre-training on stl10, `train` takes the unlabeled and train
    splits together."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "val" and name != "shapes":
        raise DataError(f"{name} has no validation split here (only shapes has one): evaluate on the test split, "
                        f"or hold out part of the training images yourself")
    train = split == "train"
    if name == "shapes":
        return make_shapes(shapes_size[0 if train else 1], image_size, seed=SHAPES_SEEDS[split],
                           object_scale=tuple(object_scale))
    if name in ("cifar10", "cifar100"):
        images, labels = load_cifar(data_dir, name, train, download)
        return images, None, labels
    if name == "stl10":
        images, labels = load_stl10(data_dir, "train" if train else "test", download)
        return images, None, labels
    if name == "imagefolder":
        folder = load_imagefolder(data_dir, "train" if train else "val")
        return folder, None, torch.tensor(folder.targets)
    if name in TRANSFER:
        images, labels = (load_caltech101 if name == "caltech101" else load_flowers102)(data_dir, train, download)
        return images, None, labels
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS + TRANSFER)}")


# ----------------------------------------------------------------------------- an ImageNet-like folder

def shapes_image(label, width, height, g):
    """One `shapes` image of class `label`, drawn at `max(width, height)` px and resized to
    `height x width` (antialiased): uint8 `[3, height, width]`."""
    image, _ = _draw_shapes(torch.tensor([label]), max(width, height), g)
    image = F.interpolate(image.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return image[0].round().clamp(0, 255).to(torch.uint8)


def write_shapes_folder(root, images=(1300, 500), *, sizes=(160, 500), quality=90, seed=0):
    """Write `shapes` as an ImageNet-like folder of JPEGs: `root/train/<class>/*.jpg` and
    `root/val/<class>/*.jpg` (`images` train and val images in all, the classes in turn, so
    at least 10 each for every class to have one: ImageFolder refuses an empty one), each with a longer
    side drawn from `sizes` px and an aspect ratio from 3/4 to 4/3, JPEG quality `quality`:
    ImageNet's sizes and format, for `--dataset imagefolder` with no download. The object
    masks are not written (ImageFolder has nowhere to keep them): `--saliency gt` needs the
    in-memory `shapes`. Val draws its images like `shapes`' test split, from its own seeds.
    The folder appears whole or not at all (written beside it, then renamed)."""
    from PIL import Image
    if os.path.exists(root):
        raise DataError(f"{root} exists: pick another folder, or remove it to write it again")
    tmp = root.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)                            # a stopped earlier try
    try:
        for split, count in zip(("train", "val"), images):
            g = torch.Generator().manual_seed(seed * 1000 + SHAPES_SEEDS["train" if split == "train" else "test"])
            for name in SHAPE_CLASSES:
                os.makedirs(os.path.join(tmp, split, name))
            for i in range(count):
                side = int(torch.randint(sizes[0], sizes[1] + 1, (), generator=g))
                ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=g)))
                width, height = (side, round(side / ratio)) if ratio >= 1 else (round(side * ratio), side)
                image = shapes_image(i % len(SHAPE_CLASSES), width, height, g)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(
                    os.path.join(tmp, split, SHAPE_CLASSES[i % len(SHAPE_CLASSES)], f"{split}_{i:06d}.jpg"),
                    quality=quality)
    except BaseException as error:                                    # a full disk, Ctrl-C: nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise DataError(f"writing {root}: {error.strerror or error}; free some space or pick another "
                            f"folder") from None
        raise
    os.replace(tmp, root)


def main(argv=None):
    """`python data.py --jpeg-folder DIR`: write `shapes` as JPEGs at ImageNet's sizes."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.error = lambda message: sys.exit(f"error: {message} (see python data.py --help)")
    parser.add_argument("--jpeg-folder", metavar="DIR", required=True,
                        help="write DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (write_shapes_folder)")
    parser.add_argument("--images", type=int, nargs=2, default=(1300, 500), metavar=("TRAIN", "VAL"),
                        help="images per split, all classes together (default 1300 500: 130 and 50 per class)")
    parser.add_argument("--sizes", type=int, nargs=2, default=(160, 500), metavar=("MIN", "MAX"),
                        help="the longer side's range in px (default 160 500, about ImageNet's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.images) < len(SHAPE_CLASSES):
        parser.error(f"--images {' '.join(map(str, args.images))}: need at least {len(SHAPE_CLASSES)} per split "
                     f"(one per class)")
    if not 8 <= args.sizes[0] <= args.sizes[1]:
        parser.error(f"--sizes {' '.join(map(str, args.sizes))}: need 8 <= MIN <= MAX")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: need a value >= 0")
    try:
        write_shapes_folder(args.jpeg_folder, tuple(args.images), sizes=tuple(args.sizes), seed=args.seed)
    except DataError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {sum(args.images)} JPEGs to {args.jpeg_folder}: train it with python train.py --dataset "
          f"imagefolder --data-dir {args.jpeg_folder}")



# ----------------------------------------------------------------------------- augmentation

def moco_v2_augmentation(image_size, crop_scale=CROP_SCALE):
    """MoCo v2 augmentation (SPEC.md section 5) for `image_size` views, torchvision v2.

    RandomResizedCrop scale `crop_scale` (the paper's (0.2, 1) by default),
    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
    Gaussian blur p 0.5 with sigma [0.1, 2] x image_size / 224 and a kernel of ~10 % of the
    side (23 px at 224), flip. Geometric transforms also move a `tv_tensors.Mask`.
    """
    kernel = max(3, round(0.1 * image_size) // 2 * 2 + 1)
    scale = image_size / 224
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1 * scale, 2.0 * scale))], p=0.5),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(image_size, *, resize=None):
    """Resize (shorter side, to `resize`, default `image_size`) and centre-crop to `image_size`, normalise."""
    return v2.Compose([v2.Resize(resize or image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def linear_eval_transforms(image_size):
    """MoCo's `main_lincls.py` views, scaled to `image_size` (224 px: the same): training
    images get RandomResizedCrop + flip, test images Resize(256/224 x size) + CenterCrop."""
    train = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(),
                        v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    return train, eval_transform(image_size, resize=round(image_size * 256 / 224))


class BatchedMoCoV2:
    """The MoCo v2 augmentation of `moco_v2_augmentation`, for a whole batch at once on its
    device (`--augment batched`): no per-image Python, so data keeps up with a GPU.

    `views, masks = augment(images_uint8 [B,3,H,W], masks bool [B,H,W] or None)`. Each image
    draws its own crop (a share `crop_scale` of the area, ratio (3/4, 4/3)), flip, jitter,
    grayscale and blur sigma. Differences from torchvision, for speed: the crop and flip are
    one bilinear `grid_sample` (no antialiasing), the jitter is applied in a fixed order
    (brightness, contrast, saturation, hue) and hue is a rotation of the YIQ chroma plane.
    `geometry=False` (`--augment split`): the loader already cropped and flipped each view
    (CroppedViews), so only the colour half runs here (`photometric`).
    """

    def __init__(self, image_size, crop_scale=CROP_SCALE, *, geometry=True):
        self.size, self.crop_scale, self.geometry = image_size, crop_scale, geometry
        self.blur_kernel = max(3, round(0.1 * image_size) // 2 * 2 + 1)
        self.sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
        self._constants = {}

    def constants(self, device):
        """MEAN, STD `[1, 3, 1, 1]` and the YIQ matrices on `device`, copied there once: a copy
        from host memory in every step would be a host synchronisation."""
        if device not in self._constants:
            self._constants[device] = (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
                                       torch.tensor(STD, device=device).view(1, 3, 1, 1),
                                       TO_YIQ.float().to(device), torch.linalg.inv(TO_YIQ).float().to(device))
        return self._constants[device]

    def __call__(self, images, masks=None):
        x = images.float() / 255
        if not self.geometry:                                         # the loader cropped (CroppedViews)
            return self.photometric(x), masks
        B, device = len(images), images.device
        u = lambda *shape: torch.rand(*shape, device=device)
        # Random resized crop + flip as one affine map from output to input coordinates.
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * u(B)
        ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u(B))
        w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
        cx, cy = (1 - w) * (2 * u(B) - 1), (1 - h) * (2 * u(B) - 1)        # centres, in [-1, 1]
        flip = torch.where(u(B) < 0.5, -1.0, 1.0)
        theta = torch.zeros(B, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
        grid = F.affine_grid(theta, (B, 3, self.size, self.size), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if masks is not None:
            masks = F.grid_sample(masks[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0] > 0.5
        return self.photometric(x), masks

    def photometric(self, x):
        """The colour half, per image: jitter, grayscale, blur, then normalisation. `x`: float
        `[B, 3, S, S]` in [0, 1]."""
        B, device = len(x), x.device
        mean, std, to_yiq, from_yiq = self.constants(device)
        u = lambda *shape: torch.rand(*shape, device=device)
        # Colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, per image.
        jitter = (u(B) < 0.8)[:, None, None, None]
        factor = lambda s: (1 + s * (2 * u(B) - 1))[:, None, None, None]
        gray = lambda t: (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])
        y = (x * factor(0.4)).clamp(0, 1)
        y = ((y - gray(y).mean((2, 3), keepdim=True)) * factor(0.4) + gray(y).mean((2, 3), keepdim=True)).clamp(0, 1)
        y = ((y - gray(y)) * factor(0.4) + gray(y)).clamp(0, 1)
        y = _rotate_hue(y, 2 * math.pi * 0.1 * (2 * u(B) - 1), to_yiq, from_yiq).clamp(0, 1)
        x = torch.where(jitter, y, x)
        x = torch.where((u(B) < 0.2)[:, None, None, None], gray(x).expand_as(x), x)   # grayscale p 0.2
        x = torch.where((u(B) < 0.5)[:, None, None, None], self._blur(x, u(B)), x)    # blur p 0.5
        return (x - mean) / std

    def _blur(self, x, u):
        """Separable Gaussian blur with one sigma per image, as a grouped convolution."""
        B, C, H, W = x.shape
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u          # [B]
        r = self.blur_kernel // 2
        taps = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)    # [B*C, k]
        out = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
        out = F.conv2d(out, kernel[:, None, None, :], groups=B * C)
        out = F.conv2d(out, kernel[:, None, :, None], groups=B * C)
        return out.view(B, C, H, W)


TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                      dtype=torch.float64)


def _rotate_hue(x, angle, to_yiq, from_yiq):
    """Hue shift by `angle` radians per image: rotate the chroma (I, Q) plane of YIQ
    (`to_yiq`, `from_yiq`: TO_YIQ and its inverse, on x's device)."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(len(x), 3, 3, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = from_yiq @ rotation @ to_yiq                                     # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrix, x)


class Raw(torch.utils.data.Dataset):
    """Unaugmented uint8 images for `--augment batched`: `(image, image, mask, mask, label)`,
    the same item layout as TwoViews; train.py augments the batch on the device."""

    def __init__(self, images, masks, labels):
        self.images, self.masks, self.labels = images, masks, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        mask = self.masks[i] if self.masks is not None else torch.zeros(0)
        return self.images[i], self.images[i], mask, mask, self.labels[i]


class PerImageDraws(torch.utils.data.Dataset):
    """A dataset whose items draw their own augmentation. With `draws_seed` set (train.py
    sets it to a function of (seed, epoch) before each epoch), item i draws from a generator
    seeded by (draws_seed, i) alone: the same views whatever process, worker or resume
    reads it (loader workers otherwise draw from streams that depend on their number and
    their order). None: the process's own random stream."""
    draws_seed = None

    def __getitem__(self, i):
        if self.draws_seed is None:
            return self.draw(i)
        with torch.random.fork_rng(devices=[]):                       # the caller's stream is left as it was
            torch.manual_seed(hash((self.draws_seed, int(i))) & (2 ** 63 - 1))
            return self.draw(i)


class TwoViews(PerImageDraws):
    """Two augmented views of each image, with the object mask carried through each view's
    geometric transforms. Item: `(view1, view2, mask1, mask2, label)`; masks are bool
    `[S, S]`, or empty `[0]` tensors for datasets without masks."""

    def __init__(self, images, masks, labels, image_size, crop_scale=CROP_SCALE):
        self.images, self.masks, self.labels = images, masks, labels
        self.transform = moco_v2_augmentation(image_size, crop_scale)

    def __len__(self):
        return len(self.labels)

    def _image(self, i):
        if isinstance(self.images, torch.Tensor):
            return tv_tensors.Image(self.images[i])
        return v2.functional.to_image(self.images[i][0])             # ImageFolder: (PIL, label)

    def draw(self, i):
        image = self._image(i)
        if self.masks is None:
            return self.transform(image), self.transform(image), torch.zeros(0), torch.zeros(0), self.labels[i]
        mask = tv_tensors.Mask(self.masks[i])
        view1, mask1 = self.transform(image, mask)
        view2, mask2 = self.transform(image, mask)
        return view1, view2, mask1.as_subclass(torch.Tensor), mask2.as_subclass(torch.Tensor), self.labels[i]


class CroppedViews(PerImageDraws):
    """The loader's half of `--augment split`, for an ImageFolder: decode, random resized crop
    and flip of two views per image, uint8 `[3, S, S]` each, in the item layout of TwoViews
    (no masks); `BatchedMoCoV2(geometry=False)` does the colour half for the whole batch on
    the device. A worker's cost per image is then about a decode and two small resizes.

    The crops are torchvision's RandomResizedCrop draws (`get_params`, read off the file's
    header), each resized with PIL's antialiased bilinear filter as torchvision does. A JPEG
    is decoded once for both views, at the smallest power-of-two reduction (1/2 to 1/8, PIL's
    `draft`, done by the JPEG decoder) that still leaves both crops at least `S` px wide and
    high, so no view is upsampled that would not have been anyway."""

    def __init__(self, folder, image_size, crop_scale=CROP_SCALE):
        self.folder, self.size = folder, image_size
        self.crop_scale = crop_scale
        self.labels = torch.tensor(folder.targets)

    def __len__(self):
        return len(self.folder)

    def draw(self, i):
        from PIL import Image
        path, label = self.folder.samples[i]
        try:
            with Image.open(path) as image:
                width, height = image.size
                boxes = [RandomResizedCrop.get_params(image, self.crop_scale, (3 / 4, 4 / 3)) for _ in range(2)]
                smallest = min(min(h, w) for _, _, h, w in boxes)
                reduce = 1
                while reduce < 8 and smallest >= 2 * reduce * self.size:
                    reduce *= 2
                if reduce > 1:
                    image.draft("RGB", (-(-width // reduce), -(-height // reduce)))
                image = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise unreadable(path, error) from None
        sx, sy = image.width / width, image.height / height            # what the decoder's reduction left
        views = []
        for top, left, h, w in boxes:
            view = image.resize((self.size, self.size), Image.BILINEAR,
                                box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
            if torch.rand(()) < 0.5:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            views.append(torch.from_numpy(np.asarray(view).copy()).permute(2, 0, 1))
        return views[0], views[1], torch.zeros(0), torch.zeros(0), label


class Plain(torch.utils.data.Dataset):
    """Evaluation view of each image: `(image, label)`, or `(image, mask, label)` with masks."""

    def __init__(self, images, masks, labels, image_size, transform=None):
        self.images, self.masks, self.labels = images, masks, labels
        self.transform = transform or eval_transform(image_size)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i] if isinstance(self.images, torch.Tensor) else v2.functional.to_image(self.images[i][0])
        if self.masks is None:
            return self.transform(image), self.labels[i]
        image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(self.masks[i]))
        return image, mask.as_subclass(torch.Tensor), self.labels[i]


AUGMENTATIONS = ("batched", "split", "torchvision")


def pretrain_dataset(name, data_dir="data", image_size=64, download=False, *, augment="torchvision",
                     crop_scale=CROP_SCALE, **kwargs):
    """What the loader gives for pre-training, by `augment`: `torchvision`, two augmented
    views per image (TwoViews); `batched`, the raw uint8 images (Raw) for BatchedMoCoV2, which
    needs same-size tensor images (not imagefolder); `split`, two cropped and flipped uint8
    views (CroppedViews) for `BatchedMoCoV2(geometry=False)`, imagefolder only."""
    images, masks, labels = load_split(name, data_dir, "train", image_size=image_size, download=download, **kwargs)
    if name == "stl10":                                               # pre-train on unlabeled + train
        unlabeled, no_labels = load_stl10(data_dir, "unlabeled")
        images, labels = torch.cat([unlabeled, images]), torch.cat([no_labels, labels])
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
    tensors = isinstance(images, torch.Tensor)
    if augment == "batched" and not tensors:
        raise DataError(f"--augment batched needs a tensor dataset; {name} is read image by image: use "
                        f"--augment split (or torchvision, the reference)")
    if augment == "split" and tensors:
        raise DataError(f"--augment split is for image files (imagefolder); {name} is a tensor dataset: use "
                        f"--augment batched (or torchvision, the reference)")
    if augment == "batched":
        return Raw(images, masks, labels)
    if augment == "split":
        return CroppedViews(images, image_size, crop_scale)
    return TwoViews(images, masks, labels, image_size, crop_scale)


def eval_datasets(name, data_dir="data", image_size=64, *, split="test", transforms=(None, None), **kwargs):
    """`(train, test)` evaluation datasets: the labelled train split (kNN memory, probe
    training) and the `split` one (`test`, or `val` for monitoring and tuning on shapes);
    `transforms` (train, test), default the centre view. Any dataset of DATASETS or TRANSFER."""
    splits = [load_split(name, data_dir, which, image_size=image_size, **kwargs) for which in ("train", split)]
    return tuple(Plain(*split, image_size, transform) for split, transform in zip(splits, transforms))


if __name__ == "__main__":
    import runs                          # train.py's machinery; the component itself does not need it
    runs.run_script(main)
