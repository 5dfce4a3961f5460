"""Write a folder that loads with `trust_remote_code=True` where hf_mim is not installed.

`save_pretrained` alone records `auto_map` for the saved class only; here every head of the family
is mapped, and the flat model-zone files (the defining modules and every sibling they import with a
single-dot import) are copied next to the weights.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from transformers import PreTrainedModel, ViTImageProcessor
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from ..registry import family_for


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


def build_image_processor(image_size: int, crop_pct: float | None = None) -> ViTImageProcessor:
    """The native ViT processor: bicubic resize to the model's size, ImageNet mean/std (as every method trains)."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def save_hub_folder(model: PreTrainedModel, output_dir: str | Path, image_processor=None) -> Path:
    """Save weights (model.safetensors), config.json with the full auto_map, the model-zone code and
    preprocessor_config.json into `output_dir`. Returns the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_type = model.config.model_type
    model.save_pretrained(output_dir)
    for source in model_zone_files(model_type):
        shutil.copyfile(source, output_dir / source.name)
    config_path = output_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = full_auto_map(model_type)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)
    if image_processor is None:
        image_processor = build_image_processor(model.config.image_size)
    image_processor.save_pretrained(output_dir)
    return output_dir
