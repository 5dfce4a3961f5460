"""Several masks per image (ExtreMA): K masks, each keeping int(N * (1 - mask_ratio)) patches,
disjoint when asked. Model-zone file imported by ExtreMA only; conventions as in masking.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .configuration_common import check_leaves_visible
from .masking import num_visible_patches, _on, uniform_count


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
    check_leaves_visible("mask_ratio", mask_ratio, num_patches - len_keep, num_patches)
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


def multi_mask_indices_from_bool_masked_pos(bool_masked_pos: torch.Tensor, num_visible: int | None = None) -> MultiMaskIndices:
    """Index form of given masks (B, K, N) (or (B, N) = one mask); visible patches in raster order.

    Every mask of every image must keep the same number of patches (the encoder batch is rectangular).
    `num_visible`: the count the config gives, used instead of the masks' own while tracing
    (see `uniform_count`).
    """
    if bool_masked_pos.ndim == 2:
        bool_masked_pos = bool_masked_pos[:, None]
    if bool_masked_pos.ndim != 3:
        raise ValueError(
            "bool_masked_pos must have shape (batch, num_masks, num_patches) or (batch, num_patches), "
            f"got {tuple(bool_masked_pos.shape)}"
        )
    bool_masked_pos = bool_masked_pos.bool()
    rule = "every mask must keep the same number of visible patches"
    len_keep = uniform_count(~bool_masked_pos, num_visible, rule)
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
        """One example's masks (num_masks, N)."""
        return self.masks(1, generator=generator).bool_masked_pos[0]

    def masks(
        self,
        batch_size: int,
        num_patches: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> MultiMaskIndices:
        """A forward's K masks per image: the given `bool_masked_pos` ((B, K, N), or (B, N) = one mask),
        else from `noise` ((B, N): disjoint masks, (B, K, N): independent ones, see `multi_masking`),
        else from noise drawn with `generator` (torch's global one when None)."""
        num_patches = self.num_patches if num_patches is None else num_patches
        if bool_masked_pos is not None:
            if bool_masked_pos.ndim == 2:
                bool_masked_pos = bool_masked_pos[:, None]
            if bool_masked_pos.ndim != 3 or bool_masked_pos.shape[0] != batch_size or bool_masked_pos.shape[2] != num_patches:
                raise ValueError(
                    f"bool_masked_pos must have shape ({batch_size}, num_masks, {num_patches}) or "
                    f"({batch_size}, {num_patches}), got {tuple(bool_masked_pos.shape)}"
                )
            return multi_mask_indices_from_bool_masked_pos(
                _on(bool_masked_pos, device), num_visible_patches(num_patches, self.mask_ratio)
            )
        if noise is None:
            shape = (batch_size, num_patches) if self.disjoint else (batch_size, self.num_masks, num_patches)
            noise = torch.rand(shape, generator=generator, device=device)
        elif noise.shape[0] != batch_size or noise.shape[-1] != num_patches or noise.ndim not in (2, 3):
            raise ValueError(
                f"noise must have shape ({batch_size}, {num_patches}) (disjoint masks) or "
                f"({batch_size}, num_masks, {num_patches}) (independent masks), got {tuple(noise.shape)}"
            )
        return multi_masking(_on(noise, device), self.mask_ratio, self.num_masks)


# --------------------------------------------------------------------------------------------------
# Attention-driven masking and throwing (AMT): per-image maps, weighted order, three bands
# --------------------------------------------------------------------------------------------------
