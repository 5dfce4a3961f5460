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
) -> ModelCard:
    """The card for `model` as it will be published under `repo_id`.

    `run` is the recipe this checkpoint was trained with (shown as a table); `results` become the
    model-index; `widget` entries carry static outputs (custom code gets no live inference widget).
    """
    config = model.config
    pipeline_tag = pipeline_tag_for(model)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        tags=["hf_mim", config.model_type, "masked-image-modeling", "vision", "custom_code"],
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
    return ModelCard.from_template(
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


def write_model_card(folder: str | Path, model: PreTrainedModel, repo_id: str, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    render_model_card(model, repo_id, **kwargs).save(path)
    return path
