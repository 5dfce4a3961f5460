"""Mask generators and the index bookkeeping that turns a mask into encoder inputs.

Model-zone file (torch + standard library only). Conventions everywhere in hf_mim:
`bool_masked_pos` is (batch, num_patches) with True = masked (removed from the encoder input, a
reconstruction target) and patch index = row * grid_width + column. Every generator draws from an
explicit `torch.Generator`, so a collator seeded per example reproduces its masks exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class MaskIndices(NamedTuple):
    """Index form of a per-image mask with the same number of visible patches in every row.

    ids_keep: (B, num_visible) visible patches, in the order they enter the encoder.
    ids_restore: (B, N) position of each patch in [visible..., masked...] order (unshuffles decoder input).
    bool_masked_pos: (B, N) True = masked, raster order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    bool_masked_pos: torch.Tensor


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """MAE's count: int(N * (1 - ratio)), truncated, as the official code computes it."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> MaskIndices:
    """MAE per-sample random masking from explicit noise (B, N): ascending argsort, smallest noise kept.

    Visible tokens keep the argsort order (not raster order), exactly like the official MAE/dBOT code.
    """
    batch_size, num_patches = noise.shape
    len_keep = num_visible_patches(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    bool_masked_pos = torch.ones(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    bool_masked_pos[:, :len_keep] = False
    bool_masked_pos = torch.gather(bool_masked_pos, 1, ids_restore)
    return MaskIndices(ids_shuffle[:, :len_keep], ids_restore, bool_masked_pos)


def indices_from_bool_masked_pos(bool_masked_pos: torch.Tensor) -> MaskIndices:
    """Index form of a given mask; visible patches enter in raster order.

    Every row must hide the same number of patches (the encoder batch is rectangular); a mask that
    does not raises a ValueError saying so.
    """
    if bool_masked_pos.ndim != 2:
        raise ValueError(f"bool_masked_pos must have shape (batch, num_patches), got {tuple(bool_masked_pos.shape)}")
    bool_masked_pos = bool_masked_pos.bool()
    counts = bool_masked_pos.sum(dim=1)
    if (counts != counts[0]).any():
        raise ValueError(
            "bool_masked_pos must mask the same number of patches in every image, got counts "
            f"{counts.tolist()}"
        )
    len_keep = bool_masked_pos.shape[1] - int(counts[0])
    ids_shuffle = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return MaskIndices(ids_shuffle[:, :len_keep], ids_restore, bool_masked_pos)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


class RandomMaskGenerator:
    """Uniform random mask of exactly N - int(N * (1 - mask_ratio)) patches (MAE), as a (grid*grid,) bool tensor."""

    def __init__(self, grid_size: int, mask_ratio: float):
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.num_patches = grid_size * grid_size
        self.mask_ratio = mask_ratio

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.rand(1, self.num_patches, generator=generator)
        return random_masking(noise, self.mask_ratio).bool_masked_pos[0]


class BlockwiseMaskGenerator:
    """BEiT block-wise masking with an exact masked count.

    Rectangles of area >= `min_num_patches` and aspect ratio in [min_aspect, 1/min_aspect] (log-uniform)
    are placed until `num_masking_patches` patches are covered; a rectangle is only accepted if it does
    not overshoot. BEiT's loop can stall a few patches short; those are topped up with uniformly random
    unmasked patches so every image masks exactly the requested count (the batch stays rectangular).
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        attempts_per_block: int = 10,
    ):
        self.height, self.width = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.height * self.width}], got {num_masking_patches}"
            )
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.attempts_per_block = attempts_per_block

    def _place_block(self, mask: torch.Tensor, max_new: int, generator: torch.Generator | None) -> int:
        for _ in range(self.attempts_per_block):
            area = _uniform(generator, self.min_num_patches, max(self.min_num_patches, max_new))
            aspect = math.exp(_uniform(generator, *self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h * w >= self.min_num_patches and h < self.height and w < self.width:
                top = _randint(generator, 0, self.height - h)
                left = _randint(generator, 0, self.width - w)
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_new:
                    region.fill_(True)
                    return new
        return 0

    def __call__(self, generator: torch.Generator | None = None, top_up: bool = True) -> torch.Tensor:
        """A (height * width,) bool mask; `top_up=False` returns the block phase alone (for inspection)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masking_patches:
            max_new = min(self.num_masking_patches - count, self.max_num_patches)
            placed = self._place_block(mask, max_new, generator)
            if placed == 0:
                break
            count += placed
        mask = mask.flatten()
        if top_up and count < self.num_masking_patches:
            free = (~mask).nonzero().squeeze(1)
            chosen = free[torch.randperm(free.numel(), generator=generator)[: self.num_masking_patches - count]]
            mask[chosen] = True
        return mask


# --------------------------------------------------------------------------------------------------
# Several masks per image (ExtreMA): K masks, each keeping int(N * (1 - mask_ratio)) patches
# --------------------------------------------------------------------------------------------------


class MultiMaskIndices(NamedTuple):
    """Index form of K masks per image.

    ids_keep: (B, K, num_visible) visible patches of each mask, in the order they enter the encoder.
    bool_masked_pos: (B, K, N) True = hidden from that mask, raster order.
    """

    ids_keep: torch.Tensor
    bool_masked_pos: torch.Tensor


def check_multi_mask(num_patches: int, mask_ratio: float, num_masks: int, disjoint: bool) -> int:
    """Validate a multi-mask setting and return the visible patches per mask."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if num_masks < 1:
        raise ValueError(f"num_masks must be >= 1, got {num_masks}")
    len_keep = num_visible_patches(num_patches, mask_ratio)
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}")
    if disjoint and num_masks * len_keep > num_patches:
        raise ValueError(
            f"{num_masks} disjoint masks of {len_keep} visible patches need {num_masks * len_keep} patches, "
            f"the image has {num_patches}"
        )
    return len_keep


def multi_masking(noise: torch.Tensor, mask_ratio: float, num_masks: int) -> MultiMaskIndices:
    """K masks per image from explicit noise, exactly as the official ExtreMA `generate_mask`.

    - noise (B, N): disjoint masks. One permutation per image, `ids_shuffle = argsort(noise)`, and mask
      k keeps `ids_shuffle[:, k*n : (k+1)*n]` with n = int(N * (1 - mask_ratio)); no patch is visible
      in two masks.
    - noise (B, K, N): independent masks (official `--disjoint` off): mask k keeps the n smallest
      entries of noise[:, k].
    Visible patches keep the argsort order (not raster order), as the official code feeds them.
    """
    if noise.ndim == 2:
        batch_size, num_patches = noise.shape
        len_keep = check_multi_mask(num_patches, mask_ratio, num_masks, disjoint=True)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_keep = ids_shuffle[:, : num_masks * len_keep].reshape(batch_size, num_masks, len_keep)
    elif noise.ndim == 3:
        batch_size, count, num_patches = noise.shape
        if count != num_masks:
            raise ValueError(f"noise of shape {tuple(noise.shape)} holds {count} masks, expected num_masks={num_masks}")
        len_keep = check_multi_mask(num_patches, mask_ratio, num_masks, disjoint=False)
        ids_keep = torch.argsort(noise, dim=2)[:, :, :len_keep]
    else:
        raise ValueError(f"noise must have shape (batch, num_patches) or (batch, num_masks, num_patches), got {tuple(noise.shape)}")
    bool_masked_pos = torch.ones(batch_size, num_masks, num_patches, dtype=torch.bool, device=noise.device)
    bool_masked_pos.scatter_(2, ids_keep, False)
    return MultiMaskIndices(ids_keep, bool_masked_pos)


def multi_mask_indices_from_bool_masked_pos(bool_masked_pos: torch.Tensor) -> MultiMaskIndices:
    """Index form of given masks (B, K, N) (or (B, N) = one mask); visible patches in raster order.

    Every mask of every image must keep the same number of patches (the encoder batch is rectangular).
    """
    if bool_masked_pos.ndim == 2:
        bool_masked_pos = bool_masked_pos[:, None]
    if bool_masked_pos.ndim != 3:
        raise ValueError(
            "bool_masked_pos must have shape (batch, num_masks, num_patches) or (batch, num_patches), "
            f"got {tuple(bool_masked_pos.shape)}"
        )
    bool_masked_pos = bool_masked_pos.bool()
    batch_size, num_masks, num_patches = bool_masked_pos.shape
    counts = (~bool_masked_pos).sum(dim=2)
    if (counts != counts.flatten()[0]).any():
        raise ValueError(
            f"every mask must keep the same number of visible patches, got counts {counts.tolist()}"
        )
    len_keep = int(counts.flatten()[0])
    if len_keep < 1:
        raise ValueError("bool_masked_pos hides every patch of a mask: the student would see nothing")
    order = torch.argsort(bool_masked_pos.to(torch.int8), dim=2, stable=True)
    return MultiMaskIndices(order[:, :, :len_keep], bool_masked_pos)


class DisjointMaskGenerator:
    """ExtreMA's masks for one image: a (num_masks, grid*grid) bool tensor, True = hidden from that mask.

    Each mask keeps exactly int(N * (1 - mask_ratio)) patches; with `disjoint` (the official default)
    the masks are cut from one random permutation, so no patch is visible in two masks (80 % x 5 uses
    195 of 196 patches). A collator stacks them into (B, num_masks, N).
    """

    def __init__(self, grid_size: int, mask_ratio: float, num_masks: int, disjoint: bool = True):
        self.num_patches = grid_size * grid_size
        self.num_visible = check_multi_mask(self.num_patches, mask_ratio, num_masks, disjoint)
        self.mask_ratio = mask_ratio
        self.num_masks = num_masks
        self.disjoint = disjoint

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (1, self.num_patches) if self.disjoint else (1, self.num_masks, self.num_patches)
        noise = torch.rand(shape, generator=generator)
        return multi_masking(noise, self.mask_ratio, self.num_masks).bool_masked_pos[0]
