"""Tests, grouped by component in the order of the files. Run: `python -m pytest -q test_all.py`.

Each test asserts a property a reader of the paper cares about; the whole file runs on a
2-core CPU in well under three minutes.
"""
import math
import urllib.error

import numpy as np
import pytest
import torch
from torch import nn

import masking
import saliency

torch.set_num_threads(min(2, torch.get_num_threads()))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_fg(batch, n, generator):
    """Foreground layouts of every density, with all-FG and no-FG rows included."""
    density = torch.rand(batch, 1, generator=generator)
    density[0], density[1] = 1.0, 0.0
    return torch.rand(batch, n, generator=generator) < density


# ============================================================================ saliency.py

def test_scda_saliency_sums_the_non_negative_channels():
    fmap = torch.randn(2, 5, 3, 4)
    expected = np.maximum(fmap.numpy(), 0).sum(1)
    assert saliency.scda_saliency(fmap).shape == (2, 3, 4)
    np.testing.assert_allclose(saliency.scda_saliency(fmap).numpy(), expected, rtol=1e-6)


def test_foreground_rule_matches_mean_minus_0_6_std_per_image():
    scores = torch.randn(50, 49, dtype=torch.float64) * torch.rand(50, 1, dtype=torch.float64) * 3
    s = scores.numpy()
    expected = s >= s.mean(1, keepdims=True) - 0.6 * s.std(1, keepdims=True)     # population std
    assert np.array_equal(saliency.foreground_patches(scores).numpy(), expected)


def test_foreground_thresholds_the_unsorted_map():
    # A salient blob in the top-left corner of a 7x7 map must be foreground *there*.
    # Thresholding a row-sorted copy (the released code) would move it to the right columns.
    # (The blob covers 16 of 49 patches: below ~26% the rule, mean - 0.6 std < 0, keeps all.)
    smap = torch.zeros(1, 7, 7)
    smap[0, :4, :4] = 10.0
    fg = saliency.foreground_patches(saliency.patch_scores(smap, 7)).view(7, 7)
    assert fg[:4, :4].all()
    assert not fg[:, 4:].any() and not fg[4:].any()


def test_patch_scores_average_the_same_patches_as_the_pixel_masks():
    g = torch.Generator().manual_seed(0)
    for grid, (H, W) in [(5, (36, 52)), (7, (224, 224)), (7, (32, 32)), (3, (8, 13))]:
        mask = torch.rand(4, grid * grid, generator=g) < 0.5
        pixels = masking.patch_to_pixel_mask(mask, grid, H, W)
        assert torch.allclose(saliency.patch_scores(pixels.float(), grid), mask.float(), atol=1e-6)
    coarse = torch.zeros(1, 4, 4)
    coarse[0, 0, 0] = 1.0                                             # a 4x4 map, grid 7: upsampled
    scores = saliency.patch_scores(coarse, 7)
    assert scores.shape == (1, 49) and scores.argmax() == 0


@pytest.mark.parametrize("size", [(64, 64), (36, 52), (8, 8)])
def test_spectral_saliency_finds_a_bright_square_on_a_flat_background(size):
    H, W = size
    images = torch.full((2, 3, H, W), 0.2)
    y, x = H // 8, W // 8
    side_h, side_w = max(2, H // 5), max(2, W // 5)
    images[:, :, y:y + side_h, x:x + side_w] = 1.0
    smap = saliency.spectral_residual_saliency(images)
    assert smap.shape == (2, H, W)
    peak = smap[0].flatten().argmax()
    py, px = divmod(int(peak), W)
    # The peak lies on the square (or on its border, where the residual is highest).
    assert y - 2 <= py < y + side_h + 2 and x - 2 <= px < x + side_w + 2
    # And the square's patch is foreground, the far corner is not.
    fg = saliency.foreground_patches(saliency.patch_scores(smap, 4)).view(2, 4, 4)
    assert fg[:, 0, 0].all() and not fg[:, 3, 3].any()


def test_spectral_saliency_rejects_views_below_8_pixels():
    with pytest.raises(ValueError, match="at least 8x8"):
        saliency.spectral_residual_saliency(torch.rand(1, 3, 7, 20))


def test_separable_blur_equals_torchvision_gaussian_blur():
    from torchvision.transforms.v2 import functional as TF
    images = torch.randn(2, 3, 36, 52)
    for kernel, sigma in [(3, 0.7), (11, 5.0), (31, 10.0)]:
        ours = saliency.gaussian_blur(images, kernel, sigma)
        assert torch.allclose(ours, TF.gaussian_blur(images, [kernel, kernel], [sigma, sigma]), atol=1e-5)


def test_gt_foreground_from_true_masks():
    masks = torch.zeros(3, 35, 35, dtype=torch.bool)
    masks[0, :15, :15] = True                                         # covers 3x3 patches of 5x5 px (grid 7)
    masks[1, 17:19, 17:19] = True                                     # tiny object: its best patch only
    fg = saliency.gt_foreground_patches(masks, 7).view(3, 7, 7)
    assert fg[0, :3, :3].all() and fg[0].sum() == 9
    assert fg[1].sum() == 1 and fg[1, 3, 3]
    assert not fg[2].any()                                            # no object, no foreground


class TinyEncoder(nn.Module):
    """Stands in for the encoders of models.py: anything with `feature_map(x)`."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)

    def feature_map(self, x):
        return torch.relu(self.conv(x))


def test_saliency_module_sources_give_bool_patches():
    views = torch.randn(4, 3, 36, 52)
    masks = torch.rand(4, 36, 52) > 0.5
    assert saliency.Saliency("spectral", 5)(views).shape == (4, 25)
    assert saliency.Saliency("self", 5)(views, encoder=TinyEncoder()).dtype == torch.bool
    assert saliency.Saliency("gt", 5)(views, masks=masks).shape == (4, 25)
    with pytest.raises(ValueError, match="encoder"):
        saliency.Saliency("self", 5)(views)
    with pytest.raises(ValueError, match="choose one of"):
        saliency.Saliency("imagenet")


def test_self_saliency_takes_no_gradient():
    encoder = TinyEncoder()
    saliency.Saliency("self", 5)(torch.randn(2, 3, 32, 32), encoder=encoder)
    assert encoder.conv.weight.grad is None


@pytest.fixture(scope="module")
def resnet50_weights(tmp_path_factory):
    from torchvision.models import resnet50
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(resnet50().state_dict(), path)
    return path


def test_pretrained_saliency_loads_a_local_state_dict(resnet50_weights):
    sal = saliency.Saliency("pretrained", 7, weights=str(resnet50_weights))
    from torchvision.models import resnet50
    reference = resnet50()
    reference.load_state_dict(torch.load(resnet50_weights, weights_only=True))
    assert torch.equal(sal.trunk[0].weight, reference.conv1.weight)  # the file's weights, not fresh ones
    views = torch.randn(2, 3, 32, 32)
    assert sal.saliency_map(views).shape == (2, 7, 7)                 # resized up to 224 before the net
    assert sal(views).shape == (2, 49)
    assert not any(p.requires_grad for p in sal.parameters())
    sal.train()
    assert not sal.trunk.training                                     # frozen BN statistics


def test_pretrained_saliency_bad_weights_give_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="no such file"):
        saliency.Saliency("pretrained", weights=str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="not a readable"):
        saliency.Saliency("pretrained", weights=str(tmp_path / "junk.pth"))
    from torchvision.models import resnet18
    torch.save(resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(RuntimeError, match="not a torchvision ResNet-50|do not fit"):
        saliency.Saliency("pretrained", weights=str(tmp_path / "r18.pth"))


def test_pretrained_saliency_offline_names_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as error:
        saliency.Saliency("pretrained")
    message = str(error.value)
    assert "--saliency-weights PATH" in message and "spectral" in message and "\n" not in message


# ============================================================================ masking.py

def expected_counts(fg_row, r):
    """SPEC.md section 3 in plain Python: (n_fg, n_bg) of a positive view."""
    n, n_fg_avail = len(fg_row), int(sum(fg_row))
    n_fg = min(round(r * n_fg_avail), n_fg_avail)
    n_bg = min(max(math.floor(r * n) - n_fg, 0), n - n_fg_avail)
    return n_fg, n_bg


@pytest.mark.parametrize("grid", [1, 3, 5, 7])
def test_balanced_mask_exact_fg_and_bg_counts(grid):
    g = torch.Generator().manual_seed(grid)
    fg = random_fg(400, grid * grid, g)
    ratio = torch.rand(400, generator=g)                              # the whole [0, 1) range
    mask = masking.balanced_mask(fg, ratio, g)
    for row in range(400):
        n_fg, n_bg = expected_counts(fg[row].tolist(), float(ratio[row]))
        assert int((mask[row] & fg[row]).sum()) == n_fg
        assert int((mask[row] & ~fg[row]).sum()) == n_bg


def test_balanced_mask_takes_the_same_fraction_of_fg_and_bg():
    # The paper's point: foreground and background each lose about r of their patches.
    g = torch.Generator().manual_seed(1)
    fg = random_fg(2000, 49, g)[2:]
    ratio = masking.sample_ratios(len(fg), 0.05, 0.25, g)
    mask = masking.balanced_mask(fg, ratio, g)
    n_fg, n_bg = fg.sum(1).double(), (~fg).sum(1).double()
    masked_fg, masked_bg = (mask & fg).sum(1), (mask & ~fg).sum(1)
    unclamped = (n_fg > 0) & (n_bg > 0)
    assert ((masked_fg - ratio.double() * n_fg).abs() <= 0.5 + 1e-9).all()
    assert ((masked_bg - ratio.double() * n_bg).abs()[unclamped] <= 1.5).all()


def test_masked_patches_are_uniform_within_foreground():
    g = torch.Generator().manual_seed(2)
    fg = torch.zeros(20000, 16, dtype=torch.bool)
    fg[:, :6] = True
    mask = masking.balanced_mask(fg, 0.5, g)                          # 3 of 6 FG, 5 of 10 BG
    frequency = mask.double().mean(0)
    assert torch.allclose(frequency, torch.full((16,), 0.5, dtype=torch.float64), atol=0.02)


def test_hard_negative_masks_only_foreground():
    g = torch.Generator().manual_seed(3)
    fg = random_fg(500, 49, g)
    ratio = masking.sample_ratios(500, 0.4, 0.7, g)
    mask = masking.hard_negative_mask(fg, ratio, g)
    assert not (mask & ~fg).any()
    expected = torch.tensor([round(float(r) * int(f.sum())) for r, f in zip(ratio, fg)])
    assert torch.equal(mask.sum(1), expected)


def test_max_fg_fraction_caps_the_hard_negative():
    fg = torch.ones(10, 49, dtype=torch.bool)
    mask = masking.hard_negative_mask(fg, 0.7, max_fg_fraction=0.55)
    assert (mask.sum(1) == round(0.55 * 49)).all()


def test_random_mask_counts_and_uniformity():
    g = torch.Generator().manual_seed(4)
    ratio = torch.rand(300, generator=g)
    mask = masking.random_mask(300, 25, ratio, g)
    assert torch.equal(mask.sum(1), torch.floor(ratio.double() * 25).long())
    many = masking.random_mask(20000, 25, 0.2, g)
    assert torch.allclose(many.double().mean(0), torch.full((25,), 0.2, dtype=torch.float64), atol=0.015)


def test_sample_ratios_stay_in_range_and_reject_bad_ranges():
    r = masking.sample_ratios(10000, 0.05, 0.25, torch.Generator().manual_seed(0))
    assert r.min() >= 0.05 and r.max() < 0.25 and abs(float(r.mean()) - 0.15) < 0.005
    with pytest.raises(ValueError, match="low <= high"):
        masking.sample_ratios(4, 0.7, 0.4)
    with pytest.raises(ValueError, match="0 <= low"):
        masking.Masker("hp", positive_ratio=(0.1, 1.5))


def test_patch_to_pixel_mask_on_odd_sizes():
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(3, 25, generator=g) < 0.4
    pixels = masking.patch_to_pixel_mask(mask, 5, 36, 52)
    assert pixels.shape == (3, 36, 52) and pixels.dtype == torch.bool
    for y in range(36):
        for x in range(52):
            patch = (y * 5 // 36) * 5 + x * 5 // 52
            assert torch.equal(pixels[:, y, x], mask[:, patch])


def test_high_pass_removes_flat_colour_and_keeps_edges():
    flat = torch.full((2, 3, 32, 32), 0.7)
    assert masking.high_pass(flat, 11, 5.0).abs().max() < 1e-5
    edge = torch.zeros(1, 1, 32, 32)
    edge[..., 16:] = 1.0
    assert masking.high_pass(edge, 11, 5.0).abs().max() > 0.2


def test_scaled_kernel_keeps_the_release_values_at_224_and_stays_odd():
    assert masking.scaled_kernel(11, 5.0, 224) == (11, 5.0)
    assert masking.scaled_kernel(31, 10.0, 224) == (31, 10.0)
    for size in range(8, 300, 7):
        k, sigma = masking.scaled_kernel(31, 10.0, size)
        assert k % 2 == 1 and k >= 3 and sigma == pytest.approx(10.0 * size / 224)


@pytest.mark.parametrize("size,grid", [((56, 56), 7), ((36, 52), 5)])    # whole patches / pixel mask
def test_noise_fill_changes_exactly_the_masked_pixels_with_the_right_std(size, grid):
    H, W = size
    g = torch.Generator().manual_seed(6)
    images = torch.full((64, 3, H, W), 5.0)
    patch_mask = torch.rand(64, 3, grid * grid, generator=g) < 0.3
    masking.fill_noise_(images, patch_mask, grid, 0.18, g)
    pixel_mask = masking.patch_to_pixel_mask(patch_mask, grid, H, W)
    assert torch.equal(images != 5.0, pixel_mask)
    noise = images[pixel_mask]
    assert abs(float(noise.mean())) < 0.005 and float(noise.std()) == pytest.approx(0.18, rel=0.02)


@pytest.mark.parametrize("strategy", ["mean", "blur"])
def test_mean_and_blur_change_only_masked_pixels(strategy):
    g = torch.Generator().manual_seed(7)
    views = torch.randn(8, 3, 36, 52, generator=g)
    fg = random_fg(8, 25, g)
    out, pixel_mask = masking.Masker(strategy, 5)(views, fg, "positive", g)
    pixel_mask = pixel_mask.expand_as(views)
    assert torch.equal(out[~pixel_mask], views[~pixel_mask])
    if strategy == "mean":
        fill = views.mean((2, 3), keepdim=True).expand_as(views)
    else:
        fill = saliency.gaussian_blur(views, *masking.scaled_kernel(31, 10.0, 36))
    assert torch.allclose(out[pixel_mask], fill[pixel_mask])
    assert pixel_mask.any()


@pytest.mark.parametrize("mode,std", [("positive", 0.18), ("negative", 0.14)])
def test_hp_masker_high_passes_and_fills_noise(mode, std):
    g = torch.Generator().manual_seed(8)
    views = torch.randn(256, 3, 56, 56, generator=g)
    fg = random_fg(256, 49, g)
    masker = masking.Masker("hp", 7)
    out, pixel_mask = masker(views, fg, mode, g)
    pixel_mask = pixel_mask.expand_as(views)
    filtered = masker.filter(views)
    assert torch.equal(out[~pixel_mask], filtered[~pixel_mask])
    assert float(out[pixel_mask].std()) == pytest.approx(std, rel=0.03)


def test_hp_masker_mixes_focal_spatial_and_channel_wise_masks_as_released():
    g = torch.Generator().manual_seed(9)
    B, S = 3000, 56
    views = torch.zeros(B, 3, S, S)
    fg = torch.ones(B, 49, dtype=torch.bool)
    _, pixel_mask = masking.Masker("hp", 7)(views, fg, "positive", g)
    side = round(200 / 224 * S)
    kept = (~pixel_mask).sum((2, 3))                                  # [B, 3] unmasked pixels
    focal = (kept == side * side).all(1)                              # grid masks keep 3136 - 64k
    same_channels = (pixel_mask == pixel_mask[:, :1]).all((1, 2, 3))
    spatial = same_channels & ~focal
    assert float(focal.double().mean()) == pytest.approx(0.2, abs=0.025)
    assert float(spatial.double().sum() / (~focal).sum()) == pytest.approx(0.3, abs=0.03)


def test_hard_negative_leaves_the_background_untouched():
    g = torch.Generator().manual_seed(10)
    views = torch.randn(16, 3, 35, 35, generator=g)
    fg = torch.zeros(16, 49, dtype=torch.bool)
    fg[:, :10] = True
    _, pixel_mask = masking.Masker("mean", 7)(views, fg, "negative", g)
    background = masking.patch_to_pixel_mask(~fg, 7, 35, 35)[:, None]
    assert not (pixel_mask & background).any() and pixel_mask.any()
    with pytest.raises(ValueError, match="needs fg"):
        masking.Masker("mean", 7)(views, None, "negative")


@pytest.mark.parametrize("device", DEVICES)
def test_masker_is_reproducible_with_a_seeded_generator(device):
    views = torch.randn(8, 3, 36, 52, device=device)
    fg = random_fg(8, 25, torch.Generator().manual_seed(0)).to(device)
    masker = masking.Masker("hp", 5)

    def run(seed):
        return masker(views, fg, "positive", torch.Generator(device=device).manual_seed(seed))

    (a, mask_a), (b, mask_b), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(a, c)
    assert a.device.type == device


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
def test_masker_shapes_on_odd_sizes(strategy):
    views = torch.randn(4, 3, 36, 52)
    out, pixel_mask = masking.Masker(strategy, 5)(views, None, "positive")   # uniform random masks
    assert out.shape == views.shape and out.dtype == views.dtype
    assert pixel_mask.dtype == torch.bool and pixel_mask.shape[-2:] == (36, 52)
