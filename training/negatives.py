"""Paste negatives into inlier crops: ADE20k crops (methods.md §2.3) and flow patches (§3.2).

Images are float RGB 0..255 [N, 3, H, W]; seg labels int64 [N, H, W]. A pasted pixel gets seg
label IGNORE_ID and ood mask True. Every random choice comes from an explicit torch.Generator,
so a step's layout can be drawn again from the same seed (the routing tests do).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from anomaly_seg_node.errors import DataError
from anomaly_seg_node.labels import IGNORE_ID
from training.config import NegativesConfig


class Pasted(NamedTuple):
    """Mixed-content batch: image [N,3,H,W], labels [N,H,W], ood_mask bool [N,H,W] and, for flow
    patches, inlier_crop [N,3,h,w]: the detached inlier pixels each patch overwrote (MLE target).
    """

    image: torch.Tensor
    labels: torch.Tensor
    ood_mask: torch.Tensor
    inlier_crop: torch.Tensor | None


@dataclass(frozen=True)
class PatchLayout:
    """One patch size per batch (the flow samples a batch at one latent size), one position
    per image: patch i covers rows tops[i]:tops[i]+h and columns lefts[i]:lefts[i]+w.
    """

    h: int
    w: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]


def patch_sides(cfg: NegativesConfig, limit: int) -> list[int]:
    """Allowed patch sides min_size, min_size+step, ..., max_size, clipped to `limit`."""
    sides = [s for s in range(cfg.min_size, cfg.max_size + 1, cfg.step) if s <= limit]
    if not sides:
        raise DataError(
            f'no flow patch side in {cfg.min_size}..{cfg.max_size} (step {cfg.step}) fits a crop '
            f'side of {limit} pixels; use larger crops (data.crop_size) or a smaller '
            'negatives.min_size')
    return sides


def _randint(high: int, rng: torch.Generator) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(0, high + 1, (1,), generator=rng).item())


def draw_patch_layout(cfg: NegativesConfig, n: int, crop_hw: tuple[int, int],
                      rng: torch.Generator) -> PatchLayout:
    """Draw a patch size (square, or h and w independently) and n positions inside the crop."""
    crop_h, crop_w = crop_hw
    if cfg.square:
        sides = patch_sides(cfg, min(crop_h, crop_w))
        h = w = sides[_randint(len(sides) - 1, rng)]
    else:
        sides_h, sides_w = patch_sides(cfg, crop_h), patch_sides(cfg, crop_w)
        h = sides_h[_randint(len(sides_h) - 1, rng)]
        w = sides_w[_randint(len(sides_w) - 1, rng)]
    tops = tuple(_randint(crop_h - h, rng) for _ in range(n))
    lefts = tuple(_randint(crop_w - w, rng) for _ in range(n))
    return PatchLayout(h, w, tops, lefts)


def _check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise DataError(f'expected float RGB images [N, 3, H, W] in 0..255, got '
                        f'{images.dtype} {tuple(images.shape)}; convert with image.float()')
    if labels.shape != (images.shape[0], *images.shape[2:]):
        raise DataError(f'labels {tuple(labels.shape)} do not match images '
                        f'{tuple(images.shape)}; expected labels [N, H, W]')


def crop_at(images: torch.Tensor, layout: PatchLayout) -> torch.Tensor:
    """The detached [N, 3, h, w] crops of `images` under the layout's rectangles."""
    h, w = layout.h, layout.w
    crops = [images[i, :, t:t + h, left:left + w]
             for i, (t, left) in enumerate(zip(layout.tops, layout.lefts, strict=True))]
    return torch.stack(crops).detach()


def paste_patches(images: torch.Tensor, labels: torch.Tensor, patches: torch.Tensor,
                  layout: PatchLayout, ignore_index: int = IGNORE_ID) -> Pasted:
    """Replace each image's rectangle with its patch [N, 3, h, w]; differentiable in patches."""
    _check_batch(images, labels)
    n = images.shape[0]
    if patches.shape != (n, 3, layout.h, layout.w) or len(layout.tops) != n:
        raise DataError(f'patches {tuple(patches.shape)} do not match the layout '
                        f'({n} images, {layout.h}x{layout.w}); draw the layout for this batch')
    h, w = layout.h, layout.w
    inlier_crop = crop_at(images, layout)
    mixed = images.clone()
    labels = labels.clone()
    ood = torch.zeros_like(labels, dtype=torch.bool)
    patches = patches.to(images.dtype)
    for i, (t, left) in enumerate(zip(layout.tops, layout.lefts, strict=True)):
        mixed[i, :, t:t + h, left:left + w] = patches[i]
        labels[i, t:t + h, left:left + w] = ignore_index
        ood[i, t:t + h, left:left + w] = True
    return Pasted(mixed, labels, ood, inlier_crop)


def paste_ade_negatives(images: torch.Tensor, labels: torch.Tensor, neg_images: torch.Tensor,
                        neg_masks: torch.Tensor, rng: torch.Generator,
                        ignore_index: int = IGNORE_ID) -> Pasted:
    """Paste ADE20k crops [M, 3, c, c] (uint8) with masks [M, c, c] (bool), M >= N.

    Each crop is placed at a uniform position fully inside its inlier crop; only masked pixels
    replace inlier pixels (methods.md §2.3).
    """
    _check_batch(images, labels)
    n, _, crop_h, crop_w = images.shape
    if neg_images.dim() != 4 or neg_images.shape[1] != 3 \
            or neg_masks.shape != (neg_images.shape[0], *neg_images.shape[2:]):
        raise DataError(f'expected ADE20k negatives [M, 3, c, c] with masks [M, c, c]; got '
                        f'{tuple(neg_images.shape)} and {tuple(neg_masks.shape)}')
    if neg_images.shape[0] < n:
        raise DataError(f'{neg_images.shape[0]} negatives for {n} inlier crops; the negative '
                        'loader must use the inlier batch size (drop_last on both loaders)')
    c_h, c_w = neg_images.shape[2:]
    if c_h > crop_h or c_w > crop_w:
        raise DataError(f'ADE20k crops of {c_h}x{c_w} do not fit inlier crops of '
                        f'{crop_h}x{crop_w}; lower negatives.ade_crop or raise data.crop_size')
    mixed = images.clone()
    labels = labels.clone()
    ood = torch.zeros_like(labels, dtype=torch.bool)
    neg = neg_images[:n].to(device=images.device, dtype=images.dtype)
    masks = neg_masks[:n].to(device=images.device, dtype=torch.bool)
    for i in range(n):
        t, left = _randint(crop_h - c_h, rng), _randint(crop_w - c_w, rng)
        region = (slice(t, t + c_h), slice(left, left + c_w))
        mixed[i, :, region[0], region[1]] = torch.where(
            masks[i], neg[i], mixed[i, :, region[0], region[1]])
        labels[i][region] = labels[i][region].masked_fill(masks[i], ignore_index)
        ood[i][region] = masks[i]
    return Pasted(mixed, labels, ood, None)
