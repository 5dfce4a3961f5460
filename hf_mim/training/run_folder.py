"""The end of every training script: the run's settings, the model card, the native form, the push."""

from __future__ import annotations

import logging
import shutil
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import PreTrainedModel

from .checkpoint import write_json_atomic
from .lora import ADAPTER_FOLDER as LORA_DIR
from .run_setup import public_args
from ..hub.card import render_model_card, widget_examples
from ..hub.push import push_folder_to_hub

logger = logging.getLogger(__name__)

NATIVE_DIR = "native"  # inside a run folder: the native transformers form, pushed to the repo's main branch
HF_MIM_REVISION = "hf_mim"  # the branch that keeps the hf_mim form when main holds the native one
PICTURE = "mim_picture.png"
RUN_FILES = ("training_args.json", "eval_results.json", PICTURE)
# what a push during training leaves on main that its native form must not keep (custom code, a LoRA adapter)
DURING_TRAINING_FILES = ["*.py", f"{LORA_DIR}/**"]


def native_form(model: PreTrainedModel):
    """(native model, max difference) when a native class computes `model` exactly, else None (logged)."""
    from ..hub.native import NotExpressible, to_native

    if not type(model).__name__.endswith("ForImageClassification"):
        return None
    try:
        return to_native(model)
    except NotExpressible as reason:
        logger.info("no native form (the repo keeps custom code): %s", reason)
        return None


def commit_message(model: PreTrainedModel, run: Mapping[str, object], results: Sequence | None, form: str) -> str:
    """E.g. "run_image_classification.py: DbotForImageClassification (native BeitForImageClassification),
    200 steps on cifar10, top-1 accuracy 0.8123"."""
    script = Path(str(run.get("script", "run_mim.py"))).name
    parts = [f"{script}: {type(model).__name__}{f' ({form})' if form else ''}"]
    if run.get("optimizer steps") is not None:
        parts.append(f"{run['optimizer steps']} steps on {run.get('data', 'the embedded data')}")
    for result in results or []:
        parts.append(f"{result.metric_name} {result.metric_value}")
        break
    return ", ".join(parts)


def finish_run_folder(
    output_dir: Path,
    model: PreTrainedModel,
    args: Namespace,
    run: Mapping[str, object],
    results: Sequence | None = None,
    is_demo: bool = False,
) -> str | None:
    """Write `training_args.json` (without credentials: `public_args`), widget samples and the model card into a saved
    Hub folder; for a classifier a native class computes exactly, also its native form in `native/`.
    Then push when `args.push_to_hub`: the native form to the repo's main branch (the widget and hosted
    inference serve it) and the hf_mim form to the `hf_mim` branch, or the hf_mim form to main.
    `args` carries the scripts' shared Hub flags (hub_model_id, hub_token, hub_private_repo,
    push_to_hub, license, dataset_name, model_name_or_path). Returns the pushed URL or None; a failed
    push raises `HubPushError` with the folder left intact."""
    from transformers import AutoImageProcessor

    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "training_args.json", public_args(args))
    repo_id = args.hub_model_id or f"{model.config.model_type}-{output_dir.name}"
    remote_base = args.model_name_or_path if args.model_name_or_path and not Path(args.model_name_or_path).exists() else None
    native = native_form(model)
    processor = AutoImageProcessor.from_pretrained(output_dir, backend="pil")
    card = dict(
        run=run,
        results=results or None,
        datasets=[args.dataset_name] if getattr(args, "dataset_name", None) else None,
        base_model=remote_base,
        license=args.license,
        is_demo=is_demo,
        picture=PICTURE if (output_dir / PICTURE).is_file() else None,
    )
    hf_mim_revision = HF_MIM_REVISION if native else "main"
    hf_mim_forms = None
    if native:
        hf_mim_forms = (
            f"This branch (`{HF_MIM_REVISION}`) holds the hf_mim form (custom code, every head): "
            f"`from_pretrained(\"{repo_id}\", revision=\"{HF_MIM_REVISION}\", trust_remote_code=True)`. "
            f"The main branch holds the same classifier as native `{type(native[0]).__name__}` (no custom code)."
        )
    render_model_card(
        model, repo_id, widget=widget_examples(model, output_dir, repo_id, hf_mim_revision, processor),
        forms=hf_mim_forms, **card,
    ).save(output_dir / "README.md")
    native_dir = None
    if native:
        native_model, difference = native
        native_dir = output_dir / NATIVE_DIR
        native_model.save_pretrained(native_dir)
        processor.save_pretrained(native_dir)
        for name in RUN_FILES:
            if (output_dir / name).is_file():
                shutil.copyfile(output_dir / name, native_dir / name)
        forms = (
            f"This main branch holds the classifier as native `{type(native_model).__name__}`: no custom code, so the "
            f"widget and hosted inference serve it (largest logit difference to the hf_mim model {difference:.2g}, "
            f"checked at export). The hf_mim form (custom code, every head: pretraining, backbone, classifier) is on "
            f"the `{HF_MIM_REVISION}` branch: `AutoModelForImageClassification.from_pretrained(\"{repo_id}\", "
            f"revision=\"{HF_MIM_REVISION}\", trust_remote_code=True)`."
        )
        render_model_card(
            model, repo_id, widget=widget_examples(model, native_dir, repo_id, "main"), forms=forms,
            custom_code=False, **card,
        ).save(native_dir / "README.md")
    logger.info("wrote the Hub-ready folder %s%s", output_dir, f" (native form in {native_dir})" if native_dir else "")
    if not args.push_to_hub:
        return None
    token, private = args.hub_token, args.hub_private_repo or None
    if native_dir is None:
        url = push_folder_to_hub(output_dir, args.hub_model_id, token=token, private=private,
                                 commit_message=commit_message(model, run, results, ""))
    else:
        push_folder_to_hub(output_dir, args.hub_model_id, token=token, private=private, revision=HF_MIM_REVISION,
                           commit_message=commit_message(model, run, results, "hf_mim form"))
        # pushes during training (--hub_strategy) put the hf_mim form on main: its code and adapter files go
        stale = DURING_TRAINING_FILES if getattr(args, "hub_strategy", "end") != "end" else None
        url = push_folder_to_hub(native_dir, args.hub_model_id, token=token, private=private, delete_patterns=stale,
                                 commit_message=commit_message(model, run, results, f"native {type(native[0]).__name__}"))
    logger.info("pushed to %s", url)
    return url
