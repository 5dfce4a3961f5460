"""Classification tooling for run_image_classification.py: the fine-tuning and linear-probe recipes
(their defaults, AdamW with layer-wise lr decay, MAE's LARS), the classifier built from any hf_mim
checkpoint (head kept or re-initialised), top-1/top-5 evaluation computed in the package (no Hub
metric download), and the run's Hub-ready folder with its model-index."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..data import batch_to_device
from .overrides import parse_overrides
from .arguments import uses_embedded_data
from .checkpoint import write_json_atomic
from .conventions import hub_kwargs, output_image_processor
from .metrics import AccuracyMeter
from .optim import build_adamw, layer_decay_param_groups, weight_decay_param_groups
from .run_setup import UserInputError, check_local_path

logger = logging.getLogger(__name__)

HEAD_NAME = "classifier"  # the linear head of every hf_mim ...ForImageClassification
EMBEDDED_DATASET = "hf_mim embedded digits (scikit-learn handwritten digits)"


def is_classifier(config) -> bool:
    return any(name.endswith("ForImageClassification") for name in (getattr(config, "architectures", None) or []))


@torch.no_grad()
def reset_head(model) -> None:
    """Re-initialise the classifier head as the model's `_init_weights` does (truncated normal, zero bias)."""
    head = getattr(model, HEAD_NAME)
    torch.nn.init.trunc_normal_(head.weight, std=getattr(model.config, "classifier_init_std", 0.01))
    torch.nn.init.zeros_(head.bias)


def build_optimizer(args, model, lr: float) -> torch.optim.Optimizer:
    """Fine-tuning (--mode finetune): layer-wise lr decay groups over every parameter; linear probe: the
    head only. --optimizer adamw | lars (timm's, as MAE's linear probe) | sgd. Each group's `lr_scale`
    is applied by the schedule. LoRA (--lora_rank): the trainable parameters (adapter, head) in plain
    weight-decay groups, one learning rate, as LoRA recipes (peft's ViT example) train; layer-wise
    decay is the full fine-tuning recipe's."""
    if args.mode == "finetune" and not getattr(args, "lora_rank", None):
        # Architectures whose depth is not a plain block index (RevColV2's column grid) say how their
        # parameters map to layers through `layer_id_for_lr_decay`; ViTs use the block index.
        groups = layer_decay_param_groups(
            model,
            args.weight_decay,
            args.layer_decay,
            num_layers=model.config.num_hidden_layers,
            layer_id_fn=getattr(model, "layer_id_for_lr_decay", None),
        )
    else:
        groups = weight_decay_param_groups(model, args.weight_decay)
    if args.optimizer == "adamw":
        return build_adamw(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2))
    if args.optimizer == "lars":
        try:
            from timm.optim import Lars
        except ImportError:
            logger.warning("timm.optim.Lars is not available in this timm: using SGD with momentum 0.9")
        else:
            # MAE's LARS: matrices are adapted (trust ratio 0.001 * |w| / |g|) even without weight decay;
            # biases and norms are not.
            for group in groups:
                group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
            return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def describe_lr_scales(optimizer) -> str:
    """'layer id: lr scale, ...' of an optimizer built with layer-wise lr decay."""
    by_layer: dict[int, float] = {}
    for group in optimizer.param_groups:
        by_layer[group.get("layer_id", -1)] = group.get("lr_scale", 1.0)
    return ", ".join(f"{layer}: {scale:.3g}" for layer, scale in sorted(by_layer.items()))


def evaluate(model, dataloader, accelerator) -> dict:
    """Top-1/top-5 (percent) over this rank's share of the validation stream, summed over ranks.
    Runs the unwrapped model: ranks may hold different numbers of batches (no collectives inside)."""
    was_training = {name: module.training for name, module in model.named_modules()}
    model.eval()
    meter = AccuracyMeter((1, 5))
    with torch.no_grad(), accelerator.autocast():
        for batch in dataloader:
            batch = batch_to_device({key: batch[key] for key in ("pixel_values", "labels")}, accelerator.device,
                                    getattr(dataloader, "collate_fn", None))
            logits = model(pixel_values=batch["pixel_values"]).logits
            meter.update(logits.float(), batch["labels"])
    for name, module in model.named_modules():
        module.training = was_training[name]
    meter = meter.reduce(accelerator)
    results = meter.compute()
    results["eval_examples"] = meter.total
    return results


# The recipes (dBOT/MAE `main_finetune.py` and MAE `main_linprobe.py`), for every flag left unset.
MODE_DEFAULTS = {
    "finetune": dict(base_learning_rate=5e-4, optimizer="adamw", weight_decay=0.05, drop_path_rate=0.1,
                     num_train_epochs=100.0, warmup_epochs=5.0, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                     randaug="rand-m9-mstd0.5-inc1", reprob=0.25),
    "linear_probe": dict(base_learning_rate=0.1, optimizer="lars", weight_decay=0.0, drop_path_rate=0.0,
                         num_train_epochs=90.0, warmup_epochs=10.0, label_smoothing=0.0, mixup=0.0, cutmix=0.0,
                         randaug="none", reprob=0.0),
}
# k-NN trains nothing: the linear probe's values (no augmentation, no drop path) only fill the flags.
MODE_DEFAULTS["knn"] = MODE_DEFAULTS["linear_probe"]

# The embedded digits are 1,438 training and 359 validation images. Fine-tuning: 5 short epochs with
# a larger learning rate than the ImageNet recipe (whose lr scales with a batch of 1024). Linear probe:
# SGD instead of LARS, whose trust ratio (0.001 |w| / |g| per step) is made for ~16k batches and
# thousands of steps and barely moves a head in ~200 steps (lr 0.1 works on the BatchNorm-ed features
# whatever their scale). Both evaluate about once an epoch and end in minutes on a CPU.
EMBEDDED_DEMO_DEFAULTS = {
    "finetune": dict(per_device_train_batch_size=64, learning_rate=1e-3, num_train_epochs=5.0, warmup_epochs=1.0, eval_steps=25),
    "linear_probe": dict(per_device_train_batch_size=64, optimizer="sgd", learning_rate=0.1, num_train_epochs=10.0,
                         warmup_epochs=1.0, eval_steps=25),
    "knn": {},
}


def mixup_active(args: argparse.Namespace) -> bool:
    return (args.mixup > 0 or args.cutmix > 0) and args.mixup_prob > 0


def base_config(args: argparse.Namespace):
    """The config the run starts from (image size, depth), before labels are known."""
    from transformers import AutoConfig

    from ..auto import family_for

    overrides = parse_overrides(args.config_overrides)
    if args.model_name_or_path:
        check_local_path("--model_name_or_path", args.model_name_or_path)
        return AutoConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args), **overrides)
    return family_for(args.model_type or "dbot").config_class.from_preset(args.model_size or "base", **overrides)


def build_model(args: argparse.Namespace, id2label: dict[int, str]):
    """The ...ForImageClassification model with our labels: from weights (backbone kept; the head kept
    only when it was trained on the same labels) or randomly initialised."""
    from transformers import AutoConfig, AutoModelForImageClassification

    from ..auto import family_for

    overrides = parse_overrides(args.config_overrides)
    overrides.update(id2label=id2label, label2id={name: i for i, name in id2label.items()}, drop_path_rate=args.drop_path_rate)
    if args.model_name_or_path:
        saved = AutoConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args))
        classifier = is_classifier(saved)
        same_labels = classifier and {int(k): v for k, v in saved.id2label.items()} == id2label
        new_head = classifier and not same_labels
        if new_head and saved.num_labels != len(id2label) and not args.ignore_mismatched_sizes:
            raise UserInputError(
                f"--model_name_or_path {args.model_name_or_path} is a classifier for {saved.num_labels} labels, the data has "
                f"{len(id2label)}: pass --ignore_mismatched_sizes to start a new head"
            )
        model = AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path, ignore_mismatched_sizes=new_head, attn_implementation=args.attn_implementation,
            **hub_kwargs(args), **overrides,
        )
        if new_head:
            logger.info("%s is a classifier for other labels: its head is re-initialised", args.model_name_or_path)
            if saved.num_labels == len(id2label):  # same shape: ignore_mismatched_sizes kept the old weights
                reset_head(model)
        elif same_labels:
            logger.info("%s is a classifier for the same labels: its head is kept", args.model_name_or_path)
    else:
        family = family_for(args.model_type or "dbot")
        config = family.config_class.from_preset(args.model_size or "base", **overrides)
        config._attn_implementation = args.attn_implementation
        model = family.image_classification_class(config)
    model.config.problem_type = "single_label_classification"
    return model


def build_feature_model(args: argparse.Namespace):
    """The base model whose `pooler_output` k-NN compares: `AutoModel` of the checkpoint (a pretraining
    folder gives the representation pretraining trained, see `builds_pretrained_encoder`; a classifier its
    fine-tuned `fc_norm` feature), or a randomly initialised baseline."""
    from transformers import AutoModel

    from ..auto import family_for

    overrides = parse_overrides(args.config_overrides)
    if args.model_name_or_path:
        return AutoModel.from_pretrained(args.model_name_or_path, attn_implementation=args.attn_implementation,
                                         **hub_kwargs(args), **overrides)
    family = family_for(args.model_type or "dbot")
    config = family.config_class.from_preset(args.model_size or "base", **overrides)
    config._attn_implementation = args.attn_implementation
    return family.base_model_class(config)


def label_fraction_note(args) -> str | None:
    """How much of the labelled training data the run used (`--train_fraction`), for cards and results."""
    fraction = getattr(args, "train_fraction", 1.0)
    return None if fraction >= 1 else f"{fraction:g} (class-balanced, seed {args.seed})"


def dataset_names(args) -> tuple[str, str]:
    """(dataset_type: a Hub id or a local name, dataset_name: human-readable) for the model-index."""
    if args.dataset_name:
        name = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        return args.dataset_name, name
    if args.train_dir:
        return Path(args.train_dir).name, f"local data ({Path(args.train_dir).name})"
    return "hf_mim-embedded-digits", EMBEDDED_DATASET


def run_summary(args, config, total_batch: int, lr: float, total_steps: int, elapsed: float, world: int,
                lora_note: str | None = None) -> dict:
    summary = {
        "script": "training_scripts/run_image_classification.py",
        "mode": args.mode,
        "initialised from": args.model_name_or_path or f"random ({config.model_type} {args.model_size or 'base'})",
        "data": dataset_names(args)[1],
        "labels": config.num_labels,
        **({"label fraction": label_fraction_note(args)} if label_fraction_note(args) else {}),
        "image size": config.image_size,
        "optimizer steps": total_steps,
        "batch (total)": total_batch,
        "learning rate": f"{lr:.3g} ({args.optimizer}; weight decay {args.weight_decay})",
        "schedule": f"cosine, warm-up {args.num_warmup_steps} steps, min lr ratio {args.min_lr_ratio}",
    }
    if args.mode == "finetune" and getattr(args, "lora_rank", None):
        summary["LoRA"] = lora_note or f"rank {args.lora_rank}"
        summary["drop path"] = args.drop_path_rate
    elif args.mode == "finetune":
        summary["layer decay"] = args.layer_decay
        summary["drop path"] = args.drop_path_rate
    else:
        summary["head"] = "BatchNorm1d(affine=False) + Linear on the frozen pooler output, folded into the Linear"
    summary["augmentation"] = (
        f"RandomResizedCrop(0.08-1) + flip, RandAugment {args.randaug}, RandomErasing {args.reprob}, "
        f"mixup {args.mixup}, cutmix {args.cutmix}, label smoothing {args.label_smoothing}"
    )
    summary["processes"] = world
    summary["wall time"] = f"{elapsed / 60:.1f} min"
    return summary


def write_outputs(args, model, output_dir: Path, results, eval_history, total_batch, lr, total_steps, elapsed, world) -> None:
    """The Hub-ready folder: weights, config (labels, full auto_map), code, processor, card, args, results.
    A LoRA run's `model` is the peft model: its adapter is saved to `lora_adapter/`, and the folder holds
    the model with the adapter merged (no peft needed to load it)."""
    from ..hub import save_hub_folder
    from .run_folder import finish_run_folder
    from ..hub.card import classification_eval_results

    lora_note = None
    if getattr(args, "lora_rank", None):
        from .lora import ADAPTER_FOLDER, describe_lora, save_adapter_and_merge

        lora_note = (f"{describe_lora(model)}; merged into the saved weights, the adapter alone (peft format) in "
                     f"`{ADAPTER_FOLDER}/`")
        model = save_adapter_and_merge(model, output_dir)
    save_hub_folder(model, output_dir, image_processor=output_image_processor(args, model.config.image_size))
    dataset_type, dataset_name = dataset_names(args)
    split = "validation" if uses_embedded_data(args) else args.validation_split
    if args.train_val_split is not None:
        split = f"{args.train_val_split:g} of {'train' if uses_embedded_data(args) else args.train_split} held out"
    eval_results = []
    if results is not None:
        write_json_atomic(
            output_dir / "eval_results.json",
            {**results, "step": total_steps, "mode": args.mode, "dataset": dataset_name, "split": split,
             "train_fraction": getattr(args, "train_fraction", 1.0), "history": eval_history},
        )
        eval_results = classification_eval_results(
            results["top1"], results["top5"], dataset_type, dataset_name, split, args.dataset_config_name
        )
    summary = run_summary(args, model.config, total_batch, lr, total_steps, elapsed, world, lora_note)
    finish_run_folder(output_dir, model, args, run=summary, results=eval_results, is_demo=uses_embedded_data(args))


def build_dataloaders(args: argparse.Namespace, data, image_size: int, accelerator):
    """(stream, collator, loader) of this rank's training share, and the evaluation loader (or None)."""
    from ..data import ClassificationCollator, make_dataloader, prepare_stream
    from ..data.finetune_transforms import finetune_train_transform

    world = accelerator.num_processes
    stream = prepare_stream(data.train, data.image_column, seed=args.seed, buffer_size=args.shuffle_buffer_size,
                            rank=accelerator.process_index, world_size=world, label_column=data.label_column,
                            max_image_pixels=args.max_image_pixels)
    collator = ClassificationCollator(finetune_train_transform(image_size, args.randaug, args.reprob, tuple(args.scale),
                                                               args.hflip), seed=args.seed)
    dataloader = make_dataloader(stream, collator, batch_size=args.per_device_train_batch_size,
                                 num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda")
    eval_dataloader = None
    if data.validation is not None:
        eval_dataloader = evaluation_dataloader(args, *data.validation, image_size, accelerator)
    return stream, collator, dataloader, eval_dataloader


def evaluation_dataloader(args: argparse.Namespace, raw, image_column: str, label_column: str, image_size: int, accelerator):
    """This rank's share of a stream, unshuffled, through the evaluation transform, every example once."""
    from ..data import ClassificationCollator, EvalTransform, make_dataloader, prepare_stream

    stream = prepare_stream(raw, image_column, seed=args.seed, buffer_size=0, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, label_column=label_column,
                            max_image_pixels=args.max_image_pixels)
    return make_dataloader(stream, ClassificationCollator(EvalTransform(image_size), seed=args.seed),
                           batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers, drop_last=False)


def write_evaluation_folder(args, model, output_dir: Path, results: dict, summary: dict, protocol: str | None = None,
                            **more_results) -> None:
    """The folder of a run that trains nothing (--mode knn, --do_eval): the evaluated model as a Hub-ready
    folder whose card and model-index carry the accuracy (prefixed by `protocol` when it is not the
    classifier's own), and `eval_results.json` (`results`, the mode, the data, `more_results`)."""
    from ..hub import build_image_processor, save_hub_folder
    from .run_folder import finish_run_folder
    from ..hub.card import classification_eval_results

    save_hub_folder(model, output_dir, image_processor=build_image_processor(model.config.image_size))
    dataset_type, dataset_name = dataset_names(args)
    split = "validation" if uses_embedded_data(args) else args.validation_split
    if getattr(args, "train_val_split", None) is not None:
        split = f"{args.train_val_split:g} of {'train' if uses_embedded_data(args) else args.train_split} held out"
    write_json_atomic(output_dir / "eval_results.json", {**results, **more_results, "dataset": dataset_name, "split": split})
    eval_results = classification_eval_results(results["top1"], results["top5"], dataset_type, dataset_name, split,
                                               args.dataset_config_name, protocol=protocol)
    summary = {
        "script": "training_scripts/run_image_classification.py",
        **summary,
        "data": dataset_name,
        "image size": model.config.image_size,
    }
    finish_run_folder(output_dir, model, args, run=summary, results=eval_results, is_demo=uses_embedded_data(args))


def write_knn_outputs(args, model, output_dir: Path, results: dict, elapsed: float, world: int) -> None:
    """`--mode knn`: the evaluated feature model, its k-NN accuracy in the card, `eval_results.json`."""
    protocol = f"weighted k-NN (k={results['k']}, T={results['temperature']:g})"
    summary = {
        "mode": "knn (frozen features, no training)",
        "initialised from": args.model_name_or_path or f"random ({model.config.model_type} {args.model_size or 'base'})",
        "protocol": f"{protocol} as DINO: cosine similarity of the L2-normalised `pooler_output`, each of the k nearest "
                    "training images votes exp(similarity / T) for its class",
        "bank": f"{results['bank_size']} training images" + (f", label fraction {label_fraction_note(args)}"
                                                             if label_fraction_note(args) else ""),
        "processes": world,
        "wall time": f"{elapsed / 60:.1f} min",
    }
    write_evaluation_folder(args, model, output_dir, results, summary, protocol, mode="knn",
                            train_fraction=getattr(args, "train_fraction", 1.0))


def load_classifier_for_evaluation(args: argparse.Namespace, id2label: dict[int, str]):
    """--do_eval: the classifier of --model_name_or_path as it was saved (a folder, a Hub id, a converted
    official checkpoint), checked against the validation labels: the same number of classes (ids are
    compared by index; different names are a warning, e.g. a converted checkpoint's LABEL_i)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    saved = AutoConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args))
    if not is_classifier(saved):
        kind = ", ".join(getattr(saved, "architectures", None) or [saved.model_type])
        raise UserInputError(f"--do_eval evaluates a classifier, and --model_name_or_path {args.model_name_or_path} is a "
                             f"{kind}: fine-tune it first, or evaluate its frozen features with --mode knn")
    if saved.num_labels != len(id2label):
        raise UserInputError(f"--model_name_or_path {args.model_name_or_path} is a classifier for {saved.num_labels} labels, "
                             f"the validation data has {len(id2label)}")
    names = [saved.id2label[i] for i in range(saved.num_labels)]
    if names != [id2label[i] for i in range(len(id2label))]:
        logger.warning("the classifier's label names (%s, ...) differ from the data's (%s, ...): label ids are compared by "
                       "index", ", ".join(names[:3]), ", ".join(id2label[i] for i in range(min(3, len(id2label)))))
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, attn_implementation=args.attn_implementation, **hub_kwargs(args),
        **parse_overrides(args.config_overrides),
    )
    return model.eval()


__all__ = [
    "EMBEDDED_DEMO_DEFAULTS", "HEAD_NAME", "MODE_DEFAULTS", "base_config", "build_dataloaders", "build_feature_model",
    "build_model", "build_optimizer", "describe_lr_scales", "evaluate", "evaluation_dataloader", "is_classifier",
    "label_fraction_note", "load_classifier_for_evaluation", "mixup_active", "reset_head", "write_evaluation_folder",
    "write_knn_outputs", "write_outputs",
]
