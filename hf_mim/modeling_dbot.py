"""dBOT: masked knowledge distillation with bootstrapped teachers (Liu et al., ICLR 2024).

A MAE-style student (encoder on the visible 25 % of patches, narrow decoder) regresses, at every
position, the per-token-normalised features a frozen teacher computes from the full image (Smooth-L1,
beta 2, masked patches + cls). Training runs in stages: the stage-0 teacher is the student's own
random initialisation (or, with `config.teacher_name_or_path`, a given frozen teacher: CLIP, timm or
hf_mim, see hf_mim/teachers.py); at each stage boundary `start_new_stage()` makes the student the teacher
and re-initialises the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbone_common import ViTBackboneMixin, backbone_ignore_patterns
from .configuration_dbot import DbotConfig
from .masking import indices_from_bool_masked_pos, num_masked_patches, RandomMaskGenerator
from .modeling_base import backbone_output, builds_pretrained_encoder, ImageClassificationMixin, MIMPreTrainedModel
from .training_events import MIMTrainingEventsMixin
from .vit_blocks import (
    forget_initialization,
    init_as_copy,
    init_vit_weights,
    MaeDecoder,
    MeanPooler,
    starts_as_copy,
    ViTEncoder,
)
from .objectives import elementwise_loss, normalize_per_token, weighted_token_mean
from .teachers import FrozenTeacherMixin


@dataclass
class DbotMaskedImageModelingOutput(ModelOutput):
    """Output of `DbotForMaskedImageModeling`.

    Token sequences have the cls position at index 0, then every patch in raster order.

    loss: Smooth-L1 over masked patches + cls (masked patches only with an external stage-0 teacher).
    predictions: (B, 1 + N, D) decoder predictions of the teacher features.
    targets: (B, 1 + N, D) teacher features after per-token normalisation; (B, N, D) patch tokens only
        with an external stage-0 teacher (`config.teacher_name_or_path` or `set_teacher`).
    bool_masked_pos: (B, N) True = hidden from the student.
    patch_loss: (B, N) per-patch loss (mean over channels) for every patch, masked or not, for pictures.
    encoder_last_hidden_state: (B, 1 + num_visible, D) student encoder output (cls, then visible patches
        in the order they entered).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    patch_loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def build_vit_encoder(config: DbotConfig, depth: int, use_final_norm: bool, drop_path_rate: float) -> ViTEncoder:
    return ViTEncoder(
        config,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        dim=config.hidden_size,
        depth=depth,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        drop_path_rate=drop_path_rate,
        use_final_norm=use_final_norm,
    )


def build_decoder(config: DbotConfig) -> MaeDecoder:
    """MAE's decoder regressing the teacher width (`decoder_pred` is the official `decoder_predp`)."""
    return MaeDecoder(
        config,
        input_dim=config.hidden_size,
        dim=config.decoder_hidden_size,
        depth=config.decoder_num_hidden_layers,
        num_heads=config.decoder_num_attention_heads,
        output_dim=config.target_size,
        grid_size=config.image_size // config.patch_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        drop_path_rate=config.drop_path_rate,
    )


class DbotPreTrainedModel(MIMPreTrainedModel):
    config_class = DbotConfig
    config: DbotConfig
    base_model_prefix = "dbot"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_vit_weights(module, token_std=self.config.initializer_range)
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.classifier_init_std)
            init.zeros_(module.bias)
        init_as_copy(module)  # the stage-0 teacher is the student's own initialisation (official main_pretrain.py)


class DbotModel(DbotPreTrainedModel):
    """The dBOT ViT backbone. Features are deterministic: nothing is masked unless `bool_masked_pos` is given.

    With `add_pooling_layer` and `config.use_mean_pooling` (the fine-tuning layout), the final
    LayerNorm is replaced by `pooler.fc_norm` on the mean of the patch tokens, exactly as the official
    fine-tuning model; otherwise `last_hidden_state` is normalised and `pooler_output` is the cls token.
    Loaded from a pretraining checkpoint (`builds_pretrained_encoder`): the final LayerNorm is kept and
    `pooler_output` is the plain mean of its patch tokens (nothing untrained).
    """

    # a pretraining checkpoint's decoder and teacher, a fine-tuned checkpoint's head
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^teacher\.", r"^classifier\."]

    def __init__(self, config: DbotConfig, add_pooling_layer: bool = True, pretrained_encoder: bool | None = None):
        super().__init__(config)
        pretrained = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        mean_pooling = add_pooling_layer and config.use_mean_pooling
        self.encoder = build_vit_encoder(
            config, config.num_hidden_layers, use_final_norm=pretrained or not mean_pooling, drop_path_rate=config.drop_path_rate
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
            True = drop that patch; the encoder then sees the cls token and the visible patches (raster
            order), as in MAE. Every image must mask the same number of patches.
        """
        if pixel_values is None:
            raise ValueError("DbotModel needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        ids_keep = None
        if bool_masked_pos is not None:
            ids_keep = indices_from_bool_masked_pos(
                bool_masked_pos.to(pixel_values.device), num_masked_patches(bool_masked_pos.shape[-1], self.config.mask_ratio)
            ).ids_keep
        encoded = self.encoder(
            pixel_values,
            ids_keep=ids_keep,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return backbone_output(
            encoded.last_hidden_state, self.pooler, self.add_pooling_layer, encoded.hidden_states, encoded.attentions, return_dict
        )


class DbotForMaskedImageModeling(MIMTrainingEventsMixin, FrozenTeacherMixin, DbotPreTrainedModel):
    """The dBOT pretraining objective: student + decoder + frozen teacher + Smooth-L1 distillation loss.

    `teacher` is the bootstrapped teacher (a submodule, saved with the student); an external stage-0
    teacher (`config.teacher_name_or_path` or `set_teacher`, `external_teacher`) replaces it in stage 0
    only and is never saved."""

    has_training_stages = True  # start_new_stage: teacher <- student, student re-initialised
    pretraining_no_weight_decay = ()  # official: timm add_weight_decay, no skip list (cls and mask tokens decayed)

    _keys_to_ignore_on_load_unexpected = [r"^dbot\.pooler\.", r"^classifier\."]

    def __init__(self, config: DbotConfig):
        super().__init__(config)
        self.dbot = DbotModel(config, add_pooling_layer=False)
        # The student's positions are the fixed sin-cos table during pretraining.
        self.dbot.encoder.embeddings.position_embeddings.requires_grad_(False)
        self.decoder = build_decoder(config)
        self.teacher = self._build_teacher(config.teacher_depth)
        self.init_frozen_teacher()
        self.post_init()

    def uses_external_teacher(self) -> bool:
        """An external teacher (when one is configured or set) replaces the random one in stage 0 only."""
        return self.config.stage == 0

    def external_teacher_width(self) -> int:
        return self.config.target_size

    def _build_teacher(self, depth: int) -> ViTEncoder:
        teacher = build_vit_encoder(self.config, depth, use_final_norm=self.config.teacher_use_final_norm, drop_path_rate=0.0)
        teacher.requires_grad_(False)
        teacher.eval()
        starts_as_copy(teacher, self.dbot.encoder)
        return teacher

    def train(self, mode: bool = True):
        """The teacher stays in eval mode: it is a fixed target network."""
        super().train(mode)
        self.teacher.eval()
        return self

    def mask_generator(self, attention_maps=None) -> RandomMaskGenerator:
        """How the data pipeline masks an image for this model: MAE uniform random masking at mask_ratio."""
        return RandomMaskGenerator(self.config.image_size // self.config.patch_size, self.config.mask_ratio)

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, 1 + N, D) teacher tokens on the full image (last block; final norm only if configured)."""
        return self.teacher(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DbotMaskedImageModelingOutput | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Which patches to hide (True), the same count per image; visible patches enter in raster order.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            MAE masking noise: the `len_keep` smallest values stay visible, in ascending-noise order.
            Drawn with `torch.rand` when neither this nor `bool_masked_pos` is given.
        """
        if pixel_values is None:
            raise ValueError("DbotForMaskedImageModeling needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )

        patch_embeddings = self.dbot.encoder.embeddings.patch_embeddings
        grid = patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        mask = self.mask_generator().masks(
            pixel_values.shape[0], grid[0] * grid[1], bool_masked_pos, noise, pixel_values.device
        )

        encoded = self.dbot.encoder(
            pixel_values,
            ids_keep=mask.ids_keep,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        predictions = self.decoder(encoded.last_hidden_state, mask.ids_restore, grid)

        if self.load_teacher() is not None:  # stage 0 from a given teacher: its patch tokens, no cls
            targets = self.external_teacher_features(pixel_values).float()
            prediction_tokens, weights = predictions[:, 1:], mask.bool_masked_pos
        else:
            targets = self.teacher_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            # The cls position is always part of the loss (official forward_loss), then the masked patches.
            prediction_tokens = predictions
            weights = torch.cat([torch.ones_like(mask.bool_masked_pos[:, :1]), mask.bool_masked_pos], dim=1)
        if self.config.normalize_targets:
            targets = normalize_per_token(targets, eps=self.config.target_norm_eps, unbiased=True)
        if targets.shape[-1] != predictions.shape[-1]:
            raise ValueError(
                f"teacher width {targets.shape[-1]} differs from the prediction width {predictions.shape[-1]}"
            )
        token_loss = elementwise_loss(prediction_tokens.float(), targets.float(), "smooth_l1", self.config.smooth_l1_beta).mean(dim=-1)
        loss = weighted_token_mean(token_loss, weights)
        patch_loss = token_loss[:, -mask.bool_masked_pos.shape[1]:].detach()

        output = DbotMaskedImageModelingOutput(
            loss=loss,
            predictions=predictions,
            targets=targets,
            bool_masked_pos=mask.bool_masked_pos,
            patch_loss=patch_loss,
            encoder_last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()

    def training_logs(self, output) -> dict[str, float]:
        return {"stage": self.config.stage}

    @torch.no_grad()
    def start_new_stage(self) -> None:
        """Bootstrap: the current student encoder becomes the frozen teacher, the student (encoder and
        decoder) is re-initialised from scratch, and `config.stage` advances.

        Parameters are re-drawn in place, so an optimizer keeps working on the same tensors (the official
        code also keeps its AdamW moments across stages). The teacher is rebuilt only if its depth changes.
        An external stage-0 teacher is dropped: from stage 1 on the student is the teacher.
        """
        if self.config.target_size != self.config.hidden_size:
            raise ValueError(
                f"config.teacher_hidden_size={self.config.teacher_hidden_size} differs from hidden_size="
                f"{self.config.hidden_size}: the decoder regresses the external teacher's width and cannot regress the "
                "bootstrapped teacher of the next stage; train one stage (--num_stages 1) or use a teacher as wide as the student"
            )
        student = self.dbot.encoder
        if self.config.teacher_depth != self.config.num_hidden_layers:
            reference = next(student.parameters())
            with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the generator as it is
                self.teacher = self._build_teacher(self.config.num_hidden_layers).to(reference.device, reference.dtype)
            self.config.teacher_depth = self.config.num_hidden_layers
        teacher_state = self.teacher.state_dict()
        for name, tensor in student.state_dict().items():
            if name in teacher_state:
                teacher_state[name].copy_(tensor)
        self.reinitialize_student()
        self.config.stage += 1
        self.drop_teacher()

    @torch.no_grad()
    def reinitialize_student(self) -> None:
        """The student (encoder and decoder) re-drawn as the official `initialize_weights` does at a stage
        boundary, in its order, so that the same generator state gives the official weights: the decoder's
        mask token, the patch projection (xavier on its flattened view), the cls token, then every Linear and
        LayerNorm in module order; the fixed sin-cos tables re-set. The patch projection's bias keeps its
        trained value: the official code initialises Linear and LayerNorm modules only, and the patch
        embedding is a Conv2d."""
        std = self.config.initializer_range
        for module in (self.dbot, self.decoder):
            forget_initialization(module)
        embeddings = self.dbot.encoder.embeddings
        init_vit_weights(self.decoder, token_std=std)  # its mask token (and fixed table) only
        projection = embeddings.patch_embeddings.projection.weight
        nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
        init_vit_weights(embeddings, token_std=std)  # the cls token (and fixed table)
        for module in (*self.dbot.modules(), *self.decoder.modules()):
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                init_vit_weights(module, token_std=std)


class DbotForImageClassification(ImageClassificationMixin, DbotPreTrainedModel):
    """dBOT fine-tuning model: mean of patch tokens -> fc_norm -> linear head (official `global_pool`).

    Loading a pretraining checkpoint keeps the backbone; the decoder, teacher and the pretraining final
    norm are pretraining-only and ignored, `fc_norm` and the head start fresh (reported as missing).
    """

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^teacher\.", r"^dbot\.encoder\.layernorm\."]

    def __init__(self, config: DbotConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dbot = DbotModel(config, add_pooling_layer=True, pretrained_encoder=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()


class DbotBackbone(ViTBackboneMixin, BackboneMixin, DbotPreTrainedModel):
    """dBOT feature maps for dense heads (UperNet through `AutoBackbone`), the MAE/BEiT segmentation
    backbone: stages "stem", "stage1".."stageN" (block outputs, no final norm), resampled as
    `config.backbone_pyramid` says (see `backbone_common`). Loads the encoder of a pretraining or
    classification checkpoint (`dbot.` prefix); the decoder, teacher, pooler and final norm are ignored.
    """

    _keys_to_ignore_on_load_unexpected = backbone_ignore_patterns("dbot")

    def __init__(self, config: DbotConfig):
        super().__init__(config)
        self.dbot = DbotModel(config, add_pooling_layer=False)
        self.dbot.encoder.layernorm = None  # dense recipes read the blocks' outputs
        self.init_pyramid(config)
        self.post_init()


__all__ = ["DbotPreTrainedModel", "DbotModel", "DbotForMaskedImageModeling", "DbotForImageClassification", "DbotBackbone"]
