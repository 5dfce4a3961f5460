"""MaskDistill checkpoints in the BEiT v2 layout (microsoft/unilm/beit2) -> hf_mim MaskDistill models.

No official MaskDistill weights exist; the author's code base is BEiT v2, and the public
re-implementation checkpoints (drkostas/MaskDistill-PyTorch) use its key names. Layouts handled
(state under "model", `module.` stripped; a `student.` prefix is stripped too):
- pretraining `VisionTransformerForMaskedImageModeling` (shared `rel_pos_bias`, `lm_head` to the teacher
  width) -> `MaskDistillForMaskedImageModeling`;
- fine-tuning `modeling_finetune.VisionTransformer` (per-block relative tables, `fc_norm`, `head`) ->
  `MaskDistillForImageClassification`.
And the teacher: an OpenAI CLIP image tower (`visual.*` keys) -> a `CLIPVisionModelWithProjection` folder
(with CLIP's mean/std in its preprocessor_config.json) that `teacher_name_or_path` can point at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from ..configuration_maskdistill import MaskDistillConfig
from ..relative_position import relative_position_index
from ..modeling_maskdistill import MaskDistillForImageClassification, MaskDistillForMaskedImageModeling
from .common import (
    CheckpointFormatError,
    ConversionReport,
    OfficialFile,
    Settings,
    VIT_BLOCK_PARTS,
    count_indexed,
    merge_qkv_bias,
    rename_keys,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

P = "maskdistill.encoder."

STUDENT_RULES = [
    (r"cls_token", P + "embeddings.cls_token"),
    (r"mask_token", P + "embeddings.mask_token"),
    (r"patch_embed\.proj\.(weight|bias)", P + r"embeddings.patch_embeddings.projection.\1"),
    (r"rel_pos_bias\.relative_position_bias_table", P + "rel_pos_bias.relative_position_bias_table"),
    (rf"blocks\.(\d+)\.{VIT_BLOCK_PARTS}", P + r"layers.\1.\2.\3"),
    (r"blocks\.(\d+)\.gamma_1", P + r"layers.\1.ls1.gamma"),
    (r"blocks\.(\d+)\.gamma_2", P + r"layers.\1.ls2.gamma"),
    (r"blocks\.(\d+)\.attn\.relative_position_bias_table", P + r"layers.\1.rel_pos_bias.relative_position_bias_table"),
    (r"norm\.(weight|bias)", P + r"layernorm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
    (r"fc_norm\.(weight|bias)", r"maskdistill.pooler.fc_norm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]

DROP = {
    r"(rel_pos_bias|blocks\.\d+\.attn)\.relative_position_index": "fixed index, recomputed by hf_mim (checked equal)",
    r"blocks\.\d+\.attn\.(q_bias|v_bias)": "merged into attn.qkv.bias as [q_bias; 0; v_bias]",
    r"blocks\.\d+\.attn\.k_bias": "BEiT's k bias is a zero buffer (merged as 0)",
}


def is_classifier_state(state: Mapping[str, torch.Tensor]) -> bool:
    return "head.weight" in state


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a `student.` prefix (re-implementation checkpoints); refuse teacher/other keys silently mixed in."""
    if any(key.startswith("student.") for key in state):
        return {key[len("student.") :]: value for key, value in state.items() if key.startswith("student.")}
    return dict(state)


def mask_ratio_for(count: int, num_patches: int) -> float:
    """The ratio whose `int(ratio * num_patches)` is exactly `count` (BEiT's --num_mask_patches)."""
    ratio = count / num_patches
    return ratio if int(ratio * num_patches) == count else (count + 0.5) / num_patches


def infer_config(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, object] | None = None, official: OfficialFile | None = None
) -> tuple[MaskDistillConfig, Settings]:
    """Every dimension from the weights (heads from the relative position table's width); masking, drop
    path and layer scale from the file's BEiT v2 `args` where it has them."""
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointFormatError(f"not a BEiT v2 / MaskDistill ViT checkpoint: key {key!r} is missing")
    settings = Settings(official, overrides)
    table_key = next(
        (key for key in ("rel_pos_bias.relative_position_bias_table", "blocks.0.attn.relative_position_bias_table") if key in state), None
    )
    if table_key is None:
        raise CheckpointFormatError("no relative position bias table: not a BEiT v2 / MaskDistill checkpoint")
    table = state[table_key]
    side = math.isqrt(table.shape[0] - 3)
    if side * side != table.shape[0] - 3 or side % 2 == 0:
        raise CheckpointFormatError(f"relative position table with {table.shape[0]} rows is not for a square grid")
    grid = (side + 1) // 2
    if "pos_embed" in state:
        raise CheckpointFormatError("absolute position embeddings are not part of the MaskDistill student layout")
    hidden = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    settings.weights("image_size", grid * patch_weight.shape[-1], f"{table_key} rows ({grid}x{grid} grid)")
    settings.weights("patch_size", patch_weight.shape[-1], "patch_embed.proj kernel")
    settings.weights("num_channels", patch_weight.shape[1], "patch_embed.proj input channels")
    settings.weights("hidden_size", hidden, "cls_token width")
    settings.weights("num_hidden_layers", count_indexed(state, "blocks."), "blocks.*")
    settings.weights("num_attention_heads", table.shape[1], f"{table_key} columns")
    if "blocks.0.mlp.fc1.weight" in state:
        settings.weights("mlp_ratio", state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, "blocks.0.mlp.fc1 width / hidden")
    if "lm_head.weight" in state:
        settings.weights("teacher_hidden_size", state["lm_head.weight"].shape[0], "lm_head rows")
    if is_classifier_state(state):
        settings.weights("num_labels", state["head.weight"].shape[0], "head rows")
        settings.weights("use_mean_pooling", "fc_norm.weight" in state, "fc_norm present" if "fc_norm.weight" in state else "no fc_norm")
    else:
        settings.from_file(
            "mask_ratio", "args.num_mask_patches", transform=lambda count: mask_ratio_for(count, grid * grid),
            why=f"of {grid * grid} patches",
        )
        settings.from_file("mask_min_num_patches", "args.min_mask_patches_per_block")
    settings.from_file("drop_path_rate", "args.drop_path")
    settings.from_file("layer_scale_init_value", "args.layer_scale_init_value")
    return MaskDistillConfig(**settings.finish()), settings


def check_index(state: Mapping[str, torch.Tensor], grid: int) -> None:
    expected = relative_position_index(grid, grid)
    for key, value in state.items():
        if key.endswith("relative_position_index") and not torch.equal(value.long(), expected):
            raise CheckpointFormatError(f"{key} is not BEiT's relative position index for a {grid}x{grid} grid")


def convert_maskdistill_checkpoint(
    state: Mapping[str, torch.Tensor] | OfficialFile, overrides: Mapping[str, object] | None = None
) -> tuple[MaskDistillForMaskedImageModeling | MaskDistillForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the weights; a fine-tuning state dict gives the classifier."""
    official = state if isinstance(state, OfficialFile) else None
    state = strip_prefix(official.state if official else state)
    config, settings = infer_config(state, overrides, official)
    check_index(state, config.grid_size)
    report = ConversionReport(source=official)
    report.record_config(config, settings)
    converted = rename_keys(state, STUDENT_RULES, DROP, report)
    converted.update(merge_qkv_bias(state, P + "layers."))
    if is_classifier_state(state):
        model: MaskDistillForMaskedImageModeling | MaskDistillForImageClassification = MaskDistillForImageClassification(config)
        shared = P + "rel_pos_bias.relative_position_bias_table"
        if shared not in converted:  # the unused loading place of the shared table: keep layer 0's
            converted[shared] = converted[P + "layers.0.rel_pos_bias.relative_position_bias_table"].clone()
            report.dropped["<rel_pos_bias>"] = "fine-tuning layout: the unused shared table is set to block 0's"
        if converted.pop(P + "embeddings.mask_token", None) is not None:
            report.dropped["mask_token"] = "the classifier has no mask token (it never masks)"
    else:
        if "lm_head.weight" not in state:
            raise CheckpointFormatError("not a MaskDistill pretraining checkpoint: `lm_head` is missing")
        model = MaskDistillForMaskedImageModeling(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise CheckpointFormatError(f"converted keys unknown to {type(model).__name__}: {unexpected[:10]}")
    if missing:
        raise CheckpointFormatError(f"the checkpoint lacks weights for: {missing[:10]}")
    return model, report


# --------------------------------------------------------------------------------------------------
# Teacher: OpenAI CLIP image tower -> transformers CLIPVisionModelWithProjection
# --------------------------------------------------------------------------------------------------


def convert_openai_clip_visual(
    state: Mapping[str, torch.Tensor], num_attention_heads: int | None = None, report: ConversionReport | None = None
):
    """An OpenAI CLIP state dict -> CLIPVisionModelWithProjection (the image tower only).

    Takes a full CLIP state dict (image + text towers, as in OpenAI's `.pt` files; only `visual.*` is
    used, the rest is reported as dropped) or the image tower alone (`visual.` prefix optional). Heads
    default to width // 64 (OpenAI's `build_model`); a tower whose width is no multiple of 64 needs them.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if any(key.startswith("visual.") for key in state):
        others = sorted(key for key in state if not key.startswith("visual."))
        if others and report is not None:
            report.dropped["<teacher text tower>"] = (
                f"{len(others)} tensors outside visual.* (text tower, logit_scale, ...) are not used by MaskDistill"
            )
        state = {key[len("visual.") :]: value for key, value in state.items() if key.startswith("visual.")}
    for key in ("conv1.weight", "class_embedding", "positional_embedding", "proj"):
        if key not in state:
            raise CheckpointFormatError(f"not an OpenAI CLIP image tower: key {key!r} is missing")
    width = state["class_embedding"].shape[0]
    if num_attention_heads is None:
        if width % 64:
            raise CheckpointFormatError(
                f"the CLIP image tower is {width} wide, not a multiple of 64 (OpenAI's heads = width // 64): "
                "pass --teacher_num_attention_heads N"
            )
        num_attention_heads = width // 64
    patch = state["conv1.weight"].shape[-1]
    grid = math.isqrt(state["positional_embedding"].shape[0] - 1)
    layers = count_indexed(state, "transformer.resblocks.")
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=state["conv1.weight"].shape[1],
        projection_dim=state["proj"].shape[1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    v = "vision_model."
    converted = {
        v + "embeddings.class_embedding": state["class_embedding"],
        v + "embeddings.patch_embedding.weight": state["conv1.weight"],
        v + "embeddings.position_embedding.weight": state["positional_embedding"],
        "visual_projection.weight": state["proj"].t().contiguous(),
    }
    for name, target in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for part in ("weight", "bias"):
            converted[f"{v}{target}.{part}"] = state[f"{name}.{part}"]
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, val = state[f"{src}attn.in_proj_{part}"].chunk(3, dim=0)
            converted[f"{dst}self_attn.q_proj.{part}"] = q
            converted[f"{dst}self_attn.k_proj.{part}"] = k
            converted[f"{dst}self_attn.v_proj.{part}"] = val
            converted[f"{dst}self_attn.out_proj.{part}"] = state[f"{src}attn.out_proj.{part}"]
            converted[f"{dst}layer_norm1.{part}"] = state[f"{src}ln_1.{part}"]
            converted[f"{dst}layer_norm2.{part}"] = state[f"{src}ln_2.{part}"]
            converted[f"{dst}mlp.fc1.{part}"] = state[f"{src}mlp.c_fc.{part}"]
            converted[f"{dst}mlp.fc2.{part}"] = state[f"{src}mlp.c_proj.{part}"]
    model = CLIPVisionModelWithProjection(config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointFormatError(f"CLIP conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if report is not None:
        report.converted += [f"teacher:visual.{key}" for key in state]
    return model


def save_teacher_folder(model, folder: str | Path, image_mean=CLIP_MEAN, image_std=CLIP_STD) -> Path:
    """Save a teacher with its own input normalisation (a CLIP image processor) so MaskDistill reads it."""
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    model.save_pretrained(folder)
    size = model.config.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(image_mean), image_std=list(image_std),
    ).save_pretrained(folder)
    return folder
