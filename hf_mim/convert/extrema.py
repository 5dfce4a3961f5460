"""Official ExtreMA checkpoints (github.com/microsoft/ExtreMA) -> hf_mim Extrema models.

Layouts handled:
- pretraining `extrema_*.pth` / `checkpoint_*.pth.tar` (`main.py`): {"epoch", "arch", "state_dict",
  "optimizer", "scaler"}; `state_dict` keys start with `module.` (DDP): `module.base_encoder.*`
  (online ViT + projector `head.{0,1,3,4,6}`), `module.momentum_encoder.*` (the same set),
  `module.predictor.{0,1,3}` -> `ExtremaForMaskedImageModeling`;
- fine-tuned (`finetune/run_class_finetuning.py`, BEiT code base): weights under "model": `cls_token`
  (unused), `pos_embed` (learnable, no cls slot), `patch_embed`, `blocks`, `fc_norm`, `head` ->
  `ExtremaForImageClassification` (mean pooling).
The linear-probe backbone (momentum encoder, final norm removed) is `model.momentum_backbone()` of the
converted pretraining model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from ..configuration_extrema import ExtremaConfig
from ..modeling_extrema import ExtremaForImageClassification, ExtremaForMaskedImageModeling
from .common import (
    CheckpointFormatError,
    ConversionReport,
    OfficialFile,
    Settings,
    VIT_BLOCK_PARTS,
    count_indexed,
    read_official_file,
    rename_keys,
)


_CA_PARTS = r"(norm1|norm2|attn\.q|attn\.k|attn\.v|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"


def vit_rules(source: str, target: str) -> list[tuple[str, str]]:
    """Official ViT keys under `source` -> an `ExtremaEncoder` under `target` (both end with a dot or are empty)."""
    s = source.replace(".", r"\.")
    return [
        (rf"{s}pos_embed", f"{target}embeddings.position_embeddings"),
        (rf"{s}patch_embed\.proj\.(weight|bias)", rf"{target}embeddings.patch_embeddings.projection.\1"),
        (rf"{s}blocks\.(\d+)\.{VIT_BLOCK_PARTS}", rf"{target}layers.\1.\2.\3"),
    ]


def class_attention_rules(source: str, target: str) -> list[tuple[str, str]]:
    s = source.replace(".", r"\.")
    return [
        (rf"{s}cls_token", f"{target}class_attention.cls_token"),
        (rf"{s}blocks_token\.(\d+)\.gamma_1", rf"{target}class_attention.layers.\1.ls1.gamma"),
        (rf"{s}blocks_token\.(\d+)\.gamma_2", rf"{target}class_attention.layers.\1.ls2.gamma"),
        (rf"{s}blocks_token\.(\d+)\.{_CA_PARTS}", rf"{target}class_attention.layers.\1.\2.\3"),
        (rf"{s}norm\.(weight|bias)", rf"{target}layernorm.\1"),
    ]


PRETRAINING_RULES = (
    vit_rules("base_encoder.", "extrema.encoder.")
    + class_attention_rules("base_encoder.", "extrema.encoder.")
    + [(r"base_encoder\.head\.(\d+)\.(weight|bias)", r"projector.\1.\2")]
    + vit_rules("momentum_encoder.", "momentum_encoder.")
    + class_attention_rules("momentum_encoder.", "momentum_encoder.")
    + [(r"momentum_encoder\.head\.(\d+)\.(weight|bias)", r"momentum_projector.\1.\2")]
    + [(r"predictor\.(\d+)\.(weight|bias)", r"predictor.\1.\2")]
)

CLASSIFIER_RULES = vit_rules("", "extrema.encoder.") + [
    (r"fc_norm\.(weight|bias)", r"extrema.pooler.fc_norm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]

CLASSIFIER_DROP = {
    r"cls_token": "the fine-tuning model keeps a cls_token but never uses it (no cls token in the sequence)",
}


def is_pretraining_state(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith("base_encoder.") for key in state)


def is_classifier_state(state: Mapping[str, torch.Tensor]) -> bool:
    return "head.weight" in state and "fc_norm.weight" in state


# The released pretraining files name their masking in the file name (no args are saved): 80%x5, 90%x8.
RELEASE_MASKING = re.compile(r"extrema_mask0?(\d)x(\d+)")


def infer_config(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, object] | None = None, official: OfficialFile | None = None
) -> tuple[ExtremaConfig, Settings]:
    """Dimensions from the weights; heads from the file's `arch` / `args.model`, else the official width table;
    mask ratio and number of masks from a released file's name (`extrema_mask09x8_...`), else the README's
    80 % x 5 (printed as a default)."""
    settings = Settings(official, overrides)
    prefix = "base_encoder." if is_pretraining_state(state) else ""
    for key in ("pos_embed", "patch_embed.proj.weight"):
        if prefix + key not in state:
            raise CheckpointFormatError(f"not an ExtreMA checkpoint: key {prefix + key!r} is missing")
    patch_weight = state[prefix + "patch_embed.proj.weight"]
    hidden = patch_weight.shape[0]
    num_patches = state[prefix + "pos_embed"].shape[1]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise CheckpointFormatError(
            f"pos_embed has {num_patches} rows, not a square patch grid (ExtreMA tables have no cls slot)"
        )
    depth = count_indexed(state, prefix + "blocks.")
    fc1 = state.get(prefix + "blocks.0.mlp.fc1.weight")
    settings.weights("image_size", grid * patch_weight.shape[-1], f"pos_embed {grid}x{grid} patches")
    settings.weights("patch_size", patch_weight.shape[-1], "patch_embed.proj kernel")
    settings.weights("num_channels", patch_weight.shape[1], "patch_embed.proj input channels")
    settings.weights("hidden_size", hidden, "patch_embed.proj width")
    settings.weights("num_hidden_layers", depth, "blocks.*")
    if fc1 is not None:
        settings.weights("mlp_ratio", fc1.shape[0] / hidden, "blocks.0.mlp.fc1 width / hidden")
    settings.weights("qkv_bias", prefix + "blocks.0.attn.qkv.bias" in state or depth == 0, "blocks.0.attn.qkv.bias present")
    settings.encoder_heads(hidden, "extra.arch", "args.model")
    if prefix:
        settings.weights("num_class_attention_layers", count_indexed(state, prefix + "blocks_token."), "blocks_token.*")
        if prefix + "blocks_token.0.gamma_1" not in state:
            settings.weights("layer_scale_init_value", 0.0, "no blocks_token.0.gamma_1")
        elif hidden == 1024:
            settings.default("layer_scale_init_value", 1e-5, "official help text for ViT-L (only the init differs)")
        settings.weights("projector_hidden_size", state[prefix + "head.0.weight"].shape[0], "head.0 width")
        settings.weights("projection_dim", state[prefix + "head.6.weight"].shape[0], "head.6 width")
        release = RELEASE_MASKING.search(official.name) if official is not None else None
        if release:
            ratio, masks = int(release.group(1)) / 10, int(release.group(2))
            settings.set("mask_ratio", ratio, f"file name {official.name!r} (official release)")
            settings.set("num_masks", masks, f"file name {official.name!r} (official release)")
        else:
            settings.default("mask_ratio", 0.8, "the README's pretraining command (not stored in the file)")
            settings.default("num_masks", 5, "the README's pretraining command (not stored in the file)")
    else:
        settings.weights("num_labels", state["head.weight"].shape[0], "head rows")
        settings.weights("pooling", "mean", "fc_norm present (mean pooling)")
        settings.from_file("drop_path_rate", "args.drop_path")
    return ExtremaConfig(**settings.finish()), settings


def convert_extrema_checkpoint(
    state: Mapping[str, torch.Tensor] | OfficialFile, overrides: Mapping[str, object] | None = None
) -> tuple[ExtremaForMaskedImageModeling | ExtremaForImageClassification, ConversionReport]:
    """Build the hf_mim model holding the official weights: pretraining files give
    `ExtremaForMaskedImageModeling`, fine-tuned files `ExtremaForImageClassification`."""
    official = state if isinstance(state, OfficialFile) else None
    state = official.state if official else state
    state = {key[len("module.") :] if key.startswith("module.") else key: value for key, value in state.items()}
    report = ConversionReport(source=official)
    if is_pretraining_state(state):
        config, settings = infer_config(state, overrides, official)
        converted = rename_keys(state, PRETRAINING_RULES, report=report)
        model: ExtremaForMaskedImageModeling | ExtremaForImageClassification = ExtremaForMaskedImageModeling(config)
    elif is_classifier_state(state):
        if "norm.weight" in state:
            raise CheckpointFormatError(
                "fine-tuned checkpoint with a final `norm` (use_mean_pooling=False) is not an official ExtreMA "
                "fine-tuning layout; hf_mim's classifier mean-pools the patch tokens"
            )
        config, settings = infer_config(state, overrides, official)
        converted = rename_keys(state, CLASSIFIER_RULES, CLASSIFIER_DROP, report)
        model = ExtremaForImageClassification(config)
    else:
        raise CheckpointFormatError(
            "not an ExtreMA checkpoint: expected `module.base_encoder.*` keys (pretraining, under 'state_dict') "
            "or `fc_norm` + `head` (fine-tuned classifier, under 'model')"
        )
    report.record_config(config, settings)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise CheckpointFormatError(f"converted keys unknown to {type(model).__name__}: {unexpected[:10]}")
    if isinstance(model, ExtremaForMaskedImageModeling) and missing and all(
        key.startswith(("momentum_encoder.", "momentum_projector.")) for key in missing
    ):
        # No momentum encoder in the file: it starts as a copy of the online branch, as at initialisation.
        model.update_momentum_encoder(0.0)
        missing = []
        report.dropped["<momentum_encoder>"] = "not in the checkpoint: momentum branch = copy of the online branch"
    if missing:
        raise CheckpointFormatError(f"the official checkpoint lacks weights for: {missing[:10]}")
    return model, report


def load_extrema_checkpoint(path) -> OfficialFile:
    """An official file: pretraining checkpoints keep the weights under "state_dict" (with "arch"),
    fine-tuned ones under "model" (with "args"); a plain state dict (.pth or .safetensors) works too."""
    return read_official_file(path, ("state_dict", "model"))
