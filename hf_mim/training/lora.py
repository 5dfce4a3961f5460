"""LoRA fine-tuning (`peft`, the optional `hf_mim[peft]` extra) of any hf_mim classifier, as
run_image_classification.py's `--lora_rank` runs it.

Targets. Every hf_mim method's attention projects queries, keys and values with one fused Linear named
`qkv` (rows [q; k; v]): `encoder.layers.i.attn.qkv` in the ViTs of dBOT, ExtreMA, MaskDistill and AMT,
`...levels.j.blocks.i.attn.qkv` in RevColV2's columns. The default target is that `qkv` of every block;
other Linears are named by their last name part (`proj`, `fc1`, `fc2`, ...; `available_targets` lists a
model's). The classifier head is trained fully (peft's `modules_to_save`); everything else is frozen.

Only q and v (`qkv_parts=("q", "v")`, the usual ViT recipe: LoRA on `query` and `value`). Splitting the
fused Linear into three would change every checkpoint's keys and the model-zone code; LoRA on the whole
`qkv` with rank r is not the recipe either (one A shared by q, k and v, and k adapted). So the update is
restricted instead: the `qkv` adapter gets rank r x (number of parts), its A is [A_q; A_v] stacked, and
its B (3d x 2r) is kept block-structured by a fixed 0/1 mask (zero at initialisation, gradients masked):
rows of q use only A_q's columns, rows of v only A_v's, rows of k nothing. Then B A = [B_q A_q; 0; B_v A_v],
exactly two independent rank-r adapters on q and v with the recipe's scale alpha / r (peft's alpha is
given x parts to keep it). The adapter stays a standard peft LoRA adapter (loadable by plain peft; the
masked entries are stored zeros), and merging is peft's. Differences from two separate Linears: one
dropout mask on the input is shared by the parts, and the stored (not the trained) parameter count
includes the fixed zeros; the logged count is the effective one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .run_setup import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("qkv",)
FUSED_QKV = "qkv"
QKV_PARTS = ("q", "k", "v")  # row blocks of the fused projection, in order
ADAPTER_FOLDER = "lora_adapter"


def _target_name(module_name: str) -> str:
    """The name a target is given by: the last part ('qkv', 'fc1'), or the last two when the last is an
    index ('up.0' of a Sequential)."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def available_targets(model, head_name: str = "classifier") -> list[str]:
    """The Linear layers of `model` outside its head, by target name, sorted."""
    return sorted({
        _target_name(name) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != head_name and not name.startswith(head_name + ".")
    })


def import_peft():
    """peft, or a MissingExtraError (a one-line run error) naming the `peft` extra."""
    from ..utils.extras import require

    return require("peft", "peft", "--lora_rank")


def check_lora_flags(args, parser) -> None:
    """One parser-error line per bad LoRA flag (the model-dependent target names are checked in `apply_lora`)."""
    if args.lora_rank is None:
        given = [flag for flag in ("lora_alpha", "lora_dropout", "lora_target_modules", "lora_qkv_parts")
                 if getattr(args, flag) is not None]
        if given:
            parser.error(f"--{given[0]} needs --lora_rank")
        return
    if args.lora_rank <= 0:
        parser.error(f"--lora_rank must be a positive integer, got {args.lora_rank}")
    if args.mode != "finetune":
        parser.error(f"--lora_rank is a fine-tuning recipe: use it with --mode finetune, not --mode {args.mode}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        parser.error(f"--lora_alpha must be > 0, got {args.lora_alpha}")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    parts = args.lora_qkv_parts or []
    if len(set(parts)) != len(parts):
        parser.error(f"--lora_qkv_parts lists a part twice: {' '.join(parts)}")
    if parts and FUSED_QKV not in (args.lora_target_modules or DEFAULT_TARGET_MODULES):
        parser.error("--lora_qkv_parts restricts the adapter of the fused 'qkv' projection: keep qkv in --lora_target_modules")


def apply_lora(model, rank: int, alpha: float | None = None, dropout: float = 0.0, target_modules=None,
               qkv_parts=None, head_name: str = "classifier"):
    """`model` (a ...ForImageClassification) wrapped as a peft `PeftModel`: LoRA of rank `rank` and scale
    `alpha / rank` (alpha default: rank, a scale of 1) on `target_modules` (default: every `qkv`), the
    head trained fully, everything else frozen. `qkv_parts` (a subset of q, k, v): the `qkv` update
    restricted to those parts, one rank-`rank` adapter each (see the module docstring)."""
    peft = import_peft()
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    known = available_targets(model, head_name)
    unknown = [name for name in targets if name not in known]
    if unknown:
        raise UserInputError(f"--lora_target_modules {unknown[0]!r} is not a Linear of {type(model).__name__}; "
                             f"available: {', '.join(known)}")
    alpha = float(rank if alpha is None else alpha)
    parts = tuple(part for part in QKV_PARTS if part in (qkv_parts or ()))  # in row order
    patterns = {}
    if parts:
        patterns = dict(rank_pattern={FUSED_QKV: rank * len(parts)}, alpha_pattern={FUSED_QKV: alpha * len(parts)})
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=[head_name], bias="none", **patterns)
    peft_model = peft.get_peft_model(model, config)
    if parts:
        restrict_qkv_update(peft_model, parts, rank)
    peft_model.lora_qkv_parts, peft_model.lora_rank = parts, rank
    return peft_model


def qkv_part_mask(out_features: int, parts: tuple[str, ...], rank: int) -> torch.Tensor:
    """(out_features, rank x len(parts)) 0/1 mask of lora_B: the rows of part i (its third of the fused
    projection) use only columns [i r, (i + 1) r)."""
    dim = out_features // len(QKV_PARTS)
    mask = torch.zeros(out_features, rank * len(parts))
    for column, part in enumerate(parts):
        row = QKV_PARTS.index(part)
        mask[row * dim:(row + 1) * dim, column * rank:(column + 1) * rank] = 1
    return mask


def _fused_qkv_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] == FUSED_QKV]


def restrict_qkv_update(peft_model, parts: tuple[str, ...], rank: int) -> None:
    """Keep every `qkv` adapter's B block-structured: the masked entries are zeroed now and their
    gradients masked (a tensor hook, so DDP reduces and the optimizer sees masked gradients: AdamW and
    SGD leave an entry that starts at 0 and never gets a gradient at 0, weight decay included)."""
    for _, module in _fused_qkv_layers(peft_model):
        for adapter in module.lora_B.values():
            weight = adapter.weight
            mask = qkv_part_mask(weight.shape[0], parts, rank).to(weight.device, weight.dtype)
            with torch.no_grad():
                weight.mul_(mask)
            weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device, grad.dtype))


def lora_parameter_counts(peft_model) -> dict:
    """{'adapter': trained LoRA entries (without the fixed zeros of a q/k/v restriction), 'head': the
    fully trained head, 'stored': every requires-grad entry, 'total': the model's own parameters}."""
    parts, rank = getattr(peft_model, "lora_qkv_parts", ()), getattr(peft_model, "lora_rank", None)
    trainable = [(name, p) for name, p in peft_model.named_parameters() if p.requires_grad]
    stored = sum(p.numel() for _, p in trainable)
    lora = sum(p.numel() for name, p in trainable if ".lora_" in name)
    fixed_zeros = 0
    if parts:
        for _, module in _fused_qkv_layers(peft_model):
            for adapter in module.lora_B.values():
                fixed_zeros += adapter.weight.numel() - int(qkv_part_mask(adapter.weight.shape[0], parts, rank).sum())
    base = sum(p.numel() for name, p in peft_model.named_parameters() if ".lora_" not in name and ".modules_to_save." not in name)
    return {"adapter": lora - fixed_zeros, "head": stored - lora, "stored": stored, "total": base}


def describe_lora(peft_model) -> str:
    """The one log line: trainable parameters (effective), of the total, and what they are."""
    counts = lora_parameter_counts(peft_model)
    config = peft_model.peft_config["default"]
    trained = counts["adapter"] + counts["head"]
    targets = ", ".join(sorted(config.target_modules))
    parts = getattr(peft_model, "lora_qkv_parts", ())
    where = targets + (f" (qkv restricted to {'+'.join(parts)})" if parts else "")
    return (f"LoRA rank {peft_model.lora_rank} (alpha {config.lora_alpha:g}) on {where}: {trained:,} trainable parameters "
            f"of {counts['total']:,} ({100 * trained / counts['total']:.2f}%): adapter {counts['adapter']:,}, "
            f"head {counts['head']:,}")


def save_adapter_and_merge(peft_model, output_dir: str | Path):
    """Save the adapter alone (and the trained head) to `output_dir/lora_adapter/` (peft's format: load
    it with `PeftModel.from_pretrained(base, folder)`), then return the plain model with the update merged
    into its weights (peft's `merge_and_unload`): a normal ...ForImageClassification, loaded and exported
    without peft."""
    folder = Path(output_dir) / ADAPTER_FOLDER
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload()


__all__ = [
    "ADAPTER_FOLDER", "DEFAULT_TARGET_MODULES", "QKV_PARTS", "apply_lora", "available_targets", "check_lora_flags",
    "describe_lora", "import_peft", "lora_parameter_counts", "qkv_part_mask", "restrict_qkv_update",
    "save_adapter_and_merge",
]
