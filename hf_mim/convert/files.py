"""Reading official checkpoint files as users download them, without executing arbitrary pickles.

The official training scripts save more than tensors: MAE-family scripts (dBOT, mae-AMT, BEiT-based
fine-tuning) an `argparse.Namespace` under "args", SimMIM-AMT its yacs `CfgNode` under "config", and
numpy scalars may appear in either. `torch.load(weights_only=True)` refuses them all; here they are
allow-listed (and nothing else), so the weights *and* the settings the weights cannot tell are read.
OpenAI's released CLIP `.pt` files are TorchScript archives, read with `torch.jit.load` (TorchScript
code is compiled, never Python-unpickled).
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointFormatError(ValueError):
    """The file is not an official checkpoint of the expected layout."""


class YacsConfigNode:
    """Allow-listed under the name `yacs.config.CfgNode` (yacs need not be installed): rebuilds the node as
    an OrderedDict of its values. torch's weights-only unpickler fills only plain dict types, so a dict
    subclass (CfgNode) cannot be rebuilt as itself; the node's bookkeeping attributes (`__immutable__`,
    `__new_allowed__`, ...) land on the OrderedDict's `__dict__` and are ignored."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def _numpy_globals() -> list:
    """numpy scalars and dtypes as numpy 1.x and 2.x pickle them (`scalar(dtype, bytes)` + dtype classes)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of torch's wheels
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed: list = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [cls for name in dir(dtypes) if isinstance(cls := getattr(dtypes, name), type) and issubclass(cls, np.dtype)]
    return allowed


def safe_globals() -> list:
    """Everything a torch.load of an official file may construct besides tensors and containers."""
    return [argparse.Namespace, (YacsConfigNode, "yacs.config.CfgNode"), *_numpy_globals()]


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` and a `code/` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain(value):
    """Namespace / CfgNode / OrderedDict trees -> dicts of plain Python values (for reading settings)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):  # numpy scalar
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


@dataclass
class OfficialFile:
    """One official file: its weights, the settings it was saved with, and what else it held."""

    path: Path
    sha256: str
    state: dict[str, torch.Tensor]
    layout: str  # e.g. "{'model', 'optimizer', 'epoch', 'scaler', 'args'}" or "TorchScript archive"
    args: dict[str, object] | None = None  # argparse Namespace saved under "args"
    config: dict[str, object] | None = None  # yacs config saved under "config" (nested dicts)
    extra: dict[str, object] = field(default_factory=dict)  # other non-tensor top-level entries

    @property
    def name(self) -> str:
        return self.path.name

    def setting(self, dotted: str):
        """`args.mask_ratio` / `config.DATA.MASK_RATIO` / `extra.arch` -> value, or None when the file does
        not say."""
        root, _, rest = dotted.partition(".")
        node: object = {"args": self.args, "config": self.config, "extra": self.extra}.get(root)
        for part in rest.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node


def _load_pickled(path: Path):
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            f"{path} holds Python objects that are not allowed and were not loaded (never executed): {error}\n"
            "hf_mim reads tensors, argparse.Namespace, yacs CfgNode and numpy scalars only. If the file is not an "
            "official checkpoint, save its state dict alone (torch.save(state_dict, 'weights.pth')) and convert that."
        ) from error


def read_official_file(path: str | Path, state_keys: tuple[str, ...] = ("model", "state_dict")) -> OfficialFile:
    """Load an official `.pth` / `.pt` / `.safetensors` file safely.

    The weights are `checkpoint[key]` for the first of `state_keys` present (else the top level); a DDP
    `module.` prefix is stripped. `args` (Namespace) and `config` (yacs) are kept as plain dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    sha = sha256_of(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: object = load_file(str(path))
        layout = "safetensors state dict"
    elif is_torchscript_archive(path):
        with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's released files are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            archive = torch.jit.load(str(path), map_location="cpu")
        state = {key: value.detach().clone() for key, value in archive.state_dict().items()}
        return OfficialFile(path, sha, state, "TorchScript archive (weights via torch.jit.load(...).state_dict())")
    else:
        checkpoint = _load_pickled(path)
        layout = "state dict"
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    args = config = None
    extra: dict[str, object] = {}
    state_key = next((key for key in state_keys if isinstance(checkpoint.get(key), Mapping)), None)
    if state_key is not None:
        layout = "{" + ", ".join(repr(key) for key in checkpoint) + "}"
        weights = checkpoint[state_key]
        for key, value in checkpoint.items():
            if key == state_key:
                continue
            if key == "args" and isinstance(value, argparse.Namespace):
                args = plain(value)
            elif key == "config" and isinstance(value, Mapping):
                config = plain(value)
            elif not isinstance(value, (Mapping, torch.Tensor)):
                extra[key] = plain(value)
    else:
        weights = checkpoint
    state = {}
    for key, value in weights.items():
        if isinstance(value, torch.Tensor):
            state[key[len("module.") :] if key.startswith("module.") else key] = value
    if not state:
        raise CheckpointFormatError(f"{path} contains no tensors (looked under {state_keys} and at the top level)")
    return OfficialFile(path, sha, state, layout, args, config, extra)


def load_official_state_dict(path: str | Path, state_key: str | None = "model") -> dict[str, torch.Tensor]:
    """The weights of an official file (see `read_official_file`)."""
    return read_official_file(path, (state_key,) if state_key else ()).state
