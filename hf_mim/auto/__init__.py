"""hf_mim's architectures as transformers sees them: the one table of method families (`families.py`)
and their registration with the Auto classes. Tooling zone: never copied to the Hub."""

from .families import MODEL_FAMILIES, ModelFamily, family_for, register_all

__all__ = ["MODEL_FAMILIES", "ModelFamily", "family_for", "register_all"]
