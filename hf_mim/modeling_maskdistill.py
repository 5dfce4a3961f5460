"""MaskDistill: masked distillation of a frozen teacher's normalised features ("A Unified View of Masked
Image Modeling", Peng, Dong, Bao, Wei, Ye; TMLR 2023).

Five parts, each a config field: teacher T (a frozen vision model loaded with `AutoModel`: CLIP, or a timm
ViT through transformers' `TimmWrapperModel`),
normalisation N (LayerNorm without affine), student S (BEiT v2 ViT: `[MASK]` token, one shared relative
position bias, layer scale, no absolute positions), head H (linear to the teacher width) and loss L
(smooth-L1 on the masked patches). `target="pixels"` swaps the teacher for per-patch normalised pixels.

The teacher is never part of the student's module tree: it is loaded lazily from
`config.teacher_name_or_path` (or given with `set_teacher`), kept frozen and in eval mode, and is not in
`state_dict()`, `save_pretrained` or a Hub folder. No official MaskDistill code exists; numerics follow
BEiT v2 (microsoft/unilm/beit2), which the first author names as its base.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbone_common import ViTBackboneMixin, backbone_ignore_patterns
from .configuration_maskdistill import MaskDistillConfig
from .masking import BlockwiseMaskGenerator
from .modeling_common import (
    MIMPreTrainedModel,
    MIMTrainingEventsMixin,
    ImageClassificationMixin,
    MeanPooler,
    builds_pretrained_encoder,
    PatchEmbeddings,
    RelativePositionBias,
    backbone_output,
    init_as_copy,
    init_beit_weights,
    make_blocks,
    starts_as_copy,
    tag_beit_rescaled_layers,
)
from .objectives import elementwise_loss, normalize_per_token, patchify, predictions_to_pixels, weighted_token_mean


@dataclass
class MaskDistillMaskedImageModelingOutput(ModelOutput):
    """Output of `MaskDistillForMaskedImageModeling`.

    loss: the configured loss (smooth-L1) over the masked patches; None when no target is available
        (target "teacher" and no teacher loaded, in eval mode).
    predictions: (B, N, target width) head output for every patch (raster order); the MaskDistill
        prediction is `predictions[bool_masked_pos]`.
    targets: (B, N, target width) normalised teacher tokens (or normalised pixel patches), or None.
    bool_masked_pos: (B, N) True = replaced by the mask token.
    patch_loss: (B, N) per-patch loss (mean over channels), every patch, for pictures.
    reconstruction: (B, C, H, W) the predicted image in `pixel_values` space (target "pixels" only;
        each patch de-normalised with the statistics of the input patch).
    last_hidden_state: (B, 1 + N, D) student output after the final norm (cls first).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    patch_loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class MaskDistillEmbeddings(nn.Module):
    """Patch embedding; masked patches replaced by `mask_token`; cls prepended. No absolute positions."""

    def __init__(self, config: MaskDistillConfig, use_mask_token: bool = True):
        super().__init__()
        self.patch_embeddings = PatchEmbeddings(config.image_size, config.patch_size, config.num_channels, config.hidden_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # the classifier never masks: no trainable parameter without a gradient (DDP would stop on it)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        grid = self.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        patches = self.patch_embeddings(pixel_values)
        batch_size, num_patches, _ = patches.shape
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("this model has no mask token (the classifier never masks): bool_masked_pos is not accepted")
            if bool_masked_pos.shape != (batch_size, num_patches):
                raise ValueError(
                    f"bool_masked_pos must have shape {(batch_size, num_patches)}, got {tuple(bool_masked_pos.shape)}"
                )
            weight = bool_masked_pos.to(device=patches.device, dtype=patches.dtype).unsqueeze(-1)
            patches = patches * (1 - weight) + self.mask_token.to(patches.dtype) * weight
        cls = self.cls_token.to(patches.dtype).expand(batch_size, -1, -1)
        return torch.cat([cls, patches], dim=1), grid


class MaskDistillEncoder(nn.Module):
    """Embeddings -> BEiT blocks with relative position bias -> optional final LayerNorm.

    `per_layer_relative_position_bias=False`: one table shared by every block (pretraining layout).
    True (fine-tuning layout): each block owns `rel_pos_bias`; the shared table is still there, frozen and
    unused, as the place a pretraining checkpoint's table loads into before `_init_weights` copies it
    into every block (BEiT's fine-tuning checkpoint loading).
    """

    def __init__(
        self,
        config: MaskDistillConfig,
        use_final_norm: bool = True,
        per_layer_relative_position_bias: bool = False,
        use_mask_token: bool = True,
    ):
        super().__init__()
        grid = config.image_size // config.patch_size
        self.embeddings = MaskDistillEmbeddings(config, use_mask_token)
        self.rel_pos_bias = RelativePositionBias(grid, config.num_attention_heads)
        self.layers = make_blocks(
            config,
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=True,
            layer_norm_eps=config.layer_norm_eps,
            drop_path_rate=config.drop_path_rate,
            layer_scale_init_value=config.layer_scale_init_value,
        )
        tag_beit_rescaled_layers(self.layers)
        self.per_layer_relative_position_bias = per_layer_relative_position_bias
        if per_layer_relative_position_bias:
            self.rel_pos_bias.requires_grad_(False)
            for layer in self.layers:
                layer.rel_pos_bias = RelativePositionBias(grid, config.num_attention_heads)
                starts_as_copy(layer.rel_pos_bias, self.rel_pos_bias)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        hidden_states, grid = self.embeddings(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        shared_bias = None if self.per_layer_relative_position_bias else self.rel_pos_bias(grid).to(hidden_states.dtype)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            bias = layer.rel_pos_bias(grid).to(hidden_states.dtype) if shared_bias is None else shared_bias
            hidden_states, weights = layer(hidden_states, None, output_attentions, bias)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if output_attentions:
                all_attentions = all_attentions + (weights,)
        if self.layernorm is not None:
            hidden_states = self.layernorm(hidden_states)
        return hidden_states, all_hidden_states, all_attentions


class MaskDistillPreTrainedModel(MIMPreTrainedModel):
    config_class = MaskDistillConfig
    config: MaskDistillConfig
    base_model_prefix = "maskdistill"
    _no_split_modules = ["Block", "MaskDistillEmbeddings"]
    _supports_flash_attn = False  # an additive attention bias is not supported by flash attention
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BEiT v2 initialisation (`init_beit_weights`), the mask and cls tokens trunc-normal, relative
        tables zero (per-layer tables copy the shared one), the classifier scaled by `classifier_init_scale`."""
        std = self.config.initializer_range
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std * self.config.classifier_init_scale)
            init.zeros_(module.bias)
        elif isinstance(module, MaskDistillEmbeddings):
            init.trunc_normal_(module.cls_token, std=std)
            if module.mask_token is not None:
                init.trunc_normal_(module.mask_token, std=std)
        elif isinstance(module, RelativePositionBias):
            if not init_as_copy(module):  # a per-block table starts as the shared one
                init.zeros_(module.relative_position_bias_table)
        else:
            init_beit_weights(module, std)


class MaskDistillModel(MaskDistillPreTrainedModel):
    """The MaskDistill (BEiT v2-style) ViT backbone. Nothing is masked unless `bool_masked_pos` is given.

    With `add_pooling_layer` and `config.use_mean_pooling` (fine-tuning layout) the final LayerNorm is
    replaced by `pooler.fc_norm` on the mean of the patch tokens, as BEiT fine-tuning does; otherwise
    `last_hidden_state` is normalised and `pooler_output` is the cls token. Loaded from a pretraining
    checkpoint (`builds_pretrained_encoder`): the final LayerNorm is kept and `pooler_output` is the
    plain mean of its patch tokens (nothing untrained).
    """

    # a pretraining checkpoint's head, or a fine-tuning checkpoint's classifier
    _keys_to_ignore_on_load_unexpected = [r"lm_head\.", r"classifier\.", r"encoder\.layernorm\.", r"layers\.\d+\.rel_pos_bias\."]

    def __init__(
        self,
        config: MaskDistillConfig,
        add_pooling_layer: bool = True,
        per_layer_relative_position_bias: bool = False,
        use_mask_token: bool = True,
        pretrained_encoder: bool | None = None,
    ):
        super().__init__(config)
        pretrained = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        mean_pooling = add_pooling_layer and config.use_mean_pooling
        self.encoder = MaskDistillEncoder(
            config,
            use_final_norm=pretrained or not mean_pooling,
            per_layer_relative_position_bias=per_layer_relative_position_bias,
            use_mask_token=use_mask_token,
        )
        self.pooler = (
            MeanPooler(config.hidden_size, config.layer_norm_eps, num_prefix_tokens=1, use_fc_norm=not pretrained)
            if mean_pooling else None
        )
        self.add_pooling_layer = add_pooling_layer
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            True = that patch embedding is replaced by the mask token (every patch still enters, BEiT style).
        """
        if pixel_values is None:
            raise ValueError("MaskDistillModel needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        hidden_states, all_hidden_states, attentions = self.encoder(
            pixel_values, bool_masked_pos, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        return backbone_output(hidden_states, self.pooler, self.add_pooling_layer, all_hidden_states, attentions, return_dict)


# --------------------------------------------------------------------------------------------------
# The frozen teacher (kept outside the module tree)
# --------------------------------------------------------------------------------------------------


def resolve_teacher_path(teacher_name_or_path: str, student_name_or_path: str | None) -> tuple[str, str]:
    """(folder or Hub id, subfolder) of the teacher. A path starting with "./" is relative to the student's
    own folder or Hub repo (a converted student carries its teacher in `./teacher`), so the folder can be
    moved or pushed and still finds it; a local student folder without it falls back to the working
    directory. Anything else is used as given."""
    if not teacher_name_or_path.startswith("./") or not student_name_or_path:
        return teacher_name_or_path, ""
    inner = teacher_name_or_path[2:]
    if os.path.isdir(student_name_or_path):
        beside = os.path.join(student_name_or_path, inner)
        return (teacher_name_or_path if not os.path.isdir(beside) and os.path.isdir(teacher_name_or_path) else beside), ""
    return student_name_or_path, inner  # a Hub repo: the teacher is its subfolder


def read_teacher_normalization(teacher_name_or_path: str, subfolder: str = "") -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) from the teacher folder's preprocessor_config.json, or None if absent."""
    path = os.path.join(teacher_name_or_path, subfolder, "preprocessor_config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(teacher_name_or_path, "preprocessor_config.json", subfolder=subfolder or None)
        except Exception:
            return None
    with open(path, encoding="utf-8") as handle:
        processor = json.load(handle)
    if "image_mean" not in processor or "image_std" not in processor:
        return None
    return list(processor["image_mean"]), list(processor["image_std"])


def load_teacher_model(teacher_name_or_path: str, subfolder: str = "") -> nn.Module:
    """The teacher as saved: the transformers class named in its config's `architectures` (so a
    `CLIPVisionModelWithProjection` keeps its projection), else whatever `AutoModel` builds."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(teacher_name_or_path, subfolder=subfolder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        model_class = AutoModel
    return model_class.from_pretrained(teacher_name_or_path, subfolder=subfolder)


def timm_backbone(model: nn.Module) -> nn.Module | None:
    """The timm network of a teacher (`TimmWrapperModel.timm_model`, or a bare timm model), else None.

    Recognised by what every timm model has (`pretrained_cfg`, `forward_features`): timm is not imported."""
    inner = getattr(model, "timm_model", model)
    return inner if hasattr(inner, "pretrained_cfg") and hasattr(inner, "forward_features") else None


def timm_normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) a timm teacher expects: the `pretrained_cfg` in its transformers config (what a
    timm Hub folder's config.json carries), else the timm model's own default one (timm's
    `resolve_data_config` falls back the same way); None for other teachers."""
    backbone = timm_backbone(model)
    if backbone is None:
        return None
    saved = getattr(getattr(model, "config", None), "pretrained_cfg", None)
    for pretrained_cfg in (saved, backbone.pretrained_cfg):
        if pretrained_cfg and pretrained_cfg.get("mean") is not None and pretrained_cfg.get("std") is not None:
            return list(pretrained_cfg["mean"]), list(pretrained_cfg["std"])
    return None


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class FrozenTeacher:
    """A frozen vision model and how to feed it: its own input normalisation and image size.

    Not an `nn.Module` on purpose: it must not enter the student's `state_dict`, parameters, optimizer
    or saved files. It follows the student's device on each call and stays in eval mode.

    Two kinds of teacher give the patch tokens (`layer` = `config.teacher_layer`):
    - transformers vision models (CLIP-style): the vision tower's `last_hidden_state` (before
      `post_layernorm`), optionally `post_layernorm` and `visual_projection`; the leading cls token dropped.
    - timm ViT-style models (`TimmWrapperModel` or a bare timm model): the last block's tokens from timm's
      `forward_intermediates`, before ("last_hidden_state") or after ("post_layernorm") the final norm, the
      model's `num_prefix_tokens` (cls, registers) dropped. `TimmWrapperModel.last_hidden_state` is
      "post_layernorm" here. timm models have no projection, so "projected" is refused.
    """

    def __init__(
        self,
        model: nn.Module,
        image_mean: list[float],
        image_std: list[float],
        layer: str = "last_hidden_state",
    ):
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.layer = layer
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.timm = timm_backbone(model)
        if self.timm is not None:
            self._init_timm()
        else:
            self._init_transformers()

    def _init_transformers(self) -> None:
        layer = self.layer
        self.vision = getattr(self.model, "vision_model", None) or self.model
        self.post_layernorm = getattr(self.vision, "post_layernorm", None)
        self.projection = getattr(self.model, "visual_projection", None)
        if layer in ("post_layernorm", "projected") and self.post_layernorm is None:
            raise ValueError(f"teacher_layer={layer!r} needs a teacher with a `post_layernorm` (CLIP-style vision tower)")
        if layer == "projected" and self.projection is None:
            raise ValueError(
                "teacher_layer='projected' needs a teacher with a `visual_projection` "
                "(CLIPVisionModelWithProjection or CLIPModel)"
            )
        config = getattr(self.model.config, "vision_config", None) or self.model.config
        self.width = config.projection_dim if layer == "projected" else config.hidden_size
        self.image_size = _pair(getattr(config, "image_size", None))
        self.patch_size = _pair(getattr(config, "patch_size", None))

    def _init_timm(self) -> None:
        name = type(self.timm).__name__
        needed = ("patch_embed", "num_prefix_tokens", "forward_intermediates")
        missing = [attr for attr in needed if not hasattr(self.timm, attr)]
        if missing:
            raise ValueError(
                f"the timm teacher ({name}) is not a ViT-style token model (no {', '.join(missing)}): MaskDistill "
                "regresses one teacher token per patch, so use a timm ViT (vit_*, deit_*, eva_*, ...)"
            )
        if self.layer == "projected":
            raise ValueError(
                f"teacher_layer='projected' cannot be honoured by a timm teacher ({name} has no projection): use "
                "'last_hidden_state' (last block, before the final norm) or 'post_layernorm' (after it)"
            )
        if self.layer == "post_layernorm" and isinstance(getattr(self.timm, "norm", None), (nn.Identity, type(None))):
            raise ValueError(
                f"teacher_layer='post_layernorm' cannot be honoured by this timm teacher ({name} has no final norm on "
                "its tokens, e.g. it normalises the pooled feature with fc_norm): use 'last_hidden_state'"
            )
        self.width = self.timm.num_features
        self.image_size = _pair(self.timm.patch_embed.img_size)
        self.patch_size = _pair(self.timm.patch_embed.patch_size)

    def check_grid(self, grid: int) -> None:
        if self.image_size is None or self.patch_size is None:
            return
        teacher_grid = tuple(size // patch for size, patch in zip(self.image_size, self.patch_size))
        if teacher_grid != (grid, grid):
            raise ValueError(
                f"the teacher's patch grid ({self.image_size[0]}x{self.image_size[1]} / {self.patch_size[0]}x"
                f"{self.patch_size[1]} = {teacher_grid[0]}x{teacher_grid[1]}) does not match the student's "
                f"({grid}x{grid}): choose a teacher (or teacher image size) with the same grid, "
                "e.g. CLIP-B/16 at 224 for a /16 student at 224"
            )

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, N, D) patch tokens of the chosen layer for images in [0, 1] (B, C, H, W); prefix tokens dropped."""
        parameter = next(self.model.parameters())
        if parameter.device != images.device:
            self.model.to(images.device)
            parameter = next(self.model.parameters())
        self.model.eval()
        images = images.to(torch.float32)
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        pixel_values = (images - self.image_mean.to(images.device)) / self.image_std.to(images.device)
        pixel_values = pixel_values.to(parameter.dtype)
        tokens = self._timm_tokens(pixel_values) if self.timm is not None else self._transformers_tokens(pixel_values)
        num_prefix = tokens.shape[1] - num_patches
        max_prefix = 0 if self.timm is not None else 8  # timm has dropped its prefix tokens already
        if not 0 <= num_prefix <= max_prefix:
            raise ValueError(
                f"the teacher returned {tokens.shape[1]} tokens for {num_patches} student patches: "
                "its patch grid must match the student's"
            )
        return tokens[:, num_prefix:]

    def _transformers_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        if self.layer in ("post_layernorm", "projected"):
            tokens = self.post_layernorm(tokens)
        if self.layer == "projected":
            tokens = self.projection(tokens)
        return tokens

    def _timm_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens; timm drops the `num_prefix_tokens` itself."""
        (tokens,) = self.timm.forward_intermediates(
            pixel_values, indices=1, norm=self.layer == "post_layernorm", output_fmt="NLC", intermediates_only=True
        )
        return tokens


class MaskDistillForMaskedImageModeling(MIMTrainingEventsMixin, MaskDistillPreTrainedModel):
    """The MaskDistill objective: BEiT-style student + linear head regress LN(teacher(full image)) on the
    masked patches with smooth-L1. The teacher is frozen and not saved (see the module docstring)."""

    _keys_to_ignore_on_load_unexpected = [r"^maskdistill\.pooler\.", r"^classifier\.", r"layers\.\d+\.rel_pos_bias\."]
    # no `_keys_to_ignore_on_save`: transformers matches exact names there, and the teacher is not a
    # submodule, so it has no key to drop

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.maskdistill = MaskDistillModel(config, add_pooling_layer=False)
        self.lm_head = nn.Linear(config.hidden_size, config.target_size)
        object.__setattr__(self, "_frozen_teacher", None)
        self.post_init()

    # ---- teacher -------------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher model (loaded from `config.teacher_name_or_path` on first access), or None."""
        frozen = self.load_teacher()
        return frozen.model if frozen is not None else None

    def load_teacher(self) -> FrozenTeacher | None:
        if self._frozen_teacher is None and self.config.target == "teacher" and self.config.teacher_name_or_path:
            path, subfolder = resolve_teacher_path(self.config.teacher_name_or_path, self.config.name_or_path)
            try:
                model = load_teacher_model(path, subfolder)
            except (OSError, ValueError) as error:
                raise OSError(
                    f"could not load the MaskDistill teacher from config.teacher_name_or_path={path!r}: {error}\n"
                    "Point teacher_name_or_path at a local vision-model folder (e.g. a saved CLIPVisionModel or "
                    "TimmWrapperModel), call model.set_teacher(...), or pass return_loss=False for predictions only."
                ) from error
            mean, std = self._teacher_normalization(model, path=path, subfolder=subfolder)
            self._attach(FrozenTeacher(model, mean, std, self.config.teacher_layer))
        return self._frozen_teacher

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also copy a teacher that the config names relative to the student ("./teacher") from the folder the
        student was loaded from, so the saved folder (and a push) still finds it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        name = self.config.teacher_name_or_path
        if name and name.startswith("./"):
            source, subfolder = resolve_teacher_path(name, self.config.name_or_path)
            target = os.path.join(save_directory, name[2:])
            if not subfolder and os.path.isdir(source) and not os.path.exists(target):
                shutil.copytree(source, target)

    def set_teacher(
        self, model: nn.Module, image_mean: list[float] | None = None, image_std: list[float] | None = None
    ) -> None:
        """Use an in-memory teacher (frozen here), normalised as `_teacher_normalization` says."""
        mean, std = self._teacher_normalization(model, image_mean, image_std)
        self._attach(FrozenTeacher(model, mean, std, self.config.teacher_layer))

    def _teacher_normalization(
        self, model: nn.Module, image_mean=None, image_std=None, path: str | None = None, subfolder: str = ""
    ) -> tuple[list[float], list[float]]:
        """The teacher's own input normalisation (never the student's): the given values, else the config's
        teacher_image_mean/std, else the teacher folder's preprocessor_config.json, else a timm teacher's
        pretrained_cfg."""
        mean = image_mean if image_mean is not None else self.config.teacher_image_mean
        std = image_std if image_std is not None else self.config.teacher_image_std
        if mean is None or std is None:
            found = (read_teacher_normalization(path, subfolder) if path else None) or timm_normalization(model)
            if found is None:
                where = f" in {path!r}" if path else ""
                raise ValueError(
                    f"no teacher input normalisation found{where} (preprocessor_config.json or timm pretrained_cfg): "
                    "set config.teacher_image_mean and config.teacher_image_std (or pass them to set_teacher)"
                )
            mean = mean if mean is not None else found[0]
            std = std if std is not None else found[1]
        return list(mean), list(std)

    def _attach(self, frozen: FrozenTeacher) -> None:
        frozen.check_grid(self.config.grid_size)
        if frozen.width != self.config.teacher_hidden_size:
            raise ValueError(
                f"the teacher's {self.config.teacher_layer} tokens are {frozen.width} wide but "
                f"config.teacher_hidden_size={self.config.teacher_hidden_size} (the head's output width); "
                "build the config with MaskDistillConfig.for_teacher(...)"
            )
        object.__setattr__(self, "_frozen_teacher", frozen)

    def images_from_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Undo the student's (ImageNet) normalisation: pixel_values -> images in [0, 1]."""
        mean = torch.tensor(self.config.image_mean, device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
        return pixel_values.to(torch.float32) * std + mean

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, D_teacher) raw teacher patch tokens (chosen layer, before N) for the student's pixel_values."""
        frozen = self.load_teacher()
        if frozen is None:
            raise ValueError(
                "MaskDistill needs a teacher for target='teacher': set config.teacher_name_or_path to a local "
                "vision-model folder (e.g. a saved CLIPVisionModel or TimmWrapperModel), call "
                "set_teacher(model, mean, std), or use target='pixels'"
            )
        num_patches = (pixel_values.shape[-2] // self.config.patch_size) * (pixel_values.shape[-1] // self.config.patch_size)
        return frozen.tokens(self.images_from_pixel_values(pixel_values), num_patches)

    def normalize_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        method, eps = self.config.target_normalization, self.config.target_norm_eps
        if method == "layer_norm":
            return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)
        if method == "layer_norm_unbiased":
            return normalize_per_token(tokens.float(), eps=eps, unbiased=True)
        return tokens.float()

    def mask_generator(self, attention_maps=None) -> BlockwiseMaskGenerator:
        """How the data pipeline masks an image for this model: BEiT block-wise masking at mask_ratio."""
        return BlockwiseMaskGenerator(
            self.config.grid_size,
            self.config.num_masking_patches,
            min_num_patches=self.config.mask_min_num_patches,
            min_aspect=self.config.mask_min_aspect,
        )

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (it is not a submodule, so nn.Module.train never reaches it)."""
        super().train(mode)
        if self._frozen_teacher is not None:
            self._frozen_teacher.model.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.maskdistill.get_input_embeddings()

    # ---- objective -----------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> MaskDistillMaskedImageModelingOutput | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Patches replaced by the mask token (True). Drawn per image with `mask_generator()` when absent.
        return_loss (`bool`, *optional*):
            None (default): compute the loss whenever a target exists; with target "teacher" and no teacher
            this is an error in training mode and `loss=None` in eval mode (predictions only). True: always
            compute it (error without a teacher). False: skip the teacher and the loss.
        """
        if pixel_values is None:
            raise ValueError("MaskDistillForMaskedImageModeling needs pixel_values")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        grid = self.maskdistill.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
        bool_masked_pos = self.mask_generator().masks(pixel_values.shape[0], grid[0] * grid[1], bool_masked_pos, pixel_values.device)

        outputs = self.maskdistill(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        predictions = self.lm_head(hidden_states[:, 1:])

        if return_loss is None:
            has_target = self.config.target == "pixels" or self.load_teacher() is not None
            return_loss = has_target or self.training  # training without a teacher: the error below
        loss = targets = patch_loss = reconstruction = None
        if return_loss:
            if self.config.target == "pixels":
                raw = patchify(pixel_values.float(), self.config.patch_size)
            else:
                raw = self.teacher_features(pixel_values)
            targets = self.normalize_targets(raw)
            if targets.shape != predictions.shape:
                raise ValueError(f"targets of shape {tuple(targets.shape)} do not match predictions {tuple(predictions.shape)}")
            patch_loss = elementwise_loss(
                predictions.float(), targets, self.config.loss, self.config.smooth_l1_beta
            ).mean(dim=-1)
            loss = weighted_token_mean(patch_loss, bool_masked_pos)
            patch_loss = patch_loss.detach()
            if self.config.target == "pixels":
                reconstruction = self._reconstruct(predictions.detach().float(), raw, pixel_values)

        output = MaskDistillMaskedImageModelingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            bool_masked_pos=bool_masked_pos,
            patch_loss=patch_loss,
            reconstruction=reconstruction,
            last_hidden_state=hidden_states,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _reconstruct(self, predictions: torch.Tensor, raw: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        method = self.config.target_normalization
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        return predictions_to_pixels(
            predictions, raw, self.config.patch_size, grid, self.config.num_channels,
            norm_eps=None if method == "none" else self.config.target_norm_eps, unbiased=method == "layer_norm_unbiased",
        )


class MaskDistillForImageClassification(ImageClassificationMixin, MaskDistillPreTrainedModel):
    """BEiT v2-style fine-tuning: per-layer relative position tables (copied from the shared pretraining
    table on load), mean of the patch tokens -> fc_norm -> linear head (`use_mean_pooling`)."""

    # a pretraining checkpoint's head, final norm and mask token (the classifier never masks)
    _keys_to_ignore_on_load_unexpected = [
        r"^lm_head\.", r"^maskdistill\.encoder\.layernorm\.", r"^maskdistill\.encoder\.embeddings\.mask_token$"
    ]
    # not reported as missing: _init_weights copies the (loaded) shared pretraining table into each block
    _keys_to_ignore_on_load_missing = [r"layers\.\d+\.rel_pos_bias\."]

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.maskdistill = MaskDistillModel(
            config, add_pooling_layer=True, per_layer_relative_position_bias=True, use_mask_token=False,
            pretrained_encoder=False,
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As PreTrainedModel's; loading re-creates parameters, so the unused shared table (the loading
        place of a pretraining checkpoint's table, copied into every block) is frozen again here."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.maskdistill.encoder.rel_pos_bias.requires_grad_(False)
        return loaded


class MaskDistillBackbone(ViTBackboneMixin, BackboneMixin, MaskDistillPreTrainedModel):
    """MaskDistill feature maps for dense heads (UperNet through `AutoBackbone`), BEiT's segmentation
    backbone: per-block relative position tables (copied from the shared pretraining table on load, as
    the classifier; bilinearly resized to the crop's grid), stages "stem", "stage1".."stageN" (block
    outputs, no final norm), resampled as `config.backbone_pyramid` says (see `backbone_common`). Loads
    a pretraining or classification checkpoint (`maskdistill.` prefix); lm_head, pooler and final norm
    are ignored.
    """

    # beyond the encoder: a pretraining checkpoint's mask token (the backbone never masks)
    _keys_to_ignore_on_load_unexpected = backbone_ignore_patterns("maskdistill") + [r"^maskdistill\.encoder\.embeddings\.mask_token$"]
    has_relative_position_bias = True  # every block owns its table already
    # not reported as missing: _init_weights copies the (loaded) shared pretraining table into each block
    _keys_to_ignore_on_load_missing = [r"layers\.\d+\.rel_pos_bias\."]

    def __init__(self, config: MaskDistillConfig):
        super().__init__(config)
        self.maskdistill = MaskDistillModel(
            config, add_pooling_layer=False, per_layer_relative_position_bias=True, use_mask_token=False
        )
        self.maskdistill.encoder.layernorm = None  # dense recipes read the blocks' outputs
        self.freeze_unused()
        self.init_pyramid(config)
        self.post_init()

    def freeze_unused(self) -> None:
        """The shared pretraining table (copied into every block) gets no gradient here: frozen, so DDP
        does not stop on a trainable parameter without a gradient (the backbone holds no mask token)."""
        self.maskdistill.encoder.rel_pos_bias.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As PreTrainedModel's; loading re-creates parameters, so the unused ones are frozen again."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_unused()
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.maskdistill.get_input_embeddings()

    def stage_hidden_states(self, pixel_values, interpolate_pos_encoding, output_attentions):
        _, hidden_states, attentions = self.maskdistill.encoder(
            pixel_values, None, interpolate_pos_encoding, True, output_attentions
        )
        return hidden_states, attentions, 1


__all__ = [
    "MaskDistillPreTrainedModel",
    "MaskDistillModel",
    "MaskDistillForMaskedImageModeling",
    "MaskDistillForImageClassification",
    "MaskDistillBackbone",
]
