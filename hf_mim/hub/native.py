"""Native transformers form of hf_mim classifiers and backbones: a BEiT model computing the same thing.

The Hub's hosted inference (the widget) does not run custom code; a native class does. BEiT's layer
is exactly the ViT/BEiT block every ViT-style method here uses: the fused qkv splits into query, key,
value (the key bias is dropped: it adds q.b_k to every logit of a query alike, which softmax ignores),
layer scale becomes lambda_1/2, a per-block relative position table keeps its index layout, and
mean pooling + fc_norm is BEiT's pooler. ExtreMA has no cls token, BEiT always prepends one: a shared
relative-bias table whose "token -> cls" entry is -1e4 hides it from every patch (exp underflows to
0), and BEiT's pooler never reads it. Not expressible: ExtreMA's class-attention pooling, RevColV2.
Every export is checked against the hf_mim model before it is written (`MAX_EXPORT_DIFF`).
"""

from __future__ import annotations

import torch
from transformers import BeitConfig, BeitForImageClassification, BeitModel, PreTrainedModel

MAX_EXPORT_DIFF = 1e-5
HIDDEN_CLS = -1e4  # relative-bias logit that hides BEiT's cls key from the patch queries (ExtreMA)


class NotExpressible(ValueError):
    """No native transformers class computes this model exactly; the message says why in one line."""


def _head(model: PreTrainedModel) -> str:
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        return "classifier"
    if name.endswith("Model"):
        return "backbone"
    raise NotExpressible(
        f"{name} is not a classifier or backbone: export a fine-tuned ...ForImageClassification "
        "or the AutoModel of a fine-tuned folder"
    )


def _gamma(layer: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The layer-scale vector of a block's branch ("ls1" attention, "ls2" MLP), None where unscaled."""
    gamma = getattr(getattr(layer, name, None), "gamma", None)
    return gamma if isinstance(gamma, torch.Tensor) else None


def _layout(model: PreTrainedModel) -> dict:
    """What the BEiT config must say for this hf_mim model, or NotExpressible."""
    config = model.config
    model_type = config.model_type
    base = model.base_model
    if model_type == "revcolv2":
        raise NotExpressible("RevColV2 (reversible multi-column network) has no native transformers class")
    if model_type == "extrema":
        if config.pooling != "mean" or getattr(base, "pretrained_encoder", False):
            raise NotExpressible(
                f"ExtreMA with pooling={config.pooling!r} (class-attention pooling) has no native transformers class; "
                "only pooling='mean' exports"
            )
    pooler = getattr(base, "pooler", None)
    if pooler is not None and getattr(pooler, "fc_norm", None) is None:
        raise NotExpressible(
            f"{type(base).__name__} pools the final-normed tokens without fc_norm (a pretrained encoder); BEiT pools "
            "with fc_norm or takes the cls token: export a fine-tuned classifier"
        )
    mean_pooling = pooler is not None and getattr(pooler, "fc_norm", None) is not None
    final_norm = base.encoder.layernorm is not None
    if mean_pooling == final_norm:
        raise NotExpressible(
            f"{type(base).__name__} pools {'with' if mean_pooling else 'without'} fc_norm and "
            f"{'with' if final_norm else 'without'} the final norm; BEiT has either mean pooling + fc_norm "
            "or the final norm + the cls token"
        )
    layers = base.encoder.layers
    first = layers[0]
    has_layer_scale = any(_gamma(first, name) is not None for name in ("ls1", "ls2"))
    per_layer_bias = getattr(first, "rel_pos_bias", None) is not None
    shared_bias = not per_layer_bias and getattr(base.encoder, "rel_pos_bias", None) is not None
    embeddings = base.encoder.embeddings
    return {
        "mean_pooling": mean_pooling,
        "layer_scale": has_layer_scale,
        "per_layer_bias": per_layer_bias,
        "shared_bias": shared_bias,
        "hide_cls": getattr(embeddings, "cls_token", None) is None,
        "absolute_positions": getattr(embeddings, "position_embeddings", None) is not None,
    }


def beit_config_for(model: PreTrainedModel) -> BeitConfig:
    """The BeitConfig with the same widths, depth, norms, pooling and labels as `model`."""
    config = model.config
    layout = _layout(model)
    first = model.base_model.encoder.layers[0]
    return BeitConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=len(model.base_model.encoder.layers),
        num_attention_heads=config.num_attention_heads,
        intermediate_size=first.mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.layer_norm_eps,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        use_mask_token=False,
        use_absolute_position_embeddings=layout["absolute_positions"],
        use_relative_position_bias=layout["per_layer_bias"],
        use_shared_relative_position_bias=layout["shared_bias"] or layout["hide_cls"],
        layer_scale_init_value=0.1 if layout["layer_scale"] else 0.0,
        drop_path_rate=0.0,
        use_mean_pooling=layout["mean_pooling"],
        num_labels=config.num_labels,
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
        initializer_range=config.initializer_range,
    )


def beit_state_dict(model: PreTrainedModel, beit_config: BeitConfig) -> dict[str, torch.Tensor]:
    """hf_mim weights renamed (and qkv split) into the BEiT layout of `beit_config`."""
    base = model.base_model
    encoder = base.encoder
    embeddings = encoder.embeddings
    dim = beit_config.hidden_size
    prefix = "beit." if _head(model) == "classifier" else ""
    out: dict[str, torch.Tensor] = {}
    cls_token = getattr(embeddings, "cls_token", None)
    out[f"{prefix}embeddings.cls_token"] = cls_token if cls_token is not None else torch.zeros(1, 1, dim)
    projection = embeddings.patch_embeddings.projection
    out[f"{prefix}embeddings.patch_embeddings.projection.weight"] = projection.weight
    out[f"{prefix}embeddings.patch_embeddings.projection.bias"] = projection.bias
    if beit_config.use_absolute_position_embeddings:
        table = embeddings.position_embeddings
        if cls_token is None:  # no cls row (ExtreMA): BEiT adds a zero to its hidden cls token
            table = torch.cat([torch.zeros(1, 1, dim, dtype=table.dtype), table], dim=1)
        out[f"{prefix}embeddings.position_embeddings"] = table
    if beit_config.use_shared_relative_position_bias:
        if cls_token is None:
            grid = beit_config.image_size // beit_config.patch_size
            num_distances = (2 * grid - 1) ** 2 + 3
            table = torch.zeros(num_distances, beit_config.num_attention_heads)
            table[num_distances - 2] = HIDDEN_CLS  # the row BEiT's index gives every "token -> cls" pair
        else:  # one table shared by every block (MaskDistill's pretraining layout)
            table = encoder.rel_pos_bias.relative_position_bias_table
        out[f"{prefix}shared_position_bias.relative_position_bias_table"] = table
    for index, layer in enumerate(encoder.layers):
        target = f"{prefix}layers.{index}."
        query, key, value = layer.attn.qkv.weight.chunk(3, dim=0)
        q_bias, _, v_bias = layer.attn.qkv.bias.chunk(3, dim=0)
        out.update({
            target + "attention.q_proj.weight": query,
            target + "attention.q_proj.bias": q_bias,
            target + "attention.k_proj.weight": key,
            target + "attention.v_proj.weight": value,
            target + "attention.v_proj.bias": v_bias,
            target + "attention.o_proj.weight": layer.attn.proj.weight,
            target + "attention.o_proj.bias": layer.attn.proj.bias,
            target + "layernorm_before.weight": layer.norm1.weight,
            target + "layernorm_before.bias": layer.norm1.bias,
            target + "layernorm_after.weight": layer.norm2.weight,
            target + "layernorm_after.bias": layer.norm2.bias,
            target + "mlp.fc1.weight": layer.mlp.fc1.weight,
            target + "mlp.fc1.bias": layer.mlp.fc1.bias,
            target + "mlp.fc2.weight": layer.mlp.fc2.weight,
            target + "mlp.fc2.bias": layer.mlp.fc2.bias,
        })
        if beit_config.layer_scale_init_value > 0:
            # a branch without layer scale (SimMIM's ViT scales only the MLP branch) gets BEiT's lambda = 1
            for source, lambda_name in (("ls1", "lambda_1"), ("ls2", "lambda_2")):
                gamma = _gamma(layer, source)
                out[target + lambda_name] = gamma if gamma is not None else torch.ones(dim)
        if beit_config.use_relative_position_bias:
            out[target + "relative_position_bias.relative_position_bias_table"] = (
                layer.rel_pos_bias.relative_position_bias_table
            )
    if beit_config.use_mean_pooling:
        out[f"{prefix}pooler.layernorm.weight"] = base.pooler.fc_norm.weight
        out[f"{prefix}pooler.layernorm.bias"] = base.pooler.fc_norm.bias
    else:
        out[f"{prefix}layernorm.weight"] = encoder.layernorm.weight
        out[f"{prefix}layernorm.bias"] = encoder.layernorm.bias
    if prefix:
        out["classifier.weight"] = model.classifier.weight
        out["classifier.bias"] = model.classifier.bias
    return {name: tensor.detach().clone().float().contiguous() for name, tensor in out.items()}


@torch.no_grad()
def max_difference(model: PreTrainedModel, native: PreTrainedModel, seed: int = 0, batch_size: int = 2) -> float:
    """Largest |hf_mim - native| over the logits (classifier), the pooled features and the patch
    tokens of the last layer, on seeded random images at the model's resolution."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, generator=generator)
    parameter = next(model.parameters())
    pixels = pixels.to(parameter.device, parameter.dtype)
    model_was_training, native_was_training = model.training, native.training
    model.eval(), native.eval()
    try:
        differences = []
        if _head(model) == "classifier":
            differences.append((model(pixels).logits - native(pixels).logits).abs().max().item())
        # the features too: a fresh classifier's logits are ~0 and would hide a wrong backbone
        ours, theirs = model.base_model(pixels, return_dict=True), native.base_model(pixels, return_dict=True)
        prefix = ours.last_hidden_state.shape[1] - theirs.last_hidden_state.shape[1] + 1  # BEiT's cls: 1
        differences.append((ours.pooler_output - theirs.pooler_output).abs().max().item())
        differences.append((ours.last_hidden_state[:, prefix:] - theirs.last_hidden_state[:, 1:]).abs().max().item())
        return max(differences)
    finally:
        model.train(model_was_training), native.train(native_was_training)


def to_native(model: PreTrainedModel) -> tuple[PreTrainedModel, float]:
    """(BeitForImageClassification or BeitModel with `model`'s weights, max output difference).

    Raises NotExpressible with a one-line reason when no native class computes `model`, or when the
    check finds a difference above MAX_EXPORT_DIFF."""
    head = _head(model)
    config = beit_config_for(model)
    native = BeitForImageClassification(config) if head == "classifier" else BeitModel(config, add_pooling_layer=True)
    try:
        state = beit_state_dict(model, config)
    except (AttributeError, KeyError, ValueError) as error:  # a head or block other than the paper's
        raise NotExpressible(f"{type(model).__name__} does not have the BEiT layout: {type(error).__name__}: {error}") from error
    missing, unexpected = native.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NotExpressible(f"BEiT layout mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    parameter = next(model.parameters())
    difference = max_difference(model, native.to(parameter.device, parameter.dtype))
    native.to("cpu", torch.float32)
    if not difference <= MAX_EXPORT_DIFF:
        raise NotExpressible(
            f"{type(native).__name__} differs from {type(model).__name__} by {difference:.3g} (> {MAX_EXPORT_DIFF:g}); not exported"
        )
    return native, difference


def load_hf_mim_model(model_name_or_path: str, **kwargs) -> PreTrainedModel:
    """The hf_mim classifier or backbone saved in a folder or Hub repo (the class its config names)."""
    from transformers import AutoConfig

    from ..auto import family_for

    config = AutoConfig.from_pretrained(model_name_or_path, **kwargs)
    family = family_for(config.model_type)
    architecture = (config.architectures or [""])[0]
    classes = {cls.__name__: cls for cls in (family.image_classification_class, family.base_model_class)}
    if architecture not in classes:
        raise NotExpressible(
            f"{model_name_or_path} holds {architecture or 'no architecture'}, not a classifier or backbone; "
            "export a fine-tuned ...ForImageClassification folder"
        )
    return classes[architecture].from_pretrained(model_name_or_path, **kwargs)


def native_card(native: PreTrainedModel, repo_id: str, source: str, difference: float, hf_mim_location: str) -> str:
    """A short card for the native form: what it is, how close it is, where the hf_mim form lives."""
    from huggingface_hub import ModelCard, ModelCardData

    task = "image-classification" if type(native).__name__.endswith("ForImageClassification") else "image-feature-extraction"
    data = ModelCardData(library_name="transformers", pipeline_tag=task, tags=["hf_mim", "beit", "vision"], license="apache-2.0")
    body = (
        f"# {repo_id.split('/')[-1]}\n\n"
        f"`{type(native).__name__}` (native transformers, no custom code) with the weights of the hf_mim model "
        f"`{source}`: it computes the same function (largest difference {difference:.2g} on random images, checked "
        f"when exported; refused above {MAX_EXPORT_DIFF:g}).\n\n"
        f"The hf_mim form (training heads, custom code, `trust_remote_code=True`): {hf_mim_location}.\n\n"
        "The image processor resizes the short side to image_size / 0.875 (bicubic) and centre-crops, as the "
        "evaluation did.\n"
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def export_native(
    model_name_or_path: str, output_dir, hf_mim_location: str | None = None, repo_id: str | None = None
) -> tuple[PreTrainedModel, float]:
    """Write the native form of the hf_mim classifier/backbone at `model_name_or_path` into `output_dir`
    (weights, config without auto_map, image processor, card). Raises NotExpressible otherwise."""
    from pathlib import Path

    from transformers import AutoImageProcessor

    from .export import build_image_processor

    model = load_hf_mim_model(model_name_or_path)
    native, difference = to_native(model)
    output_dir = Path(output_dir)
    native.save_pretrained(output_dir)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path, backend="pil")
    except (OSError, ValueError):
        processor = build_image_processor(model.config.image_size)
    processor.save_pretrained(output_dir)
    repo_id = repo_id or output_dir.name
    location = hf_mim_location or f"`{model_name_or_path}`"
    (output_dir / "README.md").write_text(native_card(native, repo_id, model_name_or_path, difference, location))
    return native, difference
