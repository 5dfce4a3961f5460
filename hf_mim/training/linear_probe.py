"""MAE-style linear probing: a frozen backbone, a BatchNorm (no affine) in front of the linear head
during training, and the BatchNorm folded into the Linear at the end.

    head = attach_batchnorm_probe(model)            # model.classifier = Sequential(BN(affine=False), Linear)
    trainable = freeze_backbone(model)              # only the head keeps requires_grad
    linear_probe_train_mode(model)                  # backbone in eval mode (no drop path), head in train mode
    ... train ...
    fold_batchnorm_probe(model)                     # model.classifier is a plain nn.Linear again

MAE (`main_linprobe.py`) puts `BatchNorm1d(hidden, affine=False, eps=1e-6)` before the head to
normalise the frozen features and trains only that head with LARS. In eval mode the BatchNorm is a
fixed affine map, `(x - running_mean) / sqrt(running_var + eps)`, so it folds exactly into the
Linear: the saved checkpoint is then an ordinary `...ForImageClassification` that loads anywhere
(also with `trust_remote_code=True`, without hf_mim).
"""

from __future__ import annotations

import torch
from torch import nn


def _head(model: nn.Module, head_name: str) -> nn.Module:
    head = getattr(model, head_name, None)
    if head is None:
        raise AttributeError(f"{type(model).__name__} has no head module {head_name!r}")
    return head


def attach_batchnorm_probe(
    model: nn.Module, head_name: str = "classifier", eps: float = 1e-6, init_std: float | None = 0.01
) -> nn.Sequential:
    """Replace `model.<head_name>` (an nn.Linear) by `Sequential(BatchNorm1d(in, affine=False, eps), Linear)`.

    The Linear is re-initialised (trunc-normal weight with std `init_std`, zero bias), as MAE does for
    linear probing: a head trained on unnormalised features means nothing behind a BatchNorm. Pass
    `init_std=None` to keep its weights. Returns the new head (on the Linear's device and dtype).
    """
    linear = _head(model, head_name)
    if isinstance(linear, nn.Sequential) and len(linear) == 2 and isinstance(linear[0], nn.BatchNorm1d):
        raise ValueError(f"{type(model).__name__}.{head_name} already is a BatchNorm probe")
    if not isinstance(linear, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}.{head_name} is {type(linear).__name__}, not nn.Linear: "
            "a linear probe needs num_labels > 0"
        )
    if init_std is not None:
        with torch.no_grad():
            nn.init.trunc_normal_(linear.weight, std=init_std)
            if linear.bias is not None:
                linear.bias.zero_()
    norm = nn.BatchNorm1d(linear.in_features, affine=False, eps=eps).to(
        device=linear.weight.device, dtype=linear.weight.dtype
    )
    probe = nn.Sequential(norm, linear)
    setattr(model, head_name, probe)
    return probe


def freeze_backbone(model: nn.Module, head_name: str = "classifier") -> list[str]:
    """`requires_grad=False` for every parameter outside `model.<head_name>`; returns the trainable names."""
    model.requires_grad_(False)
    _head(model, head_name).requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]


def linear_probe_train_mode(model: nn.Module, training: bool = True, head_name: str = "classifier") -> nn.Module:
    """Backbone in eval mode (no drop path / dropout, frozen statistics), the head in `training` mode
    (its BatchNorm uses and updates batch statistics while training)."""
    model.train(False)
    _head(model, head_name).train(training)
    return model


@torch.no_grad()
def fold_batchnorm_probe(model: nn.Module, head_name: str = "classifier") -> nn.Linear:
    """Fold the BatchNorm of `attach_batchnorm_probe` into its Linear and put a plain nn.Linear back at
    `model.<head_name>`, equal to the probe in eval mode:

        W' = W * s,  b' = b + W @ t,   with s = gamma / sqrt(running_var + eps), t = beta - running_mean * s

    (gamma = 1, beta = 0 without affine). Computed in float64, stored in the Linear's dtype.
    Returns the new Linear (requires_grad follows the old one).
    """
    probe = _head(model, head_name)
    if not (isinstance(probe, nn.Sequential) and len(probe) == 2 and isinstance(probe[0], nn.BatchNorm1d)
            and isinstance(probe[1], nn.Linear)):
        raise TypeError(
            f"{type(model).__name__}.{head_name} is not a BatchNorm probe (Sequential(BatchNorm1d, Linear)); "
            f"got {type(probe).__name__}"
        )
    norm, linear = probe[0], probe[1]
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("the probe's BatchNorm1d keeps no running statistics (track_running_stats=False): cannot fold")
    weight = linear.weight.double()
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        scale = scale * norm.weight.double()
        shift = shift * norm.weight.double() + norm.bias.double()
    bias = linear.bias.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    folded = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device, dtype=linear.weight.dtype)
    folded.weight.copy_(weight * scale.unsqueeze(0))
    folded.bias.copy_(bias + weight @ shift)
    folded.requires_grad_(linear.weight.requires_grad)
    setattr(model, head_name, folded)
    return folded


__all__ = ["attach_batchnorm_probe", "fold_batchnorm_probe", "freeze_backbone", "linear_probe_train_mode"]
