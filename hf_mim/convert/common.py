"""Shared pieces of the official-checkpoint converters: safe loading, key renaming, reporting."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Heads cannot be read off the weights; the official ViT sizes fix them by width (S, B, L, H).
VIT_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16}
# MAE's decoder (512 wide, 8 blocks): 16 heads in every official MAE-style repository.
MAE_DECODER_HEADS = 16
# The parameters of a timm ViT block that map one-to-one onto hf_mim's Block (same names).
VIT_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"


class CheckpointFormatError(ValueError):
    """The file is not an official checkpoint of the expected layout."""


def load_official_state_dict(path: str | Path, state_key: str | None = "model") -> dict[str, torch.Tensor]:
    """Load an official `.pth` (or `.safetensors`) file safely and return its weights.

    `.pth` files are read with `torch.load(weights_only=True)`: pickled Python objects (e.g. the
    `argparse.Namespace` some official scripts save under "args") are refused with an error that says
    how to proceed, instead of executing arbitrary pickle code. The weights are taken from
    `checkpoint[state_key]` when present (official layout: {"model": ..., "optimizer": ..., ...}), and a
    DDP `module.` prefix is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        checkpoint: object = load_file(str(path))
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError (or RuntimeError) for unsafe pickles
            raise CheckpointFormatError(
                f"{path} could not be loaded with torch.load(weights_only=True): {error}\n"
                "The file contains pickled Python objects besides tensors (official training scripts save "
                "their argparse arguments and optimizer). If you trust the file, extract the weights "
                "yourself, e.g. `sd = torch.load(path, weights_only=False)['model']; "
                "torch.save(sd, 'weights.pth')`, and convert 'weights.pth'."
            ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors")
    if state_key is not None and state_key in checkpoint and isinstance(checkpoint[state_key], Mapping):
        checkpoint = checkpoint[state_key]
    state = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            continue
        state[key[len("module.") :] if key.startswith("module.") else key] = value
    if not state:
        raise CheckpointFormatError(f"{path} contains no tensors (looked under {state_key!r} and at the top level)")
    return state


@dataclass
class ConversionReport:
    """What a conversion did with each official key, for the user to check."""

    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors"]
        for key, why in sorted(self.dropped.items()):
            lines.append(f"  dropped {key}: {why}")
        return "\n".join(lines)


def rename_keys(
    state: Mapping[str, torch.Tensor],
    rules: Iterable[tuple[str, str]],
    drop: Mapping[str, str] | None = None,
    report: ConversionReport | None = None,
) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to every key.

    `drop` maps regexes of keys to leave out to the reason (recorded in the report). A key that no
    rule and no drop pattern matches is an error: a silent leftover would mean random weights.
    """
    rules = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    drop_patterns = [(re.compile(pattern), why) for pattern, why in (drop or {}).items()]
    report = report if report is not None else ConversionReport()
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        reason = next((why for pattern, why in drop_patterns if pattern.fullmatch(key)), None)
        if reason is not None:
            report.dropped[key] = reason
            continue
        for pattern, replacement in rules:
            if pattern.fullmatch(key):
                converted[pattern.sub(replacement, key)] = value
                report.converted.append(key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointFormatError(
            f"{len(unknown)} keys of the official checkpoint have no mapping: {', '.join(sorted(unknown)[:10])}"
            + (" ..." if len(unknown) > 10 else "")
        )
    return converted


def count_indexed(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of `prefix{i}.` blocks in a state dict (e.g. prefix "blocks.")."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def merge_qkv_bias(state: Mapping[str, torch.Tensor], layers_prefix: str) -> dict[str, torch.Tensor]:
    """BEiT's separate q_bias / v_bias (k has none) -> one fused qkv bias [q; 0; v] per block, under
    `{layers_prefix}{i}.attn.qkv.bias`. A zero k bias is exact: it shifts every score of a query by the
    same amount, which softmax ignores."""
    merged = {}
    for key, q_bias in state.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.q_bias", key)
        if match:
            v_key = f"blocks.{match.group(1)}.attn.v_bias"
            if v_key not in state:
                raise CheckpointFormatError(f"{key} without {v_key}")
            merged[f"{layers_prefix}{match.group(1)}.attn.qkv.bias"] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), state[v_key]]
            )
    return merged


def check_decoder_sincos_table(state: Mapping[str, torch.Tensor], config) -> None:
    """MAE's decoder sin-cos table (`decoder_pos_embed`) is recomputed by hf_mim, not loaded: refuse a
    checkpoint whose table is not the standard one for the config's grid and decoder width."""
    if "decoder_pos_embed" not in state:
        return
    from ..modeling_common import sincos_2d_table

    grid = config.image_size // config.patch_size
    expected = sincos_2d_table(config.decoder_hidden_size, grid, grid)
    if state["decoder_pos_embed"].shape != expected.shape or not torch.allclose(
        state["decoder_pos_embed"].float(), expected, atol=1e-5
    ):
        raise CheckpointFormatError("decoder_pos_embed is not the fixed 2-D sin-cos table hf_mim recomputes")
