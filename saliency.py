"""Saliency of each view: which patches of a g x g grid hold the object.

SPEC.md section 2. A saliency map `[B, h, w]` is average-pooled to `g x g` patch scores,
and a patch is foreground when its score is at least `mean - 0.6 * std` of its image's
scores (the factor is train.py's `--fg-std-factor`). Four sources of saliency, chosen with
`--saliency` in train.py:

    pretrained  SCDA on a frozen supervised ResNet: ImageNet's ResNet-50 (the paper), or any
                torchvision ResNet state_dict (--saliency-weights)
    self        SCDA on the model's own momentum / target encoder (no external weights)
    spectral    spectral-residual saliency (Hou & Zhang, CVPR 2007), training-free
    gt          the true object masks of the synthetic `shapes` data (an oracle)

    >>> import torch, saliency
    >>> sal = saliency.Saliency("spectral", grid=7)
    >>> fg = sal(torch.randn(8, 3, 64, 64))          # bool [8, 49], True = foreground

Depends on torch and torchvision only.
"""
import math
import os

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- pure functions

def scda_saliency(feature_map):
    """SCDA saliency: channel sum of a non-negative feature map. `[B, C, h, w] -> [B, h, w]`.

    Only SCDA's first step (Wei et al., 2017), as the paper's released code takes it: SCDA
    itself thresholds the map at its mean and keeps the largest connected component; the
    release and this project pool the map to patches and keep those at or above
    mean - 0.6 std (`foreground_patches`, its factor `--fg-std-factor`), with no component step."""
    return feature_map.clamp_min(0).sum(1)


def spectral_residual_saliency(images, *, work_size=64):
    """Spectral-residual saliency (Hou & Zhang 2007), batched. `[B, 3, H, W] -> [B, H, W]`.

    On a grayscale copy downsized so its longer side is at most `work_size` (64 px, as in the
    original paper): `L = log|FFT(I)|`, `R = L - mean3x3(L)`,
    `S = blur(|IFFT(exp(R + i * phase))|^2)`, then resized back to `H x W`.
    Works for any H, W >= 8 and any normalisation of the input (the map is scale-free).
    """
    B, _, H, W = images.shape
    if min(H, W) < 8:
        raise ValueError(f"spectral saliency needs views of at least 8x8 pixels, got {H}x{W}")
    gray = images.float().mean(1, keepdim=True)                      # [B,1,H,W]
    scale = min(1.0, work_size / max(H, W))
    h, w = max(8, round(H * scale)), max(8, round(W * scale))
    if (h, w) != (H, W):
        gray = F.interpolate(gray, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    spectrum = torch.fft.fft2(gray)
    amplitude = spectrum.abs()
    # A floor relative to the spectrum: synthetic images (a flat box) have exact spectral
    # zeros, whose log would dominate the residual; natural images are unaffected.
    log_amplitude = torch.log(amplitude + 1e-3 * amplitude.mean((-2, -1), keepdim=True))
    phase = torch.angle(spectrum)
    # The spectrum is periodic, so the 3x3 local mean wraps around its borders.
    local_mean = F.avg_pool2d(F.pad(log_amplitude, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    residual = log_amplitude - local_mean
    saliency = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
    sigma = 0.05 * max(h, w)                                         # 3.2 px at 64 px
    saliency = gaussian_blur(saliency, 2 * math.ceil(3 * sigma) + 1, sigma)
    if (h, w) != (H, W):
        saliency = F.interpolate(saliency, size=(H, W), mode="bilinear", align_corners=False)
    return saliency[:, 0]


def patch_scores(saliency, grid):
    """Average a saliency map over a `grid x grid` patch grid. `[B, h, w] -> [B, grid*grid]`.

    Patch `i = row * grid + col` holds pixel row `y` when `row = floor(y * grid / h)`: the
    same patches as `masking.patch_to_pixel_mask`, for any `h, w` (multiples of `grid` or not).
    A map coarser than the grid (a 4x4 feature map, grid 7) is first upsampled bilinearly.
    """
    saliency = saliency.float()
    h, w = saliency.shape[-2:]
    if h < grid or w < grid:
        size = (max(h, grid), max(w, grid))
        saliency = F.interpolate(saliency[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        h, w = size

    rows, cols = cached(averaging_matrix, h, grid, saliency.device), cached(averaging_matrix, w, grid, saliency.device)
    return (rows @ saliency @ cols.T).flatten(1)


def averaging_matrix(n, grid, device=None):
    """`[grid, n]`: row i averages the pixels of patch row i (rows sum to 1)."""
    member = F.one_hot(torch.arange(n, device=device) * grid // n, grid).T.float()
    return member / member.sum(1, keepdim=True)


def foreground_patches(scores, std_factor=0.6):
    """Foreground rule of SPEC.md section 2: `s_i >= mean(s) - std_factor * std(s)` per image.

    `scores: [B, N] -> bool [B, N]`, population std. The rule is applied to the scores in
    their own patch order; the released code thresholds a row-sorted copy, which marks the
    wrong patches (see the README).

    A row with no spread (std at most 1e-6 of its largest magnitude: a constant map, or one
    that float rounding alone makes uneven, as when a 1x1 map is upsampled to the grid) has
    no patch that stands out. In exact arithmetic every score equals the mean, so the rule
    keeps all of them: such a row is all foreground, deterministically, and balanced masking
    of it is uniform random masking.
    """
    mean = scores.mean(1, keepdim=True)
    std = scores.std(1, keepdim=True, unbiased=False)
    no_spread = std <= 1e-6 * scores.abs().amax(1, keepdim=True)
    return (scores >= mean - std_factor * std) | no_spread


def mask_patch_coverage(masks, grid):
    """Fraction of each patch covered by a binary object mask. `[B, H, W] -> [B, grid*grid]`."""
    if masks.dim() == 4:                                             # [B, 1, H, W]
        masks = masks[:, 0]
    return patch_scores(masks.float(), grid)


def gt_foreground_patches(masks, grid):
    """Oracle foreground from true object masks: bool `[B, grid*grid]`.

    A patch is foreground when the object covers at least half of it; a small object that
    covers no patch by half still gets its best-covered patch. No object, no foreground.
    (The mean - 0.6 std rule suits dense saliency maps, not 0/1 coverage: on a small
    object it would call every empty patch foreground.)
    """
    coverage = mask_patch_coverage(masks, grid)
    threshold = coverage.amax(1, keepdim=True).clamp(max=0.5)
    return (coverage >= threshold) & (coverage > 0)


def blur_matrix(size, kernel_size, sigma, *, device=None, dtype=torch.float32):
    """`[size, size]` matrix `M` with `M @ v` = 1-D Gaussian blur of `v`, reflect borders.

    Reflect padding (mirror without repeating the edge, as `F.pad(mode="reflect")`) folds
    into the band of the matrix, for any kernel size.
    """
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, device=device)
    weights = torch.exp(-0.5 * (offsets.to(dtype) / sigma) ** 2)
    weights = weights / weights.sum()
    source = torch.arange(size, device=device)[:, None] + offsets          # [size, k]
    if size > 1:
        period = 2 * (size - 1)
        source = source.remainder(period)
        source = torch.where(source >= size, period - source, source)
    else:
        source = torch.zeros_like(source)
    matrix = torch.zeros(size, size, device=device, dtype=dtype)
    rows = torch.arange(size, device=device)[:, None].expand_as(source)
    return matrix.index_put_((rows, source), weights.expand_as(source), accumulate=True)


def gaussian_blur(images, kernel_size, sigma):
    """Gaussian blur of `[..., H, W]` with reflect borders, as torchvision's `gaussian_blur`.

    torchvision's is a dense k x k depthwise convolution, slow on a CPU (256 x 3 x 224 x 224
    at k = 11: 1.0 s on 2 cores) and growing with k^2; a 1-D blur is a banded matrix, so the
    blur is two matrix products whose cost does not depend on k (0.28 s) and which agree with
    torchvision's to 1e-6.
    """
    H, W = images.shape[-2:]
    rows = cached(blur_matrix, H, kernel_size, sigma, device=images.device, dtype=images.dtype)
    cols = rows if W == H else cached(blur_matrix, W, kernel_size, sigma, device=images.device, dtype=images.dtype)
    return rows @ (images @ cols.T)


_CACHE = {}


def cached(build, *args, **kwargs):
    """`build(*args, **kwargs)`, kept for the next call with the same arguments. A step blurs and
    averages views of the same few sizes, and building a matrix is a dozen small kernels: on a
    GPU at 32 px, launching them costs more than using it. Callers never write to the result.
    Inside torch.compile the graph builds (and folds) it itself."""
    if torch.compiler.is_compiling():
        return build(*args, **kwargs)
    key = (build, args, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        if len(_CACHE) >= 64:                                         # many sizes: start afresh
            _CACHE.clear()
        _CACHE[key] = build(*args, **kwargs)
    return _CACHE[key]


# ----------------------------------------------------------------------------- the four sources

SOURCES = ("pretrained", "self", "spectral", "gt")

OFFLINE_HINT = ("download the torchvision ResNet-50 ImageNet weights on a machine with "
                "internet and pass --saliency-weights PATH, or use an offline source: "
                "--saliency self | spectral | gt")

# (bottleneck blocks, blocks per stage) -> torchvision architecture
RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
           (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}


def read_state_dict(weights_path):
    """A local state_dict, unwrapped (`{"state_dict": ...}`, `module.` prefixes), or one
    RuntimeError that says what to do."""
    if not os.path.isfile(weights_path):
        raise RuntimeError(f"--saliency-weights {weights_path}: no such file; {OFFLINE_HINT}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"--saliency-weights {weights_path}: not a readable torch state_dict "
                           f"({type(error).__name__}); save one with "
                           f"torch.save(resnet50(...).state_dict(), PATH)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"--saliency-weights {weights_path}: not a state_dict (a {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resnet_of(state):
    """`(arch, cifar_stem)` of a torchvision-layout ResNet state_dict, read off its keys
    (bottleneck blocks have `conv3`; blocks per stage) and its first convolution (3x3: the
    CIFAR stem of models.py, 7x7: ImageNet's); None for anything else."""
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{t}.")}) for t in (1, 2, 3, 4))
    arch = RESNETS.get(("layer1.0.conv3.weight" in state, blocks))
    conv1 = state.get("conv1.weight")
    if arch is None or not isinstance(conv1, torch.Tensor) or conv1.dim() != 4:
        return None
    return arch, conv1.shape[-1] == 3


def load_trunk(weights_path=None):
    """A frozen torchvision ResNet without avgpool and fc, in eval mode, and whether it has
    the CIFAR stem: `(trunk, cifar_stem)`.

    `weights_path`: a local torchvision-layout state_dict of any torchvision ResNet (18 to
    152), with the ImageNet stem or the CIFAR one (`evaluate.py --supervised --save-weights`
    writes either); the architecture and stem are read off the file. A `{"state_dict": ...}`
    wrapper, `module.` prefixes and missing `num_batches_tracked` buffers are accepted. None:
    torchvision's `ResNet50_Weights.IMAGENET1K_V2` (the paper's network), from the torch hub
    cache or downloaded. Any failure raises one `RuntimeError` that says what to do.
    """
    import torchvision

    if weights_path is None:
        try:
            state = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        except Exception as error:                                    # no network, bad cache, ...
            raise RuntimeError(f"--saliency pretrained: could not get the ImageNet ResNet-50 "
                               f"weights ({type(error).__name__}: {error}); {OFFLINE_HINT}") from None
    else:
        state = read_state_dict(weights_path)
    found = resnet_of(state)
    if found is None:
        raise RuntimeError(f"--saliency-weights {weights_path}: not a torchvision ResNet state_dict (no conv1 and "
                           f"layer1-4 of ResNet-18, 34, 50, 101 or 152)")
    arch, cifar_stem = found
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:                                                    # as models.ResNetEncoder builds it
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    # `num_batches_tracked` is a counter, not a weight: older torchvision files and most
    # converted checkpoints lack it, and load_state_dict accepts them without it.
    trunk_keys = {k for k in net.state_dict() if not k.startswith("fc.")}
    missing = sorted(k for k in trunk_keys - set(state) if not k.endswith("num_batches_tracked"))
    if missing:
        raise RuntimeError(f"--saliency-weights {weights_path}: not a whole torchvision {arch} state_dict "
                           f"({len(missing)} trunk weights missing, e.g. {missing[0]})")
    try:
        net.load_state_dict({k: state[k] for k in trunk_keys if k in state}, strict=False)
    except RuntimeError as error:                                     # shape mismatch
        raise RuntimeError(f"--saliency-weights {weights_path}: weights do not fit a {arch} "
                           f"({str(error).splitlines()[-1].strip()})") from None
    trunk = nn.Sequential(*list(net.children())[:-2])                 # drop avgpool and fc
    if not all(torch.isfinite(t).all() for t in trunk.state_dict().values() if t.is_floating_point()):
        raise RuntimeError(f"--saliency-weights {weights_path}: holds NaN or inf values, whose saliency would mark "
                           f"no foreground at all: use weights from a run that did not diverge")
    return trunk.eval().requires_grad_(False), cifar_stem


class Saliency(nn.Module):
    """Maps a batch of views to foreground patches, `[B, 3, H, W] -> bool [B, grid*grid]`.

    `source`: one of `SOURCES`. `weights`: local state_dict for `pretrained`, any torchvision
    ResNet with either stem (None: torchvision's ImageNet ResNet-50). `input_size`: views
    smaller than this are resized up (shorter side) before the pretrained network; default
    224 for an ImageNet-stem network (trained at 224 px, as the paper's), none for a CIFAR-stem
    one (trained at the views' own size). Views are expected normalised with the ImageNet
    mean and std, as data.py does.

    Call as `sal(views)`, `sal(views, encoder=model.saliency_encoder)` for `self` (any module
    with a `feature_map(x)` method), `sal(views, masks=masks)` for `gt` (`[B, H, W]` object masks).
    """

    def __init__(self, source, grid=7, *, weights=None, input_size=None, std_factor=0.6):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown saliency source {source!r}; choose one of {', '.join(SOURCES)}")
        self.source, self.grid, self.input_size, self.std_factor = source, grid, input_size, std_factor
        self.trunk = None
        if source == "pretrained":
            self.trunk, cifar_stem = load_trunk(weights)
            if input_size is None:
                self.input_size = 0 if cifar_stem else 224

    def train(self, mode=True):                                       # the trunk stays frozen in eval
        super().train(mode)
        if self.trunk is not None:
            self.trunk.eval()
        return self

    @torch.no_grad()
    def saliency_map(self, views, *, encoder=None):
        """The dense map `[B, h, w]` of the source (not for `gt`)."""
        if self.source == "pretrained":
            short = min(views.shape[-2:])
            if short < self.input_size:
                size = [round(s * self.input_size / short) for s in views.shape[-2:]]
                views = F.interpolate(views, size=size, mode="bilinear", align_corners=False)
            return scda_saliency(self.trunk(views))
        if self.source == "self":
            if encoder is None:
                raise ValueError("--saliency self needs the model's encoder: call sal(views, encoder=...)")
            return scda_saliency(encoder.feature_map(views))
        if self.source == "spectral":
            return spectral_residual_saliency(views)
        raise ValueError("--saliency gt has no dense map; it reads the true masks")

    @torch.no_grad()
    def forward(self, views, *, encoder=None, masks=None):
        if self.source == "gt":
            if masks is None:
                raise ValueError("--saliency gt needs the true object masks (the shapes dataset)")
            return gt_foreground_patches(masks, self.grid)
        return self.from_map(self.saliency_map(views, encoder=encoder))

    @torch.no_grad()
    def from_map(self, saliency_map):
        """Foreground patches of a dense map `[B, h, w]`: patch scores, then the mean - 0.6 std
        rule. `sal.from_map(scda_saliency(feature_map))` reuses a forward pass the caller
        already made (train.py: the key encoder's, for `--saliency self`). A map smaller than
        2x2 (a ResNet's last map of a 32 px view with the ImageNet stem is 1x1) is refused:
        upsampled to the grid it is constant, and only float rounding would pick foreground."""
        h, w = saliency_map.shape[-2:]
        if min(h, w) < 2:
            raise ValueError(f"a {h}x{w} saliency map has no spatial extent, so it cannot say which patches "
                             f"hold the object; for --saliency self use --stem cifar or a larger --image-size")
        return foreground_patches(patch_scores(saliency_map, self.grid), self.std_factor)
