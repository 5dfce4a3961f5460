"""AMT: attention-driven masking and throwing (Liu, Gui, Luo; AAAI 2023), plugged into MAE and SimMIM.

The model being trained is its own guide. Every `amt_interval` of training (one epoch after each interval's
end, as the official scripts: `amt_refresh_delay_epochs`) an extra pass over the data reads the LAST block's
cls-to-patch attention on each full image (`attention_scores`), one map per image. A training crop's map
then orders its mask units by weighted sampling without replacement: the first r are masked
(reconstructed), the next t thrown (seen by nobody, not reconstructed, not in the loss), the rest visible.
Until the first refresh the masks are uniformly random.

One model class, `AmtForMaskedImageModeling`, holds the host of `config.variant` (a component without
weights of its own that builds the decoder and writes the host's steps):
- `MaeHost` (variant "mae"): the encoder sees the visible patches; the decoder fills
  mask tokens for masked and thrown patches, adds positions, then drops the thrown ones; MSE on the
  masked patches.
- `SimMIMHost` (variant "simmim"): masked patches become the mask token in place,
  thrown patches are dropped after the position embedding; a per-token linear head (SimMIM's 1x1 conv +
  pixel shuffle); L1 on masked pixels.
Each host also holds the few facts its host decides for the other classes (initialisation,
classifier init, mask-count rounding, how a masked image enters the encoder, the pretraining crop).
`masking_strategy="random"` gives the plain MAE / SimMIM baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .backbone_common import ViTBackboneMixin, backbone_ignore_patterns
from .configuration_amt import AmtConfig
from .masking import indices_from_bool_masked_pos, MaskIndices
from .masking_attention import AttentionMaskGenerator, normalized_cls_attention, ThrowMasks
from .beit_init import init_beit_weights, tag_beit_rescaled_layers
from .modeling_base import backbone_output, builds_pretrained_encoder, ImageClassificationMixin, MIMPreTrainedModel
from .training_events import MIMTrainingEventsMixin
from .vit_blocks import gather_tokens, init_vit_weights, MaeDecoder, MeanPooler, VisionEmbeddings, ViTEncoder
from .objectives import elementwise_loss, normalize_per_token, patchify, predictions_to_pixels, weighted_token_mean

logger = logging.get_logger(__name__)


@dataclass
class AmtMaskedImageModelingOutput(ModelOutput):
    """Output of `AmtForMaskedImageModeling` (either host).

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
    """The host's ViT: MAE's plain ViT with a sin-cos table, or SimMIM's BEiT-style ViT (layer scale,
    learned absolute positions; k bias is inert under softmax, so a fused qkv bias equals BEiT's q/v
    biases), as the config's fields say. Blocks are tagged with their depth for BEiT's rescaled init
    (read by SimMIM's `init_module` only)."""
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
    tag_beit_rescaled_layers(encoder.layers)
    return encoder


class MaeHost:
    """AMT hosted by MAE (mae-AMT's `models_mae.py`): the encoder sees only the visible patches; the
    decoder fills mask tokens for the masked and thrown patches, adds its positions, drops the thrown
    ones and predicts the pixels of the rest; MSE on the masked patches (per-patch normalised pixels
    with `norm_pix_loss`). Also what MAE decides for every AMT class of this variant (base model,
    classifier, backbone, data). Holds no weights: the model owns the decoder it builds."""

    variant = "mae"
    replaces_masked_patches = False  # the encoder drops the masked patches: no mask token
    mask_count_rounding = "floor"  # mae-AMT: int(N r) masked, int(N (r + t)) masked + thrown
    classifier_init_std = 2e-5  # MAE fine-tuning: trunc-normal(2e-5) head
    pretraining_crop_scale = (0.2, 1.0)  # RandomResizedCrop(scale=(0.2, 1)) + flip
    pretraining_no_weight_decay = ()  # mae-AMT: timm add_weight_decay, no skip list (cls and mask tokens decayed)

    @staticmethod
    def init_module(module: nn.Module, std: float) -> None:
        """MAE's initialisation (xavier-uniform linears and patch projection, N(0, std) tokens)."""
        init_vit_weights(module, token_std=std)

    @staticmethod
    def build_decoder(config: AmtConfig) -> nn.Module:
        return MaeDecoder(
            config,
            input_dim=config.hidden_size,
            dim=config.decoder_hidden_size,
            depth=config.decoder_num_hidden_layers,
            num_heads=config.decoder_num_attention_heads,
            output_dim=config.patch_size**2 * config.num_channels,
            grid_size=config.image_size // config.patch_size,
            mlp_ratio=config.mlp_ratio,
            qkv_bias=config.qkv_bias,
            layer_norm_eps=config.layer_norm_eps,
        )

    @staticmethod
    def forward_encoder(
        encoder: ViTEncoder, pixel_values: torch.Tensor, masks: ThrowMasks, counts: tuple[int, int], **flags
    ):
        """The encoder on the visible patches only (raster order). Returns (encoder output, index form of
        the removed patches: the decoder's unshuffle). Also `AmtModel`'s, given masks."""
        num_masked, num_thrown = counts
        removed = indices_from_bool_masked_pos(masks.bool_masked_pos | masks.bool_thrown_pos, num_masked + num_thrown)
        return encoder(pixel_values, ids_keep=removed.ids_keep, **flags), removed

    @staticmethod
    def forward_decoder(
        decoder: nn.Module, hidden_states: torch.Tensor, removed: MaskIndices, grid: tuple[int, int],
        ids_unthrown: torch.Tensor,
    ) -> torch.Tensor:
        """Mask tokens for the removed patches, positions, thrown patches dropped: predictions (B, K, p*p*C)
        of the unthrown patches (the cls row dropped)."""
        return decoder(hidden_states, removed.ids_restore, grid, ids_predict=ids_unthrown)[:, 1:]

    @staticmethod
    def forward_loss(config: AmtConfig, predictions: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        """(MSE per patch averaged over the masked patches, per-patch loss)."""
        per_patch = elementwise_loss(predictions.float(), target.float(), "mse").mean(dim=-1)
        return weighted_token_mean(per_patch, weights), per_patch


class SimMIMHost:
    """AMT hosted by SimMIM (SimMIM-AMT's `models/simmim.py`): a BEiT-style ViT; masked patches become the
    mask token in place, thrown patches are dropped after the position embedding; a per-token linear head
    (SimMIM's 1x1 conv + pixel shuffle, in patchify order); L1 over the masked pixels. Also what SimMIM
    decides for every AMT class of this variant."""

    variant = "simmim"
    replaces_masked_patches = True  # masked patches become the encoder's mask token
    mask_count_rounding = "ceil"  # SimMIM-AMT: ceil(N r) masked, ceil(N (r + t)) masked + thrown
    classifier_init_std = 0.02  # BEiT fine-tuning: trunc-normal(0.02) head
    pretraining_crop_scale = (0.67, 1.0)  # RandomResizedCrop(scale=(0.67, 1), ratio 3/4-4/3) + flip
    # SimMIM's pretraining optimizer: no decay for 1-D tensors, biases and the encoder's no_weight_decay()
    # ({pos_embed, cls_token}); its mask token is decayed
    pretraining_no_weight_decay = ("cls_token", "position_embeddings")

    @staticmethod
    def init_module(module: nn.Module, std: float) -> None:
        """BEiT's initialisation (trunc-normal, attn.proj / mlp.fc2 rescaled by depth)."""
        init_beit_weights(module, std)

    @staticmethod
    def build_decoder(config: AmtConfig) -> nn.Module:
        """SimMIM's 1x1 conv + PixelShuffle is one linear map per token; outputs in patchify order."""
        return nn.Linear(config.hidden_size, config.patch_size**2 * config.num_channels)

    @staticmethod
    def forward_encoder(
        encoder: ViTEncoder, pixel_values: torch.Tensor, masks: ThrowMasks, counts: tuple[int, int], **flags
    ):
        """The encoder on every unthrown patch, the masked ones as the mask token (set before the positions
        are added; thrown patches are dropped after). Returns (encoder output, None). Also `AmtModel`'s."""
        num_thrown = counts[1]
        ids_unthrown = indices_from_bool_masked_pos(masks.bool_thrown_pos, num_thrown).ids_keep if num_thrown else None
        return encoder(pixel_values, ids_keep=ids_unthrown, bool_masked_pos=masks.bool_masked_pos, **flags), None

    @staticmethod
    def forward_decoder(
        decoder: nn.Module, hidden_states: torch.Tensor, removed: None, grid: tuple[int, int], ids_unthrown: torch.Tensor
    ) -> torch.Tensor:
        """One linear map per unthrown patch token (the cls token dropped): (B, K, p*p*C)."""
        return decoder(hidden_states[:, 1:])

    @staticmethod
    def forward_loss(config: AmtConfig, predictions: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        """(SimMIM's L1: sum |error| over masked pixels and channels / (masked pixels + 1e-5) / channels,
        per-patch loss)."""
        per_patch = elementwise_loss(predictions.float(), target.float(), "l1").mean(dim=-1)
        masked_pixels = weights.sum() * config.patch_size**2
        loss = (per_patch * weights).sum() * target.shape[-1] / (masked_pixels + 1e-5) / config.num_channels
        return loss, per_patch


# config.variant -> its host
AMT_HOSTS = {host.variant: host for host in (MaeHost, SimMIMHost)}


def amt_host(config: AmtConfig) -> type[MaeHost] | type[SimMIMHost]:
    """The host of `config.variant`: besides pretraining (decoder, encoder input, loss), what it decides
    for every AMT class of that variant: the initialisation, the classifier head's init, the mask-count
    rounding, the pretraining crop."""
    return AMT_HOSTS[config.variant]


class AmtPreTrainedModel(MIMPreTrainedModel):
    config_class = AmtConfig
    config: AmtConfig
    base_model_prefix = "amt"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The host's initialisation (`init_module`: MAE's or BEiT's); the position table is the sin-cos
        table or trunc-normal, as `position_embedding_type` says; a classifier head trunc-normal with the
        host's `classifier_init_std`."""
        host = amt_host(self.config)
        std = self.config.initializer_range
        if module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=host.classifier_init_std)
            init.zeros_(module.bias)
            return
        host.init_module(module, std)
        if isinstance(module, VisionEmbeddings):
            if self.config.position_embedding_type == "sincos":
                init.copy_(module.position_embeddings, module.sincos_table())
            else:
                init.trunc_normal_(module.position_embeddings, std=std)


class AmtModel(AmtPreTrainedModel):
    """The ViT backbone of an AMT model. Nothing is masked unless masks are given (then the host's
    `forward_encoder` runs).

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
        flags = dict(
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        if bool_masked_pos is None and bool_thrown_pos is None:
            encoded = self.encoder(pixel_values, **flags)
        else:
            rows, cols = self.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
            masks, counts = amt_mask_generator(self.config).given_masks(
                bool_masked_pos, bool_thrown_pos, (pixel_values.shape[0], rows * cols), pixel_values.device
            )
            encoded, _ = amt_host(self.config).forward_encoder(self.encoder, pixel_values, masks, counts, **flags)
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
        rounding=amt_host(config).mask_count_rounding,
        strategy=config.masking_strategy,
        store=attention_maps,
    )


class AmtForMaskedImageModeling(MIMTrainingEventsMixin, AmtPreTrainedModel):
    """AMT pretraining, laid out as MAE's `models_mae.py`: `forward` = masks -> `forward_encoder` ->
    `forward_decoder` -> `forward_loss`. This class is what both hosts share: the attention-driven
    masking, the attention refresh (`attention_scores`), the training events the generic loop calls
    (`MIMTrainingEventsMixin`: `mask_generator(attention_maps)` draws per-example masks from the loop's
    attention-map store, `attention_refresh_steps(total_steps, steps_per_epoch)` says when the refresh pass,
    `forward(attention_scores_only=True)`, runs), the pixel targets and the output.

    The host of `config.variant` (`MaeHost` or `SimMIMHost`, `self.host`, no weights of its own) builds
    the decoder and writes `forward_encoder`, `forward_decoder` and `forward_loss`; one class, one
    `auto_map` entry, for both hosts' folders (old ones, which name a host class in `architectures`,
    included).
    """

    _keys_to_ignore_on_load_unexpected = [r"^amt\.pooler\.", r"^classifier\."]

    def __init__(self, config: AmtConfig):
        super().__init__(config)
        self.host = amt_host(config)
        self.amt = AmtModel(config, add_pooling_layer=False, use_mask_token=self.host.replaces_masked_patches)
        if config.position_embedding_type == "sincos":
            # a fixed sin-cos table during pretraining (MAE); learnable again when fine-tuning
            self.amt.encoder.embeddings.position_embeddings.requires_grad_(False)
        self.mask_generator()  # fails now, naming the fields, if the ratios leave no visible unit
        self.decoder = self.host.build_decoder(config)
        self.post_init()

    @property
    def pretraining_no_weight_decay(self) -> tuple[str, ...]:
        return self.host.pretraining_no_weight_decay

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

    def attention_refresh_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> list[int]:
        """Optimizer steps after which the attention maps are refreshed: `amt_refresh_delay_epochs` epochs of
        `steps_per_epoch` steps after the end of every `amt_interval` of training, none at the very end. The
        default delay of one epoch is the official schedule: mae-AMT refreshes after epoch index `e` when
        `e >= warmup_epochs, e % loc_interval == 0, e + 1 != epochs` (40 / 40 / 400: after 41, 81, ..., 361
        completed epochs), SimMIM-AMT when `e > WARMUP_EPOCHS, e % 40 == 0, e != EPOCHS - 1`. Without
        `steps_per_epoch` (a stream of unknown length) the delay is dropped, with a warning."""
        if self.config.masking_strategy != "amt":
            return []
        interval = max(1, round(self.config.amt_interval * total_steps))
        delay_epochs = self.config.amt_refresh_delay_epochs
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch={steps_per_epoch!r}: expected an integer >= 1 (or None: unknown)")
        if steps_per_epoch is None and delay_epochs:
            logger.warning(
                "AMT refreshes after every %d of %d steps without its amt_refresh_delay_epochs=%d: the epoch length is "
                "unknown (run_mim: give --num_train_examples; Trainer: a dataset with a length). The official scripts "
                "refresh one epoch after each interval's end.", interval, total_steps, delay_epochs)
        delay = delay_epochs * steps_per_epoch if steps_per_epoch is not None else 0
        return list(range(interval + delay, total_steps, interval))

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
            raise ValueError(f"{type(self).__name__} needs pixel_values")
        if attention_scores_only:
            output = AmtMaskedImageModelingOutput(attention_map=self.attention_scores(pixel_values, interpolate_pos_encoding))
            return output if (return_dict if return_dict is not None else self.config.return_dict) else output.to_tuple()
        output_hidden_states, output_attentions, return_dict = self.output_flags(
            output_hidden_states, output_attentions, return_dict
        )

        patch_size = self.config.patch_size
        grid = self.amt.get_input_embeddings().check_pixel_values(pixel_values, interpolate_pos_encoding)
        masks, counts = self.mask_generator().masks(
            pixel_values.shape[0], grid[0] * grid[1], bool_masked_pos, bool_thrown_pos, patch_attention, noise,
            pixel_values.device,
        )
        # the K unthrown patches, raster order: what is predicted
        ids_unthrown = indices_from_bool_masked_pos(masks.bool_thrown_pos, counts[1]).ids_keep

        encoded, removed = self.forward_encoder(
            pixel_values, masks, counts, interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        )
        predictions = self.forward_decoder(encoded.last_hidden_state, removed, grid, ids_unthrown)

        raw = patchify(pixel_values.float(), patch_size)  # targets in float32 under autocast too
        target = normalize_per_token(raw, eps=1e-6) if self.config.norm_pix_loss else raw
        target = gather_tokens(target, ids_unthrown)
        weights = torch.gather(masks.bool_masked_pos, 1, ids_unthrown)
        loss, per_patch = self.forward_loss(predictions, target, weights)

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

    def forward_encoder(self, pixel_values: torch.Tensor, masks: ThrowMasks, counts: tuple[int, int], **flags):
        """The host's encoder input (MAE: visible patches only; SimMIM: mask tokens in place, thrown patches
        dropped): (encoder output, what the decoder needs of the removed patches)."""
        return self.host.forward_encoder(self.amt.encoder, pixel_values, masks, counts, **flags)

    def forward_decoder(
        self, hidden_states: torch.Tensor, removed, grid: tuple[int, int], ids_unthrown: torch.Tensor
    ) -> torch.Tensor:
        """(B, K, p*p*C) pixel predictions of the K unthrown patches (the host's decoder)."""
        return self.host.forward_decoder(self.decoder, hidden_states, removed, grid, ids_unthrown)

    def forward_loss(self, predictions: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        """(the host's loss over the masked patches, per-patch loss)."""
        return self.host.forward_loss(self.config, predictions, target, weights)


class AmtForImageClassification(ImageClassificationMixin, AmtPreTrainedModel):
    """Fine-tuning model: MAE variant = mean of patch tokens -> fc_norm -> linear (global pool); SimMIM
    variant = final norm -> cls token -> linear. Pretraining-only parts of a checkpoint are ignored.
    One class for both hosts: they differ only in the pooling (the config's `use_mean_pooling`) and the
    head's init (the host's `classifier_init_std`)."""

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


__all__ = [
    "AmtPreTrainedModel",
    "AmtModel",
    "AmtForMaskedImageModeling",
    "AmtForImageClassification",
    "AmtBackbone",
]
