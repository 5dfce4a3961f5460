"""AMT: attention-driven masking and throwing (Liu, Gui, Luo; AAAI 2023), plugged into MAE and SimMIM.

The model being trained is its own guide. Every `amt_interval` of training an extra pass over the data
reads the LAST block's cls-to-patch attention on each full image (`attention_scores`), one map per
image. A training crop's map then orders its mask units by weighted sampling without replacement: the
first r are masked (reconstructed), the next t thrown (seen by nobody, not reconstructed, not in the
loss), the rest visible. Until the first refresh the masks are uniformly random.

- variant "mae": the encoder sees the visible patches; the decoder fills mask tokens for masked and
  thrown patches, adds positions, then drops the thrown ones; MSE on the masked patches.
- variant "simmim": masked patches become the mask token in place, thrown patches are dropped after the
  position embedding; a per-token linear head (SimMIM's 1x1 conv + pixel shuffle); L1 on masked pixels.
- `masking_strategy="random"` gives the plain MAE / SimMIM baselines.
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
from .configuration_amt import AmtConfig
from .masking import (
    AttentionMaskGenerator,
    ThrowMasks,
    indices_from_bool_masked_pos,
    normalized_cls_attention,
)
from .modeling_common import (
    MIMPreTrainedModel,
    MIMTrainingEventsMixin,
    ImageClassificationMixin,
    MaeDecoder,
    MeanPooler,
    builds_pretrained_encoder,
    ViTEncoder,
    VisionEmbeddings,
    backbone_output,
    gather_tokens,
    init_beit_weights,
    init_vit_weights,
    tag_beit_rescaled_layers,
)
from .objectives import elementwise_loss, normalize_per_token, patchify, predictions_to_pixels, weighted_token_mean

# Classifier head init: MAE's fine-tuning (trunc-normal 2e-5) and BEiT/SimMIM's (trunc-normal 0.02).
CLASSIFIER_INIT_STD = {"mae": 2e-5, "simmim": 0.02}
# Official mask-count rounding: mae-AMT uses int(), SimMIM-AMT ceil().
COUNT_ROUNDING = {"mae": "floor", "simmim": "ceil"}
# The hosts' pixel losses: MAE's MSE per patch, SimMIM's L1 per pixel.
PIXEL_LOSS = {"mae": "mse", "simmim": "l1"}


@dataclass
class AmtMaskedImageModelingOutput(ModelOutput):
    """Output of `AmtForMaskedImageModeling`.

    loss: MAE: MSE over masked patches; SimMIM: L1 over masked pixels.
    predictions: (B, K, p*p*C) pixel predictions of the K unthrown patches, raster order, patchify layout
        (per-patch normalised values when `norm_pix_loss`).
    bool_masked_pos, bool_thrown_pos: (B, N) the masks used (True = masked / thrown).
    reconstruction: (B, C, H, W) the predictions as an image in the input's normalised pixel space;
        thrown patches are 0.
    patch_loss: (B, N) per-patch loss (0 for thrown patches), for pictures.
    patch_scores: (B, N) the per-patch attention weights the masks were drawn from (None when random).
    patch_labels: (B, N) 0 visible, 1 masked, 2 thrown.
    encoder_last_hidden_state: (B, 1 + K', D) the encoder output (cls first).
    attention_map: (B, rows, cols) only with `attention_scores_only=True`: `attention_scores(pixel_values)`.
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    bool_thrown_pos: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    patch_loss: torch.Tensor | None = None
    patch_scores: torch.Tensor | None = None
    patch_labels: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_map: torch.Tensor | None = None


def build_encoder(config: AmtConfig, use_final_norm: bool, use_mask_token: bool) -> ViTEncoder:
    """MAE: plain ViT with a sin-cos table. SimMIM: BEiT-style ViT (layer scale, learned absolute
    positions, a mask token when pretraining; k bias is inert under softmax, so a fused qkv bias equals
    BEiT's q/v biases)."""
    simmim = config.variant == "simmim"
    encoder = ViTEncoder(
        config,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        layer_norm_eps=config.layer_norm_eps,
        drop_path_rate=config.drop_path_rate,
        layer_scale_init_value=config.layer_scale_init_value or None,
        use_final_norm=use_final_norm,
        use_mask_token=use_mask_token,
        layer_scale_attention=config.apply_attention_layer_scale,
    )
    if simmim:
        tag_beit_rescaled_layers(encoder.layers)
    return encoder


class AmtPreTrainedModel(MIMPreTrainedModel):
    config_class = AmtConfig
    config: AmtConfig
    base_model_prefix = "amt"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """MAE variant: MAE's initialisation; SimMIM variant: BEiT's. The position table is the sin-cos
        table or trunc-normal, as `position_embedding_type` says."""
        std = self.config.initializer_range
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=CLASSIFIER_INIT_STD[self.config.variant])
            init.zeros_(module.bias)
            return
        if self.config.variant == "mae":
            init_vit_weights(module, token_std=std)
        else:
            init_beit_weights(module, std)
        if isinstance(module, VisionEmbeddings):
            if self.config.position_embedding_type == "sincos":
                init.copy_(module.position_embeddings, module.sincos_table())
            else:
                init.trunc_normal_(module.position_embeddings, std=std)


class AmtModel(AmtPreTrainedModel):
    """The ViT backbone of an AMT model. Nothing is masked unless masks are given.

    With `add_pooling_layer` and `config.use_mean_pooling` (MAE fine-tuning) the final LayerNorm is
    replaced by `pooler.fc_norm` on the mean of the patch tokens; otherwise `pooler_output` is the cls
    token after the final norm (SimMIM fine-tuning). `use_mask_token` (SimMIM pretraining) adds the
    token masked patches are replaced by; fine-tuning models have none (no unused parameter under DDP).
    Loaded from a pretraining checkpoint (`builds_pretrained_encoder`), the MAE variant keeps the final
    LayerNorm and `pooler_output` is the plain mean of its patch tokens (nothing untrained).
    """

    # SimMIM's mask token, a pretraining checkpoint's pixel decoder, a fine-tuned checkpoint's head
    _keys_to_ignore_on_load_unexpected = [r"embeddings\.mask_token$", r"^decoder\.", r"^classifier\."]

    def __init__(
        self, config: AmtConfig, add_pooling_layer: bool = True, use_mask_token: bool = False, pretrained_encoder: bool | None = None
    ):
        super().__init__(config)
        pretrained = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        mean_pooling = add_pooling_layer and config.use_mean_pooling
        self.encoder = build_encoder(config, use_final_norm=pretrained or not mean_pooling, use_mask_token=use_mask_token)
        self.pooler = (
            MeanPooler(config.hidden_size, config.layer_norm_eps, num_prefix_tokens=1, use_fc_norm=not pretrained)
            if mean_pooling else None
        )
        self.add_pooling_layer = add_pooling_layer
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.embeddings.patch_embeddings

    def encode(
        self,
        pixel_values: torch.Tensor,
        masks: ThrowMasks | None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        counts: tuple[int, int] | None = None,
    ):
        """The encoder on a masked image, as the variant does it. Returns (EncoderOutput, MAE's
        index form of the removed patches or None).

        MAE: only the visible patches enter (raster order). SimMIM: masked patches become the mask
        token before positions are added, thrown patches are dropped after. `counts`: the (masked,
        thrown) patches per image of `masks` (`AttentionMaskGenerator.masks`), which fix the encoder's sequence length.
        """
        if masks is None:
            encoded = self.encoder(
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
            return encoded, None
        num_masked, num_thrown = counts
        if self.config.variant == "mae":
            removed = indices_from_bool_masked_pos(masks.bool_masked_pos | masks.bool_thrown_pos, num_masked + num_thrown)
            encoded = self.encoder(
                pixel_values,
                ids_keep=removed.ids_keep,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )
            return encoded, removed
        ids_unthrown = indices_from_bool_masked_pos(masks.bool_thrown_pos, num_thrown).ids_keep if num_thrown else None
        encoded = self.encoder(
            pixel_values,
            ids_keep=ids_unthrown,
            bool_masked_pos=masks.bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return encoded, None

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        bool_thrown_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Masked patches: dropped (MAE) or replaced by the mask token (SimMIM).
        bool_thrown_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Thrown patches, dropped from the encoder input. Same counts in every image.
        """
        if pixel_values is None:
            raise ValueError("AmtModel needs pixel_values")
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        masks = counts = None
        if bool_masked_pos is not None or bool_thrown_pos is not None:
            rows, cols = self.encoder.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
            masks, counts = amt_mask_generator(self.config).given_masks(
                bool_masked_pos, bool_thrown_pos, (pixel_values.shape[0], rows * cols), pixel_values.device
            )
        encoded, _ = self.encode(
            pixel_values, masks, interpolate_pos_encoding, output_hidden_states, output_attentions, counts
        )
        return backbone_output(
            encoded.last_hidden_state, self.pooler, self.add_pooling_layer, encoded.hidden_states, encoded.attentions, return_dict
        )


def amt_mask_generator(config: AmtConfig, attention_maps=None) -> AttentionMaskGenerator:
    """The masks `config` asks for (per example from `attention_maps`, the loop's store, when given)."""
    return AttentionMaskGenerator(
        patch_grid=config.image_size // config.patch_size,
        patch_size=config.patch_size,
        unit_size=config.mask_patch_size // config.patch_size,
        mask_ratio=config.mask_ratio,
        throw_ratio=config.throw_ratio,
        warmup_mask_ratio=config.effective_warmup_mask_ratio,
        rounding=COUNT_ROUNDING[config.variant],
        strategy=config.masking_strategy,
        store=attention_maps,
    )


class AmtForMaskedImageModeling(MIMTrainingEventsMixin, AmtPreTrainedModel):
    """MAE or SimMIM pretraining with attention-driven masking and throwing.

    Training events (`MIMTrainingEventsMixin`) the generic loop calls: `mask_generator(attention_maps)`
    (per-example masks drawn from the loop's attention-map store), `attention_refresh_steps(total_steps)`
    (when to refresh; the pass runs `forward(attention_scores_only=True)`, i.e. `attention_scores`).
    """

    _keys_to_ignore_on_load_unexpected = [r"^amt\.pooler\.", r"^classifier\."]

    def __init__(self, config: AmtConfig):
        super().__init__(config)
        self.amt = AmtModel(config, add_pooling_layer=False, use_mask_token=config.variant == "simmim")
        pixels_per_patch = config.patch_size**2 * config.num_channels
        if config.position_embedding_type == "sincos":
            # a fixed sin-cos table during pretraining (MAE); learnable again when fine-tuning
            self.amt.encoder.embeddings.position_embeddings.requires_grad_(False)
        if config.variant == "mae":
            self.decoder = MaeDecoder(
                config,
                input_dim=config.hidden_size,
                dim=config.decoder_hidden_size,
                depth=config.decoder_num_hidden_layers,
                num_heads=config.decoder_num_attention_heads,
                output_dim=pixels_per_patch,
                grid_size=config.image_size // config.patch_size,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                layer_norm_eps=config.layer_norm_eps,
            )
        else:
            # SimMIM's 1x1 conv + PixelShuffle is one linear map per token; outputs in patchify order
            self.decoder = nn.Linear(config.hidden_size, pixels_per_patch)
        self.mask_generator()  # fails now, naming the fields, if the ratios leave no visible unit
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.amt.get_input_embeddings()

    # ----------------------------------------------------------------------------------- masking
    def mask_generator(self, attention_maps=None) -> AttentionMaskGenerator:
        """How the data pipeline masks each example, from `attention_maps` (the loop's per-example store;
        None: no maps, warm-up masks)."""
        return amt_mask_generator(self.config, attention_maps)

    @property
    def uses_attention_maps(self) -> bool:
        return self.config.masking_strategy == "amt"

    def training_logs(self, output) -> dict[str, float]:
        """Thrown patches per image (0 until the first refresh)."""
        return {"patches_thrown_per_image": float(output.bool_thrown_pos.sum(dim=1).float().mean())}

    def attention_refresh_steps(self, total_steps: int) -> list[int]:
        """Optimizer steps after which the attention maps are refreshed: every `amt_interval` of
        training, none at the very end (mae-AMT: after epochs 40, 80, ..., 360 of 400)."""
        if self.config.masking_strategy != "amt":
            return []
        interval = max(1, round(self.config.amt_interval * total_steps))
        return list(range(interval, total_steps, interval))

    @torch.no_grad()
    def attention_scores(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, rows, cols) AMT map per image: the last block's cls-to-patch attention on the full,
        unmasked image (eval mode), min-max normalised per head, averaged over heads."""
        was_training = self.training
        self.eval()
        try:
            encoder = self.amt.encoder
            grid = encoder.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
            cls_attention = encoder.cls_attention(pixel_values, interpolate_pos_encoding)
            return normalized_cls_attention(cls_attention, encoder.num_prefix_tokens, grid)
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        bool_thrown_pos: torch.Tensor | None = None,
        patch_attention: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        attention_scores_only: bool = False,
        **kwargs,
    ) -> AmtMaskedImageModelingOutput | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Patches to reconstruct (True); the same count in every image.
        bool_thrown_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Patches thrown away (True): not seen, not predicted, not in the loss.
        patch_attention (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            Per-patch attention weights of each image's crop (AMT). Without given masks, masks are drawn
            from them; with given masks they are only reported back (`patch_scores`) for pictures.
        noise (`torch.FloatTensor` of shape `(batch_size, num_mask_units)`, *optional*):
            Uniform noise driving the mask draw (weighted order for AMT, random order otherwise).
        attention_scores_only (`bool`, *optional*):
            Return only `attention_map` = `attention_scores(pixel_values)`. The refresh pass goes through
            `forward` so that DDP / FSDP / DeepSpeed wrappers gather sharded weights as for a training step.
        """
        if pixel_values is None:
            raise ValueError("AmtForMaskedImageModeling needs pixel_values")
        if attention_scores_only:
            output = AmtMaskedImageModelingOutput(attention_map=self.attention_scores(pixel_values, interpolate_pos_encoding))
            return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )

        patch_size = self.config.patch_size
        grid = self.amt.encoder.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        num_patches = grid[0] * grid[1]
        masks, counts = self.mask_generator().masks(
            pixel_values.shape[0], num_patches, bool_masked_pos, bool_thrown_pos, patch_attention, noise, pixel_values.device
        )
        # the K unthrown patches, raster order: what is predicted
        ids_unthrown = indices_from_bool_masked_pos(masks.bool_thrown_pos, counts[1]).ids_keep

        encoded, removed = self.amt.encode(
            pixel_values, masks, interpolate_pos_encoding, output_hidden_states, output_attentions, counts
        )
        if self.config.variant == "mae":
            predictions = self.decoder(encoded.last_hidden_state, removed.ids_restore, grid, ids_predict=ids_unthrown)[:, 1:]
        else:
            predictions = self.decoder(encoded.last_hidden_state[:, 1:])

        raw = patchify(pixel_values.float(), patch_size)  # targets in float32 under autocast too
        target = normalize_per_token(raw, eps=1e-6) if self.config.norm_pix_loss else raw
        target = gather_tokens(target, ids_unthrown)
        weights = torch.gather(masks.bool_masked_pos, 1, ids_unthrown)
        per_patch = elementwise_loss(predictions.float(), target.float(), PIXEL_LOSS[self.config.variant]).mean(dim=-1)
        if self.config.variant == "mae":
            loss = weighted_token_mean(per_patch, weights)
        else:
            # SimMIM: sum |error| over masked pixels and channels / (masked pixels + 1e-5) / channels
            masked_pixels = weights.sum() * patch_size**2
            loss = (per_patch * weights).sum() * target.shape[-1] / (masked_pixels + 1e-5) / self.config.num_channels

        patch_loss = torch.zeros(masks.bool_masked_pos.shape, dtype=torch.float32, device=per_patch.device)
        patch_loss.scatter_(1, ids_unthrown, per_patch.detach())
        output = AmtMaskedImageModelingOutput(
            loss=loss,
            predictions=predictions,
            bool_masked_pos=masks.bool_masked_pos,
            bool_thrown_pos=masks.bool_thrown_pos,
            # predictions pasted at their patches (thrown patches 0), in the input's pixel space
            reconstruction=predictions_to_pixels(
                predictions.detach(), raw, patch_size, grid, self.config.num_channels,
                norm_eps=1e-6 if self.config.norm_pix_loss else None, patch_ids=ids_unthrown,
            ),
            patch_loss=patch_loss,
            patch_scores=patch_attention,
            patch_labels=masks.bool_masked_pos.long() + 2 * masks.bool_thrown_pos.long(),
            encoder_last_hidden_state=encoded.last_hidden_state,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()


class AmtForImageClassification(ImageClassificationMixin, AmtPreTrainedModel):
    """Fine-tuning model: MAE variant = mean of patch tokens -> fc_norm -> linear (global pool); SimMIM
    variant = final norm -> cls token -> linear. Pretraining-only parts of a checkpoint are ignored."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^amt\.encoder\.layernorm\.", r"embeddings\.mask_token$"]

    def __init__(self, config: AmtConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.amt = AmtModel(config, add_pooling_layer=True, pretrained_encoder=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()


class AmtBackbone(ViTBackboneMixin, BackboneMixin, AmtPreTrainedModel):
    """AMT feature maps for dense heads (UperNet through `AutoBackbone`), either host (MAE or SimMIM
    ViT): stages "stem", "stage1".."stageN" (block outputs, no final norm), resampled as
    `config.backbone_pyramid` says (see `backbone_common`). Loads the encoder of a pretraining or
    classification checkpoint (`amt.` prefix); decoder, mask token, pooler and final norm are ignored.
    """

    _keys_to_ignore_on_load_unexpected = backbone_ignore_patterns("amt") + [r"embeddings\.mask_token$"]

    def __init__(self, config: AmtConfig):
        super().__init__(config)
        self.amt = AmtModel(config, add_pooling_layer=False)
        self.amt.encoder.layernorm = None  # dense recipes read the blocks' outputs
        self.init_pyramid(config)
        self.post_init()


__all__ = ["AmtPreTrainedModel", "AmtModel", "AmtForMaskedImageModeling", "AmtForImageClassification", "AmtBackbone"]
