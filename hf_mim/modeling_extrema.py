"""ExtreMA: extreme masking for instance and distributed visual representations (Wu et al., TMLR 2023).

BYOL in which the only difference between the branches besides colour is extreme random token
masking. The online encoder sees, for each of K disjoint random masks, only the ~20 % visible patch
tokens (no mask tokens); two class-attention blocks pool them into an instance vector, which a
projector and a predictor map to the BYOL space. The momentum (EMA) copy of encoder + projector sees
every token of the second view of the same crop. Loss: 2 - 2 cos(prediction, target) per mask, averaged
over the masks. No loss on patch tokens.

Layout of the encoder (official `vits.VisionTransformer`): patch embedding + fixed 2-D sin-cos positions
(no cls slot) -> self-attention blocks WITHOUT a cls token -> class-attention blocks that update only a
cls query -> final LayerNorm on (cls, patch tokens).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .backbone_common import ViTBackboneMixin, backbone_ignore_patterns
from .configuration_extrema import ExtremaConfig
from .masking import num_visible_patches
from .masking_disjoint import DisjointMaskGenerator, multi_mask_indices_from_bool_masked_pos
from .class_attention import ClassAttentionBlock
from .modeling_base import builds_pretrained_encoder, ImageClassificationMixin, MIMPreTrainedModel
from .training_events import MIMTrainingEventsMixin
from .vit_blocks import (
    init_as_copy,
    init_vit_weights,
    make_blocks,
    MeanPooler,
    run_blocks,
    starts_as_copy,
    VisionEmbeddings,
)
from .objectives import byol_loss


def momentum_at(progress: float, base_momentum: float, schedule: str = "cosine") -> float:
    """Momentum of the EMA update at `progress` in [0, 1] of training (official `adjust_ema_momentum`):
    "cosine": 1 - (1 + cos(pi * progress)) / 2 * (1 - base), from `base` at 0 to 1 at the end."""
    if schedule == "constant":
        return float(base_momentum)
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r}; expected 'cosine' or 'constant'")
    progress = min(max(float(progress), 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base_momentum)


@dataclass
class ExtremaMaskedImageModelingOutput(ModelOutput):
    """Output of `ExtremaForMaskedImageModeling`. K = number of masks, n = visible patches per mask.

    loss: BYOL loss (2 - 2 cos) averaged over the batch and the K masks.
    loss_per_mask: (K,) the loss of each mask.
    predictions: (B, K, projection_dim) predictor outputs of the online branch, one per mask.
    targets: (B, projection_dim) momentum-branch projections of the second view (no gradient).
    bool_masked_pos: (B, K, N) True = hidden from that mask (raster order).
    projections: (B, K, projection_dim) online projector outputs (predictor inputs).
    encoder_last_hidden_state: (B, K, 1 + n, D) online encoder after the final norm: the instance token
        (class attention) first, then the visible patch tokens in the order they entered.
    target_last_hidden_state: (B, 1 + N, D) momentum encoder after the final norm, every patch in raster order.
    hidden_states / attentions: of the online encoder, the very tensors the loss is computed from (so
        `retain_grad()` works), rows batch-major (row b * K + k = mask k of image b; `.unflatten(0, (B, K))`):
        embeddings + every self-attention block output / the self-attention maps.
    class_attentions: the class-attention maps, each (B * K, heads, 1, 1 + n), same rows.
    """

    loss: torch.Tensor | None = None
    loss_per_mask: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    projections: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    target_last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    class_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ExtremaModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` + `class_attentions`: the class-attention maps (B, heads, 1, 1 + N),
    kept apart from `attentions` (one (B, heads, N, N) map per self-attention block) so each stacks."""

    class_attentions: tuple[torch.Tensor, ...] | None = None


class ExtremaEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B', [1 +] n, D): (cls, patches) after the final norm where built
    patch_tokens: torch.Tensor  # (B', n, D): output of the self-attention stack (no final norm)
    cls_token: torch.Tensor | None  # (B', D): class-attention output before the final norm
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None  # self-attention maps
    class_attentions: tuple[torch.Tensor, ...] | None = None


class ExtremaClassTokenBlocks(nn.Module):
    """(Not named "...Attention": transformers reads a model file with an `*Attention*(nn.Module)` class
    that does not call the attention interface itself as one whose kernel cannot be switched; the
    kernels here come from `vit_blocks.attention_kernel`, read at every call.)

    The cls query (official `cls_token`, never part of the self-attention stack) and the class-attention
    blocks (official `blocks_token`) that turn the patch tokens into one instance vector."""

    def __init__(self, config: ExtremaConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.layers = nn.ModuleList(
            ClassAttentionBlock(
                config,
                config.hidden_size,
                config.num_attention_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                layer_norm_eps=config.layer_norm_eps,
                layer_scale_init_value=config.layer_scale_init_value,
            )
            for _ in range(config.num_class_attention_layers)
        )

    def forward(
        self, tokens: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        cls_token = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        attentions = () if output_attentions else None
        for layer in self.layers:
            cls_token, weights = layer(cls_token, tokens, output_attentions)
            if output_attentions:
                attentions = attentions + (weights,)
        return cls_token, attentions


class ExtremaEncoder(nn.Module):
    """The official ExtreMA ViT without its head: embeddings -> self-attention blocks (no cls token) ->
    [class attention] -> [final LayerNorm on (cls, patches)].

    `ids_keep` (B, n) or (B, K, n) selects visible patches after the positions are added (K masks are
    stacked batch-major: row b * K + k is mask k of image b, so image b's rows stay together; the
    official code stacks mask-major, which changes no number).
    """

    def __init__(
        self, config: ExtremaConfig, drop_path_rate: float, use_class_attention: bool = True, use_final_norm: bool = True
    ):
        super().__init__()
        self.embeddings = VisionEmbeddings(
            config.image_size, config.patch_size, config.num_channels, config.hidden_size, use_cls_token=False
        )
        self.layers = make_blocks(
            config,
            config.hidden_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            layer_norm_eps=config.layer_norm_eps,
            drop_path_rate=drop_path_rate,
        )
        if config.attention_dropout:
            for layer in self.layers:
                layer.attn.attention_dropout = config.attention_dropout
        self.class_attention = ExtremaClassTokenBlocks(config) if use_class_attention else None
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if use_final_norm else None

    def forward(
        self,
        pixel_values: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ExtremaEncoderOutput:
        tokens = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if ids_keep is not None:
            if ids_keep.ndim == 2:
                ids_keep = ids_keep[:, None]
            batch_size, num_masks, num_keep = ids_keep.shape
            dim = tokens.shape[-1]
            index = ids_keep.to(tokens.device).unsqueeze(-1).expand(-1, -1, -1, dim)
            tokens = torch.gather(tokens.unsqueeze(1).expand(-1, num_masks, -1, -1), 2, index)
            tokens = tokens.reshape(batch_size * num_masks, num_keep, dim)  # row b * K + k: mask k of image b
        patch_tokens, hidden_states, attentions = run_blocks(
            self.layers, tokens, output_hidden_states, output_attentions
        )
        cls_token, class_attentions = None, None
        sequence = patch_tokens
        if self.class_attention is not None:
            cls_token, class_attentions = self.class_attention(patch_tokens, output_attentions)
            sequence = torch.cat([cls_token, patch_tokens], dim=1)
            cls_token = cls_token[:, 0]
        if self.layernorm is not None:
            sequence = self.layernorm(sequence)
        return ExtremaEncoderOutput(sequence, patch_tokens, cls_token, hidden_states, attentions, class_attentions)


class ExtremaMLP(nn.Sequential):
    """Official `_build_proj` / `_build_mlp`: Linear -> LayerNorm -> GELU, ..., Linear (all with bias).

    Indices match the official keys: projector `head.{0,3,6}` Linear, `head.{1,4}` LayerNorm;
    predictor `predictor.{0,3}` Linear, `predictor.1` LayerNorm. `norm="batch_norm"` puts BYOL's
    BatchNorm in place of the LayerNorms (`ExtremaConfig.projector_norm`): always the statistics of the
    batch being projected (no running statistics: these MLPs only serve pretraining, where BYOL's target
    network also normalises with its batch), the statistics of each process under several processes.
    """

    def __init__(self, num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, norm_eps: float,
                 norm: str = "layer_norm"):
        layers: list[nn.Module] = []
        for index in range(num_layers):
            dim_in = input_dim if index == 0 else hidden_dim
            dim_out = output_dim if index == num_layers - 1 else hidden_dim
            layers.append(nn.Linear(dim_in, dim_out))
            if index < num_layers - 1:
                if norm == "batch_norm":
                    layers.append(nn.BatchNorm1d(dim_out, eps=norm_eps, track_running_stats=False))
                else:
                    layers.append(nn.LayerNorm(dim_out, eps=norm_eps))
                layers.append(nn.GELU())
        super().__init__(*layers)


def build_projector(config: ExtremaConfig) -> ExtremaMLP:
    return ExtremaMLP(3, config.hidden_size, config.projector_hidden_size, config.projection_dim,
                      config.projector_layer_norm_eps, config.projector_norm)


def build_predictor(config: ExtremaConfig) -> ExtremaMLP:
    return ExtremaMLP(2, config.projection_dim, config.projector_hidden_size, config.projection_dim,
                      config.projector_layer_norm_eps, config.projector_norm)


class ExtremaPreTrainedModel(MIMPreTrainedModel):
    config_class = ExtremaConfig
    config: ExtremaConfig
    base_model_prefix = "extrema"
    _no_split_modules = ["Block", "ClassAttentionBlock", "VisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_vit_weights(module, token_std=self.config.initializer_range)
        if isinstance(module, ExtremaClassTokenBlocks):
            init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, nn.BatchNorm1d):  # projector_norm="batch_norm"
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            # official fine-tuning: trunc_normal(0.02) then x init_scale (0.001); bias 0
            init.trunc_normal_(module.weight, std=self.config.classifier_init_std)
            init.zeros_(module.bias)
        init_as_copy(module)  # the momentum branch starts as an exact copy of the online one (official builder)


class ExtremaModel(ExtremaPreTrainedModel):
    """The ExtreMA ViT backbone. Features are deterministic: nothing is masked unless `bool_masked_pos` is given.

    `last_hidden_state` is the official encoder output: (B, 1 + N, D) = final LayerNorm of (the
    class-attention instance token, every patch token). `pooler_output` follows `config.pooling`:
    "mean" (default) = the official fine-tuning representation, `fc_norm` of the mean of the patch tokens
    after the self-attention stack (class attention and final norm not involved); "class_attention" =
    the official linear-probe representation, the instance token before the final norm.

    Loaded from a pretraining checkpoint (`builds_pretrained_encoder`): `pooler_output` is the
    class-attention instance token (the linear-probe representation pretraining trained), whatever
    `config.pooling` says, and no `fc_norm` is built.

    Args:
        add_pooling_layer: build `pooler` (`fc_norm`) for the "mean" representation.
        use_class_attention / use_final_norm: build the class-attention blocks and the final norm
            (the fine-tuning classifier drops both, as the official fine-tuning model).
        pretrained_encoder: the layout above (None: as `builds_pretrained_encoder` decides).
    """

    # Loaded from a pretraining or classification checkpoint: the heads around the backbone are not needed.
    _keys_to_ignore_on_load_unexpected = [
        r"^projector\.", r"^predictor\.", r"^momentum_encoder\.", r"^momentum_projector\.", r"^classifier\."
    ]

    def __init__(
        self,
        config: ExtremaConfig,
        add_pooling_layer: bool = True,
        use_class_attention: bool = True,
        use_final_norm: bool = True,
        pretrained_encoder: bool | None = None,
    ):
        super().__init__(config)
        self.pretrained_encoder = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        if add_pooling_layer and (config.pooling == "class_attention" or self.pretrained_encoder) and not use_class_attention:
            raise ValueError("pooling='class_attention' needs the class-attention blocks (use_class_attention=True)")
        self.encoder = ExtremaEncoder(
            config, config.drop_path_rate, use_class_attention=use_class_attention, use_final_norm=use_final_norm
        )
        mean_pooling = add_pooling_layer and config.pooling == "mean" and not self.pretrained_encoder
        self.pooler = MeanPooler(config.hidden_size, config.layer_norm_eps, num_prefix_tokens=0) if mean_pooling else None
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
            True = drop that patch: the encoder then sees only the visible patches (raster order), as the
            ExtreMA student. Every image must keep the same number of patches.
        """
        if pixel_values is None:
            raise ValueError("ExtremaModel needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        ids_keep = None
        if bool_masked_pos is not None:
            if bool_masked_pos.ndim != 2:
                raise ValueError(
                    f"ExtremaModel takes one mask per image, bool_masked_pos of shape (batch, num_patches); got "
                    f"{tuple(bool_masked_pos.shape)} (several masks: ExtremaForMaskedImageModeling)"
                )
            ids_keep = multi_mask_indices_from_bool_masked_pos(
                bool_masked_pos.to(pixel_values.device), num_visible_patches(bool_masked_pos.shape[-1], self.config.mask_ratio)
            ).ids_keep[:, 0]
        encoded = self.encoder(
            pixel_values,
            ids_keep=ids_keep,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        if self.pooler is not None:
            pooled = self.pooler(encoded.patch_tokens)
        elif self.add_pooling_layer and (self.config.pooling == "class_attention" or self.pretrained_encoder):
            pooled = encoded.cls_token
        else:
            pooled = None
        output = ExtremaModelOutput(
            last_hidden_state=encoded.last_hidden_state,
            pooler_output=pooled,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            class_attentions=encoded.class_attentions,
        )
        return output if return_dict else output.to_tuple()


class ExtremaForMaskedImageModeling(MIMTrainingEventsMixin, ExtremaPreTrainedModel):
    """The ExtreMA pretraining objective: online encoder on K masked copies + projector + predictor, momentum
    encoder + projector on the second view, BYOL loss averaged over the masks.

    Training events (`MIMTrainingEventsMixin`, called by the generic loop in `hf_mim.training`):
    `on_train_step_start(progress)` before every optimizer step's forward applies the EMA update with the
    cosine momentum schedule: the official order (the EMA update inside the forward, with the online weights
    before this step's optimizer update, before the teacher pass; the first step included, which matters
    when the momentum branch starts different from the online one, as in a released checkpoint).
    `update_momentum_encoder(m)` applies one update with an explicit momentum.

    Linear probing (paper protocol: the momentum encoder, final norm removed, cls token after class
    attention): `model.momentum_backbone().save_pretrained(dir)`, then
    `ExtremaForImageClassification.from_pretrained(dir, num_labels=...)`.
    """

    _keys_to_ignore_on_load_unexpected = [r"^extrema\.pooler\.", r"^classifier\."]
    # official `no_weight_decay()`: {pos_embed, cls_token} (1-D tensors and biases are never decayed)
    pretraining_no_weight_decay = ("cls_token", "position_embeddings")

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.extrema = ExtremaModel(config, add_pooling_layer=False)
        # The online positions are the fixed sin-cos table during pretraining (official requires_grad=False).
        self.extrema.encoder.embeddings.position_embeddings.requires_grad_(False)
        self.projector = build_projector(config)
        self.predictor = build_predictor(config)
        # Registered after the online modules: `_init_weights` copies them into these (`starts_as_copy`).
        self.momentum_encoder = ExtremaEncoder(config, drop_path_rate=0.0)
        self.momentum_projector = build_projector(config)
        for _, online, momentum in self._branch_pairs():
            starts_as_copy(momentum, online)
        self.momentum_encoder.requires_grad_(False)
        self.momentum_projector.requires_grad_(False)
        self.momentum_encoder.eval()
        self.momentum_projector.eval()
        self.post_init()

    def _branch_pairs(self) -> list[tuple[str, nn.Module, nn.Module]]:
        return [
            ("extrema.encoder", self.extrema.encoder, self.momentum_encoder),
            ("projector", self.projector, self.momentum_projector),
        ]

    def train(self, mode: bool = True):
        """The momentum branch stays in eval mode: it is a target network without gradients."""
        super().train(mode)
        self.momentum_encoder.eval()
        self.momentum_projector.eval()
        return self

    # ---------------------------------------------------------------- masks

    def mask_generator(self, attention_maps=None) -> DisjointMaskGenerator:
        """How the data pipeline masks an image for this model: callable(generator) -> (num_masks, N) bool,
        True = hidden from that mask. A collator stacks them into `bool_masked_pos` (B, num_masks, N)."""
        return DisjointMaskGenerator(
            self.config.image_size // self.config.patch_size,
            self.config.mask_ratio,
            self.config.num_masks,
            disjoint=self.config.disjoint_masks,
        )

    # ---------------------------------------------------------------- momentum branch

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online_params, momentum_params = [], []
        for _, online, momentum in self._branch_pairs():
            online_named = dict(online.named_parameters())
            for name, tensor in momentum.named_parameters():
                online_params.append(online_named[name])
                momentum_params.append(tensor)
        return online_params, momentum_params

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """theta_m <- momentum * theta_m + (1 - momentum) * theta_online, over every parameter of the encoder
        (class attention, final norm and frozen positions included) and of the projector (official
        `_update_momentum_encoder`); the predictor has no momentum twin."""
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        online_params, momentum_params = self._ema_pairs()
        online_params = [p.detach().to(q.dtype) for p, q in zip(online_params, momentum_params)]
        torch._foreach_mul_(momentum_params, momentum)
        torch._foreach_add_(momentum_params, online_params, alpha=1.0 - momentum)

    def momentum_at(self, progress: float) -> float:
        """The scheduled momentum at `progress` (fraction of training done)."""
        return momentum_at(progress, self.config.ema_momentum, self.config.ema_momentum_schedule)

    def on_train_step_start(self, progress: float) -> float:
        """Before each optimizer step's forward (progress = steps done / total, the official fractional epoch
        / epochs): EMA update with the scheduled momentum. Returns the momentum used."""
        momentum = self.momentum_at(progress)
        self.update_momentum_encoder(momentum)
        return momentum

    @torch.no_grad()
    def momentum_targets(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(targets (B, projection_dim), last_hidden_state (B, 1 + N, D)) of the momentum branch on full images."""
        encoded = self.momentum_encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.momentum_projector(encoded.last_hidden_state[:, 0]), encoded.last_hidden_state

    def exported_backbones(self) -> dict:
        """The momentum encoder as a class-attention backbone: what the paper linear-probes."""
        return {"momentum_encoder": self.momentum_backbone()}

    def momentum_backbone(self, pooling: str = "class_attention") -> ExtremaModel:
        """An `ExtremaModel` holding the momentum encoder's weights (what the paper linear-probes).

        With `pooling="class_attention"` (default) its `pooler_output` is the probe feature of the
        official `main_lincls.py --eval_momentum`: the instance token after class attention, final norm
        removed. Save it with `save_pretrained` (or `hf_mim.hub.save_hub_folder`) and load it into
        `ExtremaForImageClassification` for the linear probe. `pooling="mean"` gives the fine-tuning
        representation instead (with a fresh `fc_norm`).
        """
        config = copy.deepcopy(self.config)
        config.pooling = pooling
        config.validate()
        reference = next(self.momentum_encoder.parameters())
        backbone = ExtremaModel(config, pretrained_encoder=False).to(device=reference.device, dtype=reference.dtype)
        backbone.encoder.load_state_dict(self.momentum_encoder.state_dict())
        return backbone.eval()

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_values_2: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ExtremaMaskedImageModelingOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`):
            First view: masked, seen by the online encoder.
        pixel_values_2 (`torch.FloatTensor` of the same shape, *optional*):
            Second view (same crop, different colour jitter in the paper): seen whole by the momentum
            encoder. Defaults to `pixel_values` (the official single-tensor input).
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_masks, num_patches)`, *optional*):
            The K masks of each image, True = hidden from that mask; every mask keeps the same number of
            patches, which enter the encoder in raster order. A (batch_size, num_patches) tensor is one mask.
        noise (`torch.FloatTensor`, *optional*):
            Official mask noise: (batch_size, num_patches) gives disjoint masks cut from `argsort(noise)`
            (mask k keeps ranks k*n .. (k+1)*n - 1, in that order); (batch_size, num_masks, num_patches)
            gives independent masks. Drawn with `torch.rand` (shape from `config.disjoint_masks`) when
            neither this nor `bool_masked_pos` is given.
        """
        if pixel_values is None:
            raise ValueError("ExtremaForMaskedImageModeling needs pixel_values")
        if pixel_values_2 is None:
            pixel_values_2 = pixel_values
        elif pixel_values_2.shape != pixel_values.shape:
            raise ValueError(
                f"pixel_values_2 {tuple(pixel_values_2.shape)} must have the shape of pixel_values {tuple(pixel_values.shape)}"
            )
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )

        patch_embeddings = self.extrema.encoder.embeddings.patch_embeddings
        grid = patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        batch_size = pixel_values.shape[0]
        mask = self.mask_generator().masks(batch_size, grid[0] * grid[1], bool_masked_pos, noise, pixel_values.device)
        num_masks = mask.ids_keep.shape[1]

        # Online branch: all K masks in one pass, batch-major rows (b * K + k).
        encoded = self.extrema.encoder(
            pixel_values,
            ids_keep=mask.ids_keep,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        projections = self.projector(encoded.last_hidden_state[:, 0])
        predictions = self.predictor(projections)

        targets, target_hidden = self.momentum_targets(pixel_values_2, interpolate_pos_encoding=interpolate_pos_encoding)

        per_sample = byol_loss(predictions.float().view(batch_size, num_masks, -1), targets.float()[:, None]).T
        loss_per_mask = per_sample.mean(dim=1)
        loss = loss_per_mask.mean()

        def batch_major(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.unflatten(0, (batch_size, num_masks))

        output = ExtremaMaskedImageModelingOutput(
            loss=loss,
            loss_per_mask=loss_per_mask,
            predictions=batch_major(predictions),
            targets=targets,
            bool_masked_pos=mask.bool_masked_pos,
            projections=batch_major(projections),
            encoder_last_hidden_state=batch_major(encoded.last_hidden_state),
            target_last_hidden_state=target_hidden,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            class_attentions=encoded.class_attentions,
        )
        return output if return_dict else output.to_tuple()


class ExtremaForImageClassification(ImageClassificationMixin, ExtremaPreTrainedModel):
    """ExtreMA fine-tuning / linear-probe model.

    `config.pooling == "mean"` (default): the official fine-tuning model: mean of the patch tokens after
    the self-attention stack -> `fc_norm` -> linear head; no class attention, no final norm, learnable
    positions (initialised from the checkpoint's table). `config.pooling == "class_attention"`: the
    official linear-probe feature (instance token after class attention, no final norm) -> linear head.

    Loading a pretraining checkpoint keeps the online encoder; the projector, predictor, momentum branch
    (and, for mean pooling, class attention and final norm) are pretraining-only and ignored, `fc_norm`
    and the head start fresh (reported as missing).
    """

    _keys_to_ignore_on_load_unexpected = [
        r"^projector\.",
        r"^predictor\.",
        r"^momentum_encoder\.",
        r"^momentum_projector\.",
        r"^extrema\.encoder\.layernorm\.",
        r"^extrema\.encoder\.class_attention\.",
    ]

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.extrema = ExtremaModel(
            config,
            add_pooling_layer=True,
            use_class_attention=config.pooling == "class_attention",
            use_final_norm=False,
            pretrained_encoder=False,
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()


class ExtremaBackbone(ViTBackboneMixin, BackboneMixin, ExtremaPreTrainedModel):
    """ExtreMA feature maps for dense heads (UperNet through `AutoBackbone`): the self-attention stack
    only (no cls token enters it; no class attention, no final norm, as the CAE-based dense recipe),
    stages "stem", "stage1".."stageN", resampled as `config.backbone_pyramid` says (see
    `backbone_common`). Loads the online encoder of a pretraining or classification checkpoint
    (`extrema.` prefix); projector, predictor, momentum branch and class attention are ignored.
    """

    _keys_to_ignore_on_load_unexpected = backbone_ignore_patterns("extrema") + [r"^extrema\.encoder\.class_attention\."]

    def __init__(self, config: ExtremaConfig):
        super().__init__(config)
        self.extrema = ExtremaModel(config, add_pooling_layer=False, use_class_attention=False, use_final_norm=False)
        self.init_pyramid(config)
        self.post_init()


__all__ = [
    "ExtremaPreTrainedModel",
    "ExtremaModel",
    "ExtremaForMaskedImageModeling",
    "ExtremaForImageClassification",
    "ExtremaBackbone",
]
