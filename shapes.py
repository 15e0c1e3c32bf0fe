"""The generated `shapes` dataset: ten shapes on smooth random textures, with their true
object masks. No download: the default dataset of train.py, and the one whose object masks
let the study measure saliency against the truth. Drawn in memory, and kept in a folder only
when asked (`cache`, train.py's --shapes-cache: large views that many runs draw).

    >>> import shapes
    >>> images, masks, labels = shapes.make_shapes(1000, 32, seed=0)   # uint8 [n,3,S,S], bool [n,S,S], [n]
    >>> small = shapes.make_shapes(1000, 96, object_scale=(0.08, 0.15))  # objects a few % of the view

    python shapes.py --jpeg-folder DIR       # the same shapes as an ImageNet-like folder of JPEGs

data.py reads them as the dataset `shapes` (train, val and test splits from SHAPES_SEEDS).
Depends on torch (and PIL, which torchvision brings, to write JPEGs).
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import functools
import hashlib
import math
import os
import shutil
import sys
import tempfile

import torch
import torch.nn.functional as F

OBJECT_SCALE = (0.25, 0.45)      # a shapes object's radius, a share of the image side
# Ten shapes that differ in structure (holes, arms, corners, elongation), not only in the
# number of polygon sides: at 32 px a rotated pentagon, hexagon and circle look alike.
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star", "crescent", "bar", "L", "T")
# Six saturated hues: the only colours of the dataset.
PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.9, 0.8, 0.1], [0.3, 0.8, 0.3],
                        [0.2, 0.7, 0.9], [0.4, 0.3, 0.9], [0.9, 0.4, 0.8]])
SHAPES_SEEDS = {"train": 0, "test": 1, "val": 2}   # three independent draws: disjoint splits
MAX_SIDE = 4096                  # the JPEG folder's largest side (a 30000 px image takes tens of GB to draw)
MIN_RADIUS_PX = 2                # an object's smallest radius in pixels (0.001 of 32 px drew objects of no pixel)


# ----------------------------------------------------------------------------- in memory

def make_shapes(num_images, image_size=64, seed=0, *, object_scale=OBJECT_SCALE, chunk=1000, cache=None):
    """Generate the `shapes` dataset: uint8 images `[n, 3, S, S]`, bool masks `[n, S, S]`,
    labels `[n]` (an index into SHAPE_CLASSES). Deterministic from `seed`, batched.

    A shape of random size (radius `object_scale` of the side, 25-45 % by default: objects
    that fill the frame; smaller ones let a random mask hide them), position, rotation and colour lies
    on a random smooth texture, with a little pixel noise. Object and background colours come
    from one palette of 6 hues for every image, drawn independently of the class, so colour
    gives neither the class nor the instance: a view pair can only be matched by its shape
    (per-image random colours let contrastive learning match views by colour and learn
    nothing about shape; measured in the README).

    `cache`: a folder where the draw is kept (see `_kept`), so that later calls, in other
    processes too, load it instead of drawing it again (20,000 images at 144 px: 89 s on two
    CPU cores, and a study draws them in every run and every evaluation).
    """
    return _generate(num_images, image_size, seed, tuple(object_scale), chunk, cache)[:3]


def make_twins(num_images, image_size=64, seed=0, *, object_scale=OBJECT_SCALE, chunk=1000, cache=None):
    """`(images, masks)` of make_shapes' images drawn again: the same object (shape, size,
    rotation, colour) at a new place on a new background, with new noise, from a stream of
    their own. A view pair made of an image and its twin (`--shapes-twins`) shares the object
    and nothing else, so neither the object's place nor its background tells images apart:
    only what the object looks like. `cache`: make_shapes'."""
    _, _, labels, objects = _generate(num_images, image_size, seed, tuple(object_scale), chunk, cache)
    again = torch.Generator().manual_seed(2 ** 32 + seed)
    drawn = [_draw_shapes(labels[i:i + chunk], image_size, again, object_scale, [o[i:i + chunk] for o in objects])[:2]
             for i in range(0, num_images, chunk)]
    return tuple(torch.cat(parts) for parts in zip(*drawn))


@functools.lru_cache(maxsize=4)                  # train.py's kNN and pre-training share them
def _generate(num_images, image_size, seed, object_scale, chunk, cache=None):
    """make_shapes' images, masks and labels, and the objects drawn `(radius, angle, colour)`."""
    key = num_images, image_size, seed, object_scale, chunk
    return _draw(*key) if cache is None else _kept(cache, *key)


def _kept(folder, num_images, image_size, seed, object_scale, chunk):
    """_draw of these arguments, kept in `folder`: loaded (memory-mapped, so processes that
    read it at once share its pages) when the file of these arguments, this shapes.py and this
    torch is there, else drawn and written. A lock makes processes that ask at once wait for
    the first one's draw; the file appears whole (written beside it, then renamed). A folder
    that cannot be written costs time alone: a warning, and the draw."""
    import fcntl                                                  # POSIX: the rest of the file runs anywhere
    key = num_images, image_size, seed, object_scale, chunk
    with open(__file__, "rb") as source:                          # an edit to the drawing draws anew
        version = hashlib.sha1(source.read() + torch.__version__.encode()).hexdigest()[:10]
    path = os.path.join(folder, f"shapes-{num_images}x{image_size}px-seed{seed}-radius{object_scale[0]}-"
                                f"{object_scale[1]}-chunk{chunk}-{version}.pt")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as error:
        print(f"warning: cannot keep shapes in {folder} ({error.strerror or error}); drawing them", file=sys.stderr)
        return _draw(*key)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                          # released when the file closes
        if os.path.exists(path):
            try:
                return _checked(torch.load(path, mmap=True, weights_only=True), num_images, image_size)
            except Exception as error:                            # truncated, empty, foreign: draw it again
                print(f"warning: {path} is damaged ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:80]}); "
                      f"drawing the images again and replacing it", file=sys.stderr)
        drawn = _draw(*key)
        try:                                      # through a file object: a full disk is an OSError
            with open(path + ".tmp", "wb") as f:
                torch.save(drawn, f)
            os.replace(path + ".tmp", path)
        except (OSError, RuntimeError) as error:                  # a full disk: this run goes on
            print(f"warning: cannot keep shapes in {folder} ({getattr(error, 'strerror', None) or error}); "
                  f"later runs draw them again", file=sys.stderr)
        finally:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
        return drawn


def _checked(kept, num_images, image_size):
    """`kept` when it is what _draw returns for these sizes, else ValueError: images uint8
    `[n, 3, S, S]`, masks bool `[n, S, S]`, labels int64 `[n]`, objects 3 tensors of `[n]`."""
    n, S = num_images, image_size
    shapes_ok = (isinstance(kept, tuple) and len(kept) == 4 and isinstance(kept[3], tuple) and len(kept[3]) == 3
                 and all(isinstance(t, torch.Tensor) for t in (*kept[:3], *kept[3])))
    if not shapes_ok:
        raise ValueError("not the structure the cache writes")
    images, masks, labels, objects = kept
    expected = [(images, torch.uint8, (n, 3, S, S)), (masks, torch.bool, (n, S, S)), (labels, torch.int64, (n,))]
    for tensor, dtype, shape in expected + [(o, o.dtype, (n,)) for o in objects]:
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"a {tensor.dtype} tensor of {tuple(tensor.shape)} where {dtype} {shape} belongs")
    return kept


def _draw(num_images, image_size, seed, object_scale, chunk):
    """_generate's draw, in chunks of `chunk` images from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    drawn = []
    for start in range(0, num_images, chunk):
        label = torch.randint(len(SHAPE_CLASSES), (min(chunk, num_images - start),), generator=g)
        image, mask, objects = _draw_shapes(label, image_size, g, object_scale)
        drawn.append((image, mask, label, *objects))
    images, masks, labels, *objects = (torch.cat(parts) for parts in zip(*drawn))
    return images, masks, labels, tuple(objects)


def _draw_shapes(label, size, g, object_scale=OBJECT_SCALE, objects=None):
    """Images uint8 `[n, 3, S, S]`, masks bool `[n, S, S]` of the shapes `label` `[n]`, and
    the objects drawn `(radius, angle, colour)`; given `objects`, those are kept and the
    place, background and noise drawn anew."""
    n = len(label)
    mask, radius, angle = _shape_masks(label, size, g, object_scale, None if objects is None else objects[:2])
    colour = objects[2] if objects is not None else torch.randint(len(PALETTE), (n,), generator=g)
    object_colour = PALETTE[colour][:, :, None, None]
    tint = PALETTE[torch.randint(len(PALETTE), (n,), generator=g)][:, :, None, None]
    texture = _texture(n, size, g, cells=4)                           # [n, 1, S, S] luminance
    background = (0.45 + 0.2 * texture) * (0.5 + 0.5 * tint)
    shading = 0.8 + 0.4 * _texture(n, size, g)
    image = torch.where(mask[:, None], object_colour * shading, background)
    image = image + 0.03 * torch.randn(image.shape, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), mask, (radius, angle, colour)


def _texture(n, size, g, cells=8):
    """Smooth random luminance fields in [0, 1], `[n, 1, S, S]`: low-resolution noise of
    `cells x cells`, upsampled, so a crop of a fifth of the image sees a different pattern."""
    low = torch.rand(n, 1, cells, cells, generator=g)
    return F.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def _shape_masks(label, size, g, object_scale=OBJECT_SCALE, radius_angle=None):
    """bool `[n, S, S]`: shape `label` at a random centre, rotation and radius (a share
    `object_scale` of the side, uniform), with the radius and angle drawn; given
    `radius_angle`, only the centre is drawn."""
    n = len(label)
    lo, hi = object_scale
    share = lo + (hi - lo) * torch.rand(n, generator=g) if radius_angle is None else radius_angle[0]
    radius = size * share
    cy = radius + (size - 2 * radius) * torch.rand(n, generator=g)
    cx = radius + (size - 2 * radius) * torch.rand(n, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g) if radius_angle is None else radius_angle[1]
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
    return inside[torch.arange(n), label], share, angle


# ----------------------------------------------------------------------------- an ImageNet-like folder

def shapes_image(label, width, height, g):
    """One `shapes` image of class `label`, drawn at `max(width, height)` px and resized to
    `height x width` (antialiased): uint8 `[3, height, width]`."""
    image, _, _ = _draw_shapes(torch.tensor([label]), max(width, height), g)
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
    The folder appears whole or not at all (written beside it, then renamed). An existing
    `root` raises FileExistsError, a failed write (a full disk) OSError, each with a message
    that says what to do."""
    from PIL import Image
    root = root.rstrip("/") or root
    if os.path.lexists(root):                                         # a dangling link too
        raise FileExistsError(f"{root} exists: pick another folder, or remove it to write it again")
    parent = os.path.dirname(os.path.abspath(root))
    # A folder of this writer's own beside ROOT: never one that a user (or another writer) has
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", suffix=".tmp", dir=parent)
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
        if os.path.lexists(root):                                     # another writer finished first
            raise FileExistsError(f"{root} appeared while it was written (another writer?): its images are "
                                  f"kept, these are not")
        os.rename(tmp, root)
    except BaseException as error:                                    # a full disk, Ctrl-C, a stop: nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, FileExistsError):
            raise OSError(f"writing {root}: {error.strerror or error}; free some space or pick another "
                          f"folder") from None
        raise


def main(argv=None):
    """`python shapes.py --jpeg-folder DIR`: write `shapes` as JPEGs at ImageNet's sizes."""
    import argparse

    def refuse(message):                                              # a bad flag: one line, exit 2
        print(f"error: {message} (see python shapes.py --help)", file=sys.stderr)
        sys.exit(2)
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.error = refuse
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
    if not 8 <= args.sizes[0] <= args.sizes[1] <= MAX_SIDE:          # 30000 px: tens of GB for one image
        parser.error(f"--sizes {' '.join(map(str, args.sizes))}: need 8 <= MIN <= MAX <= {MAX_SIDE}")
    if not 0 <= args.seed < 2 ** 40:                                  # seed * 1000 + k must fit torch's seed
        parser.error(f"--seed {args.seed}: need 0 <= seed < 2**40")
    if not args.jpeg_folder.strip("/"):
        parser.error(f"--jpeg-folder '{args.jpeg_folder}': give a folder to write, e.g. --jpeg-folder data/shapes-jpeg")
    for sig in (signal.SIGTERM, signal.SIGHUP):                      # a stop cleans up as Ctrl-C does
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        write_shapes_folder(args.jpeg_folder, tuple(args.images), sizes=tuple(args.sizes), seed=args.seed)
    except FileExistsError as error:
        refuse(error)
    except OSError as error:                                          # the disk is full
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {sum(args.images)} JPEGs to {args.jpeg_folder}: train it with python train.py --dataset "
          f"imagefolder --data-dir {args.jpeg_folder}")


if __name__ == "__main__":
    import runs                          # train.py's machinery; the component itself does not need it
    runs.run_script(main)
