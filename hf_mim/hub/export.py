"""Write a folder that loads with `trust_remote_code=True` where hf_mim is not installed.

`model.save_pretrained` does the work (transformers' custom-object saving copies the flat model-zone
files; `MIMPreTrainedModel.save_pretrained` maps every head of the family in `auto_map`); here the
image processor that preprocesses as evaluation does is added.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from transformers import CLIPImageProcessorPil, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..data.transforms import eval_resize_size
from ..auto import family_for

EVAL_CROP_PCT = 0.875  # MAE / BEiT evaluation: short side to size / 0.875, centre crop


def model_zone_files(model_type: str) -> list[Path]:
    """The flat .py files that define a family's config and models, with their sibling imports."""
    family = family_for(model_type)
    roots = {inspect.getfile(cls) for cls in family.auto_classes().values()}
    files: set[str] = set(roots)
    for root in roots:
        files.update(get_relative_import_files(root))
    return sorted(Path(f) for f in files)


def full_auto_map(model_type: str) -> dict[str, str]:
    """{"AutoConfig": "configuration_dbot.DbotConfig", "AutoModel": "modeling_dbot.DbotModel", ...}."""
    return {
        auto_name: f"{Path(inspect.getfile(cls)).stem}.{cls.__name__}"
        for auto_name, cls in family_for(model_type).auto_classes().items()
    }


def build_image_processor(image_size: int, crop_pct: float = EVAL_CROP_PCT) -> CLIPImageProcessorPil:
    """A native processor doing the evaluation transform (`data.EvalTransform`): bicubic resize of the
    short side to int(image_size / crop_pct), centre crop to image_size, ImageNet mean/std.

    CLIP's processor is the native class with exactly these steps (ViT's squashes the image to a
    square). Its PIL backend matches EvalTransform exactly; the torchvision backend (transformers'
    default when torchvision is installed) resizes uint8 tensors and differs by at most one grey
    level on a few pixels."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": eval_resize_size(image_size, crop_pct)},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def save_hub_folder(model: PreTrainedModel, output_dir: str | Path, image_processor=None) -> Path:
    """Save weights (model.safetensors), config.json with the family's full auto_map, the model-zone
    code and preprocessor_config.json (the evaluation preprocessing unless one is given) into
    `output_dir`. Returns the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    if image_processor is None:
        image_processor = build_image_processor(model.config.image_size)
    image_processor.save_pretrained(output_dir)
    return output_dir


def push_model(
    model: PreTrainedModel,
    repo_id: str,
    image_processor=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Push any hf_mim model as a self-contained repo: weights, config with the family's auto_map, the
    model-zone code, the image processor (the evaluation preprocessing unless one is given) and a card.
    `model.push_to_hub` is self-contained too, without processor and card."""
    import tempfile

    from .card import write_model_card
    from .push import push_folder_to_hub

    with tempfile.TemporaryDirectory() as folder:
        save_hub_folder(model, folder, image_processor=image_processor)
        write_model_card(folder, model, repo_id)
        message = commit_message or f"Upload {type(model).__name__} ({model.config.model_type}) with its code and image processor"
        return push_folder_to_hub(folder, repo_id, token=token, private=private, commit_message=message)
