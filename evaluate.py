"""Evaluate a pre-trained encoder: kNN, linear probe, and saliency quality on `shapes`.

    python evaluate.py --checkpoint runs/shapes-moco/last.pt
    python evaluate.py --checkpoint runs/shapes-moco/last.pt --dataset cifar10 --data-dir data   # transfer
    python evaluate.py --checkpoint runs/shapes-moco/last.pt --export backbone.pth            # a torchvision ResNet

The checkpoint carries its training flags, so nothing else is needed. Prints one JSON
object and writes it next to the checkpoint (`eval.json`). When training high-passed its views
(`--strategy hp` with masking, or `--high-pass on`), evaluation inputs are high-passed too, as
in the paper.

Importable: `extract_features`, `knn_accuracy`, `linear_probe`, `linear_probe_paper`,
`saliency_quality`, `export_backbone`.
"""
import signal
if __name__ == "__main__":                # Ctrl-C while torch is imported: stop quietly, nothing is written yet
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse
import json
import os
import pickle
import sys
import time

import torch
import torch.nn.functional as F

import data
import masking
import models
import runs
import saliency
import shapes


@torch.no_grad()
def extract_features(encoder, loader, device, *, transform=None):
    """Pooled features of every image: `(features [N, C] float32, labels [N])`, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        features.append(encoder(images).float().cpu())
        labels.append(batch[-1])
    encoder.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k=200,
                 temperature=0.1, chunk=1024):
    """Weighted kNN top-1 (%) as in MoCo's CIFAR demo: cosine similarity, the k nearest
    training features vote for their label with weight `exp(sim / temperature)`.

    train.py and `main` pass the pooled backbone features (512-d for ResNet-18), the
    representation that the linear probe and transfer use; MoCo's demo votes with its
    128-d projection-head output instead, so the figures are not directly comparable."""
    num_classes = int(train_labels.max()) + 1
    bank = F.normalize(train_features, dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test_features), chunk):
        query = F.normalize(test_features[start:start + chunk], dim=1)
        sim, index = (query @ bank.T).topk(k, dim=1)                  # [n, k]
        votes = torch.zeros(len(query), num_classes)
        votes.scatter_add_(1, train_labels[index], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return 100.0 * correct / len(test_features)


def linear_probe(train_features, train_labels, test_features, test_labels, *, epochs=100,
                 lr=30.0, batch_size=256, weight_decay=0.0, milestones=(60, 80), seed=0):
    """Linear classifier on frozen, cached features: top-1 (%) on the test features.

    The optimiser is the paper's (SPEC.md section 5): SGD momentum 0.9, lr 30, batch 256,
    100 epochs, lr x0.1 at 60 and 80, no weight decay. The protocol is faster and differs in
    two ways from MoCo v2's `main_lincls.py`, which the release uses:
    - each image is seen once, as its centre view, and its features are computed once and
      cached; `main_lincls.py` draws a new RandomResizedCrop + flip of every image in every
      epoch and passes it through the frozen backbone (in eval mode) each time;
    - the features are standardised with the training mean and std. `main_lincls.py` has no
      normalisation before its `fc` (no BN either: lr 30 suits the small scale of raw pooled
      ResNet features); standardising makes lr 30 stable for any encoder, a random-init one
      included, at the price of figures that are not the release's protocol.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    classifier = torch.nn.Linear(x_train.shape[1], int(train_labels.max()) + 1)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(x_train[index]), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return 100.0 * float((classifier(x_test).argmax(1) == test_labels).float().mean())


@torch.no_grad()
def saliency_quality(sources, loader, device, grid, *, encoder=None, transform=None):
    """IoU and precision (%) of each source's foreground patches against the true object
    patches (`saliency.gt_foreground_patches`), averaged over the images of `loader`
    (items `(image, mask, label)`). `sources`: name -> Saliency module. `transform`: what
    the `self` source's encoder sees (train.py feeds it the filtered views)."""
    totals = {name: {"iou": 0.0, "precision": 0.0} for name in sources}
    count = 0
    for images, masks, _ in loader:
        images, masks = images.to(device), masks.to(device)
        truth = saliency.gt_foreground_patches(masks, grid)
        for name, source in sources.items():
            seen = transform(images) if transform is not None and source.source == "self" else images
            fg = source(seen, encoder=encoder, masks=masks)
            overlap = (fg & truth).sum(1).float()
            union = (fg | truth).sum(1).float().clamp(min=1)
            totals[name]["iou"] += float((overlap / union).sum())
            totals[name]["precision"] += float((overlap / fg.sum(1).float().clamp(min=1)).sum())
        count += len(images)
    return {name: {key: round(100 * value / count, 2) for key, value in figures.items()}
            for name, figures in totals.items()}


def linear_probe_paper(encoder, train_loader, test_loader, device, num_classes, *, epochs=100, lr=30.0,
                       milestones=(60, 80), transform=None, seed=0):
    """The release's linear evaluation (MoCo's `main_lincls.py`): a linear classifier on the
    frozen backbone in eval mode, fed augmented images every epoch (`train_loader` draws a
    RandomResizedCrop + flip of each image, `data.linear_eval_transforms`), SGD momentum 0.9,
    `lr` 30, weight decay 0, lr x0.1 at `milestones`; top-1 (%) on `test_loader` (Resize +
    CenterCrop). No feature standardisation: the classifier sees raw pooled features."""
    torch.manual_seed(seed)
    was_training = encoder.training
    encoder.eval()
    classifier = torch.nn.Linear(encoder.out_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)

    def features(batch):
        images = batch[0].to(device, non_blocking=True)
        with torch.no_grad():
            return encoder(transform(images) if transform is not None else images).float()
    for _ in range(epochs):
        for batch in train_loader:
            labelled = batch[-1] >= 0
            loss = F.cross_entropy(classifier(features(batch)[labelled.to(device)]), batch[-1][labelled].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    with torch.no_grad():
        correct = sum(int((classifier(features(batch)).argmax(1).cpu() == batch[-1]).sum()) for batch in test_loader)
    encoder.train(was_training)
    return 100.0 * correct / len(test_loader.dataset)


def backbone_state(model):
    """The backbone as a torchvision ResNet state_dict without `fc` (`conv1.weight`, `layer1.0...`)."""
    return {name.removeprefix("trunk."): tensor.detach().cpu() for name, tensor in model.backbone.state_dict().items()}


def detectron2_name(name):
    """A torchvision ResNet name in detectron2's ResNet ("R-50") naming, as MoCo's
    `detection/convert-pretrain-to-detectron2.py` renames: stem, res2-res5, conv/norm, shortcut."""
    name = name if name.startswith("layer") else "stem." + name
    for t in (1, 2, 3, 4):
        name = name.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        name = name.replace(f"bn{t}", f"conv{t}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


EXPORT_LAYOUTS = ("torchvision", "moco", "detectron2")


def export_backbone(model, path, layout="torchvision"):
    """Write the pre-trained backbone for use outside this project:
    - `torchvision`: a plain ResNet state_dict without `fc`, for
      `resnet50().load_state_dict(torch.load(path), strict=False)` (only `fc.*` missing);
    - `moco`: `{"state_dict": {"module.encoder_q.<name>": ...}}`, what MoCo's (and the
      release's) `main_lincls.py --pretrained` reads;
    - `detectron2`: a pickle of `{"model": {detectron2 name: numpy array}, "__author__": "MOCO",
      "matching_heuristics": True}`, as MoCo's converter writes for detection and segmentation
      transfer (VOC, COCO) with detectron2.
    The file is written atomically."""
    state = backbone_state(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if layout == "detectron2":
        weights = {detectron2_name(name): tensor.numpy() for name, tensor in state.items()
                   if not name.endswith("num_batches_tracked")}
        runs.write_atomic(path, lambda f: pickle.dump({"model": weights, "__author__": "MOCO",
                                                       "matching_heuristics": True}, f))
    else:
        runs.write_atomic(path, lambda f: torch.save(state if layout == "torchvision" else {
            "state_dict": {f"module.encoder_q.{name}": tensor for name, tensor in state.items()}}, f))


def trained_on_high_pass(train_args):
    """Whether training high-passed every view (so evaluation inputs must be high-passed too)."""
    high_pass = getattr(train_args, "high_pass", None)               # None: a checkpoint from before the flag
    if high_pass is None:
        high_pass = "on" if train_args.strategy == "hp" and train_args.masking != "none" else "off"
    return high_pass == "on"


def preprocessing(train_args):
    """What an exported encoder expects of its inputs, as JSON-ready facts: the normalisation
    and, when it trained on high-passed views, the filter that follows it (the release's
    `main_lincls.py --strategy hp` applies the same before its linear classifier)."""
    facts = {"arch": train_args.arch, "stem": train_args.stem, "trained_at_px": train_args.image_size,
             "normalize": {"mean": list(data.MEAN), "std": list(data.STD)}, "high_pass": None}
    if trained_on_high_pass(train_args):
        kernel, sigma = masking.scaled_kernel(masking.HP_KERNEL, masking.HP_SIGMA, train_args.image_size)
        facts["high_pass"] = {
            "kernel_size": kernel, "sigma": sigma,
            "apply": "after normalize: x - torchvision.transforms.functional.gaussian_blur(x, kernel_size, sigma)",
            "other_sizes": f"kernel and sigma scale with the view: masking.scaled_kernel({masking.HP_KERNEL}, "
                           f"{masking.HP_SIGMA}, size) ({masking.HP_KERNEL} and {masking.HP_SIGMA} at 224 px)"}
    return facts


def supervised_baseline(dataset="shapes", *, arch="resnet18", stem="imagenet", image_size=32, epochs=5,
                        batch_size=128, lr=0.1, device="cpu", shapes_size=(20000, 5000), seed=0, save_weights=None,
                        object_scale=shapes.OBJECT_SCALE):
    """How hard a dataset is: a ResNet trained with labels (MoCo v2 augmentation, SGD,
    cosine), then its test top-1 (%) and the kNN top-1 (%) of its features and of a
    random-init encoder of the same architecture.

    `save_weights`: also write the trained network as a torchvision ResNet state_dict (with
    `fc`; conv1 3x3 for the CIFAR stem), which `--saliency pretrained --saliency-weights`
    reads: a saliency network trained with labels, as the paper's ImageNet ResNet-50 was.
    Each epoch prints its loss and training top-1 on stderr."""
    torch.manual_seed(seed)
    encoder = models.ResNetEncoder(arch, cifar_stem=stem == "cifar").to(device)
    random_encoder = models.ResNetEncoder(arch, cifar_stem=stem == "cifar").to(device)
    classifier = torch.nn.Linear(encoder.out_dim, 10).to(device)
    drawn = {"shapes_size": shapes_size, "object_scale": tuple(object_scale)}
    train_views = data.pretrain_dataset(dataset, image_size=image_size, **drawn)
    loader = torch.utils.data.DataLoader(train_views, batch_size=batch_size, shuffle=True, drop_last=True)
    params = list(encoder.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    start = time.time()
    for epoch in range(1, epochs + 1):
        total_loss, correct = 0.0, 0
        for view, _, _, _, label in loader:
            logits = classifier(encoder(view.to(device)))
            loss = F.cross_entropy(logits, label.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
            correct += int((logits.argmax(1).cpu() == label).sum())
        print(f"epoch {epoch}/{epochs}: loss {total_loss / len(loader):.4f}, training top-1 "
              f"{100 * correct / (len(loader) * batch_size):.2f} %, {(time.time() - start) / 60:.1f} min",
              file=sys.stderr, flush=True)
    train_set, test_set = data.eval_datasets(dataset, image_size=image_size, **drawn)
    plain = lambda d: torch.utils.data.DataLoader(d, batch_size=256)
    if save_weights:
        state = {name.removeprefix("trunk."): tensor.detach().cpu() for name, tensor in encoder.state_dict().items()}
        state.update({f"fc.{name}": tensor.detach().cpu() for name, tensor in classifier.state_dict().items()})
    results = {"arch": arch, "stem": stem, "image_size": image_size, "epochs": epochs, "lr": lr,
               "object_scale": list(object_scale)}
    if save_weights:
        try:                                       # a full disk: the figures below are still measured
            runs.write_atomic(save_weights, lambda f: torch.save(state, f))
        except OSError as error:
            results["save_weights_error"] = f"could not write {save_weights} ({error.strerror or error})"
            print(f"error: {results['save_weights_error']}; the figures follow, the network is not kept",
                  file=sys.stderr, flush=True)
    encoder.eval()
    with torch.no_grad():
        correct = sum(int((classifier(encoder(batch[0].to(device))).argmax(1).cpu() == batch[-1]).sum())
                      for batch in plain(test_set))
    results["supervised_top1"] = round(100 * correct / len(test_set), 2)
    for name, net in (("supervised_knn_top1", encoder), ("random_init_knn_top1", random_encoder)):
        train_x, train_y = extract_features(net, plain(train_set), device)
        test_x, test_y = extract_features(net, plain(test_set), device)
        results[name] = round(knn_accuracy(train_x, train_y, test_x, test_y), 2)
    return results


def check_output_path(flag, path, checkpoint=None, *, make_folder=False):
    """Refuse, before any work, an output path that cannot be written or that holds what a
    user keeps: a folder, the checkpoint being read, or any train.py checkpoint. `make_folder`:
    a missing folder will be made (else it is refused: a typo found after an hour's training)."""
    if not path:
        runs.fail(f"{flag} '': give a file name, e.g. {flag} backbone.pth")
    if os.path.isdir(path):                                           # the rename would fail after the work
        runs.fail(f"{flag} {path}: is a folder; give a file name, e.g. {path.rstrip('/')}/backbone.pth")
    if os.path.exists(path) and (checkpoint and os.path.exists(checkpoint) and os.path.samefile(path, checkpoint)
                                 or is_train_checkpoint(path)):
        runs.fail(f"{flag} {path}: is a train.py checkpoint, which writing there would replace; pick another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not runs.can_write(path) or not (make_folder or os.path.isdir(folder)):
        runs.fail(f"{flag} {path}: cannot write into {folder}; pick another path")


def is_train_checkpoint(path):
    """Whether `path` is a checkpoint that train.py wrote (read lazily, weights only)."""
    try:
        return "optimizer" in runs.read_checkpoint(path, mmap=True, needs=())
    except runs.CheckpointError:
        return False


def main(argv=None):
    parser = runs.OneLineParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="OUT/last.pt written by train.py")
    parser.add_argument("--supervised", action="store_true",
                        help="instead: train a ResNet-18 with labels on shapes and report how hard it is")
    parser.add_argument("--image-size", type=int, default=None,
                        help="view size (default: the checkpoint's; 32 with --supervised)")
    parser.add_argument("--epochs", type=int, default=5, help="with --supervised")
    parser.add_argument("--arch", choices=models.ARCHS, default="resnet18", help="with --supervised")
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet",
                        help="with --supervised (cifar: a 4x4 last map at 32 px, for SCDA saliency)")
    parser.add_argument("--lr", type=float, default=0.1, help="with --supervised: SGD's learning rate (cosine)")
    parser.add_argument("--shapes-object-scale", type=float, nargs=2, metavar=("LO", "HI"), default=shapes.OBJECT_SCALE,
                        help="with --supervised: the shapes objects' radius, a share of the side (as train.py)")
    parser.add_argument("--save-weights", metavar="PATH",
                        help="with --supervised: write the network as a torchvision ResNet state_dict, for "
                             "train.py --saliency pretrained --saliency-weights PATH")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--export", metavar="PATH", help="only write the backbone to PATH (see --export-layout)")
    parser.add_argument("--export-layout", choices=EXPORT_LAYOUTS, default="torchvision",
                        help="torchvision: a ResNet state_dict without fc; moco: main_lincls.py's "
                             "module.encoder_q.*; detectron2: a .pkl for detection transfer")
    parser.add_argument("--dataset", choices=data.DATASETS + data.TRANSFER, default=None,
                        help="evaluate on this dataset (transfer; default: the pre-training one)")
    parser.add_argument("--data-dir", default=None, help="where --dataset is (default: the checkpoint's --data-dir)")
    parser.add_argument("--download", action="store_true", help="let torchvision download --dataset")
    parser.add_argument("--protocol", choices=["fast", "paper"], default="fast",
                        help="linear probe: fast (cached centre-view features, standardised) or paper "
                             "(augmented images through the frozen backbone each epoch, as main_lincls.py)")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (SPEC: 100)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="what kNN and the probe are tested on: test (reported results) or val (shapes "
                             "only: monitoring and tuning, so that the test split is read once)")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--saliency-weights", default=None,
                        help="a torchvision ResNet state_dict: also measure the pretrained source's saliency quality "
                             "(nothing is downloaded)")
    args = parser.parse_args(argv)
    for flag, value in (("--knn-k", args.knn_k), ("--probe-epochs", args.probe_epochs), ("--epochs", args.epochs),
                        ("--image-size", args.image_size)):
        if value is not None and value < 1:
            runs.fail(f"{flag} {value}: need at least 1")
    if not 0 < args.lr < float("inf"):
        runs.fail(f"--lr {args.lr}: need a finite positive learning rate")
    lo, hi = args.shapes_object_scale
    if not 0 < lo <= hi <= 0.5:
        runs.fail(f"--shapes-object-scale {lo} {hi}: need 0 < LO <= HI <= 0.5 (a radius of half the side fills it)")
    if args.supervised and lo * (args.image_size or 32) < shapes.MIN_RADIUS_PX:   # objects of no pixel
        runs.fail(f"--shapes-object-scale {lo} {hi}: at {args.image_size or 32} px an object's radius would be "
                  f"{lo * (args.image_size or 32):.2g} px; need at least {shapes.MIN_RADIUS_PX} px (a larger LO "
                  f"or --image-size)")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        runs.fail(f"--device {args.device}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        runs.fail("--device cuda: no GPU is visible; use --device cpu")
    if args.save_weights is not None and not args.supervised:
        runs.fail("--save-weights writes the network of --supervised: add --supervised")
    for flag, path in (("--save-weights", args.save_weights), ("--export", args.export)):
        if path is not None:                                          # before the work, not after it
            check_output_path(flag, path, args.checkpoint, make_folder=flag == "--export")
    if args.supervised:
        results = supervised_baseline(arch=args.arch, stem=args.stem, image_size=args.image_size or 32,
                                      epochs=args.epochs, lr=args.lr, device=device, save_weights=args.save_weights,
                                      object_scale=args.shapes_object_scale)
        print(json.dumps(results, indent=2))
        if "save_weights_error" in results:
            sys.exit(1)
        return results
    if not args.checkpoint:
        runs.fail("pass --checkpoint OUT/last.pt (or --supervised)")
    checkpoint = runs.load_checkpoint(args.checkpoint)
    train_args = argparse.Namespace(**checkpoint["args"])

    model = models.build_model(train_args)
    model.load_state_dict(checkpoint["model"])
    if not runs.finite_weights(model):
        runs.fail(f"--checkpoint {args.checkpoint}: its weights are not finite (NaN or inf), so its figures would mean "
             f"nothing: evaluate an earlier checkpoint, or retrain with a lower --lr")
    if args.export:
        try:
            export_backbone(model, args.export, args.export_layout)
        except (OSError, RuntimeError) as error:                      # torch.save raises RuntimeError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            runs.fail(f"--export {args.export}: cannot write it ({reason}); pick another path")
        facts = preprocessing(train_args)
        facts_path = os.path.splitext(args.export)[0] + ".preprocessing.json"
        runs.write_json(facts_path, facts)
        note = ("" if train_args.stem != "cifar" else "; it has the CIFAR stem: build the torchvision ResNet "
                "with conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and maxpool = nn.Identity() before loading")
        print(f"wrote the {train_args.arch} backbone to {args.export} ({args.export_layout} layout){note}")
        hp = facts["high_pass"]
        print(f"its inputs ({facts_path}): Normalize(mean={facts['normalize']['mean']}, std={facts['normalize']['std']})"
              + (f", then the high-pass filter x - gaussian_blur(x, {hp['kernel_size']}, {hp['sigma']}) it trained on: "
                 f"apply it before main_lincls.py or detectron2" if hp else ""))
        return {"export": args.export, "preprocessing": facts_path}
    encoder = model.backbone.to(device)
    dataset = args.dataset or train_args.dataset
    image_size = args.image_size or train_args.image_size
    transform = masking.Masker(train_args.strategy, train_args.grid, high_pass=True).filter \
        if trained_on_high_pass(train_args) else None
    data_dir = args.data_dir or train_args.data_dir
    loader = lambda dataset, shuffle=False: torch.utils.data.DataLoader(
        dataset, batch_size=256, shuffle=shuffle, num_workers=train_args.workers)
    # the shapes the checkpoint saw (its object scale: the default for runs from before the flag)
    drawn = {"shapes_size": tuple(train_args.shapes_size),
             "object_scale": tuple(getattr(train_args, "shapes_object_scale", shapes.OBJECT_SCALE)),
             "shapes_cache": getattr(train_args, "shapes_cache", None)}
    start = time.time()
    try:
        train_set, test_set = data.eval_datasets(dataset, data_dir, image_size, download=args.download,
                                                 split=args.split, **drawn)
        train_features, train_labels = extract_features(encoder, loader(train_set), device, transform=transform)
        test_features, test_labels = extract_features(encoder, loader(test_set), device, transform=transform)
        labelled = train_labels >= 0
        results = {"checkpoint": args.checkpoint, "epoch": checkpoint.get("epoch"), "step": checkpoint.get("step"),
                   "dataset": dataset, "split": args.split, "image_size": image_size, "protocol": args.protocol,
                   "knn_top1": round(knn_accuracy(train_features[labelled], train_labels[labelled], test_features,
                                                  test_labels, k=args.knn_k), 2)}
        if args.protocol == "fast":
            results["linear_top1"] = round(linear_probe(train_features[labelled], train_labels[labelled],
                                                        test_features, test_labels, epochs=args.probe_epochs), 2)
        else:
            augmented, centred = data.eval_datasets(dataset, data_dir, image_size, split=args.split,
                                                    transforms=data.linear_eval_transforms(image_size), **drawn)
            results["linear_top1"] = round(linear_probe_paper(
                encoder, loader(augmented, shuffle=True), loader(centred), device, int(train_labels.max()) + 1,
                epochs=args.probe_epochs, milestones=(round(0.6 * args.probe_epochs), round(0.8 * args.probe_epochs)),
                transform=transform), 2)
    except data.DataError as error:                                   # an unreadable image, maybe in a worker
        runs.fail(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1])
    if dataset == "shapes" and train_args.dataset == "shapes":
        rule = {"std_factor": getattr(train_args, "fg_std_factor", 0.6)}   # the run's foreground rule (0.6 before the flag)
        sources = {"spectral": saliency.Saliency("spectral", train_args.grid, **rule),
                   "gt": saliency.Saliency("gt", train_args.grid)}
        side = models.feature_map_size(train_args.image_size, cifar_stem=train_args.stem == "cifar")
        if side >= 2:
            sources["self"] = saliency.Saliency("self", train_args.grid, **rule)
        else:
            results["self_saliency"] = (f"not measured: the encoder's last feature map is {side}x{side} "
                                        f"at {train_args.image_size} px with the {train_args.stem} stem")
        if args.saliency_weights is None:                           # never a download unless asked for
            results["pretrained_saliency"] = "not measured: pass --saliency-weights PATH (a torchvision ResNet state_dict)"
        else:
            try:
                sources["pretrained"] = saliency.Saliency("pretrained", train_args.grid, weights=args.saliency_weights,
                                                          **rule).to(device)
            except RuntimeError as error:
                results["pretrained_saliency"] = f"not measured: {error}"
        results["saliency_quality"] = saliency_quality(sources, loader(test_set), device, train_args.grid,
                                                       encoder=model.saliency_encoder.to(device).eval(),
                                                       transform=transform)
    results["seconds"] = round(time.time() - start, 1)
    print(json.dumps(results, indent=2))
    name = "eval.json" if dataset == train_args.dataset and args.protocol == "fast" and args.split == "test" else \
        f"eval-{dataset}-{args.protocol}{'-val' * (args.split == 'val')}.json"
    path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name)
    try:
        runs.write_json(path, results)
    except OSError as error:                                          # a read-only folder: the results stand above
        print(f"note: could not write {path} ({error.strerror or error}); the results are printed above",
              file=sys.stderr)
    return results


if __name__ == "__main__":
    runs.run_script(main)
