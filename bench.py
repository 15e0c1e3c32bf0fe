"""Speed benchmarks. Figures in the README come from here.

    python bench.py --part masking                     # 256 views of 3x224x224, CPU
    python bench.py --part masking --device cuda

`masking`: the batched masks and fills of masking.py against a straightforward per-image
loop (a randperm per image, patches filled one at a time), both on the same inputs in the
same process, one after the other, so the ratios hold on a noisy machine. Medians of
`--repeats` runs.
"""
import argparse
import math
import statistics
import time

import torch

import masking


def median_seconds(fn, repeats, device):
    """Median wall time of `fn()` over `repeats` runs, after one warm-up."""
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
    print(f"  speed-up, masks:             {t['masks, per-image loop'] / t['masks, batched']:6.1f}x")
    print(f"  speed-up, masks + noise fill: {t['masks + hp noise fill, per-image loop'] / t['masks + hp noise fill, batched']:6.1f}x")


def describe(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["masking"], default="masking", help="what to time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible; use --device cpu")
    bench_masking(args, device)


if __name__ == "__main__":
    main()
