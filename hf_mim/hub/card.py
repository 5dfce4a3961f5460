"""Model cards: one Jinja template per method in model_cards/, rendered with huggingface_hub's
ModelCard / ModelCardData so the YAML metadata is valid for the Hub."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel

TEMPLATES_DIR = Path(__file__).resolve().parent / "model_cards"


def template_path(model_type: str) -> Path:
    path = TEMPLATES_DIR / f"{model_type}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no model card template for {model_type!r} (looked for {path})")
    return path


def pipeline_tag_for(model: PreTrainedModel) -> str:
    return "image-classification" if type(model).__name__.endswith("ForImageClassification") else "image-feature-extraction"


def human_count(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.1f} K"


def classification_eval_results(
    top1: float, top5: float, dataset_type: str, dataset_name: str, split: str, dataset_config: str | None = None,
    protocol: str | None = None,
) -> list[EvalResult]:
    """Top-1/top-5 (given in percent, the scripts' unit) as model-index entries in fractions, the
    convention transformers' own cards follow; the dataset id and its config in their own fields.
    `protocol` (e.g. "weighted k-NN (k=20, T=0.07)") prefixes the metric names: not a classifier's accuracy."""
    prefix = f"{protocol} " if protocol else ""
    common = dict(
        task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
        dataset_config=dataset_config, dataset_split=split,
    )
    return [
        EvalResult(metric_type="accuracy", metric_name=f"{prefix}top-1 accuracy", metric_value=round(top1 / 100, 4), **common),
        EvalResult(metric_type="top_5_accuracy", metric_name=f"{prefix}top-5 accuracy", metric_value=round(top5 / 100, 4), **common),
    ]


def pretraining_eval_results(
    loss: float, dataset_type: str, dataset_name: str, split: str, dataset_config: str | None = None
) -> list[EvalResult]:
    """The validation pretraining loss (fixed masks) as a model-index entry."""
    return [EvalResult(task_type="masked-image-modeling", metric_type="loss", metric_name="validation loss (fixed masks)",
                       metric_value=round(loss, 6), dataset_type=dataset_type, dataset_name=dataset_name,
                       dataset_config=dataset_config, dataset_split=split)]


def automodel_output(model: PreTrainedModel) -> str:
    """What `AutoModel.from_pretrained` of this checkpoint returns: the layout the saved weights give
    the base model (`builds_pretrained_encoder`), never an untrained layer."""
    config = model.config
    if getattr(getattr(model.base_model, "pooler", None), "fc_norm", None) is not None:
        return ("`pooler_output` is the fine-tuned representation: the mean of the patch tokens through the "
                "fine-tuned `fc_norm` (the classifier's input); `last_hidden_state` holds the last block's tokens "
                "(fine-tuning drops the final norm, as the official model).")
    if config.model_type == "extrema":
        return ("`pooler_output` is the class-attention instance token before the final norm (the official "
                "linear-probe feature); `last_hidden_state` is (instance token, patch tokens) after the final norm.")
    if config.model_type == "revcolv2":
        return ("`last_hidden_state` is the top level of the last top-down column and `pooler_output` the plain "
                "mean of its patch tokens (or its cls token): pretraining trained no norm there, none is added.")
    if not getattr(config, "use_mean_pooling", True):
        return "`last_hidden_state` is every token after the encoder's final LayerNorm, `pooler_output` its cls token."
    return ("`last_hidden_state` is every token after the encoder's final LayerNorm, as pretrained; `pooler_output` "
            "is their mean over the patch tokens (how the method pools for fine-tuning, without the fresh `fc_norm` "
            "that `AutoModelForImageClassification` adds).")


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    run: Mapping[str, object] | None = None,
    results: Sequence[EvalResult] | None = None,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    widget: list[dict] | None = None,
    is_demo: bool = False,
    picture: str | None = None,
    forms: str | None = None,
    custom_code: bool = True,
) -> ModelCard:
    """The card for `model` as it will be published under `repo_id`.

    `run` is the recipe this checkpoint was trained with (shown as a table); `results` become the
    model-index; `widget` entries point at sample images in the repo (with static outputs where custom
    code gets no live widget); `picture` (a file in the repo) is shown; `forms` says where the native and
    the hf_mim forms of the model live; `custom_code=False` for a native export.
    """
    config = model.config
    pipeline_tag = pipeline_tag_for(model)
    tags = ["hf_mim", config.model_type, "masked-image-modeling", "vision"] + (["custom_code"] if custom_code else [])
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=tags,
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        eval_results=list(results) if results else None,
        widget=widget,
    )
    run_context = None
    if run:
        # an optional "script" entry names the training script (default run_mim.py) instead of a table row
        script = run.get("script", "training_scripts/run_mim.py")
        run_context = {"table": [(k, v) for k, v in run.items() if k != "script"], "is_demo": is_demo, "script": script}
    num_parameters = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("teacher."))
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(config.model_type)),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        architecture=type(model).__name__,
        config=config,
        visible_percent=round(100 * (1 - getattr(config, "mask_ratio", 0.0))),
        num_parameters=human_count(num_parameters),
        pipeline_tag=pipeline_tag,
        run=run_context or {"is_demo": is_demo},
        results=results or [],
    )
    extra = []
    if forms:
        extra.append(f"## Where the model lives\n\n{forms}\n")
    extra.append(f"## What `AutoModel` returns\n\n{automodel_output(model)}\n")
    if picture:
        extra.append(f"## What the model does\n\n![what the model does on sample images]({picture})\n")
    return ModelCard(str(card).rstrip() + "\n\n" + "\n".join(extra))


def write_model_card(folder: str | Path, model: PreTrainedModel, repo_id: str, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    render_model_card(model, repo_id, **kwargs).save(path)
    return path


def widget_examples(
    model: PreTrainedModel,
    folder: str | Path,
    repo_id: str,
    revision: str = "main",
    image_processor=None,
    photos: Mapping[str, object] | None = None,
) -> list[dict]:
    """Save a few real photos into `folder/samples/` and point widget examples at them in the repo (at
    `revision`). With an image processor, a classifier's entries carry its top-5 as static output: a
    custom-code repo gets no live widget."""
    import torch

    from ..data.embedded import sample_photos

    photos = sample_photos() if photos is None else photos
    folder = Path(folder)
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    classify = image_processor is not None and pipeline_tag_for(model) == "image-classification"
    was_training = model.training
    entries = []
    for name, image in photos.items():
        title = name.split("/")[-1]
        file = f"samples/{title}.jpg"
        image.convert("RGB").save(folder / file, quality=90)
        entry = {"src": f"https://huggingface.co/{repo_id}/resolve/{revision}/{file}", "example_title": title}
        if classify:
            with torch.no_grad():
                pixels = image_processor(image.convert("RGB"), return_tensors="pt").pixel_values
                parameter = next(model.parameters())
                logits = model.eval()(pixels.to(parameter.device, parameter.dtype)).logits[0].float()
            scores, indices = logits.softmax(-1).topk(min(5, logits.numel()))
            entry["output"] = [
                {"label": model.config.id2label[int(i)], "score": round(float(p), 4)} for p, i in zip(scores, indices)
            ]
        entries.append(entry)
    model.train(was_training)
    return entries


def segmentation_eval_results(results: Mapping, dataset_type: str, dataset_name: str, split: str,
                              dataset_config: str | None = None) -> list[EvalResult]:
    """mIoU and pixel accuracy (given in percent) as model-index entries in fractions."""
    common = dict(task_type="image-segmentation", dataset_type=dataset_type, dataset_name=dataset_name,
                  dataset_config=dataset_config, dataset_split=split)
    return [
        EvalResult(metric_type="mean_iou", metric_name="mIoU", metric_value=round(results["mean_iou"] / 100, 4), **common),
        EvalResult(metric_type="accuracy", metric_name="pixel accuracy",
                   metric_value=round(results["pixel_accuracy"] / 100, 4), **common),
    ]


def render_segmentation_card(model: PreTrainedModel, repo_id: str, results: Mapping | None, dataset_type: str,
                             dataset_name: str, split: str, run: Mapping[str, object], license: str = "apache-2.0",
                             datasets: Sequence[str] | None = None, is_demo: bool = False) -> ModelCard:
    """The card of a run_semantic_segmentation.py folder: metadata (image-segmentation, model-index with
    mIoU / pixel accuracy), how to load it, the metrics per class and the recipe."""
    backbone = model.config.backbone_config.model_type
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", license=license,
        tags=["hf_mim", backbone, "upernet", "semantic-segmentation", "vision", "custom_code"],
        datasets=list(datasets) if datasets else None, model_name=repo_id.split("/")[-1],
        eval_results=segmentation_eval_results(results, dataset_type, dataset_name, split) if results else None,
    )
    lines = [
        f"# {repo_id.split('/')[-1]}", "",
        f"transformers' `UperNetForSemanticSegmentation` over the hf_mim `{type(model.backbone).__name__}` "
        f"({backbone}), fine-tuned with `training_scripts/run_semantic_segmentation.py` on {dataset_name}."
        + (" A demonstration run on the small embedded set, not a paper result." if is_demo else ""), "",
        "```python", "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation", "",
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        f'model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True)',
        "logits = model(**processor(image, return_tensors=\"pt\")).logits  # (1, labels, H, W)", "```", "",
    ]
    if results:
        lines += [f"## Results ({dataset_name}, {split})", "",
                  f"mIoU {results['mean_iou']:.2f}, pixel accuracy {results['pixel_accuracy']:.2f}, "
                  f"mean accuracy {results['mean_accuracy']:.2f} (percent).", "", "| class | IoU |", "|---|---|"]
        lines += [f"| {model.config.id2label[i]} | {'-' if iou is None else f'{iou:.2f}'} |"
                  for i, iou in enumerate(results["per_class_iou"])]
        lines.append("")
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in run.items()]
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
