"""BEiT block-wise masking (MaskDistill): rectangles placed until an exact masked count.

Model-zone file imported by MaskDistill only; conventions as in masking.py.
"""

from __future__ import annotations

import math

import torch

from .masking import check_shape, _on, _randint, _uniform


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

    def masks(
        self,
        batch_size: int,
        num_patches: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A forward's (B, N) masks: the given `bool_masked_pos` (checked: shape), else one draw per
        image from `generator` (torch's global one when None), as the collator draws them."""
        shape = (batch_size, self.height * self.width if num_patches is None else num_patches)
        if bool_masked_pos is not None:
            check_shape("bool_masked_pos", bool_masked_pos, shape)
            return _on(bool_masked_pos, device).bool()
        if shape[1] != self.height * self.width:
            raise ValueError("masks for another image size must be passed as bool_masked_pos")
        return _on(torch.stack([self(generator) for _ in range(batch_size)]), device)

    def __call__(self, generator: torch.Generator | None = None, top_up: bool = True) -> torch.Tensor:
        """One example's (height * width,) bool mask; `top_up=False` returns the block phase alone (for inspection)."""
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
