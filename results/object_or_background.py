"""What does a `shapes` encoder look at? A probe for the object-scale study (results/README.md).

    python results/object_or_background.py CHECKPOINT [CHECKPOINT ...]

For each checkpoint and for a random-init encoder of its architecture, on a fresh draw of its
`shapes` (its object scale and view size; 4,000 training and 1,000 test images, the seeds of
the splits): kNN top-1 on the shape classes with the usual images and with the background
replaced by flat grey, and the mean cosine similarity between a test image's features and those
of its object alone (on grey) and of its background alone (the object greyed out); and kNN
top-1 on where the object is (the cell of a 3x3 grid that holds its centre) instead of what it
is. An encoder that learned the shape scores well above chance (10 %) both ways; one that is
closer to an image's object alone than to its background alone but scores near chance keys on
something of the object other than its shape, such as where it is.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data      # noqa: E402  (the project's modules, from the folder above)
import evaluate  # noqa: E402
import masking   # noqa: E402
import models    # noqa: E402
import runs      # noqa: E402
import shapes    # noqa: E402


def features(encoder, images, labels, image_size, transform):
    loader = torch.utils.data.DataLoader(data.Plain(images, None, labels, image_size, None), batch_size=256)
    return evaluate.extract_features(encoder, loader, "cpu", transform=transform)


def position(masks, cells=3):
    """The cell of a `cells x cells` grid that holds each object's centre (of mass): `[n]`."""
    n, size, _ = masks.shape
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    area = masks.sum((1, 2)).clamp(min=1)
    cy = (masks.sum(2) * coords).sum(1) / area
    cx = (masks.sum(1) * coords).sum(1) / area
    row, col = ((c * cells / size).long().clamp(max=cells - 1) for c in (cy, cx))
    return row * cells + col


def probe(path, num_train=4000, num_test=1000):
    checkpoint = runs.load_checkpoint(path)
    args = argparse.Namespace(**checkpoint["args"])
    trained = models.build_model(args)
    trained.load_state_dict(checkpoint["model"])
    torch.manual_seed(args.seed)
    scale = tuple(getattr(args, "shapes_object_scale", shapes.OBJECT_SCALE))
    transform = masking.Masker(args.strategy, args.grid, high_pass=True).filter \
        if evaluate.trained_on_high_pass(args) else None
    draws = {split: shapes.make_shapes(count, args.image_size, seed=shapes.SHAPES_SEEDS[split], object_scale=scale)
             for split, count in (("train", num_train), ("test", num_test))}
    grey = lambda images, keep: torch.where(keep[:, None], images, torch.full_like(images, 128))
    print(f"{path}: radius {scale[0]}-{scale[1]} of the side, {args.image_size} px")
    for name, encoder in (("trained", trained.backbone), ("random init", models.build_model(args).backbone)):
        with torch.no_grad():
            usual, flat = ({split: features(encoder, change(images, masks), labels, args.image_size, transform)
                            for split, (images, masks, labels) in draws.items()}
                           for change in (lambda images, masks: images, grey))
            images, masks, labels = draws["test"]
            background, _ = features(encoder, grey(images, ~masks), labels, args.image_size, transform)
        knn = lambda f: evaluate.knn_accuracy(*f["train"], *f["test"])
        where = evaluate.knn_accuracy(usual["train"][0], position(draws["train"][1]), usual["test"][0],
                                      position(draws["test"][1]))
        cosine = lambda a, b: float((F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).mean())
        print(f"  {name:12s} kNN {knn(usual):5.1f} %, on flat grey {knn(flat):5.1f} %; cosine with its object "
              f"alone {cosine(usual['test'][0], flat['test'][0]):.3f}, with its background alone "
              f"{cosine(usual['test'][0], background):.3f}; kNN on where the object is {where:5.1f} %")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if len(sys.argv) < 2:
        sys.exit("usage: python results/object_or_background.py CHECKPOINT [CHECKPOINT ...]")
    for checkpoint in sys.argv[1:]:
        probe(checkpoint)
