"""Hub-ready folders: full auto_map, flat model-zone code, image processor, model card, push."""

from .export import (
    build_image_processor,
    full_auto_map,
    model_zone_files,
    push_model,
    save_hub_folder,
)
from .push import HUB_IGNORE_PATTERNS, HubPushError, push_folder_to_hub

__all__ = [
    "HUB_IGNORE_PATTERNS",
    "HubPushError",
    "build_image_processor",
    "full_auto_map",
    "model_zone_files",
    "push_folder_to_hub",
    "push_model",
    "save_hub_folder",
]
