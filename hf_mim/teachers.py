"""Frozen teachers whose features a student regresses: the one place every hf_mim method gets them.

Model-zone file: copied flat next to every checkpoint (Hub remote code), so it imports only torch,
transformers, the standard library and flat siblings (timm is reached only through transformers'
`TimmWrapperModel`, which imports it itself).

Three kinds of teacher, each loaded offline from a folder or a Hub id (or given in memory):
- CLIP-style transformers vision towers (`CLIPVisionModel`, `CLIPVisionModelWithProjection`, a full
  `CLIPModel`'s `vision_model`);
- timm ViTs through `TimmWrapperModel` (a `timm/...` Hub folder, or one saved with `save_pretrained`);
- any other transformers model that returns `hidden_states`, in particular hf_mim models: a finished dBOT
  stage, an ExtreMA momentum encoder (`exported_backbones()`), a MaskDistill or RevColV2 backbone.

A teacher is frozen (requires_grad False, eval mode, called under no_grad), never part of the student's
module tree (so never in `state_dict`, the optimizer or a saved folder), fed with its own input
normalisation (mean/std of its processor or config, applied to the student's image), and runs in the
student's device, dtype and autocast (a bf16 student gets a bf16 teacher, never an upcast one).

`TeacherConfigMixin` holds the config side (fields, validation, `for_teacher`), `FrozenTeacherMixin`
the model side (lazy loading, `set_teacher`, `external_teacher_features`); `FrozenTeacher` is one
loaded teacher.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_common import check_choice, check_positive_int, config_error
from .objectives import normalize_per_token

TEACHER_LAYERS = ("last_hidden_state", "post_layernorm", "projected")
TARGET_NORMALIZATIONS = ("layer_norm", "layer_norm_unbiased", "none")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# --------------------------------------------------------------------------------------------------
# Config side
# --------------------------------------------------------------------------------------------------


def as_list(value):
    """A tuple of per-channel values as a list (JSON round trip); anything else as given, for validation."""
    return list(value) if isinstance(value, tuple) else value


def teacher_token_width(teacher_config, layer: str) -> int:
    """Width of the teacher tokens at `layer`. A timm teacher's config (TimmWrapperConfig) states no width,
    so its network is built on the meta device (no memory, no weights) to read `num_features`."""
    if getattr(teacher_config, "model_type", None) == "timm_wrapper":
        if layer == "projected":
            raise config_error("teacher_layer", layer, "a timm teacher has no projection (use 'last_hidden_state')")
        from transformers import AutoModel

        with torch.device("meta"):
            return AutoModel.from_config(teacher_config).timm_model.num_features
    if layer == "projected":
        if getattr(teacher_config, "projection_dim", None) is None:
            raise config_error("teacher_layer", layer, "this teacher has no projection (use 'last_hidden_state')")
        return teacher_config.projection_dim
    return teacher_config.hidden_size


class TeacherConfigMixin:
    """Config fields of a frozen teacher, shared by every method that regresses one (the class sets them in
    its `__init__`; `validate_teacher_fields` checks them, naming the field):

    teacher_name_or_path: folder or Hub id of the teacher (None: none; "./name" is relative to the
        student's own folder or Hub repo).
    teacher_layer: "last_hidden_state" (the last block's tokens, before a final norm), "post_layernorm"
        (after the teacher's final norm: CLIP's `post_layernorm`, timm's `norm`, an hf_mim model's final
        LayerNorm) or "projected" (CLIP's `visual_projection`; CLIP only).
    teacher_hidden_size: width of those tokens (the head's output width); `for_teacher(path)` reads it.
    teacher_image_mean, teacher_image_std: the teacher's input normalisation (None: its folder's
        preprocessor_config.json, else a timm teacher's pretrained_cfg, else its config's image_mean/std).
    image_mean, image_std: the student's input normalisation, undone before the teacher's is applied.
    """

    def set_teacher_fields(self, teacher_name_or_path, teacher_layer, teacher_hidden_size, teacher_image_mean,
                           teacher_image_std, image_mean, image_std) -> None:
        """Store the fields above (lists for the normalisations; the student's default to ImageNet's)."""
        self.teacher_name_or_path = teacher_name_or_path
        self.teacher_layer = teacher_layer
        self.teacher_hidden_size = teacher_hidden_size
        self.teacher_image_mean = as_list(teacher_image_mean)
        self.teacher_image_std = as_list(teacher_image_std)
        self.image_mean = as_list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = as_list(image_std) if image_std is not None else list(IMAGENET_STD)

    def validate_teacher_fields(self, optional_width: bool = False) -> None:
        check_choice("teacher_layer", self.teacher_layer, TEACHER_LAYERS)
        if not (optional_width and self.teacher_hidden_size is None):
            check_positive_int("teacher_hidden_size", self.teacher_hidden_size)
        if self.teacher_name_or_path is not None and not isinstance(self.teacher_name_or_path, str):
            raise config_error("teacher_name_or_path", self.teacher_name_or_path, "expected a path/name or None")
        for field in ("teacher_image_mean", "teacher_image_std", "image_mean", "image_std"):
            value = getattr(self, field)
            if value is not None and (
                not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise config_error(field, value, f"expected a list of {self.num_channels} numbers (one per channel)")
            if value is not None and len(value) != self.num_channels:
                raise config_error(field, value, f"expected {self.num_channels} values (one per channel)")
        for field in ("teacher_image_std", "image_std"):
            value = getattr(self, field)
            if value is not None and any(v <= 0 for v in value):
                raise config_error(field, value, "standard deviations must be positive")

    @staticmethod
    def teacher_width_of(teacher_name_or_path: str, layer: str = "last_hidden_state") -> int:
        """The token width of the teacher at `teacher_name_or_path`, read from its config (offline if cached)."""
        from transformers import AutoConfig

        teacher_config = AutoConfig.from_pretrained(teacher_name_or_path)
        teacher_config = getattr(teacher_config, "vision_config", None) or teacher_config
        return teacher_token_width(teacher_config, layer)

    @classmethod
    def for_teacher(cls, teacher_name_or_path: str, preset: str | None = None, **overrides):
        """A config whose `teacher_hidden_size` is read from the teacher's config (offline if cached)."""
        width = cls.teacher_width_of(teacher_name_or_path, overrides.get("teacher_layer", "last_hidden_state"))
        overrides = {"teacher_name_or_path": str(teacher_name_or_path), "teacher_hidden_size": width, **overrides}
        return cls.from_preset(preset, **overrides) if preset else cls(**overrides)


def normalize_teacher_tokens(tokens: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    """N of the unified view, in float32: "layer_norm" (biased variance, as `F.layer_norm`),
    "layer_norm_unbiased" (torch.var, as dBOT/MAE code) or "none"."""
    if method == "layer_norm":
        return F.layer_norm(tokens.float(), tokens.shape[-1:], eps=eps)
    if method == "layer_norm_unbiased":
        return normalize_per_token(tokens.float(), eps=eps, unbiased=True)
    return tokens.float()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def resolve_teacher_path(teacher_name_or_path: str, student_name_or_path: str | None) -> tuple[str, str]:
    """(folder or Hub id, subfolder) of the teacher. A path starting with "./" is relative to the student's
    own folder or Hub repo (a converted student carries its teacher in `./teacher`), so the folder can be
    moved or pushed and still finds it; a local student folder without it falls back to the working
    directory. Anything else is used as given."""
    if not teacher_name_or_path.startswith("./") or not student_name_or_path:
        return teacher_name_or_path, ""
    inner = teacher_name_or_path[2:]
    if os.path.isdir(student_name_or_path):
        beside = os.path.join(student_name_or_path, inner)
        return (teacher_name_or_path if not os.path.isdir(beside) and os.path.isdir(teacher_name_or_path) else beside), ""
    return student_name_or_path, inner  # a Hub repo: the teacher is its subfolder


def read_teacher_normalization(teacher_name_or_path: str, subfolder: str = "") -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) from the teacher folder's preprocessor_config.json, or None if absent."""
    path = os.path.join(teacher_name_or_path, subfolder, "preprocessor_config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(teacher_name_or_path, "preprocessor_config.json", subfolder=subfolder or None)
        except Exception:
            return None
    with open(path, encoding="utf-8") as handle:
        processor = json.load(handle)
    if "image_mean" not in processor or "image_std" not in processor:
        return None
    return list(processor["image_mean"]), list(processor["image_std"])


def load_teacher_model(teacher_name_or_path: str, subfolder: str = "") -> nn.Module:
    """The teacher as saved: the transformers class named in its config's `architectures` (so a
    `CLIPVisionModelWithProjection` keeps its projection), else whatever `AutoModel` builds (a timm folder:
    `TimmWrapperModel`; an hf_mim folder: the method's backbone, with hf_mim imported)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(teacher_name_or_path, subfolder=subfolder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        model_class = AutoModel
    return model_class.from_pretrained(teacher_name_or_path, subfolder=subfolder)


def timm_backbone(model: nn.Module) -> nn.Module | None:
    """The timm network of a teacher (`TimmWrapperModel.timm_model`, or a bare timm model), else None.

    Recognised by what every timm model has (`pretrained_cfg`, `forward_features`): timm is not imported."""
    inner = getattr(model, "timm_model", model)
    return inner if hasattr(inner, "pretrained_cfg") and hasattr(inner, "forward_features") else None


def timm_normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) a timm teacher expects: the `pretrained_cfg` in its transformers config (what a
    timm Hub folder's config.json carries), else the timm model's own default one (timm's
    `resolve_data_config` falls back the same way); None for other teachers."""
    backbone = timm_backbone(model)
    if backbone is None:
        return None
    saved = getattr(getattr(model, "config", None), "pretrained_cfg", None)
    for pretrained_cfg in (saved, backbone.pretrained_cfg):
        if pretrained_cfg and pretrained_cfg.get("mean") is not None and pretrained_cfg.get("std") is not None:
            return list(pretrained_cfg["mean"]), list(pretrained_cfg["std"])
    return None


def config_normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) stated by the teacher's own config (hf_mim configs carry the student's), else None."""
    config = getattr(model, "config", None)
    mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
    return (list(mean), list(std)) if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) else None


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class FrozenTeacher:
    """A frozen vision model and how to feed it: its own input normalisation and image size.

    Not an `nn.Module` on purpose: it must not enter the student's `state_dict`, parameters, optimizer
    or saved files. It follows the student's device and floating dtype on each call and stays in eval mode.

    How the patch tokens are read (`layer` = `config.teacher_layer`):
    - CLIP-style towers (a `post_layernorm`): the vision tower's `last_hidden_state` (before
      `post_layernorm`), optionally `post_layernorm` and `visual_projection`; the leading cls token dropped.
    - timm ViT-style models (`TimmWrapperModel` or a bare timm model): the last block's tokens from timm's
      `forward_intermediates`, before ("last_hidden_state") or after ("post_layernorm") the final norm, the
      model's `num_prefix_tokens` (cls, registers) dropped. timm models have no projection.
    - any other model returning `hidden_states` (hf_mim backbones; a pretraining model is reduced to its
      `base_model`): `hidden_states[-1]` (the last block's tokens) or, for "post_layernorm", the output's
      `last_hidden_state` (after the model's final norm); leading prefix tokens dropped.
    """

    def __init__(self, model: nn.Module, image_mean: list[float], image_std: list[float], layer: str = "last_hidden_state"):
        model.requires_grad_(False)
        model.eval()
        self.model = model
        self.layer = layer
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.timm = timm_backbone(model)
        if self.timm is not None:
            self._init_timm()
        else:
            self._init_transformers()

    def _init_transformers(self) -> None:
        layer = self.layer
        self.vision = getattr(self.model, "vision_model", None) or self.model
        self.post_layernorm = getattr(self.vision, "post_layernorm", None)
        self.projection = getattr(self.model, "visual_projection", None)
        self.clip_style = self.post_layernorm is not None
        if not self.clip_style:  # an hf_mim (or other) model: its backbone returns hidden_states
            self.vision = getattr(self.model, "base_model", None) or self.model
            if layer == "projected":
                raise ValueError(
                    f"teacher_layer='projected' needs a teacher with a `visual_projection` (CLIP); "
                    f"{type(self.model).__name__} has none: use 'last_hidden_state' or 'post_layernorm'"
                )
        elif layer == "projected" and self.projection is None:
            raise ValueError(
                "teacher_layer='projected' needs a teacher with a `visual_projection` "
                "(CLIPVisionModelWithProjection or CLIPModel)"
            )
        config = getattr(self.model.config, "vision_config", None) or self.model.config
        self.width = config.projection_dim if layer == "projected" else config.hidden_size
        self.image_size = _pair(getattr(config, "image_size", None))
        self.patch_size = _pair(getattr(config, "patch_size", None))

    def _init_timm(self) -> None:
        name = type(self.timm).__name__
        needed = ("patch_embed", "num_prefix_tokens", "forward_intermediates")
        missing = [attr for attr in needed if not hasattr(self.timm, attr)]
        if missing:
            raise ValueError(
                f"the timm teacher ({name}) is not a ViT-style token model (no {', '.join(missing)}): the student "
                "regresses one teacher token per patch, so use a timm ViT (vit_*, deit_*, eva_*, ...)"
            )
        if self.layer == "projected":
            raise ValueError(
                f"teacher_layer='projected' cannot be honoured by a timm teacher ({name} has no projection): use "
                "'last_hidden_state' (last block, before the final norm) or 'post_layernorm' (after it)"
            )
        if self.layer == "post_layernorm" and isinstance(getattr(self.timm, "norm", None), (nn.Identity, type(None))):
            raise ValueError(
                f"teacher_layer='post_layernorm' cannot be honoured by this timm teacher ({name} has no final norm on "
                "its tokens, e.g. it normalises the pooled feature with fc_norm): use 'last_hidden_state'"
            )
        self.width = self.timm.num_features
        self.image_size = _pair(self.timm.patch_embed.img_size)
        self.patch_size = _pair(self.timm.patch_embed.patch_size)

    def check_grid(self, grid: int) -> None:
        """The teacher's patch grid must be the student's: one teacher token per student patch."""
        if self.image_size is None or self.patch_size is None:
            return
        teacher_grid = tuple(size // patch for size, patch in zip(self.image_size, self.patch_size))
        if teacher_grid != (grid, grid):
            raise ValueError(
                f"the teacher's patch grid ({self.image_size[0]}x{self.image_size[1]} / {self.patch_size[0]}x"
                f"{self.patch_size[1]} = {teacher_grid[0]}x{teacher_grid[1]}) does not match the student's "
                f"({grid}x{grid}): choose a teacher_name_or_path (or teacher image size) with the same grid, "
                "e.g. CLIP-B/16 at 224 for a /16 student at 224"
            )

    def follow(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """Move the teacher to the student's device and floating dtype (same precision, never upcast)."""
        parameter = next(self.model.parameters())
        if parameter.device != device or (dtype is not None and dtype.is_floating_point and parameter.dtype != dtype):
            self.model.to(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else None)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, num_patches: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N, D) patch tokens of the chosen layer for images in [0, 1] (B, C, H, W); prefix tokens dropped.

        `dtype`: the student's parameter dtype, which the teacher takes on; None keeps the teacher's. The
        call runs in the caller's autocast, so a bf16-autocast student gets a bf16-autocast teacher."""
        self.follow(images.device, dtype)
        parameter = next(self.model.parameters())
        self.model.eval()
        images = images.to(torch.float32)
        if self.image_size is not None and tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        pixel_values = (images - self.image_mean.to(images.device)) / self.image_std.to(images.device)
        pixel_values = pixel_values.to(parameter.dtype)
        if self.timm is not None:
            tokens = self._timm_tokens(pixel_values)
        elif self.clip_style:
            tokens = self._clip_tokens(pixel_values)
        else:
            tokens = self._hidden_state_tokens(pixel_values)
        num_prefix = tokens.shape[1] - num_patches
        max_prefix = 0 if self.timm is not None else 8  # timm has dropped its prefix tokens already
        if not 0 <= num_prefix <= max_prefix:
            raise ValueError(
                f"the teacher returned {tokens.shape[1]} tokens for {num_patches} student patches: "
                "its patch grid must match the student's (teacher_name_or_path)"
            )
        return tokens[:, num_prefix:]

    def _clip_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        if self.layer in ("post_layernorm", "projected"):
            tokens = self.post_layernorm(tokens)
        if self.layer == "projected":
            tokens = self.projection(tokens)
        return tokens

    def _hidden_state_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.vision(pixel_values=pixel_values, output_hidden_states=self.layer == "last_hidden_state", return_dict=True)
        return output.hidden_states[-1] if self.layer == "last_hidden_state" else output.last_hidden_state

    def _timm_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens; timm drops the `num_prefix_tokens` itself."""
        (tokens,) = self.timm.forward_intermediates(
            pixel_values, indices=1, norm=self.layer == "post_layernorm", output_fmt="NLC", intermediates_only=True
        )
        return tokens


# --------------------------------------------------------------------------------------------------
# Model side
# --------------------------------------------------------------------------------------------------


class FrozenTeacherMixin:
    """Teacher handling for a `...ForMaskedImageModeling` whose config has the `TeacherConfigMixin` fields.

    The teacher is loaded lazily from `config.teacher_name_or_path` (or given with `set_teacher`) when
    `uses_external_teacher()` says the objective needs it, kept frozen and in eval mode, and never saved.
    Call `init_frozen_teacher()` in `__init__`; place this mixin before the `PreTrainedModel` base.
    """

    def init_frozen_teacher(self) -> None:
        object.__setattr__(self, "_frozen_teacher", None)  # not a submodule: never in state_dict

    def uses_external_teacher(self) -> bool:
        """Whether the objective regresses an external teacher now (default: `config.target == "teacher"`)."""
        return getattr(self.config, "target", "teacher") == "teacher"

    def external_teacher_width(self) -> int:
        """The width the head predicts, which the teacher's tokens must have."""
        return self.config.teacher_hidden_size

    @property
    def external_teacher(self) -> nn.Module | None:
        """The frozen teacher model (loaded from `config.teacher_name_or_path` on first access), or None."""
        frozen = self.load_teacher()
        return frozen.model if frozen is not None else None

    def load_teacher(self) -> FrozenTeacher | None:
        if self._frozen_teacher is None and self.uses_external_teacher() and self.config.teacher_name_or_path:
            path, subfolder = resolve_teacher_path(self.config.teacher_name_or_path, self.config.name_or_path)
            try:
                model = load_teacher_model(path, subfolder)
            except (OSError, ValueError) as error:
                raise OSError(
                    f"could not load the {type(self).__name__} teacher from config.teacher_name_or_path={path!r}: "
                    f"{error}\nPoint teacher_name_or_path at a local vision-model folder (e.g. a saved CLIPVisionModel, "
                    "TimmWrapperModel or hf_mim model), or call model.set_teacher(...)."
                ) from error
            mean, std = self._teacher_normalization(model, path=path, subfolder=subfolder)
            self._attach(FrozenTeacher(model, mean, std, self.config.teacher_layer))
        return self._frozen_teacher if self.uses_external_teacher() else None

    def set_teacher(self, model: nn.Module, image_mean: list[float] | None = None, image_std: list[float] | None = None) -> None:
        """Use an in-memory teacher (frozen here), normalised as `_teacher_normalization` says."""
        mean, std = self._teacher_normalization(model, image_mean, image_std)
        self._attach(FrozenTeacher(model, mean, std, self.config.teacher_layer))

    def drop_teacher(self) -> None:
        """Forget the external teacher (frees its memory; it is reloaded if needed again)."""
        object.__setattr__(self, "_frozen_teacher", None)

    def _teacher_normalization(
        self, model: nn.Module, image_mean=None, image_std=None, path: str | None = None, subfolder: str = ""
    ) -> tuple[list[float], list[float]]:
        """The teacher's own input normalisation (never the student's): the given values, else the config's
        teacher_image_mean/std, else the teacher folder's preprocessor_config.json, else a timm teacher's
        pretrained_cfg, else the image_mean/image_std of the teacher's own config (an hf_mim model's)."""
        mean = image_mean if image_mean is not None else self.config.teacher_image_mean
        std = image_std if image_std is not None else self.config.teacher_image_std
        if mean is None or std is None:
            found = (
                (read_teacher_normalization(path, subfolder) if path else None)
                or timm_normalization(model)
                or config_normalization(model)
            )
            if found is None:
                where = f" in {path!r}" if path else ""
                raise ValueError(
                    f"no teacher input normalisation found{where} (preprocessor_config.json, timm pretrained_cfg or "
                    "image_mean/image_std in its config): "
                    "set config.teacher_image_mean and config.teacher_image_std (or pass them to set_teacher)"
                )
            mean = mean if mean is not None else found[0]
            std = std if std is not None else found[1]
        return list(mean), list(std)

    def _attach(self, frozen: FrozenTeacher) -> None:
        frozen.check_grid(self.config.image_size // self.config.patch_size)
        width = self.external_teacher_width()
        if frozen.width != width:
            raise ValueError(
                f"the teacher's {self.config.teacher_layer} tokens are {frozen.width} wide but "
                f"config.teacher_hidden_size={self.config.teacher_hidden_size} (the head predicts {width}); "
                f"build the config with {type(self.config).__name__}.for_teacher(...)"
            )
        object.__setattr__(self, "_frozen_teacher", frozen)

    def images_from_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Undo the student's (ImageNet) normalisation: pixel_values -> images in [0, 1]."""
        mean = torch.tensor(self.config.image_mean, device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixel_values.device, dtype=torch.float32).view(1, -1, 1, 1)
        return pixel_values.to(torch.float32) * std + mean

    @torch.no_grad()
    def external_teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, N, D_teacher) raw teacher patch tokens (chosen layer, before normalisation) for the student's
        pixel_values, computed in the student's dtype and autocast."""
        frozen = self.load_teacher()
        if frozen is None:
            raise ValueError(
                f"{type(self).__name__} needs a teacher here: set config.teacher_name_or_path to a local "
                "vision-model folder (e.g. a saved CLIPVisionModel, TimmWrapperModel or hf_mim model) or call "
                "set_teacher(model, mean, std)"
            )
        patch_size = self.config.patch_size
        num_patches = (pixel_values.shape[-2] // patch_size) * (pixel_values.shape[-1] // patch_size)
        dtype = next(self.parameters()).dtype
        return frozen.tokens(self.images_from_pixel_values(pixel_values), num_patches, dtype=dtype)

    def train(self, mode: bool = True):
        """The teacher stays in eval mode (it is not a submodule, so nn.Module.train never reaches it)."""
        super().train(mode)
        if self._frozen_teacher is not None:
            self._frozen_teacher.model.eval()
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also copy a teacher that the config names relative to the student ("./teacher") from the folder the
        student was loaded from, so the saved folder (and a push) still finds it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        name = self.config.teacher_name_or_path
        if name and name.startswith("./"):
            source, subfolder = resolve_teacher_path(name, self.config.name_or_path)
            target = os.path.join(save_directory, name[2:])
            if not subfolder and os.path.isdir(source) and not os.path.exists(target):
                shutil.copytree(source, target)


__all__ = [
    "FrozenTeacher",
    "FrozenTeacherMixin",
    "TeacherConfigMixin",
    "normalize_teacher_tokens",
    "resolve_teacher_path",
    "teacher_token_width",
]
