"""Semantic-segmentation tooling for run_semantic_segmentation.py: the ADE20K recipe's defaults,
transformers' UperNet built over any hf_mim backbone (encoder weights from a pretraining or
classification checkpoint), AdamW with the backbone's layer-wise lr decay, sliding-window / whole-image
evaluation with mIoU, pixel accuracy and per-class IoU computed in the package, and the Hub-ready folder
(weights, remote code, processor, card with the metrics in its model-index)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .checkpoint import write_json_atomic
from .conventions import hub_kwargs
from .metrics import SegmentationMeter
from .optim import build_adamw, layer_decay_param_groups
from .overrides import parse_overrides
from .run_setup import check_local_path, public_args

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255

# BEiT / MAE / dBOT ADE20K UperNet recipe (mmseg): 512 crops, AdamW lr 1e-4 (total batch 16), weight
# decay 0.05, layer decay 0.65, 1500 warm-up iterations, poly (power 1) decay over 160k iterations, drop
# path 0.1, UperNet channels 512 (transformers' default), auxiliary FCN head weight 0.4.
RECIPE_DEFAULTS = dict(crop_size=512, learning_rate=1e-4, weight_decay=0.05, layer_decay=0.65, num_warmup_steps=1500,
                       max_train_steps=160_000, per_device_train_batch_size=16, drop_path_rate=0.1,
                       lr_scheduler_type="linear", decode_head_channels=512, adam_beta2=0.999)

# The embedded shapes-on-textures set (800 / 200 images of 64 x 64, 5 classes): 500 steps of batch 8
# (5 epochs), a narrow UperNet, lr 2e-3; about 2 minutes a run on 2 CPU cores. Measured with the
# EMBEDDED_MODEL architecture (mIoU, pretrained with run_mim.py's dBOT for 2000 steps on the set's images /
# random initialisation): 23.3 / 22.3 after 500 steps, 31.0 / 31.7 after 1000 — the short demo shows the
# pipeline, not the value of pretraining, which needs real data and schedules.
EMBEDDED_DEFAULTS = dict(crop_size=64, learning_rate=2e-3, num_warmup_steps=15, max_train_steps=500,
                         per_device_train_batch_size=8, per_device_eval_batch_size=32, drop_path_rate=0.0,
                         decode_head_channels=32, eval_steps=250, layer_decay=0.75)
# the embedded run's random-init model when neither a checkpoint nor a size is given (what
# `run_mim.py --model_type dbot --model_size tiny --config_overrides ...` pretrains in minutes)
EMBEDDED_MODEL = dict(model_type="dbot", model_size="tiny",
                      config_overrides="image_size=64,hidden_size=96,num_hidden_layers=4,num_attention_heads=3")

# the recipe's poly decay has power 1: a straight line to 0 after warm-up, transformers' "linear"


def backbone_config(args):
    """(family, backbone config) of the run: from the checkpoint's config (a pretraining, classification or
    UperNet folder) or a named size; --config_overrides and --drop_path_rate applied."""
    from transformers import AutoConfig

    from ..auto import family_for

    overrides = parse_overrides(args.config_overrides)
    overrides["drop_path_rate"] = args.drop_path_rate
    if args.model_name_or_path:
        check_local_path("--model_name_or_path", args.model_name_or_path)
        saved = AutoConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args))
        saved = getattr(saved, "backbone_config", None) or saved
        family = family_for(saved.model_type)
        values = {k: v for k, v in saved.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")}
        return family, family.config_class(**{**values, **overrides})
    family = family_for(args.model_type)
    return family, family.config_class.from_preset(args.model_size, **overrides)


def build_model(args, id2label: dict[int, str]):
    """(UperNet over the hf_mim backbone, what the checkpoint did not provide). Encoder weights come from
    --model_name_or_path (the pyramid and the heads start fresh); an UperNet folder loads whole."""
    from transformers import AutoConfig

    from ..modeling_upernet import MIMUperNetConfig, MIMUperNetForSemanticSegmentation

    family, backbone_cfg = backbone_config(args)
    backbone_cfg._attn_implementation = args.attn_implementation
    labels = dict(id2label=id2label, label2id={name: i for i, name in id2label.items()})
    if args.model_name_or_path and AutoConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args)).model_type == "upernet":
        model, info = MIMUperNetForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, backbone_config=backbone_cfg, ignore_mismatched_sizes=True, output_loading_info=True,
            **hub_kwargs(args), **labels)
        return model, sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
    backbone = family.backbone_class(backbone_cfg)
    channels = list(backbone.channels)
    config = MIMUperNetConfig(backbone_config=backbone_cfg, hidden_size=args.decode_head_channels,
                              auxiliary_in_channels=channels[min(2, len(channels) - 1)],
                              auxiliary_channels=max(8, args.decode_head_channels // 2), loss_ignore_index=IGNORE_INDEX,
                              **labels)
    model = MIMUperNetForSemanticSegmentation(config)
    missing = [f"backbone.{name}" for name, _ in model.backbone.named_parameters()]
    if args.model_name_or_path and not args.random_init:
        loaded, info = family.backbone_class.from_pretrained(args.model_name_or_path, config=backbone_cfg, output_loading_info=True,
                                                             **hub_kwargs(args))
        model.backbone = loaded
        missing = [f"backbone.{key}" for key in sorted(info["missing_keys"])]
        logger.info("encoder weights loaded from %s; not in the checkpoint (initialised): %s", args.model_name_or_path,
                    ", ".join(missing) or "nothing")
    elif args.model_name_or_path:
        logger.info("random initialisation with the architecture of %s (--compare_random_init)", args.model_name_or_path)
    return model, missing


def build_optimizer(args, model, lr: float) -> torch.optim.Optimizer:
    """AdamW over layer-wise lr decay groups: the backbone's `layer_id_for_lr_decay` (0 embeddings ..
    L + 1 pyramid and both heads)."""
    backbone = model.backbone
    groups = layer_decay_param_groups(model, args.weight_decay, args.layer_decay, num_layers=backbone.config.num_hidden_layers,
                                      layer_id_fn=backbone.layer_id_for_lr_decay)
    return build_adamw(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2))


def padded_logits(model, pixel_values: torch.Tensor, multiple: int) -> torch.Tensor:
    """Logits at the input's size for any input size: padded bottom/right to a multiple of the coarsest
    feature stride (the backbone needs whole patches), then cropped back."""
    height, width = pixel_values.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        pixel_values = torch.nn.functional.pad(pixel_values, (0, pad_w, 0, pad_h))
    return model(pixel_values=pixel_values).logits[..., :height, :width]


def slide_logits(model, pixel_values: torch.Tensor, crop: int, stride: int, multiple: int) -> torch.Tensor:
    """mmseg's sliding-window inference: crop x crop windows every `stride` pixels (the last window
    flush with the border), logits averaged where windows overlap."""
    height, width = pixel_values.shape[-2:]
    rows = max(math.ceil((height - crop) / stride), 0) + 1
    cols = max(math.ceil((width - crop) / stride), 0) + 1
    total, count = None, pixel_values.new_zeros(1, 1, height, width)
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            top, left = max(bottom - crop, 0), max(right - crop, 0)
            logits = padded_logits(model, pixel_values[..., top:bottom, left:right], multiple).float()
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], height, width)
            total[..., top:bottom, left:right] += logits
            count[..., top:bottom, left:right] += 1
    return total / count


def evaluate(model, dataloader, accelerator, args) -> dict:
    """mIoU / pixel accuracy / per-class IoU (percent) over this rank's share of the validation stream,
    the confusion matrices summed over ranks. Runs the unwrapped model (ranks may hold different numbers
    of batches)."""
    was_training = model.training
    model.eval()
    meter = SegmentationMeter(model.config.num_labels, IGNORE_INDEX)
    multiple = int(max(model.backbone.feature_strides))
    with torch.no_grad(), accelerator.autocast():
        for batch in dataloader:
            pixel_values = batch["pixel_values"].to(accelerator.device)
            if args.eval_mode == "slide":
                logits = slide_logits(model, pixel_values, args.crop_size, args.eval_stride, multiple)
            else:
                logits = padded_logits(model, pixel_values, multiple)
            meter.update(logits.argmax(1), batch["labels"].to(accelerator.device))
    model.train(was_training)
    return meter.reduce(accelerator).compute()


def segmentation_processor(args):
    """transformers' segmentation processor (PIL backend): resize to crop x crop, ImageNet mean/std, and
    --reduce_labels for maps given to it."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    return SegformerImageProcessorPil(size={"height": args.crop_size, "width": args.crop_size}, do_reduce_labels=args.reduce_labels,
                                      image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))


def dataset_names(args, embedded: bool) -> tuple[str, str]:
    if embedded:
        return "hf_mim-embedded-segmentation", "hf_mim embedded shapes on textures (generated)"
    if args.dataset_name:
        return args.dataset_name, args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    return Path(args.train_dir).name, f"local data ({Path(args.train_dir).name})"


def write_outputs(args, model, output_dir: Path, results: dict | None, summary: dict, embedded: bool, extra: dict) -> None:
    """The Hub-ready folder: weights, config (auto_map), the flat model-zone code, processor, card with the
    metrics in its model-index, training_args.json, eval_results.json; pushed with --push_to_hub."""
    from ..hub.card import render_segmentation_card
    from ..hub.push import push_folder_to_hub

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    segmentation_processor(args).save_pretrained(output_dir)
    write_json_atomic(output_dir / "training_args.json", public_args(args))
    dataset_type, dataset_name = dataset_names(args, embedded)
    split = "validation" if embedded else args.validation_split
    if results is not None:
        write_json_atomic(output_dir / "eval_results.json", {**results, "dataset": dataset_name, "split": split, **extra})
    repo_id = args.hub_model_id or f"{model.config.backbone_config.model_type}-upernet-{output_dir.name}"
    card = render_segmentation_card(model, repo_id, results, dataset_type, dataset_name, split, summary, license=args.license,
                                    datasets=[args.dataset_name] if args.dataset_name else None, is_demo=embedded)
    card.save(output_dir / "README.md")
    logger.info("wrote the Hub-ready folder %s", output_dir)
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None,
                                 commit_message=f"UperNet on {model.config.backbone_config.model_type}: mIoU "
                                 + (f"{results['mean_iou']:.2f}" if results else "n/a"))
        logger.info("pushed to %s", url)


__all__ = ["EMBEDDED_DEFAULTS", "EMBEDDED_MODEL", "RECIPE_DEFAULTS", "backbone_config", "build_model", "build_optimizer",
           "evaluate", "padded_logits", "segmentation_processor", "slide_logits", "write_outputs"]
