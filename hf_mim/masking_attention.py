"""Attention-driven masking and throwing (AMT): per-image maps, weighted order, three bands.

Model-zone file imported by AMT only; conventions as in masking.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .configuration_common import check_leaves_visible
from .masking import check_shape, is_tracing, num_visible_patches, _on, uniform_count


class ThrowMasks(NamedTuple):
    """AMT's three kinds of patch, as two (B, N) bool masks in raster order (neither = visible).

    bool_masked_pos: hidden from the encoder and reconstructed (in the loss).
    bool_thrown_pos: removed everywhere: not seen, not predicted, not in the loss.
    """

    bool_masked_pos: torch.Tensor
    bool_thrown_pos: torch.Tensor


def amt_counts(num_units: int, mask_ratio: float, throw_ratio: float, rounding: str) -> tuple[int, int]:
    """(masked, thrown) unit counts as the official code computes them.

    "floor" (mae-AMT): masked = int(N r), masked + thrown = int(N (r + t)).
    "ceil" (SimMIM-AMT): masked = ceil(N r), thrown = ceil(N t).
    """
    if rounding == "floor":
        masked = int(num_units * mask_ratio)
        return masked, int(num_units * (mask_ratio + throw_ratio)) - masked
    if rounding == "ceil":
        return math.ceil(num_units * mask_ratio), math.ceil(num_units * throw_ratio)
    raise ValueError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")


def weighted_order(weights: torch.Tensor, noise: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, N) weighted random permutation without replacement, highest-priority first, from explicit
    uniform noise: argsort(log(w + eps) + Gumbel(noise), descending).

    Same distribution as `torch.multinomial(w, N)` (the official call), but reproducible from `noise`;
    `eps` keeps zero-weight units drawable (multinomial fails when fewer than N weights are positive).
    """
    if weights.shape != noise.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and noise {tuple(noise.shape)} must have the same shape")
    tiny = torch.finfo(torch.float32).tiny
    uniform = noise.float().clamp(tiny, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(uniform))
    keys = torch.log(weights.float().clamp_min(0) + eps) + gumbel
    return torch.argsort(keys, dim=-1, descending=True)


def throw_masks_from_order(order: torch.Tensor, num_masked: int, num_thrown: int) -> ThrowMasks:
    """First `num_masked` of each row's order masked, the next `num_thrown` thrown, the rest visible."""
    batch_size, num_units = order.shape
    masked = torch.zeros(batch_size, num_units, dtype=torch.bool, device=order.device)
    thrown = torch.zeros_like(masked)
    masked.scatter_(1, order[:, :num_masked], True)
    thrown.scatter_(1, order[:, num_masked : num_masked + num_thrown], True)
    return ThrowMasks(masked, thrown)


def units_to_patches(unit_mask: torch.Tensor, unit_grid: int, unit_size: int) -> torch.Tensor:
    """(B, G*G) mask over mask units of `unit_size` x `unit_size` patches -> (B, (G*unit_size)^2) over patches."""
    if unit_size == 1:
        return unit_mask
    batch_size = unit_mask.shape[0]
    grid = unit_mask.reshape(batch_size, unit_grid, unit_grid)
    grid = grid.repeat_interleave(unit_size, dim=1).repeat_interleave(unit_size, dim=2)
    return grid.reshape(batch_size, -1)


def units_from_patches(patch_values: torch.Tensor, patch_grid: int, unit_size: int) -> torch.Tensor:
    """(B, P*P) per-patch values -> (B, (P/unit_size)^2) sums per mask unit."""
    if unit_size == 1:
        return patch_values
    batch_size = patch_values.shape[0]
    units = patch_grid // unit_size
    grid = patch_values.reshape(batch_size, units, unit_size, units, unit_size)
    return grid.sum(dim=(2, 4)).reshape(batch_size, units * units)


def normalized_cls_attention(cls_attention: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """AMT's per-image map from the last block's cls attention (B, heads, prefix + N): keys of the
    patches only, min-max normalised per head over the patches, mean over heads -> (B, rows, columns)."""
    patches = cls_attention[:, :, num_prefix_tokens:].float()
    low = patches.amin(dim=-1, keepdim=True)
    high = patches.amax(dim=-1, keepdim=True)
    normalized = (patches - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
    return normalized.mean(dim=1).reshape(-1, *grid)


def crop_attention_maps(
    attention_maps: torch.Tensor,
    crop_boxes: torch.Tensor | None,
    flipped: torch.Tensor | None,
    output_size: tuple[int, int],
) -> torch.Tensor:
    """(B, rows, cols) maps of whole images -> (B, H, W) per-pixel weights of each training crop, in [0, 1].

    `crop_boxes` (B, 4) = (top, left, height, width) as fractions of the original image (None = whole
    images); `flipped` (B,) bool (None = none). Each map is sampled bilinearly at the centre of every
    output pixel (align_corners=False, edges clamped): for a whole image this is
    `F.interpolate(map, (H, W), mode="bilinear")`, the official resize; for a crop it reads the crop's own
    part of the map (the paper's intent; the released code always reads the map's top-left cells).
    Flipped with the image. One `grid_sample` for the whole batch.
    """
    batch_size = attention_maps.shape[0]
    out_h, out_w = output_size
    dtype = torch.float32
    device = attention_maps.device
    if crop_boxes is None:
        crop_boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=dtype, device=device).expand(batch_size, 4)
    boxes = crop_boxes.to(device=device, dtype=dtype)
    top, left, height, width = boxes.unbind(dim=1)
    row_steps = (torch.arange(out_h, dtype=dtype, device=device) + 0.5) / out_h
    col_steps = (torch.arange(out_w, dtype=dtype, device=device) + 0.5) / out_w
    if flipped is not None:
        col_steps = torch.where(flipped.to(device).bool()[:, None], col_steps.flip(0), col_steps)  # (B, W)
    rows = top[:, None] + row_steps[None] * height[:, None]  # (B, H) fractions of the image
    cols = left[:, None] + col_steps * width[:, None]  # (B, W)
    grid = torch.stack(
        [(cols * 2 - 1)[:, None, :].expand(-1, out_h, -1), (rows * 2 - 1)[:, :, None].expand(-1, -1, out_w)], dim=-1
    )
    sampled = F.grid_sample(
        attention_maps.to(dtype)[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled[:, 0].clamp(0, 1)


def crop_attention_map(
    attention_map: torch.Tensor, crop_box: torch.Tensor | None, flipped: bool, output_size: tuple[int, int]
) -> torch.Tensor:
    """One map: `crop_attention_maps` for a batch of one, (rows, cols) -> (H, W)."""
    boxes = None if crop_box is None else torch.as_tensor(crop_box).reshape(1, 4)
    return crop_attention_maps(attention_map[None], boxes, torch.tensor([bool(flipped)]), output_size)[0]


class AttentionMaskGenerator:
    """AMT's masks: attention-driven masking and throwing once the store holds maps, uniform random
    masking (`warmup_mask_ratio`, nothing thrown) before the first refresh.

    Called per example as `generator(torch_generator, example_id=..., crop_box=..., flipped=...)`, or for
    a batch with `draw(noise, example_ids, crop_boxes, flipped)`: masks over patches and the per-patch
    weights they were drawn from (None before any map exists). The crop box and flip say where the
    training crop sits in the image the map was computed on. `store` maps an example id to its map
    (`get(example_id)`, `len`; the training loop's `hf_mim.training.AttentionMapStore`); None or empty:
    no maps yet. Once the store holds maps, an example
    without one (data added after the last refresh) is masked with a uniform map, as the official
    code's all-ones initial maps, so a batch never mixes mask counts. Masks are drawn at the level of
    mask units (`unit_size` x `unit_size` patches: 1 for MAE, 2 for SimMIM's 32 px units at patch 16).
    `strategy="random"` is the plain MAE/SimMIM baseline: random masking at `mask_ratio`, no throwing.
    `needs_crop_box` tells `PretrainingCollator` to draw these masks in the training process
    (`finish`), where the store is current, not in DataLoader workers.
    """

    needs_crop_box = True

    def __init__(
        self,
        patch_grid: int,
        patch_size: int,
        unit_size: int,
        mask_ratio: float,
        throw_ratio: float,
        warmup_mask_ratio: float,
        rounding: str,
        strategy: str = "amt",
        store=None,
    ):
        if patch_grid % unit_size:
            raise ValueError(f"a {patch_grid}x{patch_grid} patch grid cannot be cut into units of {unit_size} patches")
        self.patch_grid = patch_grid
        self.patch_size = patch_size
        self.unit_size = unit_size
        self.unit_grid = patch_grid // unit_size
        self.mask_ratio = mask_ratio
        self.throw_ratio = throw_ratio
        self.warmup_mask_ratio = warmup_mask_ratio
        self.rounding = rounding
        self.strategy = strategy
        self.store = store
        self._check_counts()

    @property
    def num_units(self) -> int:
        return self.unit_grid * self.unit_grid

    def _random_count(self, mask_ratio: float, num_units: int | None = None) -> int:
        """Masked units of random masking: MAE keeps int(N (1 - r)) patches, SimMIM masks ceil(N r) units."""
        num_units = self.num_units if num_units is None else num_units
        if self.rounding == "floor":
            return num_units - num_visible_patches(num_units, mask_ratio)
        return math.ceil(num_units * mask_ratio)

    def patch_counts(self, num_patches: int, throwing: bool) -> tuple[int, int]:
        """(masked, thrown) patches of this generator's masks over `num_patches` patches: attention-driven
        masking and throwing when `throwing` (strategy "amt" once maps exist), else random masking (the
        baseline's `mask_ratio`, or `warmup_mask_ratio`) with nothing thrown. What a traced model
        assumes given masks hold (`uniform_count`)."""
        per_unit = self.unit_size * self.unit_size
        num_units = num_patches // per_unit
        if throwing and self.strategy == "amt":
            masked, thrown = amt_counts(num_units, self.mask_ratio, self.throw_ratio, self.rounding)
        else:
            ratio = self.mask_ratio if self.strategy == "random" else self.warmup_mask_ratio
            masked, thrown = self._random_count(ratio, num_units), 0
        return masked * per_unit, thrown * per_unit

    def _check_counts(self) -> None:
        """Every way of masking must leave the encoder at least one visible unit."""
        settings = [("mask_ratio", self._random_count(self.mask_ratio), 0)]
        if self.strategy == "amt":
            settings = [
                ("warmup_mask_ratio", self._random_count(self.warmup_mask_ratio), 0),
                ("throw_ratio", *amt_counts(self.num_units, self.mask_ratio, self.throw_ratio, self.rounding)),
            ]
        for field, masked, thrown in settings:
            check_leaves_visible(
                field, getattr(self, field), masked + thrown, self.num_units, unit="mask unit",
                detail=f"masking {masked} and throwing {thrown}; mask_ratio={self.mask_ratio}, throw_ratio="
                f"{self.throw_ratio}, warmup_mask_ratio={self.warmup_mask_ratio}, {self.unit_size}x{self.unit_size} "
                "patches per unit",
            )

    def random_masks(self, noise: torch.Tensor, mask_ratio: float) -> ThrowMasks:
        """Uniform random masking of units from noise (B, units); nothing thrown."""
        order = torch.argsort(noise, dim=-1, descending=True)
        return self._to_patches(throw_masks_from_order(order, self._random_count(mask_ratio), 0))

    def guided_masks(self, unit_weights: torch.Tensor, noise: torch.Tensor) -> ThrowMasks:
        """Attention-driven masking and throwing of units from weights and uniform noise, both (B, units)."""
        num_masked, num_thrown = amt_counts(unit_weights.shape[-1], self.mask_ratio, self.throw_ratio, self.rounding)
        return self._to_patches(throw_masks_from_order(weighted_order(unit_weights, noise), num_masked, num_thrown))

    def _to_patches(self, masks: ThrowMasks) -> ThrowMasks:
        return ThrowMasks(*(units_to_patches(m, self.unit_grid, self.unit_size) for m in masks))

    def batch_patch_weights(
        self, attention_maps: torch.Tensor, crop_boxes: torch.Tensor | None, flipped: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, N) per-patch weights of each crop: the map's per-pixel weights summed over each patch."""
        side = self.patch_grid * self.patch_size
        pixels = crop_attention_maps(attention_maps, crop_boxes, flipped, (side, side))
        grid = pixels.reshape(-1, self.patch_grid, self.patch_size, self.patch_grid, self.patch_size)
        return grid.sum(dim=(2, 4)).reshape(pixels.shape[0], -1)

    def patch_weights(self, attention_map: torch.Tensor, crop_box: torch.Tensor | None, flipped: bool) -> torch.Tensor:
        """(N,) per-patch weights of one crop of one (rows, cols) map."""
        boxes = None if crop_box is None else torch.as_tensor(crop_box).reshape(1, 4)
        return self.batch_patch_weights(attention_map[None], boxes, torch.tensor([bool(flipped)]))[0]

    def draw(
        self,
        noise: torch.Tensor,
        example_ids: list[int] | None = None,
        crop_boxes: torch.Tensor | None = None,
        flipped: torch.Tensor | None = None,
    ) -> tuple[ThrowMasks, torch.Tensor | None]:
        """Masks for a batch from uniform noise (B, units): (ThrowMasks (B, N), weights (B, N) or None)."""
        if self.strategy == "random":
            return self.random_masks(noise, self.mask_ratio), None
        if example_ids is None or self.store is None or not len(self.store):
            return self.random_masks(noise, self.warmup_mask_ratio), None
        uniform = torch.ones(self.patch_grid, self.patch_grid)
        maps = [self.store.get(example_id) for example_id in example_ids]
        maps = torch.stack([uniform if found is None else found for found in maps])
        weights = self.batch_patch_weights(maps, crop_boxes, flipped)
        unit_weights = units_from_patches(weights, self.patch_grid, self.unit_size)
        return self.guided_masks(unit_weights, noise), weights

    def given_masks(
        self, bool_masked_pos: torch.Tensor | None, bool_thrown_pos: torch.Tensor | None, shape: tuple[int, int], device=None
    ) -> tuple[ThrowMasks, tuple[int, int]]:
        """Given masks checked: (B, N) each (None: nothing masked / thrown), disjoint, the same counts in
        every image. Returns them and their (masked, thrown) counts per image; while tracing those are
        the config's (`patch_counts`, checked inside the graph: see `uniform_count`)."""
        empty = torch.zeros(shape, dtype=torch.bool, device=device)
        masked = empty if bool_masked_pos is None else _on(bool_masked_pos, device)
        thrown = empty if bool_thrown_pos is None else _on(bool_thrown_pos, device)
        for name, mask in (("bool_masked_pos", masked), ("bool_thrown_pos", thrown)):
            check_shape(name, mask, shape)
        masked, thrown = masked.bool(), thrown.bool()
        overlap = "a patch cannot be both masked and thrown (bool_masked_pos & bool_thrown_pos overlap)"
        if is_tracing():
            torch._assert_async(~(masked & thrown).any(), overlap)
        elif (masked & thrown).any():
            raise ValueError(overlap)
        config_masked, config_thrown = self.patch_counts(shape[1], throwing=bool_thrown_pos is not None)
        counts = (
            uniform_count(masked, config_masked if bool_masked_pos is not None else 0,
                          "bool_masked_pos must select the same number of patches in every image"),
            uniform_count(thrown, config_thrown, "bool_thrown_pos must select the same number of patches in every image"),
        )
        return ThrowMasks(masked, thrown), counts

    def masks(
        self,
        batch_size: int,
        num_patches: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        bool_thrown_pos: torch.Tensor | None = None,
        patch_attention: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[ThrowMasks, tuple[int, int]]:
        """A forward's masks and their (masked, thrown) patch counts per image: the given masks win
        (`given_masks`); else attention-driven masks from `patch_attention` (B, N) (strategy "amt");
        else random masks (the baseline's `mask_ratio`, or `warmup_mask_ratio` before any map exists).
        `noise` (B, units) drives the draw; drawn with `generator` (torch's global one) when None."""
        num_patches = self.patch_grid**2 if num_patches is None else num_patches
        if bool_thrown_pos is not None and bool_masked_pos is None:
            raise ValueError("bool_thrown_pos needs bool_masked_pos: give both masks, or neither to draw them")
        if bool_masked_pos is not None:
            return self.given_masks(bool_masked_pos, bool_thrown_pos, (batch_size, num_patches), device)
        if num_patches != self.patch_grid**2:
            raise ValueError("masks for another image size must be passed as bool_masked_pos / bool_thrown_pos")
        if noise is None:
            noise = torch.rand(batch_size, self.num_units, generator=generator, device=device)
        check_shape("noise", noise, (batch_size, self.num_units), " (one value per mask unit)")
        noise = _on(noise, device)
        if self.strategy == "amt" and patch_attention is not None:
            check_shape("patch_attention", patch_attention, (batch_size, num_patches))
            unit_weights = units_from_patches(_on(patch_attention, device).float(), self.patch_grid, self.unit_size)
            return self.guided_masks(unit_weights, noise), self.patch_counts(num_patches, throwing=True)
        ratio = self.mask_ratio if self.strategy == "random" else self.warmup_mask_ratio
        return self.random_masks(noise, ratio), self.patch_counts(num_patches, throwing=False)

    def __call__(
        self,
        generator: torch.Generator | None = None,
        example_id: int | None = None,
        crop_box: torch.Tensor | None = None,
        flipped: bool = False,
    ) -> tuple[ThrowMasks, torch.Tensor | None]:
        """One example: (masks over patches (N,), per-patch weights (N,) or None)."""
        noise = torch.rand(1, self.num_units, generator=generator)
        boxes = None if crop_box is None else torch.as_tensor(crop_box).reshape(1, 4)
        masks, weights = self.draw(
            noise, None if example_id is None else [example_id], boxes, torch.tensor([bool(flipped)])
        )
        return ThrowMasks(*(m[0] for m in masks)), (None if weights is None else weights[0])
