"""Targets and losses shared by the MIM objectives.

Model-zone file (torch + standard library only). Patch vectors use MAE's layout: for each patch,
(row-in-patch, column-in-patch, channel) flattened, patches in raster order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C)."""
    batch_size, channels, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image of size {height}x{width} is not a multiple of patch_size={patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch_size, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch_size, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], num_channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
    batch_size = patches.shape[0]
    grid_h, grid_w = grid_size
    if patches.shape[1] != grid_h * grid_w or patches.shape[2] != patch_size * patch_size * num_channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {grid_h}x{grid_w} grid of "
            f"{patch_size}x{patch_size}x{num_channels} patches"
        )
    images = patches.reshape(batch_size, grid_h, grid_w, patch_size, patch_size, num_channels)
    images = images.permute(0, 5, 1, 3, 2, 4)
    return images.reshape(batch_size, num_channels, grid_h * patch_size, grid_w * patch_size)


def normalize_per_token(tokens: torch.Tensor, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the last dim, no affine.

    Both dBOT's teacher targets (`norm_feature_loss`) and MAE's norm-pix targets use torch's default
    *unbiased* variance; `F.layer_norm` would use the biased one and change the loss by ~D/(D-1).
    """
    mean = tokens.mean(dim=-1, keepdim=True)
    var = tokens.var(dim=-1, keepdim=True, unbiased=unbiased)
    return (tokens - mean) / torch.sqrt(var + eps)


def pixel_targets(pixel_values: torch.Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch pixel targets (B, N, p*p*C), normalised per patch when `norm_pix` (MAE's norm_pix_loss)."""
    target = patchify(pixel_values, patch_size)
    return normalize_per_token(target, eps=eps) if norm_pix else target


def unnormalize_per_token(normalized: torch.Tensor, reference: torch.Tensor, eps: float, unbiased: bool = True) -> torch.Tensor:
    """Inverse of `normalize_per_token` with `reference`'s statistics: normalized * sqrt(var + eps) + mean."""
    mean = reference.mean(dim=-1, keepdim=True)
    var = reference.var(dim=-1, keepdim=True, unbiased=unbiased)
    return normalized * torch.sqrt(var + eps) + mean


def predictions_to_pixels(
    predictions: torch.Tensor,
    raw_patches: torch.Tensor,
    patch_size: int,
    grid_size: tuple[int, int],
    num_channels: int,
    norm_eps: float | None,
    unbiased: bool = True,
    patch_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel predictions (B, K, p*p*C) back to images (B, C, H, W) in the input's pixel space, for pictures.

    Targets normalised per patch (`norm_eps` not None: norm-pix / LayerNorm-without-affine targets) are
    un-normalised with the true patches' statistics (`raw_patches` (B, N, p*p*C), as MAE's
    visualisations do). `patch_ids` (B, K): the patches the K predictions belong to (others stay 0);
    None: all N in raster order.
    """
    pixels = predictions.float()
    raw = raw_patches.float()
    if patch_ids is not None:
        raw = torch.gather(raw, 1, patch_ids.unsqueeze(-1).expand(-1, -1, raw.shape[-1]))
    if norm_eps is not None:
        pixels = unnormalize_per_token(pixels, raw, norm_eps, unbiased)
    if patch_ids is not None:
        full = torch.zeros_like(raw_patches, dtype=torch.float32)
        pixels = full.scatter(1, patch_ids.unsqueeze(-1).expand(-1, -1, full.shape[-1]), pixels)
    return unpatchify(pixels, patch_size, grid_size, num_channels)


def smooth_l1(prediction: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth-L1: 0.5 d^2 / beta where |d| < beta, |d| - 0.5 beta elsewhere (torch's SmoothL1Loss)."""
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=beta)


LOSSES = ("mse", "l1", "smooth_l1")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss: str, beta: float = 1.0) -> torch.Tensor:
    """The one loss selector: element-wise "mse" (d^2), "l1" (|d|) or "smooth_l1" (with `beta`)."""
    if loss == "mse":
        return (prediction - target) ** 2
    if loss == "l1":
        return (prediction - target).abs()
    if loss == "smooth_l1":
        return smooth_l1(prediction, target, beta)
    raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, got {loss!r}")


def weighted_token_mean(per_token_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(loss * w) / sum(w) over (B, N) tokens: the loss over masked positions only."""
    weights = weights.to(per_token_loss.dtype)
    return (per_token_loss * weights).sum() / weights.sum().clamp_min(torch.finfo(per_token_loss.dtype).tiny)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MAE's loss: mean squared error per token (over channels), averaged over the weighted tokens."""
    return weighted_token_mean(elementwise_loss(prediction, target, "mse").mean(dim=-1), weights)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE per sample: ||q/|q| - k/|k|||^2 = 2 - 2 cos(q, k), over the last dim."""
    prediction = F.normalize(prediction, dim=-1)
    target = F.normalize(target, dim=-1)
    return ((prediction - target) ** 2).sum(dim=-1)
