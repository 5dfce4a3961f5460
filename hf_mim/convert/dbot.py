"""Official dBOT checkpoints (github.com/liuxingbin/dbot) -> hf_mim Dbot models.

Layouts handled (state under the top-level "model" key, no `module.` prefix; `misc.save_model` also saves
the run's `args`, which give the heads, mask ratio and target settings):
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
    OfficialFile,
    Settings,
    VIT_BLOCK_PARTS,
    check_decoder_sincos_table,
    count_indexed,
    mae_decoder_rules,
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


DECODER_RULES = mae_decoder_rules("decoder_predp")  # dBOT names its output projection `decoder_predp`

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
    official: OfficialFile | None = None,
) -> tuple[DbotConfig, Settings]:
    """Dimensions from the weights; heads, mask ratio and the target settings from the file's `args`
    (main_pretrain.py / main_finetune.py), else official defaults (printed as such) or required flags."""
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointFormatError(f"not a dBOT/MAE ViT checkpoint: key {key!r} is missing")
    settings = Settings(official, overrides)
    hidden = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"pos_embed has {num_patches} patch rows, not a square grid")
    depth = count_indexed(state, "blocks.")
    settings.weights("image_size", grid * patch_weight.shape[-1], f"pos_embed {grid}x{grid} patches")
    settings.weights("patch_size", patch_weight.shape[-1], "patch_embed.proj kernel")
    settings.weights("num_channels", patch_weight.shape[1], "patch_embed.proj input channels")
    settings.weights("hidden_size", hidden, "cls_token width")
    settings.weights("num_hidden_layers", depth, "blocks.*")
    if "blocks.0.mlp.fc1.weight" in state:
        settings.weights("mlp_ratio", state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, "blocks.0.mlp.fc1 width / hidden")
    settings.weights("qkv_bias", "blocks.0.attn.qkv.bias" in state or depth == 0, "blocks.0.attn.qkv.bias present")
    settings.encoder_heads(hidden, "args.model")
    settings.mae_decoder(state, "args.model")
    if teacher_state is not None:
        settings.weights("teacher_depth", count_indexed(teacher_state, "blocks."), "teacher file blocks.*")
    else:
        settings.set("teacher_depth", depth, "no teacher file: the student's depth (teacher = copy of the student)")
    if is_classifier_state(state):
        settings.weights("num_labels", state["head.weight"].shape[0], "head rows")
        settings.from_file("drop_path_rate", "args.drop_path")
    else:
        settings.from_file("mask_ratio", "args.mask_ratio")
        settings.from_file("normalize_targets", "args.norm_feature_loss")
        settings.from_file("teacher_use_final_norm", "args.tlayernorm", transform=bool)
        settings.from_file("drop_path_rate", "args.sdpr")
    return DbotConfig(**settings.finish()), settings


def convert_dbot_checkpoint(
    state: Mapping[str, torch.Tensor] | OfficialFile,
    teacher_state: Mapping[str, torch.Tensor] | OfficialFile | None = None,
    overrides: Mapping[str, object] | None = None,
) -> tuple[DbotForMaskedImageModeling | DbotForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the official weights; fine-tuned files give the classifier.
    `state` may be an `OfficialFile` (`read_official_file`), whose `args` then set what the weights cannot."""
    official = state if isinstance(state, OfficialFile) else None
    state = official.state if official else state
    teacher_file = teacher_state if isinstance(teacher_state, OfficialFile) else None
    teacher_state = teacher_file.state if teacher_file else teacher_state
    config, settings = infer_config(state, teacher_state, overrides, official)
    report = ConversionReport(source=official, teacher_source=teacher_file)
    report.record_config(config, settings)
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
