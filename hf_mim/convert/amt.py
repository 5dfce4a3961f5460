"""Official AMT checkpoints (github.com/guijiejie/AMT) -> hf_mim Amt models.

Layouts handled (state under "model" or a raw state dict; a DDP `module.` prefix is stripped by the loader):
- mae-AMT pretraining (`models_mae.MaskedAutoencoderViT`, MAE layout: `cls_token`, `pos_embed`, `blocks.*`,
  `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`,
  `decoder_pred`) -> `AmtForMaskedImageModeling(variant="mae")`;
- mae-AMT fine-tuned (`models_vit.VisionTransformer`, global pool: `fc_norm` + `head`, no `norm`)
  -> `AmtForImageClassification(variant="mae")`;
- SimMIM-AMT pretraining (`SimMIM`: BEiT-style `encoder.*` with q/v biases and `gamma_1`/`gamma_2`, head
  `decoder.0` = 1x1 conv followed by PixelShuffle) -> `AmtForMaskedImageModeling(variant="simmim")`;
- SimMIM-AMT fine-tuned (BEiT-style blocks, `norm` + cls token + `head`)
  -> `AmtForImageClassification(variant="simmim")`.

The released SimMIM-AMT `Block.forward` never multiplies the attention branch by `gamma_1`, so models
converted from it get `apply_attention_layer_scale=False` and `gamma_1` is dropped (reported): the converted
model computes what the official one computed. `apply_attention_layer_scale=True` in the overrides keeps
`gamma_1` as the attention LayerScale instead (the paper's BEiT block; different numbers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..configuration_amt import AmtConfig
from ..modeling_amt import AmtForImageClassification, AmtForMaskedImageModeling
from .common import (
    CheckpointFormatError,
    ConversionReport,
    MAE_DECODER_HEADS,
    VIT_BLOCK_PARTS,
    VIT_HEADS_BY_WIDTH,
    check_decoder_sincos_table,
    count_indexed,
    merge_qkv_bias,
    rename_keys,
)


P = "amt.encoder."

GAMMA_1_UNUSED = (
    "the released SimMIM-AMT Block.forward never applies gamma_1 (x + attn(norm1(x)), a bug of the official "
    "code): converted with apply_attention_layer_scale=False, which computes the same"
)


def encoder_rules(variant: str, apply_attention_layer_scale: bool) -> list[tuple[str, str]]:
    rules = [
        (r"cls_token", P + "embeddings.cls_token"),
        (r"pos_embed", P + "embeddings.position_embeddings"),
        (r"patch_embed\.proj\.(weight|bias)", P + r"embeddings.patch_embeddings.projection.\1"),
        (rf"blocks\.(\d+)\.{VIT_BLOCK_PARTS}", P + r"layers.\1.\2.\3"),
        (r"blocks\.(\d+)\.gamma_2", P + r"layers.\1.ls2.gamma"),
        (r"norm\.(weight|bias)", P + r"layernorm.\1"),
        (r"fc_norm\.(weight|bias)", r"amt.pooler.fc_norm.\1"),
        (r"head\.(weight|bias)", r"classifier.\1"),
    ]
    if variant == "simmim":
        rules.append((r"mask_token", P + "embeddings.mask_token"))
        rules.append((r"decoder\.0\.(weight|bias)", r"decoder.\1"))  # rows already permuted, see `simmim_head`
    if apply_attention_layer_scale:
        rules.append((r"blocks\.(\d+)\.gamma_1", P + r"layers.\1.ls1.gamma"))
    return rules


MAE_DECODER_RULES = [
    (r"decoder_embed\.(weight|bias)", r"decoder.decoder_embed.\1"),
    (r"mask_token", r"decoder.mask_token"),
    (rf"decoder_blocks\.(\d+)\.{VIT_BLOCK_PARTS}", r"decoder.layers.\1.\2.\3"),
    (r"decoder_norm\.(weight|bias)", r"decoder.decoder_norm.\1"),
    (r"decoder_pred\.(weight|bias)", r"decoder.decoder_pred.\1"),
]


def drop_rules(apply_attention_layer_scale: bool) -> dict[str, str]:
    drop = {
        r"decoder_pos_embed": "fixed sin-cos table, recomputed by hf_mim (checked equal)",
        r"blocks\.\d+\.attn\.(q_bias|v_bias)": "merged into attn.qkv.bias as [q_bias; 0; v_bias]",
        r"blocks\.\d+\.attn\.k_bias": "BEiT's k bias is a zero buffer (merged as 0)",
    }
    if not apply_attention_layer_scale:
        drop[r"blocks\.\d+\.gamma_1"] = GAMMA_1_UNUSED
    return drop


def is_classifier_state(state: Mapping[str, torch.Tensor]) -> bool:
    return "head.weight" in state


def detect_variant(state: Mapping[str, torch.Tensor]) -> str:
    """'simmim' for the BEiT-style layout (q/v biases or layer scale, or SimMIM's encoder/decoder.0), else 'mae'."""
    if "decoder.0.weight" in state or any(key.startswith("encoder.") for key in state):
        return "simmim"
    beit_style = re.compile(r"blocks\.\d+\.(attn\.q_bias|attn\.v_bias|gamma_1|gamma_2)")
    return "simmim" if any(beit_style.fullmatch(key) for key in state) else "mae"


def unprefix_simmim(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SimMIM pretraining layout: `encoder.*` -> unprefixed encoder keys (as the official fine-tuning loader
    does); `decoder.0.*` kept. Anything else is left for `rename_keys` to refuse."""
    return {key[len("encoder.") :] if key.startswith("encoder.") else key: value for key, value in state.items()}


def infer_config(state: Mapping[str, torch.Tensor], overrides: Mapping[str, object] | None = None) -> AmtConfig:
    """Every dimension the weights determine; heads from the official size table (or the overrides)."""
    overrides = dict(overrides or {})
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointFormatError(f"not an AMT (MAE / SimMIM ViT) checkpoint: key {key!r} is missing")
    if "pos_embed" not in state:
        raise CheckpointFormatError(
            "no absolute position embedding (`pos_embed`): only SimMIM-AMT's USE_APE=True layout (the released "
            "config) is supported, not relative position biases"
        )
    variant = overrides.pop("variant", None) or detect_variant(state)
    hidden = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    patch_size = patch_weight.shape[-1]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"pos_embed has {num_patches} patch rows, not a square grid")
    depth = count_indexed(state, "blocks.")
    if variant == "simmim":
        qkv_bias = "blocks.0.attn.q_bias" in state or depth == 0
    else:
        qkv_bias = "blocks.0.attn.qkv.bias" in state or depth == 0
    kwargs: dict[str, object] = dict(
        variant=variant,
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=patch_weight.shape[1],
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=VIT_HEADS_BY_WIDTH.get(hidden),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in state else 4.0,
        qkv_bias=qkv_bias,
    )
    if variant == "mae":
        kwargs["layer_scale_init_value"] = 0.1 if "blocks.0.gamma_2" in state else 0.0
        if "decoder_embed.weight" in state:
            kwargs.update(
                decoder_hidden_size=state["decoder_embed.weight"].shape[0],
                decoder_num_hidden_layers=count_indexed(state, "decoder_blocks."),
                decoder_num_attention_heads=MAE_DECODER_HEADS,
            )
    else:
        kwargs["layer_scale_init_value"] = 0.1 if "blocks.0.gamma_2" in state else 0.0  # the value is loaded
        kwargs["apply_attention_layer_scale"] = False  # gamma_1 exists but the released blocks never apply it
        # SimMIM-AMT masks 32 px units with ViT-B/16: 2 x 2 patches. The weights do not record it.
        kwargs["mask_patch_size"] = 2 * patch_size
    if is_classifier_state(state):
        kwargs["num_labels"] = state["head.weight"].shape[0]
        kwargs["use_mean_pooling"] = "fc_norm.weight" in state
    kwargs.update(overrides)
    if kwargs["num_attention_heads"] is None:
        raise CheckpointFormatError(
            f"hidden size {hidden} is not an official ViT width; pass num_attention_heads=... in --config_overrides"
        )
    return AmtConfig(**kwargs)


def simmim_head(weight: torch.Tensor, bias: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SimMIM's Conv2d(C, p*p*c, 1) + PixelShuffle(p) -> hf_mim's Linear(C, p*p*c) in patchify order.

    PixelShuffle reads conv channel `ch * p*p + i * p + j` into pixel (i, j) of channel `ch`; `patchify`
    orders a patch as `(i * p + j) * c + ch`. So row `(k, ch)` of the Linear is conv channel `(ch, k)`.
    """
    out_channels = weight.shape[0]
    pixels = patch_size * patch_size
    if weight.ndim != 4 or weight.shape[-2:] != (1, 1) or out_channels % pixels:
        raise CheckpointFormatError(
            f"decoder.0.weight of shape {tuple(weight.shape)} is not a 1x1 conv to {pixels} x channels outputs "
            f"(SimMIM's encoder_stride must equal the patch size {patch_size})"
        )
    channels = out_channels // pixels
    linear = weight[:, :, 0, 0].reshape(channels, pixels, -1).transpose(0, 1).reshape(out_channels, -1)
    return linear.contiguous(), bias.reshape(channels, pixels).transpose(0, 1).reshape(-1).contiguous()


def convert_amt_checkpoint(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, object] | None = None
) -> tuple[AmtForMaskedImageModeling | AmtForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the official weights; fine-tuned files give the classifier."""
    overrides = dict(overrides or {})
    state = unprefix_simmim(state)
    config = infer_config(state, overrides)
    report = ConversionReport()
    classifier = is_classifier_state(state)
    if config.variant == "simmim" and "decoder.0.weight" in state:
        weight, bias = simmim_head(state["decoder.0.weight"], state["decoder.0.bias"], config.patch_size)
        state = {**state, "decoder.0.weight": weight, "decoder.0.bias": bias}
    rules = encoder_rules(config.variant, config.apply_attention_layer_scale)
    if config.variant == "mae" and not classifier:
        if "decoder_pred.weight" not in state:
            raise CheckpointFormatError("not an mae-AMT pretraining checkpoint: `decoder_pred` is missing")
        check_decoder_sincos_table(state, config)
        rules = MAE_DECODER_RULES + rules
    if config.variant == "simmim" and not classifier and "decoder.0.weight" not in state:
        raise CheckpointFormatError("not a SimMIM-AMT pretraining checkpoint: the head `decoder.0` is missing")
    converted = rename_keys(state, rules, drop_rules(config.apply_attention_layer_scale), report)
    converted.update(merge_qkv_bias(state, P + "layers."))
    if config.variant == "simmim" and not classifier and "mask_patch_size" not in overrides:
        report.dropped["<mask_patch_size>"] = (
            f"not stored in the weights: set to 2 patches ({config.mask_patch_size} px), SimMIM-AMT's 32 px units "
            "at patch 16; override with mask_patch_size=..."
        )
    model: AmtForMaskedImageModeling | AmtForImageClassification = (
        AmtForImageClassification(config) if classifier else AmtForMaskedImageModeling(config)
    )
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise CheckpointFormatError(f"converted keys unknown to {type(model).__name__}: {unexpected[:10]}")
    if missing:
        raise CheckpointFormatError(f"the official checkpoint lacks weights for: {missing[:10]}")
    return model.eval(), report
