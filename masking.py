"""Saliency-balanced masking and masked hard negatives (SPEC.md section 3).

A view is cut into a `grid x grid` patch grid (patch `i = row * grid + col`). Masks are
bool tensors `[..., N]`, True = masked; `fg` is the same shape, True = foreground.

- positive (query) view, r ~ U(0.05, 0.25): `balanced_mask` masks `round(r |FG|)` foreground
  and `floor(r N) - round(r |FG|)` background patches, so both lose the same fraction;
- hard negative, from the key view, r ~ U(0.4, 0.7): `hard_negative_mask` masks
  `round(r |FG|)` foreground patches and no background: the image without its object;
- ablation baseline: `random_mask`, `floor(r N)` patches anywhere.

`Masker` fills the masked patches with one of the paper's strategies (`hp`, `blur`, `mean`):

    >>> import torch, saliency, masking
    >>> views = torch.randn(8, 3, 64, 64)
    >>> fg = saliency.Saliency("spectral", grid=7)(views)
    >>> masker = masking.Masker("hp", grid=7)
    >>> query, query_mask = masker(views, fg, mode="positive")
    >>> negative, negative_mask = masker(views, fg, mode="negative")
    >>> key = masker.filter(views)                   # hp: the key is high-passed too, unmasked

Every image of a batch is handled in one tensor program: no Python loop over images.
Depends on torch and saliency.py (for the separable Gaussian blur).
"""
import math
import os

import torch

from saliency import gaussian_blur

# Release values, for 224 px views (SPEC.md section 3). Kernels and crops scale with the view.
POSITIVE_RATIO = (0.05, 0.25)
NEGATIVE_RATIO = (0.4, 0.7)
HP_KERNEL, HP_SIGMA = 11, 5.0                 # high-pass: x - blur(x)
BLUR_KERNEL, BLUR_SIGMA = 31, 10.0            # `blur` fill
NOISE_STD = {"positive": 0.18, "negative": 0.14}
FOCAL_PROB, SPATIAL_PROB = 0.2, 0.3           # per image, hp only; the rest is channel-wise
FOCAL_SIDE = {"positive": 200 / 224, "negative": 130 / 224}
HP_MAX_FG_FRACTION = 0.55                     # hp release: r * fg_ratio <= 0.55
STRATEGIES = ("hp", "blur", "mean")


# ----------------------------------------------------------------------------- randomness

def _rand(shape, generator, device):
    """Uniform [0, 1) on `device`, drawn from `generator` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randn(shape, generator, device, dtype):
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_ratios(batch, low, high, generator=None, *, device=None):
    """Mask ratios `r ~ U(low, high)`, one per image: float `[batch]`."""
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"mask ratio range ({low}, {high}) must satisfy 0 <= low <= high <= 1")
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return low + (high - low) * _rand(batch, generator, device)


# ----------------------------------------------------------------------------- patch masks

def _as_ratio(ratio, shape, device):
    """A ratio (float or tensor) as float64 of `shape`: counts are computed in double so that
    floor/round agree with the same arithmetic done in Python."""
    return torch.as_tensor(ratio, device=device).to(torch.float64).expand(shape)


def _draw(fg, n_fg, n_bg, generator):
    """Mask `n_fg` foreground and `n_bg` background patches, uniformly at random, per row.

    One random key per patch; background keys are shifted by 1, so sorting ranks all
    foreground patches first. A foreground patch is masked when its rank is below `n_fg`,
    a background patch when its rank among the background is below `n_bg`.
    """
    keys = _rand(fg.shape, generator, fg.device) + (~fg)
    rank = keys.argsort(-1).argsort(-1)                              # [..., N]
    num_fg = fg.sum(-1, keepdim=True)
    return torch.where(fg, rank < n_fg.unsqueeze(-1), rank - num_fg < n_bg.unsqueeze(-1))


def balanced_mask(fg, ratio, generator=None, *, max_fg_fraction=None):
    """Saliency-balanced mask for a positive view: bool `[..., N]` from `fg: bool [..., N]`.

    `ratio`: float or tensor `[...]`. Masks `n_fg = round(r |FG|)` foreground patches and
    `n_bg = floor(r N) - n_fg` background patches, clamped to `[0, |BG|]`.
    `max_fg_fraction` caps `n_fg / N` (the hp release caps it at 0.55).
    """
    N = fg.shape[-1]
    r = _as_ratio(ratio, fg.shape[:-1], fg.device)
    num_fg = fg.sum(-1)
    n_fg = torch.round(r * num_fg)
    if max_fg_fraction is not None:
        n_fg = torch.minimum(n_fg, torch.round(torch.full_like(r, max_fg_fraction * N)))
    n_bg = (torch.floor(r * N) - n_fg).clamp(min=0).minimum(N - num_fg)
    return _draw(fg, n_fg, n_bg, generator)


def hard_negative_mask(fg, ratio, generator=None, *, max_fg_fraction=None):
    """Hard-negative mask: `round(r |FG|)` foreground patches, no background. bool `[..., N]`."""
    r = _as_ratio(ratio, fg.shape[:-1], fg.device)
    n_fg = torch.round(r * fg.sum(-1))
    if max_fg_fraction is not None:
        n_fg = torch.minimum(n_fg, torch.round(torch.full_like(r, max_fg_fraction * fg.shape[-1])))
    return _draw(fg, n_fg, torch.zeros_like(n_fg), generator)


def random_mask(batch, num_patches, ratio, generator=None):
    """Uniform random mask (the ablation baseline): `floor(r N)` of N patches. bool `[batch, N]`.

    The device is the ratio's when it is a tensor, else the generator's, else the CPU.
    """
    device = ratio.device if torch.is_tensor(ratio) else (generator.device if generator else "cpu")
    everything = torch.ones(batch, num_patches, dtype=torch.bool, device=device)
    n = torch.floor(_as_ratio(ratio, (batch,), device) * num_patches)
    return _draw(everything, n, torch.zeros_like(n), generator)


def patch_to_pixel_mask(mask, grid, height, width):
    """Patch mask `[..., grid*grid]` to pixel mask `[..., height, width]`.

    Pixel row `y` lies in patch row `floor(y * grid / height)`, so any size works; for sizes
    that are multiples of `grid` every patch is `height/grid x width/grid` pixels.
    """
    rows = torch.arange(height, device=mask.device) * grid // height     # one gather: no host sync
    cols = torch.arange(width, device=mask.device) * grid // width
    return mask.unflatten(-1, (grid, grid))[..., rows[:, None], cols]


def fill_noise_(images, patch_mask, grid, std, generator=None):
    """In place: each pixel of each masked patch becomes N(0, std^2) noise.

    `images: [B, C, H, W]`, `patch_mask: bool [B, 1 or C, grid*grid]` (1: all channels).
    Noise is drawn for the masked pixels only. When H and W are multiples of `grid` (224 px
    and grid 7, as in the paper) the image is viewed as `[B, C, g, g, H/g, W/g]` patches and
    whole patches are written, with no pixel mask; 4x faster than a pixel mask on a CPU.
    """
    B, C, H, W = images.shape
    if H % grid == 0 and W % grid == 0 and images.is_contiguous():
        patches = images.view(B, C, grid, H // grid, grid, W // grid).permute(0, 2, 4, 1, 3, 5)
        b, c, p = patch_mask.nonzero(as_tuple=True)                   # patches: [B, g, g, C, h, w]
        index = (b, p // grid, p % grid) + ((c,) if patch_mask.shape[1] > 1 else ())
        noise = _randn((len(b),) + patches.shape[len(index):], generator, images.device, images.dtype)
        patches[index] = noise * std                                  # a spatial mask: all C at once
        return images
    return fill_noise_pixels_(images, patch_to_pixel_mask(patch_mask, grid, H, W), std, generator)


def fill_noise_pixels_(images, pixel_mask, std, generator=None):
    """In place: masked pixels become N(0, std^2) noise; `pixel_mask` broadcasts to `images`."""
    broadcast = math.prod(i for i, m in zip(images.shape, pixel_mask.shape) if m == 1)
    count = int(pixel_mask.sum()) * broadcast
    noise = _randn(count, generator, images.device, images.dtype) * std
    return images.masked_scatter_(pixel_mask.expand_as(images), noise)


def high_pass(images, kernel_size, sigma):
    """High-pass filter `x - gaussian_blur(x)` of `[B, C, H, W]` (hp strategy, SPEC.md section 3)."""
    return images - gaussian_blur(images, kernel_size, sigma)


def scaled_kernel(kernel_224, sigma_224, size):
    """The release's 224 px blur kernel scaled to a view of `size` px (its shorter side).

    Rule: sigma scales linearly with the size; the kernel too, rounded to the nearest odd
    integer, at least 3. So 224 px keeps (11, 5.0) and (31, 10.0); 32 px gives (3, 0.71)
    and (5, 1.43); 96 px gives (5, 2.14) and (13, 4.29).
    """
    k = max(3, round(kernel_224 * size / 224))
    return k + 1 - k % 2, sigma_224 * size / 224


def focal_mask(batch, height, width, side_fraction, generator=None, *, device="cpu"):
    """A random axis-aligned square per image, `side_fraction` of the shorter side: bool `[B, 1, H, W]`."""
    side = max(1, round(side_fraction * min(height, width)))
    top = (_rand(batch, generator, device) * (height - side + 1)).long()
    left = (_rand(batch, generator, device) * (width - side + 1)).long()
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    inside_y = (ys >= top[:, None]) & (ys < top[:, None] + side)         # [B, H]
    inside_x = (xs >= left[:, None]) & (xs < left[:, None] + side)       # [B, W]
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


# ----------------------------------------------------------------------------- the masker

class Masker:
    """Masks a batch of views and fills the masked patches, as train.py calls it:

        query, query_mask = masker(views, fg, mode="positive")     # fg None: uniform random mask
        negative, negative_mask = masker(key_views, key_fg, mode="negative")
        key = masker.filter(key_views)

    Returns the masked views `[B, C, H, W]` and the pixel mask `bool [B, 1 or C, H, W]`
    (C where the hp strategy drew a channel-wise mask). Strategies (SPEC.md section 3):

    - `hp`: the view is high-pass filtered, masked pixels get Gaussian noise (std 0.18 in the
      query, 0.14 in the hard negative). Per image: with p 0.2 a focal mask (query: noise
      outside a random square of 200/224 of the side; hard negative: noise inside one of
      130/224); otherwise the grid mask, the same patches in all channels with p 0.3, each
      channel its own patches with p 0.7. The release's 0.55 cap on `r * fg_ratio` applies.
      The noise is drawn independently for every masked pixel of every image. The release
      draws one noise patch per batch (3 x 32 x 32 for spatial masks, one per channel for
      channel-wise ones, one square for the hard negative's focal mask) and pastes that same
      patch into every masked patch of every image; only its positive focal noise is fresh
      per image. A fixed pattern is something an encoder can learn to recognise as "masked",
      and per-pixel noise is what the paper's text describes; so the project draws it fresh.
    - `blur`: a masked patch is taken from a Gaussian-blurred copy of the view.
    - `mean`: a masked patch is set to the image's per-channel mean.

    `high_pass`: whether `filter` high-passes views (None: for `hp` only, as in the paper).
    On with another fill, or used alone by a caller that does not mask, it separates what the
    filter does from what masking does.

    `dense_noise`: draw the hp noise for every pixel and select it with the mask (no host
    synchronisation), instead of for the masked pixels only. None: dense on GPUs, sparse on
    CPUs, where a dense draw costs more than it saves.
    """

    def __init__(self, strategy="hp", grid=7, *, positive_ratio=POSITIVE_RATIO,
                 negative_ratio=NEGATIVE_RATIO, high_pass=None, dense_noise=None):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown masking strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.strategy, self.grid = strategy, grid
        self.high_pass = strategy == "hp" if high_pass is None else high_pass
        self.dense_noise = dense_noise            # hp noise drawn for every pixel; None: on GPUs
        self.ratios = {"positive": positive_ratio, "negative": negative_ratio}
        for low, high in self.ratios.values():
            sample_ratios(0, low, high)                               # validates the range

    def filter(self, views):
        """What every view the encoders see goes through: the high-pass filter when
        `high_pass` (by default for `hp`), else nothing."""
        if not self.high_pass:
            return views
        return high_pass(views, *scaled_kernel(HP_KERNEL, HP_SIGMA, min(views.shape[-2:])))

    def patch_masks(self, fg, ratio, mode, channels, generator=None):
        """Grid masks `bool [B, c, N]`: c = channels for hp (channel-wise per image), else 1."""
        B, N = ratio.shape[0], self.grid ** 2
        c = channels if self.strategy == "hp" else 1
        ratio = ratio[:, None].expand(B, c)
        cap = HP_MAX_FG_FRACTION if self.strategy == "hp" else None
        if fg is None:
            masks = random_mask(B * c, N, ratio.reshape(-1), generator).view(B, c, N)
        else:
            fg = fg[:, None, :].expand(B, c, N)
            draw = balanced_mask if mode == "positive" else hard_negative_mask
            masks = draw(fg, ratio, generator, max_fg_fraction=cap)
        if self.strategy == "hp":                                     # spatial: channel 0 for all
            spatial = _rand(B, generator, masks.device) < SPATIAL_PROB
            masks = torch.where(spatial[:, None, None], masks[:, :1], masks)
        return masks

    def __call__(self, views, fg=None, mode="positive", generator=None, *, filtered=False):
        """`filtered`: the views already went through `self.filter` (saves a high-pass when
        the caller also needs the filtered views, as train.py does for the key)."""
        if mode not in self.ratios:
            raise ValueError(f"mode must be 'positive' or 'negative', got {mode!r}")
        if mode == "negative" and fg is None:
            raise ValueError("a hard negative masks salient patches: it needs fg (saliency)")
        B, C, H, W = views.shape
        ratio = sample_ratios(B, *self.ratios[mode], generator, device=views.device)
        patch_masks = self.patch_masks(fg, ratio, mode, C, generator)          # [B, c, N]
        fresh = not filtered and self.high_pass                       # the filter makes a new tensor
        views = views if filtered else self.filter(views)

        if self.strategy == "hp":
            focal = _rand(B, generator, views.device) < FOCAL_PROB
            square = focal_mask(B, H, W, FOCAL_SIDE[mode], generator, device=views.device)
            focal_pixels = ~square if mode == "positive" else square    # the query keeps its square
            pixel_mask = torch.where(focal[:, None, None, None], focal_pixels,
                                     patch_to_pixel_mask(patch_masks, self.grid, H, W))
            std = NOISE_STD[mode]
            dense = self.dense_noise if self.dense_noise is not None else views.device.type != "cpu"
            if dense:                           # one dense draw: no host sync, the GPU keeps busy
                noise = _randn(views.shape, generator, views.device, views.dtype) * std
                return torch.where(pixel_mask, noise, views), pixel_mask
            # CPU: draw noise for the masked pixels only (a dense draw costs more than the filter)
            out = fill_noise_(views if fresh else views.clone(),
                              patch_masks & ~focal[:, None, None], self.grid, std, generator)
            index = focal.nonzero()[:, 0]                             # focal images: a pixel mask
            out[index] = fill_noise_pixels_(out[index], focal_pixels[index], std, generator)
            return out, pixel_mask
        pixel_mask = patch_to_pixel_mask(patch_masks, self.grid, H, W)
        if self.strategy == "blur":
            filled = gaussian_blur(views, *scaled_kernel(BLUR_KERNEL, BLUR_SIGMA, min(H, W)))
        else:                                                         # mean
            filled = views.mean((2, 3), keepdim=True)
        return torch.where(pixel_mask, filled, views), pixel_mask


# ----------------------------------------------------------------------------- the picture

def save_view_grid(path, figures, query, key, negatives, grid, *, count=6, cell=96):
    """A labelled PNG, one image per row: the augmented view, its foreground patches (green),
    its query mask (red), the query and the key as the encoders see them, the first hard
    negative (the columns that the run has). Views are scaled to `cell` px (nearest, so 32 px
    patches stay sharp); filtered (hp) images are stretched to [0, 1] per image. Written atomically."""
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
        fg = patch_to_pixel_mask(figures["fg"][:count, None].cpu(), grid, H, W)
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
    sheet.save(path + ".tmp", format="PNG")                          # atomic: a full disk leaves no half picture
    os.replace(path + ".tmp", path)
