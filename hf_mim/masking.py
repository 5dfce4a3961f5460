"""Mask generators and the index bookkeeping that turns a mask into encoder inputs.

Model-zone file (torch + standard library only). Conventions everywhere in hf_mim:
`bool_masked_pos` is (batch, num_patches) with True = masked (removed from the encoder input, a
reconstruction target) and patch index = row * grid_width + column. Every generator draws from an
explicit `torch.Generator`, so a collator seeded per example reproduces its masks exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .configuration_common import check_leaves_visible


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


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """The patches MAE-style random masking hides: all but `num_visible_patches`."""
    return num_patches - num_visible_patches(num_patches, mask_ratio)


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


def is_tracing() -> bool:
    """True while torch.compile or torch.export traces: tensor values are unknown then, so mask counts
    (which decide tensor shapes) must come from the config, not from the masks."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def uniform_count(mask: torch.Tensor, expected: int | None, rule: str) -> int:
    """How many entries of every row (last dim) of a bool mask are True; all rows must agree (the
    encoder batch is rectangular), as `rule` says ("bool_masked_pos must select the same number ...").

    Eager: read from the tensor; rows that disagree raise a ValueError stating `rule`. While tracing
    (`is_tracing`): `expected` (the count the config gives for the mask's shape), checked by an
    assertion inside the graph, so a traced program is specialised to the config's counts and refuses
    masks with others at run time.
    """
    if is_tracing():
        if expected is None:
            raise ValueError(f"{rule}: torch.compile / torch.export need that count from the config, none was given")
        torch._assert_async(
            (mask.sum(dim=-1) == expected).all(), f"{rule}, {expected} as the config says (a traced model keeps its counts)"
        )
        return expected
    counts = mask.sum(dim=-1)
    if (counts != counts.flatten()[0]).any():
        raise ValueError(f"{rule}, got counts {counts.tolist()}")
    return int(counts.flatten()[0])


def indices_from_bool_masked_pos(bool_masked_pos: torch.Tensor, num_masked: int | None = None) -> MaskIndices:
    """Index form of a given mask; visible patches enter in raster order.

    Every row must hide the same number of patches (the encoder batch is rectangular); a mask that
    does not raises a ValueError saying so. `num_masked`: the count the config gives, used instead of
    the mask's own while tracing (see `uniform_count`).
    """
    if bool_masked_pos.ndim != 2:
        raise ValueError(f"bool_masked_pos must have shape (batch, num_patches), got {tuple(bool_masked_pos.shape)}")
    bool_masked_pos = bool_masked_pos.bool()
    rule = "bool_masked_pos must mask the same number of patches in every image"
    len_keep = bool_masked_pos.shape[1] - uniform_count(bool_masked_pos, num_masked, rule)
    ids_shuffle = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return MaskIndices(ids_shuffle[:, :len_keep], ids_restore, bool_masked_pos)


def _on(tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return tensor if device is None else tensor.to(device)


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], note: str = "") -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{note}, got {tuple(tensor.shape)}")


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


class RandomMaskGenerator:
    """Uniform random masking of exactly N - int(N * (1 - mask_ratio)) patches (MAE).

    Mask generators own both ways a mask comes to be: `__call__(generator)`, one example's mask (the
    collator's per-example draw, here a (grid*grid,) bool tensor), and `masks(...)`, a forward's masks
    (given ones checked, else made from `noise`, else drawn; row b of a draw equals the b-th
    per-example draw from the same generator).
    """

    def __init__(self, grid_size: int, mask_ratio: float):
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.num_patches = grid_size * grid_size
        self.mask_ratio = mask_ratio
        check_leaves_visible("mask_ratio", mask_ratio, num_masked_patches(self.num_patches, mask_ratio), self.num_patches)

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.masks(1, generator=generator).bool_masked_pos[0]

    def masks(
        self,
        batch_size: int,
        num_patches: int | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskIndices:
        """A forward's masks over `num_patches` (default: the config's grid): the given `bool_masked_pos`
        (visible patches in raster order), else random masking from `noise` (ascending order kept),
        else from noise drawn with `generator` (torch's global one when None)."""
        shape = (batch_size, self.num_patches if num_patches is None else num_patches)
        if bool_masked_pos is not None:
            check_shape("bool_masked_pos", bool_masked_pos, shape)
            return indices_from_bool_masked_pos(_on(bool_masked_pos, device), num_masked_patches(shape[1], self.mask_ratio))
        if noise is None:
            noise = torch.rand(shape, generator=generator, device=device)
        check_shape("noise", noise, shape)
        return random_masking(_on(noise, device), self.mask_ratio)
