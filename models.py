"""ResNet encoders and the three frameworks: MoCo v2, SimCLR, BYOL (SPEC.md section 4).

    >>> import torch, models
    >>> encoder = models.ResNetEncoder("resnet18", cifar_stem=True, bn_splits=8)
    >>> moco = models.MoCo(encoder, queue_size=4096, momentum=0.99, temperature=0.1, alpha=2.0)
    >>> query, key = torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)
    >>> hard_negatives = torch.randn(16, 1, 3, 32, 32)           # [B, M, 3, H, W]
    >>> loss, figures = moco(query, key, hard_negatives)

Each framework's `forward(query, key, hard_negatives=None)` takes image batches (the query is
the masked view, the key the clean one) and returns the loss and a dict of detached scalars
worth logging. `backbone` is the encoder to evaluate; `saliency_encoder` the one to use for
`--saliency self` (the momentum / target encoder: it sees clean views and moves slowly).

Single device: Shuffle-BN needs several GPUs in the release; here `SplitBatchNorm2d`
normalises `bn_splits` sub-batches separately and the key batch is permuted before the key
encoder and restored after, which gives the same effect on one device. Under torchrun the
same sub-batches are spread over the processes (see "several processes" below).
Depends on torch, torchvision and losses.py.
"""
import contextlib
import copy
import functools
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from losses import byol_loss, info_nce, l2norm, nt_xent

ARCHS = ("resnet18", "resnet34", "resnet50")


# ----------------------------------------------------------------------------- encoders

class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that, in training, normalises `num_splits` sub-batches with their own
    statistics, as `num_splits` GPUs would. Sub-batch s holds samples s, s + S, s + 2S, ...
    (a view of a contiguous input, no copy; a channels_last input is copied and its layout
    restored). In eval mode it is BatchNorm2d.
    Running statistics are the mean over the sub-batches' running statistics; with
    `track_running_stats` off (`batch_stats_only`) they are neither used nor updated.
    """

    def __init__(self, num_features, num_splits, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        N, C, H, W = x.shape
        S = self.num_splits
        if not self.training or S == 1:
            return super().forward(x)
        if N % S:
            raise ValueError(f"batch of {N} does not split into {S} BatchNorm sub-batches: "
                             f"use a batch size divisible by --bn-splits {S}")
        track = self.track_running_stats
        running_mean = self.running_mean.repeat(S) if track else None
        running_var = self.running_var.repeat(S) if track else None
        out = F.batch_norm(x.reshape(N // S, C * S, H, W), running_mean, running_var,
                           self.weight.repeat(S), self.bias.repeat(S), True, self.momentum, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(S, C).mean(0))
                self.running_var.copy_(running_var.view(S, C).mean(0))
                self.num_batches_tracked += 1
        out = out.view(N, C, H, W)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)      # keep the caller's layout
        return out


@contextlib.contextmanager
def batch_stats_only(*modules):
    """Inside, the BatchNorm layers of `modules` in train mode normalise with the batch's own
    statistics, as usual, but leave every running statistic (and `num_batches_tracked`)
    exactly as it was. For the extra passes of a step, over hard negatives (40-70 % noise)
    and for `--saliency self`: the running statistics that evaluation uses must describe the
    views the encoder trains on, updated once per step, as in a plain step."""
    layers = [m for module in modules for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


def convert_split_bn(module, num_splits):
    """Replace every BatchNorm2d of `module` with a SplitBatchNorm2d (same weights and stats)."""
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            convert_split_bn(child, num_splits)
    return module


class ResNetEncoder(nn.Module):
    """A torchvision ResNet without avgpool and fc. `feature_map(x) -> [B, C, h, w]`,
    `forward(x) -> [B, C]` (global average pool), `out_dim = C`.

    `cifar_stem`: 3x3 conv with stride 1 and no max-pool, for 32-96 px images (MoCo's CIFAR
    demo); the map of a 32 px image is then 4x4 instead of 1x1.
    """

    def __init__(self, arch="resnet18", *, cifar_stem=False, bn_splits=1):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        self.trunk = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
        self.out_dim, self.bn_splits = net.fc.in_features, bn_splits
        convert_split_bn(self, bn_splits)

    def feature_map(self, x):
        return self.trunk(x)

    def forward(self, x):
        return self.feature_map(x).mean((2, 3))


def feature_map_size(image_size, *, cifar_stem=False):
    """Side of a ResNet's last feature map for square views of `image_size` px. Each
    stride-2 stage takes n to ceil(n / 2): five stages with the ImageNet stem (32 px -> 1,
    224 -> 7), three with the CIFAR stem (32 px -> 4)."""
    for _ in range(3 if cifar_stem else 5):
        image_size = -(-image_size // 2)
    return image_size


def mlp(in_dim, hidden_dim, out_dim, *, batch_norm=False):
    """Projection head / predictor: Linear, (BatchNorm1d,) ReLU, Linear."""
    norm = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), *norm, nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


@torch.no_grad()
def momentum_update(target, online, momentum):
    """theta_target <- m * theta_target + (1 - m) * theta_online, for every parameter."""
    target_params, online_params = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1 - momentum)


def cosine_momentum(base, step, total_steps):
    """BYOL's target momentum at `step` of `total_steps`: `1 - (1 - base)(cos(pi step / total) + 1) / 2`,
    from `base` at the start to 1 at the end (BYOL paper, section 3.2)."""
    progress = min(step, total_steps) / max(1, total_steps)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module):
    """A copy that follows `module` by momentum only: no gradient."""
    return copy.deepcopy(module).requires_grad_(False)


# ----------------------------------------------------------------------------- several processes
# Under torchrun each of W processes holds every W-th image of the global batch: global image g
# is image g // W of process g % W. With that layout the BatchNorm sub-batches of W processes
# with bn_splits / W splits each are exactly those of one process with bn_splits (both stride),
# and gathering the global batch is a stack. With one process every helper is the identity.

def process_group():
    """`(rank, world size)`: (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batch(x, *, grad=False):
    """Every process's local batch `[b, ...]` as the global batch `[W b, ...]`, in global order.
    `grad`: the gradient flows into this process's own part, multiplied by W. Then every process
    computes the global loss from the gathered batch (SimCLR's and BYOL's heads and losses):
    the parameters after the gather get the whole gradient in each process, those before it
    W times their process's share, and DDP's mean over the processes gives one process's
    gradient for both."""
    rank, world = process_group()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    if grad:
        parts[rank] = scale_gradient(x, world)
    return torch.stack(parts, 1).flatten(0, 1)


def local_part(x):
    """This process's images of a global batch `[W b, ...]`."""
    rank, world = process_group()
    return x[rank::world]


@torch.no_grad()
def average_running_stats(module):
    """Make every process's BatchNorm running statistics their mean over the processes. The
    update is linear, so the mean is what one process with all the sub-batches would hold."""
    rank, world = process_group()
    if world == 1:
        return
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
            for statistic in (layer.running_mean, layer.running_var):
                dist.all_reduce(statistic)
                statistic /= world


def forward_shuffled(network, images):
    """Shuffle-BN: the network sees the batch in a random order (so each BN sub-batch mixes
    other images than the query's), and the outputs come back in the input order. `images` is
    the global batch; with W processes each runs every W-th image of the permutation (drawn
    on process 0) and the outputs are gathered, as MoCo's multi-GPU Shuffle-BN does.
    `network` returns a tensor or a tuple of tensors."""
    rank, world = process_group()
    # A uniform random order as the argsort of uniform keys, not randperm: inductor (torch 2.11)
    # fails to compile its randperm-then-index pattern on a GPU.
    perm = torch.rand(len(images), device=images.device).argsort()
    if world > 1:
        dist.broadcast(perm, 0)
    out = network(images[perm][rank::world])
    restore = lambda y: gather_batch(y)[perm.argsort()]
    return tuple(map(restore, out)) if isinstance(out, tuple) else restore(out)


def scale_gradient(x, factor):
    """`x` with its gradient multiplied by `factor` (the value unchanged)."""
    return x if factor == 1 else x + (factor - 1) * (x - x.detach())


# ----------------------------------------------------------------------------- frameworks

PAIRINGS = ("own", "release")


def check_pairing(pairing):
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown hard-negative pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    return pairing


@contextlib.contextmanager
def single_image_batch_norm(*modules):
    """Inside, every BatchNorm2d of `modules` normalises each image over its own positions, as
    train-mode BatchNorm does on a GPU handed a batch of ONE image (the release's hard-negative
    pass, SPEC.md section 4), and leaves the running statistics alone. A batch of one image in
    BatchNorm is instance normalisation with BatchNorm's weights, so the whole batch goes in one
    pass. It needs more than one position per channel: a 1x1 map is refused by torch."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]

    def per_image(layer, x):
        return F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
    for layer in layers:
        layer.forward = functools.partial(per_image, layer)          # an instance attribute hides the class's
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def release_hard_negatives(network, hard_negatives, groups, *modules):
    """The hard negatives as the released code computes them (SPEC.md section 4), for this
    process's images. Each of the `groups` BatchNorm sub-batches stands for one of the
    release's GPUs (sub-batch g holds images g, g + groups, ...). The m-th hard negative of a
    GPU is image m of its batch, embedded by `network` as a batch of one image (BatchNorm of
    `modules` over that image alone), and every query of that GPU meets it. The release's
    shuffle of these single images across GPUs changes no value, so it is left out.
    `hard_negatives: [b, M, 3, H, W]` (image m's m-th: the release makes one per image) ->
    `[b, M, D]`, row i holding the hard negatives of image i's sub-batch."""
    b, M = hard_negatives.shape[:2]
    if M * groups > b:
        raise ValueError(f"the release's pairing takes hard negative m from image m of each of the {groups} "
                         f"BatchNorm sub-batches: {M} hard negatives need {M * groups} images, the batch has {b}")
    device = hard_negatives.device
    image_m_of_group = torch.arange(groups, device=device)[:, None] + groups * torch.arange(M, device=device)
    chosen = hard_negatives[image_m_of_group, torch.arange(M, device=device)]   # [G, M, 3, H, W]
    with single_image_batch_norm(*modules):
        t = network(chosen.flatten(0, 1)).view(groups, M, -1)                    # [G, M, D]
    return t[torch.arange(b, device=device) % groups]                            # each query its group's: [b, M, D]


class MoCo(nn.Module):
    """MoCo v2 with masked hard negatives: query encoder + MLP head, a momentum key encoder,
    a FIFO queue of K keys. Hard negatives go through the key encoder and are never enqueued.
    """

    def __init__(self, encoder, *, dim=128, queue_size=65536, momentum=0.999,
                 temperature=0.2, alpha=2.0, hard_negative_pairing="own"):
        """`hard_negative_pairing`: `own`, query b meets its own image's hard negatives (the
        paper's text, the default); `release`, what the released code computes
        (`release_hard_negatives`)."""
        super().__init__()
        self.encoder_q = encoder
        self.head_q = mlp(encoder.out_dim, encoder.out_dim, dim)
        self.encoder_k, self.head_k = frozen_copy(self.encoder_q), frozen_copy(self.head_q)
        self.momentum, self.temperature, self.alpha = momentum, temperature, alpha
        self.pairing = check_pairing(hard_negative_pairing)
        self.register_buffer("queue", l2norm(torch.randn(queue_size, dim)))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self):
        return self.encoder_q

    @property
    def saliency_encoder(self):
        return self.encoder_k

    def key_network(self, x):
        return l2norm(self.head_k(self.encoder_k(x)))

    @torch.no_grad()
    def enqueue(self, keys):
        """FIFO: the newest keys overwrite the oldest; the pointer wraps around."""
        K, B = len(self.queue), len(keys)
        if K % B:
            raise ValueError(f"queue size {K} is not a multiple of the batch size {B}: "
                             f"choose --queue-size as a multiple of --batch-size")
        index = self.queue_ptr + torch.arange(B, device=keys.device)     # no host sync
        self.queue.index_copy_(0, index, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + B) % K)

    @torch.no_grad()
    def encode_keys(self, key):
        """Momentum update, then the key encoder on the key views (in a shuffled order, for
        Shuffle-BN; across processes under torchrun). Returns `(keys [B, D], feature maps
        [B, C, h, w])` of this process's views: train.py reads `--saliency self` of the key
        views off these maps instead of a second forward pass, and passes the pair to
        `forward(..., keys=)`."""
        momentum_update(self.encoder_k, self.encoder_q, self.momentum)
        momentum_update(self.head_k, self.head_q, self.momentum)

        def keys_and_maps(x):
            feature_map = self.encoder_k.feature_map(x)
            return l2norm(self.head_k(feature_map.mean((2, 3)))), feature_map
        k, feature_map = forward_shuffled(keys_and_maps, gather_batch(key))
        return local_part(k), local_part(feature_map)

    @torch.no_grad()
    def encode_hard_negatives(self, hard_negatives):
        """`[B, M, 3, H, W] -> [B, M, D]`: the key encoder's embedding of the hard negatives that
        each query of this process meets. `own`: its image's, embedded in one shuffled pass over
        the global batch (as the keys are). Either way the pass leaves BatchNorm's running
        statistics alone: one update per step, the key's."""
        if self.pairing == "release":
            return release_hard_negatives(self.key_network, hard_negatives, self.encoder_k.bn_splits,
                                          self.encoder_k, self.head_k)
        everyone = gather_batch(hard_negatives)                         # the global batch's
        with batch_stats_only(self.encoder_k, self.head_k):
            t = forward_shuffled(self.key_network, everyone.flatten(0, 1))
        return local_part(t.view(*everyone.shape[:2], -1))

    def forward(self, query, key, hard_negatives=None, *, keys=None):
        """`keys`: what `encode_keys(key)` returned this step (then `key` is not used again)."""
        q = l2norm(self.head_q(self.encoder_q(query)))                   # queries: [B, D]
        with torch.no_grad():
            k = (keys if keys is not None else self.encode_keys(key))[0]   # keys: [B, D]
            t = None if hard_negatives is None else self.encode_hard_negatives(hard_negatives)   # [B, M, D]
        # info_nce normalises the queue into a new tensor, so enqueuing in place is safe.
        loss = info_nce(q, k, self.queue, t, self.temperature, self.alpha)
        self.enqueue(gather_batch(k))                                    # never the hard negatives
        figures = {"positive_sim": (q * k).sum(1).mean().detach(), "queue_ptr": self.queue_ptr.clone()}
        if t is not None:
            figures["hard_negative_sim"] = torch.einsum("bd,bmd->bm", q, t).mean().detach()
        return loss, figures


class SimCLR(nn.Module):
    """SimCLR: one encoder + MLP head, NT-Xent over the 2B views; hard negatives are embedded
    by the same network without gradient (with batch statistics that leave the running ones
    alone) and appended to each anchor's row, each query meeting its own image's.

    The head's BatchNorm normalises over the global batch: under torchrun every process runs
    the head and the loss on every process's features (its gradient reaching its own, see
    `gather_batch`), so W processes compute what one does."""

    def __init__(self, encoder, *, dim=128, temperature=0.2, alpha=2.0):
        super().__init__()
        self.encoder = encoder
        self.head = mlp(encoder.out_dim, encoder.out_dim, dim, batch_norm=True)
        self.temperature, self.alpha = temperature, alpha

    @property
    def backbone(self):
        return self.encoder

    @property
    def saliency_encoder(self):
        return self.encoder

    @torch.no_grad()
    def encode_hard_negatives(self, hard_negatives):
        """`[b, M, 3, H, W]` (this process's) `-> [B, M, D]` (the global batch's). Hard negative
        m of image i goes in position m b + i, so each BatchNorm sub-batch holds the hard
        negatives of the images of one query sub-batch, for one process or W."""
        b, M = hard_negatives.shape[:2]
        with batch_stats_only(self.encoder, self.head):
            features = self.encoder(hard_negatives.transpose(0, 1).flatten(0, 1))   # [M b, C]
            features = gather_batch(features.view(M, b, -1).transpose(0, 1))        # [B, M, C]
            return self.head(features.flatten(0, 1)).view(len(features), M, -1)     # [B, M, D]

    def forward(self, query, key, hard_negatives=None):
        f1, f2 = self.encoder(torch.cat([query, key])).chunk(2)                      # [b, C] each
        z1, z2 = self.head(torch.cat([gather_batch(f1, grad=True), gather_batch(f2, grad=True)])).chunk(2)  # [B, D]
        t = None if hard_negatives is None else self.encode_hard_negatives(hard_negatives)       # [B, M, D]
        loss = nt_xent(z1, z2, self.temperature, t, self.alpha)
        figures = {"positive_sim": (l2norm(z1) * l2norm(z2)).sum(1).mean().detach()}
        if t is not None:
            figures["hard_negative_sim"] = torch.einsum("bd,bmd->bm", l2norm(z2), l2norm(t)).mean().detach()
        return loss, figures


class BYOL(nn.Module):
    """BYOL: online encoder + projector + predictor regress a momentum target's projection.

    Symmetric loss. The query (masked) view goes to the online network against the target's
    key; in the swapped term the online network sees the key and the target the query.
    BYOL has no negatives, so hard negatives are an error. The projectors' and the
    predictor's BatchNorm normalise over the global batch, as SimCLR's head does.

    `momentum` is the target's momentum for the next step. BYOL raises it from its base
    value to 1 by a cosine over training: train.py sets it each step with `cosine_momentum`.
    """

    def __init__(self, encoder, *, dim=256, hidden_dim=4096, momentum=0.99):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(encoder.out_dim, hidden_dim, dim, batch_norm=True)
        self.predictor = mlp(dim, hidden_dim, dim, batch_norm=True)
        self.target_encoder, self.target_projector = frozen_copy(encoder), frozen_copy(self.projector)
        self.momentum = momentum

    @property
    def backbone(self):
        return self.encoder

    @property
    def saliency_encoder(self):
        return self.target_encoder

    def forward(self, query, key, hard_negatives=None):
        if hard_negatives is not None:
            raise ValueError("BYOL has no negatives, so it cannot use hard negatives: "
                             "use --num-hard-negatives 0 with --framework byol")
        views = torch.cat([query, key])
        everyone = lambda f, grad=False: torch.cat([gather_batch(x, grad=grad) for x in f.chunk(2)])  # [2B, C]
        p1, p2 = self.predictor(self.projector(everyone(self.encoder(views), grad=True))).chunk(2)
        with torch.no_grad():
            momentum_update(self.target_encoder, self.encoder, self.momentum)
            momentum_update(self.target_projector, self.projector, self.momentum)
            z1, z2 = self.target_projector(everyone(self.target_encoder(views))).chunk(2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return loss, {"positive_sim": (l2norm(p1) * l2norm(z2)).sum(1).mean().detach()}


FRAMEWORKS = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL}


def build_model(args):
    """The framework that train.py's flags describe (`args` as train.parse_args makes it)."""
    # --bn-splits counts the sub-batches of the global batch: each of W processes takes bn_splits / W
    encoder = ResNetEncoder(args.arch, cifar_stem=args.stem == "cifar", bn_splits=args.bn_splits // process_group()[1])
    pairing = getattr(args, "hard_negative_pairing", "own")            # checkpoints from before the flag
    if args.framework == "moco":
        return MoCo(encoder, queue_size=args.queue_size, momentum=args.moco_momentum,
                    temperature=args.temperature, alpha=args.alpha, hard_negative_pairing=pairing)
    if args.framework == "simclr":
        return SimCLR(encoder, temperature=args.temperature, alpha=args.alpha)
    return BYOL(encoder, momentum=args.moco_momentum)
