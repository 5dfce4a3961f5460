"""RevColV2: bottom-up and top-down reversible columns of ViT levels, kept whole from masked image
modeling to fine-tuning (Han, Cai, Zhang, NeurIPS 2023).

No official RevColV2 code exists. What is fixed by the paper: bottom-up columns inherit RevCol (v1)
and take only the visible patches; top-down columns take their outputs plus mask tokens and
reconstruct the unseen raw patches at the lowest level of the last column; classification uses the
top level. The reversible engine follows RevCol v1's official `ReverseFunction` (tested against it);
everything else is hf_mim's reading, each choice a config field (see `RevColV2Config` and the model card).

Layout (L = num_levels, C = hidden_size, P = 1 with the cls token):

    tokens = patch_embed(x) + sincos      (B, P + N, C); with a mask only the visible patches
    bottom-up column i, levels 0 -> L-1:  c_l(i) = Level(c_{l-1}(i), c_{l+1}(i-1)) + alpha * c_l(i-1)
                                           (c_{-1}(i) = tokens; column 0 has no previous column)
    transition: every level's state is scattered back to all N positions, mask tokens (one per
        level, plus the sin-cos position) filling the masked ones
    top-down column j, levels L-1 -> 0:   d_l(j) = Level(d_{l+1}(j), d_{l-1}(j-1)) + alpha * d_l(j-1)
                                           (d_L(j) = filled c_{L-1} of the last bottom-up column;
                                            d(-1) = the filled bottom-up states)
    pretraining: pixels of the masked patches from d_0(last) (LayerNorm + Linear, norm-pix MSE), or
        (`target="teacher"`) a frozen teacher's normalised tokens from d_{teacher_head_level}(last)
    fine-tuning: d_{L-1}(last) (the top level) -> mean of patch tokens -> LayerNorm -> Linear
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .backbone_common import PYRAMID_SCALES, ChannelLayerNorm, init_pyramid_module
from .configuration_revcolv2 import RevColV2Config
from .masking import indices_from_bool_masked_pos, MaskIndices, num_masked_patches, RandomMaskGenerator
from .modeling_base import builds_pretrained_encoder, ImageClassificationMixin, MIMPreTrainedModel
from .training_events import MIMTrainingEventsMixin
from .vit_blocks import Block, gather_tokens, init_vit_weights, MeanPooler, resize_position_table, VisionEmbeddings
from .objectives import elementwise_loss, masked_mse, patchify, pixel_targets, predictions_to_pixels, weighted_token_mean
from .reversible import clamp_alpha, run_column
from .teachers import FrozenTeacherMixin, normalize_teacher_tokens

logger = logging.get_logger(__name__)


@dataclass
class RevColV2MaskedImageModelingOutput(ModelOutput):
    """Output of `RevColV2ForMaskedImageModeling`.

    loss: MSE over the masked patches (against per-patch normalised pixels with `norm_pix_loss`), or with
        `target="teacher"` the `teacher_loss` against the normalised teacher tokens.
    predictions: (B, N, p*p*C) predicted patches, every position, raster order (MAE patch layout); with
        `target="teacher"` (B, N, teacher_hidden_size) predicted teacher tokens.
    bool_masked_pos: (B, N) True = removed before the bottom-up columns.
    reconstruction: (B, C, H, W) the predictions as an image in the input's (normalised) pixel space;
        with `norm_pix_loss` each patch is un-normalised with its target patch's mean and variance.
    patch_loss: (B, N) per-patch MSE (mean over the patch's values), for pictures.
    last_hidden_state: (B, P + N, C) top level of the last top-down column.
    hidden_states: see `RevColV2Model`.
    targets: (B, N, teacher_hidden_size) normalised teacher tokens (`target="teacher"` only; no reconstruction then).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    bool_masked_pos: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    patch_loss: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    targets: torch.Tensor | None = None


@dataclass
class RevColV2ColumnsOutput(ModelOutput):
    """Internal: the states of the last top-down column in level order 0 .. L-1 (the levels it built),
    the embeddings, and the top level after each top-down column (what `hidden_states` returns)."""

    levels: tuple[torch.Tensor, ...] | None = None
    embeddings: torch.Tensor | None = None
    column_tops: tuple[torch.Tensor, ...] | None = None

    def as_hidden_states(self) -> tuple[torch.Tensor, ...]:
        """(embedding output, top level after top-down column 1, ..., after the last): one entry per
        top-down column, as a ViT returns one per block. Every head computes these (the classifier
        builds only the levels its top level reads), so the field means the same for all of them."""
        return (self.embeddings, *self.column_tops)


# --------------------------------------------------------------------------------------------------
# Levels and columns
# --------------------------------------------------------------------------------------------------


def _linear_norm(config: RevColV2Config) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(config.hidden_size, config.hidden_size), nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    )


class RevColV2Fusion(nn.Module):
    """`down(c_down) [+ up(c_up)]`: what a level adds from its own column and from the previous one.

    Token form of RevCol v1's `Fusion`: `down` is Identity for the first level of a column's order and
    Linear + LayerNorm (fusion_type "linear") or Identity otherwise; `up` exists only in columns with a
    previous column and not for the last level, Linear + LayerNorm ("linear", "up_linear") or Identity.
    """

    def __init__(self, config: RevColV2Config, first_in_order: bool, has_up: bool):
        super().__init__()
        if first_in_order or config.fusion_type in ("up_linear", "identity"):
            self.down = nn.Identity()
        else:
            self.down = _linear_norm(config)
        if not has_up:
            self.up = None
        elif config.fusion_type == "identity":
            self.up = nn.Identity()
        else:
            self.up = _linear_norm(config)

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None) -> torch.Tensor:
        if self.up is None or c_up is None:
            return self.down(c_down)
        return self.up(c_up) + self.down(c_down)


class RevColV2Level(nn.Module):
    """Fusion, then ViT blocks; no residual around the level (the alpha shortcut is the column's)."""

    def __init__(self, config: RevColV2Config, num_blocks: int, rates: list[float], first_in_order: bool, has_up: bool):
        super().__init__()
        self.fusion = RevColV2Fusion(config, first_in_order, has_up)
        self.blocks = nn.ModuleList(
            Block(
                config,
                config.hidden_size,
                config.num_attention_heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=config.qkv_bias,
                layer_norm_eps=config.layer_norm_eps,
                drop_path_rate=rate,
                layer_scale_init_value=config.layer_scale_init_value or None,
            )
            for rate in rates[:num_blocks]
        )

    # set by the column: the reversible engine recomputes this level in backward already
    engine_recomputes = False

    def forward(self, c_down: torch.Tensor, c_up: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.fusion(c_down, c_up)
        for block in self.blocks:
            if self.engine_recomputes and block.gradient_checkpointing:
                # gradient checkpointing is a no-op here: run the block's own forward, not the checkpointed one
                hidden_states = _BLOCK_FORWARD(block, hidden_states)[0]
            else:
                hidden_states = block(hidden_states)[0]
        return hidden_states


# Block.forward without GradientCheckpointingLayer's checkpointing wrapper (functools.wraps keeps it).
_BLOCK_FORWARD = getattr(Block.forward, "__wrapped__", Block.forward)


def _drop_path_ramp(max_rate: float, depth: int) -> list[float]:
    """Linear 0 -> max_rate over `depth` blocks (plain Python: safe under a meta-device context)."""
    if depth <= 1:
        return [0.0] * depth
    return [max_rate * index / (depth - 1) for index in range(depth)]


class RevColV2Column(nn.Module):
    """One reversible column. `levels` are stored in processing order (bottom-up: level 0 first;
    top-down: the top level first). A first column (no previous column) has no `up` fusion and no
    alpha; otherwise `alpha` holds one channel-wise shortcut scale per level, shape (L, C)."""

    def __init__(self, config: RevColV2Config, has_prev: bool, top_down: bool, levels_built: int | None = None):
        super().__init__()
        self.top_down = top_down
        self.num_levels = config.num_levels
        self.alpha_min = config.alpha_min
        counts = list(config.blocks_per_level)
        order = list(range(config.num_levels))[::-1] if top_down else list(range(config.num_levels))
        rates = _drop_path_ramp(config.drop_path_rate, sum(counts))  # one 0 -> rate ramp per column (v1)
        levels, start = [], {}
        offset = 0
        for level in order:  # ramp positions follow the processing order
            start[level] = offset
            offset += counts[level]
        for position, level in enumerate(order[:levels_built]):
            levels.append(
                RevColV2Level(
                    config,
                    counts[level],
                    rates[start[level] : start[level] + counts[level]],
                    first_in_order=position == 0,
                    has_up=has_prev and position < config.num_levels - 1,
                )
            )
        self.levels = nn.ModuleList(levels)
        self.alpha = nn.Parameter(torch.full((config.num_levels, config.hidden_size), float(config.alpha_init))) if has_prev else None

    def effective_alphas(self) -> list[torch.Tensor] | None:
        if self.alpha is None:
            return None
        alpha = clamp_alpha(self.alpha, self.alpha_min)
        return [alpha[k].view(1, 1, -1) for k in range(alpha.shape[0])]

    def forward(
        self, x: torch.Tensor, prev_states: list[torch.Tensor] | None, reversible: bool, hand_off: bool = False
    ) -> list[torch.Tensor]:
        """States in processing order. `hand_off`: the next column of the same stack takes these states
        (it then keeps a compact residual of them instead; see `hf_mim.reversible`)."""
        if (prev_states is None) != (self.alpha is None):
            raise ValueError("a first column takes no previous states; every other column needs them")
        if len(self.levels) < self.num_levels:
            return self.partial_forward(x, prev_states)
        for level in self.levels:
            level.engine_recomputes = reversible
        return run_column(
            list(self.levels),
            x,
            prev_states,
            self.effective_alphas(),
            level_params=[list(level.parameters()) for level in self.levels],
            reversible=reversible,
            hand_off=hand_off,
        )


    def partial_forward(self, x: torch.Tensor, prev_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first levels (processing order) of a column built with `levels_built`, plain autograd
        (the reversible engine runs whole columns):
        level k = level(previous output, prev_states[k + 1]) + alpha_k * prev_states[k]."""
        alphas = self.effective_alphas()
        states, down = [], x
        for k, level in enumerate(self.levels):
            up = prev_states[k + 1] if k + 1 < self.num_levels else None
            down = level(down, up) + prev_states[k] * alphas[k]
            states.append(down)
        return states


class RevColV2MaskTokens(nn.Module):
    """One learnable mask token per level, scattered into the masked positions (plus their sin-cos
    position) of every bottom-up state before the top-down columns."""

    def __init__(self, config: RevColV2Config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_levels, config.hidden_size))

    def fill(
        self, state: torch.Tensor, level: int, mask: MaskIndices, positions: torch.Tensor, num_prefix_tokens: int
    ) -> torch.Tensor:
        """(B, P + K, C) visible state -> (B, P + N, C), raster order."""
        prefix, visible = state[:, :num_prefix_tokens], state[:, num_prefix_tokens:]
        batch_size, num_patches = mask.ids_restore.shape
        num_masked = num_patches - visible.shape[1]
        token = self.weight[level].to(state.dtype).view(1, 1, -1)
        patches = torch.cat([visible, token.expand(batch_size, num_masked, -1)], dim=1)
        patches = gather_tokens(patches, mask.ids_restore)
        masked = mask.bool_masked_pos.unsqueeze(-1).to(state.dtype)
        patches = patches + masked * positions.to(state.dtype)
        return torch.cat([prefix, patches], dim=1)


# --------------------------------------------------------------------------------------------------
# Pretrained model base
# --------------------------------------------------------------------------------------------------


class RevColV2PreTrainedModel(MIMPreTrainedModel):
    config_class = RevColV2Config
    config: RevColV2Config
    base_model_prefix = "revcolv2"
    _no_split_modules = ["RevColV2Column", "VisionEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        init_vit_weights(module, token_std=self.config.initializer_range)
        if isinstance(module, RevColV2Column) and module.alpha is not None:
            init.constant_(module.alpha, self.config.alpha_init)
        elif isinstance(module, RevColV2MaskTokens):
            init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.ConvTranspose2d):  # the backbone pyramid, as the ViT backbones'
            init_pyramid_module(module)
        elif module is getattr(self, "classifier", None) and isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.classifier_init_std)
            init.zeros_(module.bias)

    def layer_id_for_lr_decay(self, name: str) -> int:
        """Layer id of a parameter for layer-wise lr decay, RevCol v1's grid rule (`optimizer.py`).

        0: embeddings and mask tokens; block b (position in its column's processing order) of column c
        (bottom-up columns first, then top-down) gets b + c + 1, its level's fusion the id of the level's
        first block, a column's alphas the id of its first block; everything else (pooler, classifier,
        pixel head, backbone pyramid) `config.num_hidden_layers + 1`.
        """
        config = self.config
        match = re.search(r"(?:^|\.)(bottom_up|top_down)\.(\d+)\.(?:alpha$|levels\.(\d+)\.(?:blocks\.(\d+)\.|fusion\.))", name)
        if match:
            stack, column, position, block = match.group(1), int(match.group(2)), match.group(3), match.group(4)
            if stack == "top_down":
                column += config.num_bottom_up_columns
            if position is None:  # alpha
                return column + 1
            counts = list(config.blocks_per_level)
            order = list(range(config.num_levels))[::-1] if stack == "top_down" else list(range(config.num_levels))
            start = sum(counts[level] for level in order[: int(position)])
            return start + (int(block) if block is not None else 0) + column + 1
        if re.search(r"(?:^|\.)(embeddings|mask_tokens)\.", name):
            return 0
        return config.num_hidden_layers + 1

    def _set_gradient_checkpointing(self, enable: bool = True, **kwargs):
        """Reached by `activation_checkpointing_enable` and `gradient_checkpointing_enable` (so also by
        `TrainingArguments(gradient_checkpointing=True)`). Accepted in every mode: with
        use_reversible=True the engine already recomputes every level in backward, so it changes nothing."""
        if enable and self.config.use_reversible:
            logger.warning_once(
                "RevColV2 with use_reversible=True already recomputes every level in backward: gradient "
                "checkpointing changes nothing (set use_reversible=False to checkpoint plain columns instead)."
            )
        return super()._set_gradient_checkpointing(enable=enable, **kwargs)


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------


class RevColV2Model(RevColV2PreTrainedModel):
    """The whole RevColV2 autoencoder body: bottom-up columns, mask-token transition, top-down columns.

    Features are deterministic: nothing is masked unless `bool_masked_pos` is given. Outputs:
    `last_hidden_state` (B, P + N, C) = the top level of the last top-down column; `pooler_output` =
    LayerNorm of the mean of its patch tokens (or of its cls token, `classifier_pooling="cls"`);
    `hidden_states` (when asked) = (embedding output, the top level after each top-down column), the same
    for every RevColV2 head (`RevColV2ColumnsOutput.as_hidden_states`); the levels of the last column are
    the backbone's stages (`RevColV2Backbone`). Attention maps are not returned. Loaded from a pretraining checkpoint
    (`builds_pretrained_encoder`), `pooler_output` is the plain mean (or cls token) of the top level: no
    LayerNorm that pretraining did not train.
    """

    # a pretraining checkpoint's pixel decoder, a fine-tuned checkpoint's head
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^classifier\."]

    def __init__(
        self,
        config: RevColV2Config,
        add_pooling_layer: bool = True,
        pretrained_encoder: bool | None = None,
        top_level_only: bool = False,
    ):
        """`top_level_only` (the classifier): build only what the top level of the last top-down column
        needs: no mask tokens (it never masks) and, in that last column, no level after the top one.
        Under DDP every trainable parameter must get a gradient; those parts would get none."""
        super().__init__(config)
        pretrained = builds_pretrained_encoder(config, add_pooling_layer, pretrained_encoder)
        self.top_level_only = top_level_only
        self.embeddings = VisionEmbeddings(
            config.image_size, config.patch_size, config.num_channels, config.hidden_size, use_cls_token=config.use_cls_token
        )
        self.bottom_up = nn.ModuleList(
            RevColV2Column(config, has_prev=i > 0, top_down=False) for i in range(config.num_bottom_up_columns)
        )
        self.mask_tokens = None if top_level_only else RevColV2MaskTokens(config)
        # top_level_only: the top level of the last column reads positions 0-1 (processing order) of the
        # column before, which read positions 0-2 of theirs, ...: column i needs its first T - i levels
        columns = config.num_top_down_columns
        built = [min(config.num_levels, columns - i) if top_level_only else config.num_levels for i in range(columns)]
        self.top_down = nn.ModuleList(
            RevColV2Column(config, has_prev=True, top_down=True, levels_built=built[i]) for i in range(columns)
        )
        if top_level_only:  # parts of a pretraining (or full) checkpoint this model does not build
            self._keys_to_ignore_on_load_unexpected = [*type(self)._keys_to_ignore_on_load_unexpected, r"(^|\.)mask_tokens\."] + [
                rf"(^|\.)top_down\.{i}\.levels\.({'|'.join(map(str, range(built[i], config.num_levels)))})\."
                for i in range(columns)
                if built[i] < config.num_levels
            ]
        if add_pooling_layer:
            self.pooler = MeanPooler(
                config.hidden_size, config.layer_norm_eps, self.embeddings.num_prefix_tokens, use_fc_norm=not pretrained
            )
        else:
            self.pooler = None
        self.post_init()

    @property
    def num_prefix_tokens(self) -> int:
        return self.embeddings.num_prefix_tokens

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def run_columns(
        self, pixel_values: torch.Tensor, mask: MaskIndices | None, interpolate_pos_encoding: bool = False
    ) -> RevColV2ColumnsOutput:
        """Embeddings -> bottom-up -> transition -> top-down; the last top-down column's levels."""
        grid_h, grid_w = self.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        tokens = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        prefix = self.num_prefix_tokens
        if mask is not None:
            tokens = torch.cat([tokens[:, :prefix], gather_tokens(tokens[:, prefix:], mask.ids_keep)], dim=1)
        reversible = self.config.use_reversible
        states = None
        for index, column in enumerate(self.bottom_up):  # every column but the last hands its states on
            states = column(tokens, states, reversible, hand_off=index < len(self.bottom_up) - 1)
        if mask is not None:
            if self.mask_tokens is None:
                raise ValueError("this model has no mask tokens (the classifier never masks): bool_masked_pos is not accepted")
            positions = resize_position_table(self.embeddings.position_embeddings, prefix, grid_h, grid_w)[:, prefix:]
            states = [self.mask_tokens.fill(state, level, mask, positions, prefix) for level, state in enumerate(states)]
        states = states[::-1]  # top-down processing order: the top level first
        top = states[0]
        last = len(self.top_down) - 1
        column_tops = []
        for index, column in enumerate(self.top_down):  # a partial column (top_level_only) takes no hand-off
            hand_off = index < last and len(self.top_down[index + 1].levels) == self.config.num_levels
            states = column(top, states, reversible, hand_off=hand_off)
            column_tops.append(states[0])
        return RevColV2ColumnsOutput(levels=tuple(states[::-1]), embeddings=tokens, column_tops=tuple(column_tops))

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
            True = remove that patch before the bottom-up columns; the top-down columns see mask tokens
            there. Every image must mask the same number of patches.
        """
        if pixel_values is None:
            raise ValueError("RevColV2Model needs pixel_values")
        if output_attentions:
            raise ValueError("RevColV2 does not return attention maps (the reversible columns do not keep them)")
        output_hidden_states, _, return_dict = self.output_flags(output_hidden_states, None, return_dict)
        mask = None
        if bool_masked_pos is not None:
            mask = indices_from_bool_masked_pos(
                bool_masked_pos.to(pixel_values.device), num_masked_patches(bool_masked_pos.shape[-1], self.config.mask_ratio)
            )
        columns = self.run_columns(pixel_values, mask, interpolate_pos_encoding)
        top = columns.levels[-1]
        pooled = None
        if self.pooler is not None:
            if self.config.classifier_pooling == "cls":
                pooled = top[:, 0] if self.pooler.fc_norm is None else self.pooler.fc_norm(top[:, 0])
            else:
                pooled = self.pooler(top)
        output = BaseModelOutputWithPooling(
            last_hidden_state=top,
            pooler_output=pooled,
            hidden_states=columns.as_hidden_states() if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------------


class RevColV2PixelDecoder(nn.Module):
    """LayerNorm + Linear from a level of the last top-down column to the target: the raw patch values
    (lowest level), or the teacher's tokens (`target="teacher"`, level `teacher_head_level`)."""

    def __init__(self, config: RevColV2Config):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pred = nn.Linear(config.hidden_size, config.target_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.pred(self.norm(hidden_states))


class RevColV2ForMaskedImageModeling(MIMTrainingEventsMixin, FrozenTeacherMixin, RevColV2PreTrainedModel):
    """RevColV2 pretraining: 75 % of the patches removed before the bottom-up columns, mask tokens at
    the top-down transition, masked patches reconstructed from the lowest level of the last top-down
    column; MSE against per-patch normalised pixels. `target="teacher"`: the masked positions regress a
    frozen teacher's normalised tokens instead (hf_mim/teachers.py: loaded lazily, never saved, no
    gradient; it runs outside the reversible columns, so their memory stays flat in the column count)."""

    _keys_to_ignore_on_load_unexpected = [r"^revcolv2\.pooler\.", r"^classifier\."]

    def __init__(self, config: RevColV2Config):
        super().__init__(config)
        self.revcolv2 = RevColV2Model(config, add_pooling_layer=False)
        # Fixed sin-cos positions during pretraining (MAE).
        self.revcolv2.embeddings.position_embeddings.requires_grad_(False)
        self.decoder = RevColV2PixelDecoder(config)
        self.init_frozen_teacher()
        self.post_init()

    teacher = FrozenTeacherMixin.external_teacher

    def mask_generator(self, attention_maps=None) -> RandomMaskGenerator:
        """How the data pipeline masks an image for this model: uniform random masking at mask_ratio."""
        return RandomMaskGenerator(self.config.image_size // self.config.patch_size, self.config.mask_ratio)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> RevColV2MaskedImageModelingOutput | tuple:
        r"""
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_patches)`, *optional*):
            Which patches to remove (True), the same count per image; visible patches enter in raster order.
        noise (`torch.FloatTensor` of shape `(batch_size, num_patches)`, *optional*):
            MAE masking noise: the `len_keep` smallest values stay visible. Drawn with `torch.rand` when
            neither this nor `bool_masked_pos` is given.
        """
        if pixel_values is None:
            raise ValueError("RevColV2ForMaskedImageModeling needs pixel_values")
        output_hidden_states, _, return_dict = self.output_flags(output_hidden_states, None, return_dict)

        grid = self.revcolv2.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        mask = self.mask_generator().masks(
            pixel_values.shape[0], grid[0] * grid[1], bool_masked_pos, noise, pixel_values.device
        )
        columns = self.revcolv2.run_columns(pixel_values, mask, interpolate_pos_encoding)
        prefix = self.revcolv2.num_prefix_tokens
        if self.config.target == "teacher":
            predictions = self.decoder(columns.levels[self.config.teacher_head_level][:, prefix:])
            targets = normalize_teacher_tokens(
                self.external_teacher_features(pixel_values), self.config.target_normalization, self.config.target_norm_eps
            )
            if targets.shape != predictions.shape:
                raise ValueError(f"teacher targets of shape {tuple(targets.shape)} do not match predictions {tuple(predictions.shape)}")
            per_patch = elementwise_loss(predictions.float(), targets, self.config.teacher_loss, self.config.smooth_l1_beta).mean(dim=-1)
            loss = weighted_token_mean(per_patch, mask.bool_masked_pos)  # the masked positions only
            patch_loss, reconstruction = per_patch.detach(), None
        else:
            predictions = self.decoder(columns.levels[0][:, prefix:])
            loss, patch_loss, reconstruction = self._pixel_loss(predictions, pixel_values, mask, grid)
            targets = None

        output = RevColV2MaskedImageModelingOutput(
            loss=loss,
            predictions=predictions,
            bool_masked_pos=mask.bool_masked_pos,
            reconstruction=reconstruction,
            patch_loss=patch_loss,
            last_hidden_state=columns.levels[-1],
            hidden_states=columns.as_hidden_states() if output_hidden_states else None,
            targets=targets,
        )
        return output if return_dict else output.to_tuple()

    def _pixel_loss(self, predictions, pixel_values, mask, grid):
        """(loss, patch_loss, reconstruction) of the pixel target: masked-patch MSE against (normalised) patches."""
        patch_size = self.config.patch_size
        # targets (and their per-patch statistics) in float32, also under bf16/fp16 autocast
        raw = patchify(pixel_values.float(), patch_size)
        target = pixel_targets(pixel_values.float(), patch_size, self.config.norm_pix_loss, self.config.norm_pix_eps)
        weights = mask.bool_masked_pos
        loss = masked_mse(predictions.float(), target.float(), weights)
        patch_loss = elementwise_loss(predictions.detach().float(), target.float(), "mse").mean(dim=-1)
        reconstruction = predictions_to_pixels(
            predictions.detach(), raw, patch_size, grid, self.config.num_channels,
            norm_eps=self.config.norm_pix_eps if self.config.norm_pix_loss else None,
        )
        return loss, patch_loss, reconstruction


# --------------------------------------------------------------------------------------------------
# Fine-tuning heads
# --------------------------------------------------------------------------------------------------


class RevColV2ForImageClassification(ImageClassificationMixin, RevColV2PreTrainedModel):
    """The whole autoencoder (bottom-up + top-down columns, no masking), top level of the last
    top-down column -> mean of patch tokens -> LayerNorm -> Linear. A pretraining checkpoint loads with
    only the pixel head dropped; `pooler.fc_norm` and the classifier start fresh."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: RevColV2Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.revcolv2 = RevColV2Model(config, add_pooling_layer=True, pretrained_encoder=False, top_level_only=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()


def level_scale(level: int) -> float:
    """Resampling of level l in the "multi_scale" pyramid: 4 / 2**l (`backbone_common.PYRAMID_SCALES` for
    four levels: strides 4, 8, 16, 32 at patch 16)."""
    return PYRAMID_SCALES[level] if level < len(PYRAMID_SCALES) else 4.0 / 2**level


def _resampler(config: RevColV2Config, level: int) -> nn.Module:
    """The BEiT / MAE multi-scale resampling of level l by `level_scale(l)`: deconvolutions up (a channel
    LayerNorm + GELU between two), identity, max-pooling down."""
    dim = config.hidden_size
    if config.backbone_pyramid == "none" or level == 2:
        return nn.Identity()
    if level < 2:
        layers: list[nn.Module] = []
        for step in range(2 - level):
            if step > 0:
                layers += [ChannelLayerNorm(dim, eps=config.layer_norm_eps), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        return nn.Sequential(*layers)
    return nn.MaxPool2d(kernel_size=2 ** (level - 2), stride=2 ** (level - 2))


class RevColV2Backbone(BackboneMixin, RevColV2PreTrainedModel):
    """Multi-level feature maps for dense heads (UperNet, Mask2Former, ... through `AutoBackbone`).

    Stages: "stem" (the patch embedding) and "stage1" .. "stage{L}", the levels of the last top-down
    column, each LayerNorm-ed and reshaped to (B, C, h, w); with `backbone_pyramid="multi_scale"` level l is
    resampled by 4 / 2**l (strides 4, 8, 16, 32 at patch 16 for 4 levels). The whole autoencoder body
    runs; weights load from pretraining and classification checkpoints (`revcolv2.` prefix).
    """

    has_attentions = False

    def __init__(self, config: RevColV2Config):
        super().__init__(config)
        self.revcolv2 = RevColV2Model(config, add_pooling_layer=False)
        self.feature_norms = nn.ModuleList(
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) for _ in range(config.num_levels + 1)
        )
        self.resamplers = nn.ModuleList(
            [nn.Identity()] + [_resampler(config, level) for level in range(config.num_levels)]
        )
        self.num_features = [config.hidden_size] * (config.num_levels + 1)
        self.post_init()

    @property
    def feature_strides(self) -> list[float]:
        """Stride in pixels of each returned feature map (as the ViT backbones report it)."""
        patch, pyramid = self.config.patch_size, self.config.backbone_pyramid
        strides = []
        for name in self.out_features:
            index = self.stage_names.index(name)
            strides.append(float(patch) if index == 0 or pyramid == "none" else patch / level_scale(index - 1))
        return strides

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = True,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput | tuple:
        r"""
        interpolate_pos_encoding (`bool`, defaults to `True`): dense tasks run at their own resolution
            (any multiple of the patch size); the sin-cos position table is resized to it.
        """
        if output_attentions:
            raise ValueError("RevColV2 does not return attention maps")
        output_hidden_states, _, return_dict = self.output_flags(output_hidden_states, None, return_dict)
        grid_h, grid_w = self.revcolv2.embeddings.patch_embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        columns = self.revcolv2.run_columns(pixel_values, None, interpolate_pos_encoding)
        stages = (columns.embeddings, *columns.levels)
        prefix = self.revcolv2.num_prefix_tokens
        feature_maps = []
        for index, (name, hidden_state) in enumerate(zip(self.stage_names, stages)):
            if name not in self.out_features:
                continue
            hidden_state = self.feature_norms[index](hidden_state[:, prefix:])
            batch_size, _, dim = hidden_state.shape
            feature_map = hidden_state.transpose(1, 2).reshape(batch_size, dim, grid_h, grid_w).contiguous()
            feature_maps.append(self.resamplers[index](feature_map))
        output = BackboneOutput(feature_maps=tuple(feature_maps), hidden_states=stages if output_hidden_states else None)
        return output if return_dict else output.to_tuple()


__all__ = [
    "RevColV2PreTrainedModel",
    "RevColV2Model",
    "RevColV2ForMaskedImageModeling",
    "RevColV2ForImageClassification",
    "RevColV2Backbone",
]
