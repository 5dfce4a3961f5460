"""Validation and named sizes shared by every hf_mim configuration.

Model-zone file: it is copied next to every checkpoint, so it imports only the standard library and
transformers.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers import PreTrainedConfig


def config_error(field: str, value: Any, expected: str) -> ValueError:
    """A ValueError that names the offending config field, its value and what was expected."""
    return ValueError(f"Invalid config value {field}={value!r}: {expected}.")


def check_positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise config_error(field, value, "expected a positive integer")


def check_non_negative_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise config_error(field, value, "expected an integer >= 0")


def check_fraction(field: str, value: Any, *, allow_one: bool = False) -> None:
    upper_ok = value <= 1 if allow_one else value < 1
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 <= value and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise config_error(field, value, f"expected a number in {interval}")


def check_positive_numbers(config: Any, *fields: str) -> None:
    """Each named field of `config` must be a number > 0 (the first that is not is named)."""
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise config_error(field, value, "expected a positive number")


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise config_error(field, value, f"expected one of {', '.join(map(repr, choices))}")


def check_heads_divide(width_field: str, width: int, heads_field: str, heads: int) -> None:
    check_positive_int(width_field, width)
    check_positive_int(heads_field, heads)
    if width % heads != 0:
        raise config_error(
            width_field, width, f"must be divisible by {heads_field}={heads} (the per-head width must be whole)"
        )


def check_patch_grid(image_size: Any, patch_size: Any) -> None:
    check_positive_int("image_size", image_size)
    check_positive_int("patch_size", patch_size)
    if image_size % patch_size != 0:
        raise config_error("image_size", image_size, f"must be a multiple of patch_size={patch_size}")


class PresetConfigMixin:
    """Named model sizes (`base`, `large`, ..., `tiny` for tests) from one table per method.

    `Config.from_preset("large", mask_ratio=0.8)` builds the paper's Large configuration with overrides.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PreTrainedConfig:
        if name not in cls.presets:
            raise ValueError(
                f"Unknown preset {name!r} for {cls.__name__}; available presets: {', '.join(sorted(cls.presets))}."
            )
        kwargs = copy.deepcopy(cls.presets[name])
        kwargs.update(overrides)
        return cls(**kwargs)
