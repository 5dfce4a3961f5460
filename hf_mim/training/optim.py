"""Parameter groups (weight decay, layer-wise lr decay) and the AdamW the MIM recipes use.

Every group carries `"weight_decay"`, `"lr_scale"` (read by the schedulers in `schedule.py`:
`lr = base_lr * lr_scale * factor(step)`) and `"param_names"` (the same key torch writes for named
parameters, so it lands in the optimizer's state dict and makes checkpoints readable).
Only trainable parameters (`requires_grad=True`) are grouped: frozen ones (a dBOT teacher, the fixed
sin-cos position table during pretraining) never reach the optimizer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

DEFAULT_SKIP_NAMES: tuple[str, ...] = (
    "cls_token",
    "mask_token",
    "position_embeddings",
    "pos_embed",
    "gamma",
    "relative_position_bias_table",
)

# A block of the encoder: `layers.3.`, `layer.3.` (transformers ViT) or `blocks.3.` (timm / official code).
_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)\.")
# A decoder module (`decoder.`, `decoder_embed.`, `decoder_blocks.`): its blocks are not encoder blocks.
_DECODER_RE = re.compile(r"(?:^|\.)decoder[^.]*\.")
_EMBEDDING_LEAVES = frozenset({"cls_token", "pos_embed", "mask_token", "dist_token", "position_embeddings"})


def is_no_decay(name: str, param: torch.Tensor, skip_names: Sequence[str] = DEFAULT_SKIP_NAMES) -> bool:
    """True for 1-D parameters (norms, biases, layer scale) and names containing a `skip_names` entry."""
    return param.ndim <= 1 or any(skip in name for skip in skip_names)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return named


def weight_decay_param_groups(
    model: nn.Module, weight_decay: float, skip_names: Sequence[str] = DEFAULT_SKIP_NAMES
) -> list[dict]:
    """Two groups over the trainable parameters: decayed (2-D+ weights) and not decayed (1-D params and
    names containing any `skip_names` substring). Empty groups are left out."""
    decay: dict = {"params": [], "param_names": [], "weight_decay": float(weight_decay), "lr_scale": 1.0}
    no_decay: dict = {"params": [], "param_names": [], "weight_decay": 0.0, "lr_scale": 1.0}
    for name, param in _trainable(model):
        group = no_decay if is_no_decay(name, param, skip_names) else decay
        group["params"].append(param)
        group["param_names"].append(name)
    return [group for group in (decay, no_decay) if group["params"]]


def vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT/MAE `get_layer_id_for_vit` on hf_mim (and transformers/timm) names.

    0: embeddings (cls/mask/position tokens, patch embedding, anything under `embeddings`);
    i + 1: encoder block i (`layers.i.`, `layer.i.`, `blocks.i.`, but not a decoder's blocks);
    num_layers + 1: everything else (final norm, pooler/fc_norm, classifier head, decoder).
    """
    if _DECODER_RE.search(name):
        return num_layers + 1
    match = _BLOCK_RE.search(name)
    if match:
        block = int(match.group(1))
        if block >= num_layers:
            raise ValueError(f"parameter {name!r} is in encoder block {block}, but num_layers={num_layers}")
        return block + 1
    leaf = name.rsplit(".", 1)[-1]
    if "embeddings" in name or "patch_embed" in name or leaf in _EMBEDDING_LEAVES:
        return 0
    return num_layers + 1


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
    layer_id_fn: Callable[[str], int] | None = None,
    skip_names: Sequence[str] = DEFAULT_SKIP_NAMES,
) -> list[dict]:
    """BEiT/MAE `param_groups_lrd`: one group per (layer id, decay or not), with
    `lr_scale = layer_decay ** (num_layers + 1 - layer_id)` (embeddings smallest, head 1.0).

    `layer_id_fn(name) -> int` replaces `vit_layer_id` for other architectures; ids must lie in
    `[0, num_layers + 1]`. Groups come sorted by (layer id, decay first) and also carry `"layer_id"`.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    layer_of = layer_id_fn if layer_id_fn is not None else (lambda name: vit_layer_id(name, num_layers))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in _trainable(model):
        layer_id = int(layer_of(name))
        if not 0 <= layer_id <= num_layers + 1:
            raise ValueError(
                f"parameter {name!r} got layer id {layer_id}, outside [0, {num_layers + 1}]: "
                f"is num_layers={num_layers} the encoder depth?"
            )
        no_decay = is_no_decay(name, param, skip_names)
        group = groups.setdefault(
            (layer_id, no_decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr_scale": float(layer_decay ** (num_layers + 1 - layer_id)),
                "layer_id": layer_id,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_adamw(
    param_groups: Iterable[dict] | Iterable[torch.Tensor],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (their own `weight_decay` wins over the `weight_decay` default).

    Every group starts at `lr`; the schedulers multiply by each group's `lr_scale`. The fused kernel is
    requested only when every parameter is on CUDA; otherwise torch picks its default (foreach/for-loop).
    """
    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if not params:
        raise ValueError("build_adamw got no parameters")
    fused = True if all(p.is_cuda for p in params) else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
