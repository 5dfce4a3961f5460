"""AMT configuration ("Good Helper Is around You: Attention-Driven Masked Image Modeling", Liu, Gui, Luo;
AAAI 2023): attention-driven masking and throwing, plugged into MAE or SimMIM."""

from __future__ import annotations

from transformers import PreTrainedConfig

from .configuration_common import (
    ViTBackboneConfigMixin,
    PresetConfigMixin,
    check_choice,
    check_fraction,
    check_heads_divide,
    check_non_negative_int,
    check_patch_grid,
    check_positive_numbers,
    config_error,
)

VARIANTS = ("mae", "simmim")
MASKING_STRATEGIES = ("amt", "random")

# What each host method uses when a field is left at None (official mae-AMT / SimMIM-AMT settings).
VARIANT_DEFAULTS = {
    "mae": dict(
        position_embedding_type="sincos",  # fixed 2-D sin-cos, frozen in pretraining (MAE)
        layer_scale_init_value=0.0,
        drop_path_rate=0.0,
        mask_ratio=0.45,
        throw_ratio=0.4,
        warmup_mask_ratio=0.75,  # mae-AMT hard-codes random 75 % masking until the first refresh
        patches_per_mask_unit=1,  # MAE masks single patches
        amt_interval=0.1,  # refresh every 40 of 400 epochs
        use_mean_pooling=True,  # fine-tuning: mean of patch tokens + fc_norm (global_pool)
        norm_pix_loss=False,  # off in the AMT README command
    ),
    "simmim": dict(
        position_embedding_type="learned",  # BEiT-style ViT with absolute learned positions (USE_APE)
        layer_scale_init_value=0.1,
        drop_path_rate=0.1,
        mask_ratio=0.44,
        throw_ratio=0.26,
        warmup_mask_ratio=None,  # SimMIM-AMT draws its warm-up masks at MASK_RATIO: follow mask_ratio
        patches_per_mask_unit=2,  # SimMIM masks units of 2 x 2 patches (32 px at patch 16)
        amt_interval=0.2,  # refresh every 40 of 200 epochs
        use_mean_pooling=False,  # fine-tuning: final norm + cls token
        norm_pix_loss=False,
    ),
}


class AmtConfig(ViTBackboneConfigMixin, PresetConfigMixin, PreTrainedConfig):
    r"""Configuration of an AMT model: MAE or SimMIM whose masks come from the model's own attention.

    Every `None` field takes the value of the chosen `variant` (the official mae-AMT / SimMIM-AMT
    settings, `VARIANT_DEFAULTS`). Named sizes: `AmtConfig.from_preset("base", variant="simmim")`
    ("tiny", "demo", "small", "base", "large", "huge"; the official code supports ViT-B/16 only).

    Args:
        variant: "mae" (encoder on the visible patches, transformer decoder, MSE on masked patches) or
            "simmim" (mask tokens in place, 1x1-conv + pixel-shuffle head, L1 on masked pixels).
        masking_strategy: "amt" (attention-driven masking and throwing) or "random" (the plain MAE /
            SimMIM baseline: uniform random masking at `mask_ratio`, nothing thrown).
        image_size, patch_size, num_channels, hidden_size, num_hidden_layers, num_attention_heads,
            mlp_ratio, qkv_bias, layer_norm_eps, drop_path_rate: the ViT encoder.
        position_embedding_type: "sincos" (fixed, MAE) or "learned" (SimMIM's absolute table).
        layer_scale_init_value: LayerScale on both residual branches (0 = none; SimMIM 0.1).
        apply_attention_layer_scale: apply LayerScale to the attention branch too. The released SimMIM-AMT
            code never applies its `gamma_1` (a bug); True follows the paper's BEiT-style blocks, the
            converter sets False for official checkpoints, which were trained without it.
        decoder_hidden_size, decoder_num_hidden_layers, decoder_num_attention_heads: MAE's decoder
            (512 / 8 / 16); unused by SimMIM.
        mask_ratio: fraction of mask units masked (reconstructed): MAE 0.45, SimMIM 0.44.
        throw_ratio: fraction thrown away (seen by nobody, not reconstructed): MAE 0.4, SimMIM 0.26.
        warmup_mask_ratio: random masking ratio before the first attention refresh. Unset: MAE 0.75 (mae-AMT
            hard-codes it), SimMIM None = follow `mask_ratio` (SimMIM-AMT draws warm-up masks at MASK_RATIO),
            resolved when masks are drawn so a later `mask_ratio` change carries over.
        mask_patch_size: side in pixels of one mask unit (MAE: the patch; SimMIM: 2 x 2 patches, 32 px).
        amt_interval: fraction of training between attention refreshes (MAE 0.1, SimMIM 0.2).
        amt_refresh_delay_epochs: epochs from the end of each interval to its refresh. 1 (default) is the
            official schedule: both scripts refresh after the epoch whose 0-based index is a multiple of the
            interval, i.e. after 41, 81, ..., 361 of 400 epochs (mae-AMT; SimMIM-AMT 41, ..., 161 of 200), so
            the random phase lasts interval + 1 epochs. 0 refreshes at each interval's end. Never at the very
            end. Without an epoch length (a stream trained for --max_train_steps with no
            --num_train_examples, a Trainer dataset without len) the delay is dropped, with a warning.
        crop_aligned_attention: crop the stored attention map with the image's own crop box (the paper).
            The released code always takes the map's top-left cells instead (a bug); there is no switch
            to reproduce it.
        norm_pix_loss: MAE's per-patch normalised pixel target.
        use_mean_pooling: fine-tuning representation = mean of patch tokens + fc_norm (MAE); False = the
            cls token after the final norm (SimMIM).
        initializer_range: std of the token / BEiT-style initialisation.
        backbone_pyramid, backbone_pyramid_channels, backbone_relative_position_bias, out_features, out_indices:
            the `<M>Backbone`'s feature maps (AutoBackbone, dense tasks); see `ViTBackboneConfigMixin`.
    """

    model_type = "amt"

    presets = {
        "tiny": dict(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, mask_patch_size=8,
        ),
        # hf_mim's own size for the embedded-data demo and the learning benchmark (32 px digits, patch 4, 64
        # patches; minutes on 2 CPU cores); not from the paper. Its small-budget recipe: hf_mim/training/recipes.py.
        "demo": dict(
            image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
            decoder_hidden_size=128, decoder_num_hidden_layers=4, decoder_num_attention_heads=4,
        ),
        "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
        "huge": dict(patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16),
    }

    def __init__(
        self,
        variant: str = "mae",
        masking_strategy: str = "amt",
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float | None = None,
        position_embedding_type: str | None = None,
        layer_scale_init_value: float | None = None,
        apply_attention_layer_scale: bool = True,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        mask_ratio: float | None = None,
        throw_ratio: float | None = None,
        warmup_mask_ratio: float | None = None,
        mask_patch_size: int | None = None,
        amt_interval: float | None = None,
        amt_refresh_delay_epochs: int = 1,
        crop_aligned_attention: bool = True,
        norm_pix_loss: bool | None = None,
        use_mean_pooling: bool | None = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        check_choice("variant", variant, VARIANTS)
        defaults = VARIANT_DEFAULTS[variant]
        self.variant = variant
        self.masking_strategy = masking_strategy
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = defaults["drop_path_rate"] if drop_path_rate is None else drop_path_rate
        self.position_embedding_type = (
            defaults["position_embedding_type"] if position_embedding_type is None else position_embedding_type
        )
        self.layer_scale_init_value = (
            defaults["layer_scale_init_value"] if layer_scale_init_value is None else layer_scale_init_value
        )
        self.apply_attention_layer_scale = apply_attention_layer_scale
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.mask_ratio = defaults["mask_ratio"] if mask_ratio is None else mask_ratio
        self.throw_ratio = defaults["throw_ratio"] if throw_ratio is None else throw_ratio
        self.warmup_mask_ratio = defaults["warmup_mask_ratio"] if warmup_mask_ratio is None else warmup_mask_ratio
        if mask_patch_size is None:
            mask_patch_size = defaults["patches_per_mask_unit"] * patch_size
        self.mask_patch_size = mask_patch_size
        self.amt_interval = defaults["amt_interval"] if amt_interval is None else amt_interval
        self.amt_refresh_delay_epochs = amt_refresh_delay_epochs
        self.crop_aligned_attention = crop_aligned_attention
        self.norm_pix_loss = defaults["norm_pix_loss"] if norm_pix_loss is None else norm_pix_loss
        self.use_mean_pooling = defaults["use_mean_pooling"] if use_mean_pooling is None else use_mean_pooling
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.validate()

    @property
    def effective_warmup_mask_ratio(self) -> float:
        """The warm-up (random-phase) mask ratio: `warmup_mask_ratio`, or `mask_ratio` when it is None."""
        return self.mask_ratio if self.warmup_mask_ratio is None else self.warmup_mask_ratio

    def validate(self) -> None:
        """Raise a ValueError naming the first invalid field."""
        check_choice("masking_strategy", self.masking_strategy, MASKING_STRATEGIES)
        check_choice("position_embedding_type", self.position_embedding_type, ("sincos", "learned"))
        check_patch_grid(self.image_size, self.patch_size)
        check_heads_divide("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.position_embedding_type == "sincos" and self.hidden_size % 4:
            raise config_error("hidden_size", self.hidden_size, "must be divisible by 4 (2-D sin-cos positions)")
        check_non_negative_int("num_hidden_layers", self.num_hidden_layers)
        if self.num_hidden_layers < 1:
            raise config_error("num_hidden_layers", self.num_hidden_layers, "AMT reads the last block's attention: >= 1")
        if self.variant == "mae":
            check_heads_divide(
                "decoder_hidden_size", self.decoder_hidden_size, "decoder_num_attention_heads", self.decoder_num_attention_heads
            )
            if self.decoder_hidden_size % 4:
                raise config_error("decoder_hidden_size", self.decoder_hidden_size, "must be divisible by 4 (sin-cos)")
            check_non_negative_int("decoder_num_hidden_layers", self.decoder_num_hidden_layers)
        if not isinstance(self.mask_patch_size, int) or self.mask_patch_size % self.patch_size:
            raise config_error("mask_patch_size", self.mask_patch_size, f"must be a multiple of patch_size={self.patch_size}")
        if self.image_size % self.mask_patch_size:
            raise config_error("mask_patch_size", self.mask_patch_size, f"must divide image_size={self.image_size}")
        for field in ("mask_ratio", "throw_ratio", "warmup_mask_ratio", "drop_path_rate"):
            if field != "warmup_mask_ratio" or self.warmup_mask_ratio is not None:
                check_fraction(field, getattr(self, field))
        if self.masking_strategy == "amt" and self.mask_ratio + self.throw_ratio >= 1:
            raise config_error(
                "throw_ratio", self.throw_ratio, f"mask_ratio + throw_ratio must stay below 1 (mask_ratio={self.mask_ratio})"
            )
        if not 0 < self.amt_interval <= 1:
            raise config_error("amt_interval", self.amt_interval, "expected a fraction of training in (0, 1]")
        check_non_negative_int("amt_refresh_delay_epochs", self.amt_refresh_delay_epochs)
        if self.layer_scale_init_value < 0:
            raise config_error("layer_scale_init_value", self.layer_scale_init_value, "expected a number >= 0")
        check_positive_numbers(self, "mlp_ratio", "layer_norm_eps")


__all__ = ["AmtConfig"]
