"""Official AMT checkpoints (github.com/guijiejie/AMT) -> hf_mim Amt models.

Layouts handled (state under "model" or a raw state dict; a DDP `module.` prefix is stripped by the loader;
the settings the weights cannot tell come from the file's `args` (mae-AMT `misc.save_model`) or yacs `config`
(SimMIM-AMT `utils.save_checkpoint`)):
- mae-AMT pretraining (`models_mae.MaskedAutoencoderViT`, MAE layout: `cls_token`, `pos_embed`, `blocks.*`,
  `norm`, `decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks.*`, `decoder_norm`,
  `decoder_pred`) -> `AmtForMaskedImageModeling(variant="mae")`;
- mae-AMT fine-tuned (`models_vit.VisionTransformer`, global pool: `fc_norm` + `head`, no `norm`)
  -> `AmtForImageClassification(variant="mae")`;
- SimMIM-AMT pretraining (`SimMIM`: BEiT-style `encoder.*` with q/v biases and `gamma_1`/`gamma_2`, head
  `decoder.0` = 1x1 conv followed by PixelShuffle) -> `AmtForMaskedImageModeling(variant="simmim")`;
- SimMIM-AMT fine-tuned (BEiT-style blocks, `norm` + cls token + `head`)
  -> `AmtForImageClassification(variant="simmim")`.

What differs between the two hosts' files is one `HostLayout` each (`HOST_LAYOUTS`): the pretraining
head's keys and their rules, the qkv-bias key, the settings read from the file, the head's reshaping.

The released SimMIM-AMT `Block.forward` never multiplies the attention branch by `gamma_1`, so models
converted from it get `apply_attention_layer_scale=False` and `gamma_1` is dropped (reported): the converted
model computes what the official one computed. `apply_attention_layer_scale=True` in the overrides keeps
`gamma_1` as the attention LayerScale instead (the paper's BEiT block; different numbers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..configuration_amt import AmtConfig
from ..modeling_amt import AmtForImageClassification, AmtForMaskedImageModeling
from .common import (
    CheckpointFormatError,
    ConversionReport,
    OfficialFile,
    Settings,
    VIT_BLOCK_PARTS,
    check_decoder_sincos_table,
    count_indexed,
    mae_decoder_rules,
    merge_qkv_bias,
    rename_keys,
)


P = "amt.encoder."

GAMMA_1_UNUSED = (
    "the released SimMIM-AMT Block.forward never applies gamma_1 (x + attn(norm1(x)), a bug of the official "
    "code): converted with apply_attention_layer_scale=False, which computes the same"
)


def encoder_rules(apply_attention_layer_scale: bool) -> list[tuple[str, str]]:
    """Either host's ViT (MAE/timm or BEiT-style keys, unprefixed) and a fine-tuned file's head."""
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
    if apply_attention_layer_scale:
        rules.append((r"blocks\.(\d+)\.gamma_1", P + r"layers.\1.ls1.gamma"))
    return rules


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


# SimMIM-AMT refreshes the attention maps every 40 epochs (hard-coded in main_simmim.py).
SIMMIM_AMT_REFRESH_EPOCHS = 40


def official_refresh_delay(settings: Settings) -> None:
    """Both scripts refresh after the epoch whose 0-based index is a multiple of the interval: one epoch after
    the interval's end (mae-AMT `epoch % args.loc_interval == 0`, SimMIM-AMT `epoch % 40 == 0`)."""
    settings.set("amt_refresh_delay_epochs", 1, "official code: refresh after epoch index k x interval (0-based)")


def mae_settings(
    settings: Settings, state: Mapping[str, torch.Tensor], classifier: bool, official: OfficialFile | None
) -> None:
    """mae-AMT: heads from `args.model` (or the width), the decoder from its weights, the AMT settings from `args`."""
    hidden = state["cls_token"].shape[-1]
    settings.encoder_heads(hidden, "args.model")
    settings.mae_decoder(state, "args.model")
    if classifier:
        settings.from_file("drop_path_rate", "args.drop_path")
        return
    settings.from_file("mask_ratio", "args.mask_ratio")
    settings.from_file("throw_ratio", "args.throw_ratio")
    settings.from_file("norm_pix_loss", "args.norm_pix_loss")
    official_refresh_delay(settings)
    epochs = official.setting("args.epochs") if official else None
    if epochs:
        settings.from_file(
            "amt_interval", "args.loc_interval", transform=lambda every: every / epochs, why=f"of args.epochs={epochs}"
        )


def simmim_settings(
    settings: Settings, state: Mapping[str, torch.Tensor], classifier: bool, official: OfficialFile | None
) -> None:
    """SimMIM-AMT: heads and the AMT settings from the yacs `config`; gamma_1 unused (the released blocks)."""
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    if not settings.from_file("num_attention_heads", "config.MODEL.VIT.NUM_HEADS"):
        settings.encoder_heads(state["cls_token"].shape[-1], "config.MODEL.NAME")
    settings.set("apply_attention_layer_scale", False, "official code: released SimMIM-AMT blocks never apply gamma_1")
    settings.from_file("drop_path_rate", "config.MODEL.DROP_PATH_RATE")
    if classifier:
        return
    settings.from_file("mask_ratio", "config.DATA.MASK_RATIO")
    settings.from_file("warmup_mask_ratio", "config.DATA.MASK_RATIO", why="random masks before the first refresh")
    settings.from_file("throw_ratio", "config.DATA.THROW_RATIO")
    if not settings.from_file("mask_patch_size", "config.DATA.MASK_PATCH_SIZE"):
        settings.default("mask_patch_size", 2 * patch_size, "SimMIM-AMT masks 2 x 2 patches (32 px at patch 16)")
    official_refresh_delay(settings)
    settings.from_file(
        "amt_interval", "config.TRAIN.EPOCHS", transform=lambda epochs: SIMMIM_AMT_REFRESH_EPOCHS / epochs,
        why=f"refresh every {SIMMIM_AMT_REFRESH_EPOCHS} epochs, hard-coded",
    )


def mae_head(state: Mapping[str, torch.Tensor], config: AmtConfig) -> Mapping[str, torch.Tensor]:
    """MAE's decoder loads as it is; its sin-cos table must be the one hf_mim recomputes."""
    check_decoder_sincos_table(state, config)
    return state


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


def simmim_head_state(state: Mapping[str, torch.Tensor], config: AmtConfig) -> Mapping[str, torch.Tensor]:
    """The 1x1 conv's rows permuted into the Linear's patchify order (`simmim_head`)."""
    weight, bias = simmim_head(state["decoder.0.weight"], state["decoder.0.bias"], config.patch_size)
    return {**state, "decoder.0.weight": weight, "decoder.0.bias": bias}


@dataclass(frozen=True)
class HostLayout:
    """How one host's official files differ: the evidence for detecting it, the key holding a block's qkv
    bias, the pretraining head (a key that must be there, its renaming rules, its reshaping), and the
    settings read from the file."""

    evidence: str
    qkv_bias_key: str
    head_key: str
    head_missing: str
    head_rules: list[tuple[str, str]]
    prepare_head: Callable[[Mapping[str, torch.Tensor], AmtConfig], Mapping[str, torch.Tensor]]
    settings: Callable[[Settings, Mapping[str, torch.Tensor], bool, OfficialFile | None], None]


HOST_LAYOUTS = {
    "mae": HostLayout(
        evidence="MAE/timm keys",
        qkv_bias_key="blocks.0.attn.qkv.bias",
        head_key="decoder_pred.weight",
        head_missing="not an mae-AMT pretraining checkpoint: `decoder_pred` is missing",
        head_rules=mae_decoder_rules(),
        prepare_head=mae_head,
        settings=mae_settings,
    ),
    "simmim": HostLayout(
        evidence="BEiT-style q/v biases or SimMIM keys",
        qkv_bias_key="blocks.0.attn.q_bias",
        head_key="decoder.0.weight",
        head_missing="not a SimMIM-AMT pretraining checkpoint: the head `decoder.0` is missing",
        head_rules=[
            (r"mask_token", P + "embeddings.mask_token"),
            (r"decoder\.0\.(weight|bias)", r"decoder.\1"),  # rows already permuted, see `simmim_head`
        ],
        prepare_head=simmim_head_state,
        settings=simmim_settings,
    ),
}


def infer_config(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, object] | None = None, official: OfficialFile | None = None
) -> tuple[AmtConfig, Settings]:
    """Dimensions from the weights; heads and the AMT settings (mask / throw ratios, norm_pix_loss, mask unit,
    refresh interval) from the file's own `args` (mae-AMT) or yacs `config` (SimMIM-AMT), else the
    variant's official defaults (printed as such) or required flags."""
    overrides = dict(overrides or {})
    for key in ("cls_token", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointFormatError(f"not an AMT (MAE / SimMIM ViT) checkpoint: key {key!r} is missing")
    if "pos_embed" not in state:
        raise CheckpointFormatError(
            "no absolute position embedding (`pos_embed`): only SimMIM-AMT's USE_APE=True layout (the released "
            "config) is supported, not relative position biases"
        )
    settings = Settings(official, overrides)
    variant = overrides.get("variant") or detect_variant(state)
    host = HOST_LAYOUTS[variant]
    settings.weights("variant", variant, host.evidence)
    hidden = state["cls_token"].shape[-1]
    patch_weight = state["patch_embed.proj.weight"]
    patch_size = patch_weight.shape[-1]
    num_patches = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointFormatError(f"pos_embed has {num_patches} patch rows, not a square grid")
    depth = count_indexed(state, "blocks.")
    qkv_bias = host.qkv_bias_key in state or depth == 0
    settings.weights("image_size", grid * patch_size, f"pos_embed {grid}x{grid} patches")
    settings.weights("patch_size", patch_size, "patch_embed.proj kernel")
    settings.weights("num_channels", patch_weight.shape[1], "patch_embed.proj input channels")
    settings.weights("hidden_size", hidden, "cls_token width")
    settings.weights("num_hidden_layers", depth, "blocks.*")
    if "blocks.0.mlp.fc1.weight" in state:
        settings.weights("mlp_ratio", state["blocks.0.mlp.fc1.weight"].shape[0] / hidden, "blocks.0.mlp.fc1 width / hidden")
    settings.weights("qkv_bias", qkv_bias, "q/v or qkv bias present")
    layer_scale = 0.1 if "blocks.0.gamma_2" in state else 0.0  # the init value only; trained gammas are loaded
    settings.weights("layer_scale_init_value", layer_scale, "blocks.0.gamma_2 present" if layer_scale else "no gamma_2")
    classifier = is_classifier_state(state)
    if classifier:
        settings.weights("num_labels", state["head.weight"].shape[0], "head rows")
        settings.weights("use_mean_pooling", "fc_norm.weight" in state, "fc_norm present" if "fc_norm.weight" in state else "no fc_norm")
    host.settings(settings, state, classifier, official)
    return AmtConfig(**settings.finish()), settings


def convert_amt_checkpoint(
    state: Mapping[str, torch.Tensor] | OfficialFile, overrides: Mapping[str, object] | None = None
) -> tuple[AmtForMaskedImageModeling | AmtForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the official weights; fine-tuned files give the classifier, pretraining
    files the host of their variant. `state` may be an `OfficialFile`, whose args / yacs config then set what
    the weights cannot."""
    official = state if isinstance(state, OfficialFile) else None
    state = unprefix_simmim(official.state if official else state)
    config, settings = infer_config(state, overrides, official)
    report = ConversionReport(source=official)
    report.record_config(config, settings)
    host = HOST_LAYOUTS[config.variant]
    rules = encoder_rules(config.apply_attention_layer_scale)
    if not is_classifier_state(state):
        if host.head_key not in state:
            raise CheckpointFormatError(host.head_missing)
        state = host.prepare_head(state, config)
        rules = host.head_rules + rules
    converted = rename_keys(state, rules, drop_rules(config.apply_attention_layer_scale), report)
    converted.update(merge_qkv_bias(state, P + "layers."))
    model: AmtForMaskedImageModeling | AmtForImageClassification = (
        AmtForImageClassification(config) if is_classifier_state(state) else AmtForMaskedImageModeling(config)
    )
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise CheckpointFormatError(f"converted keys unknown to {type(model).__name__}: {unexpected[:10]}")
    if missing:
        raise CheckpointFormatError(f"the official checkpoint lacks weights for: {missing[:10]}")
    return model.eval(), report
