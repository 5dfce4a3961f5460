"""Official dBOT checkpoints (github.com/liuxingbin/dbot) -> hf_mim Dbot models.

Layouts handled (state under the top-level "model" key, no `module.` prefix):
- pretraining student `checkpoint-*.pth` / `*_dbot_*_pre.pth`: encoder + decoder (`decoder_predp`);
- teacher `checkpoint-teacher-*.pth`: encoder keys only (its final `norm` is unused, tlayernorm=0);
- fine-tuned `*_finetune.pth`: timm ViT with `fc_norm` + `head` (global pooling), no final `norm`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..configuration_dbot import DbotConfig
from ..modeling_dbot import DbotForImageClassification, DbotForMaskedImageModeling
from .common import (
    CheckpointFormatError,
    ConversionReport,
    MAE_DECODER_HEADS,
    VIT_BLOCK_PARTS,
    VIT_HEADS_BY_WIDTH,
    check_decoder_sincos_table,
    count_indexed,
    rename_keys,
)


def encoder_rules(prefix: str) -> list[tuple[str, str]]:
    return [
        (r"cls_token", f"{prefix}embeddings.cls_token"),
        (r"pos_embed", f"{prefix}embeddings.position_embeddings"),
        (r"patch_embed\.proj\.(weight|bias)", rf"{prefix}embeddings.patch_embeddings.projection.\1"),
        (rf"blocks\.(\d+)\.{VIT_BLOCK_PARTS}", rf"{prefix}layers.\1.\2.\3"),
        (r"norm\.(weight|bias)", rf"{prefix}layernorm.\1"),
    ]


DECODER_RULES = [
    (r"decoder_embed\.(weight|bias)", r"decoder.decoder_embed.\1"),
    (r"mask_token", r"decoder.mask_token"),
    (rf"decoder_blocks\.(\d+)\.{VIT_BLOCK_PARTS}", r"decoder.layers.\1.\2.\3"),
    (r"decoder_norm\.(weight|bias)", r"decoder.decoder_norm.\1"),
    (r"decoder_predp\.(weight|bias)", r"decoder.decoder_pred.\1"),
]

CLASSIFIER_RULES = [
    (r"fc_norm\.(weight|bias)", r"dbot.pooler.fc_norm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]

FIXED_TABLE = {r"decoder_pos_embed": "fixed sin-cos table, recomputed by hf_mim (checked equal)"}


def is_classifier_state(state: Mapping[str, torch.Tensor]) -> bool:
    return "head.weight" in state


def infer_config(
    state: Mapping[str, torch.Tensor],
    teacher_state: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> DbotConfig:
    """Read every dimension the weights determine; heads come from the official size table."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointFormatError(f"not a dBOT/MAE ViT checkpoint: key {key!r} is missing")
    hidden = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"pos_embed has {num_patches} patch rows, not a square grid")
    kwargs: dict[str, object] = dict(
        image_size=grid * patch_weight.shape[-1],
        patch_size=patch_weight.shape[-1],
        num_channels=patch_weight.shape[1],
        hidden_size=hidden,
        num_hidden_layers=count_indexed(state, "blocks."),
        num_attention_heads=VIT_HEADS_BY_WIDTH.get(hidden),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in state else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in state or count_indexed(state, "blocks.") == 0,
    )
    if "decoder_embed.weight" in state:
        kwargs.update(
            decoder_hidden_size=state["decoder_embed.weight"].shape[0],
            decoder_num_hidden_layers=count_indexed(state, "decoder_blocks."),
            decoder_num_attention_heads=MAE_DECODER_HEADS,
        )
    kwargs["teacher_depth"] = (
        count_indexed(teacher_state, "blocks.") if teacher_state is not None else kwargs["num_hidden_layers"]
    )
    if is_classifier_state(state):
        kwargs["num_labels"] = state["head.weight"].shape[0]
    kwargs.update(overrides or {})
    if kwargs["num_attention_heads"] is None:
        raise CheckpointFormatError(
            f"hidden size {hidden} is not an official dBOT width; pass num_attention_heads=... in --config_overrides"
        )
    return DbotConfig(**kwargs)


def convert_dbot_checkpoint(
    state: Mapping[str, torch.Tensor],
    teacher_state: Mapping[str, torch.Tensor] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[DbotForMaskedImageModeling | DbotForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the official weights; fine-tuned files give the classifier."""
    config = infer_config(state, teacher_state, overrides)
    report = ConversionReport()
    if is_classifier_state(state):
        if teacher_state is not None:
            raise CheckpointFormatError("a fine-tuned (classifier) checkpoint takes no teacher checkpoint")
        converted = rename_keys(state, encoder_rules("dbot.encoder.") + CLASSIFIER_RULES, report=report)
        model: DbotForMaskedImageModeling | DbotForImageClassification = DbotForImageClassification(config)
    else:
        if "decoder_predp.weight" not in state:
            raise CheckpointFormatError(
                "not a dBOT pretraining checkpoint: `decoder_predp` is missing (a MAE pixel decoder has `decoder_pred`)"
            )
        check_decoder_sincos_table(state, config)
        converted = rename_keys(state, encoder_rules("dbot.encoder.") + DECODER_RULES, FIXED_TABLE, report)
        if teacher_state is not None:
            teacher_drop = {} if config.teacher_use_final_norm else {
                r"norm\.(weight|bias)": "teacher final norm is not applied (official tlayernorm=0)"
            }
            teacher_report = ConversionReport()
            converted.update(rename_keys(teacher_state, encoder_rules("teacher."), teacher_drop, teacher_report))
            report.converted += [f"teacher:{key}" for key in teacher_report.converted]
            report.dropped.update({f"teacher:{key}": why for key, why in teacher_report.dropped.items()})
        model = DbotForMaskedImageModeling(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise CheckpointFormatError(f"converted keys unknown to {type(model).__name__}: {unexpected[:10]}")
    if isinstance(model, DbotForMaskedImageModeling) and teacher_state is None:
        # No teacher file: the teacher starts as a copy of the student, as at a stage boundary.
        student = model.dbot.encoder.state_dict()
        model.teacher.load_state_dict({k: v for k, v in student.items() if k in model.teacher.state_dict()})
        missing = [key for key in missing if not key.startswith("teacher.")]
        report.dropped["<teacher>"] = "no teacher checkpoint given: teacher = copy of the student encoder"
    if missing:
        raise CheckpointFormatError(f"the official checkpoint lacks weights for: {missing[:10]}")
    return model, report
