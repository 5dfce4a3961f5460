"""Shared pieces of the official-checkpoint converters: settings with their sources, key renaming, reporting
(safe file reading is in `files`)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .files import CheckpointFormatError, OfficialFile, load_official_state_dict, read_official_file  # noqa: F401

# Heads cannot be read off the weights; the official ViT sizes fix them by width (S, B, L, H).
VIT_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16}
# MAE's decoder (512 wide, 8 blocks): 16 heads in every official MAE-style repository.
MAE_DECODER_HEADS = 16
# The parameters of a timm ViT block that map one-to-one onto hf_mim's Block (same names).
VIT_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"


def mae_decoder_rules(pred: str = "decoder_pred") -> list[tuple[str, str]]:
    """Renames of an official MAE decoder (dBOT, mae-AMT) into `MaeDecoder` under `decoder.`; `pred`: the
    name of its output projection (dBOT's file calls it `decoder_predp`)."""
    return [
        (r"decoder_embed\.(weight|bias)", r"decoder.decoder_embed.\1"),
        (r"mask_token", r"decoder.mask_token"),
        (rf"decoder_blocks\.(\d+)\.{VIT_BLOCK_PARTS}", r"decoder.layers.\1.\2.\3"),
        (r"decoder_norm\.(weight|bias)", r"decoder.decoder_norm.\1"),
        (rf"{pred}\.(weight|bias)", r"decoder.decoder_pred.\1"),
    ]


# Official model names (MAE / timm / BEiT / ExtreMA `--model`, `-a`) -> (width, heads) of the ViT they build.
VIT_SIZES = {"small": (384, 6), "base": (768, 12), "large": (1024, 16), "huge": (1280, 16)}
MODEL_NAME_SIZE = re.compile(r"(?:^|_)(?:vit|beit)_(small|base|large|huge)(?:_|$)")


class Settings:
    """The config values a converter decides, each with where it came from: the weights, the file's own
    args/config, the command line, or a default (official table or hf_mim's). Command-line values win;
    a value still unknown after them is an error naming the flag."""

    def __init__(self, official: OfficialFile | None = None, overrides: Mapping[str, object] | None = None):
        self.official = official
        self.overrides = dict(overrides or {})
        self.values: dict[str, object] = {}
        self.sources: dict[str, str] = {}
        self.required: dict[str, str] = {}

    def set(self, name: str, value, source: str) -> None:
        self.values[name] = value
        self.sources[name] = source

    def weights(self, name: str, value, why: str) -> None:
        self.set(name, value, f"weights: {why}")

    def default(self, name: str, value, why: str) -> None:
        self.set(name, value, f"default: {why}")

    def from_file(self, name: str, *keys: str, transform=None, why: str = "") -> bool:
        """Take `name` from the first of `keys` (`args.x`, `config.A.B`) the file holds; False if none."""
        if self.official is None:
            return False
        for key in keys:
            value = self.official.setting(key)
            if value is not None:
                self.set(name, transform(value) if transform else value, f"file: {key}={value!r}" + (f" ({why})" if why else ""))
                return True
        return False

    def need(self, name: str, message: str) -> None:
        """`name` must be known once the command line is applied, else `message` is the error."""
        self.required[name] = message

    def finish(self) -> dict[str, object]:
        """Apply the command line, check the required values, return the config kwargs."""
        for name, value in self.overrides.items():
            self.set(name, value, "command line")
        for name, message in self.required.items():
            if self.values.get(name) is None:
                raise CheckpointFormatError(message)
        return dict(self.values)

    def model_name_heads(self, name: str, width: int, *keys: str) -> bool:
        """Heads from an official model name in the file (`args.model=mae_vit_base_patch16`), if it names a
        ViT of this width."""
        for key in keys:
            model = self.official.setting(key) if self.official is not None else None
            match = MODEL_NAME_SIZE.search(model) if isinstance(model, str) else None
            if match and VIT_SIZES[match.group(1)][0] == width:
                self.set(name, VIT_SIZES[match.group(1)][1], f"file: {key}={model!r} (ViT-{match.group(1)[0].upper()})")
                return True
        return False

    def encoder_heads(self, width: int, *keys: str, flag: str = "--num_attention_heads") -> None:
        """Heads: the file's model name, else the official width table (a default, printed as such),
        else a required flag."""
        if self.model_name_heads("num_attention_heads", width, *keys):
            return
        if width in VIT_HEADS_BY_WIDTH:
            self.default("num_attention_heads", VIT_HEADS_BY_WIDTH[width], f"official ViT of width {width}")
            return
        self.need(
            "num_attention_heads",
            f"the number of attention heads cannot be read from the weights (width {width} is no official ViT size) "
            f"and the file names no official model: pass {flag} N",
        )

    def mae_decoder(self, state: Mapping[str, torch.Tensor], *keys: str) -> None:
        """An MAE decoder's settings (dBOT, mae-AMT), when `state` holds one: width and depth from the
        weights, then its heads (`mae_decoder_heads`, reading the model name from `keys`)."""
        if "decoder_embed.weight" not in state:
            return
        decoder_width, decoder_depth = state["decoder_embed.weight"].shape[0], count_indexed(state, "decoder_blocks.")
        self.weights("decoder_hidden_size", decoder_width, "decoder_embed width")
        self.weights("decoder_num_hidden_layers", decoder_depth, "decoder_blocks.*")
        self.mae_decoder_heads(decoder_width, decoder_depth, *keys)

    def mae_decoder_heads(self, decoder_width: int, decoder_depth: int, *keys: str) -> None:
        """MAE decoders: every official `mae_vit_*` model has 16 decoder heads; without such a name only the
        official 512-wide, 8-block decoder is known, anything else is a required flag."""
        for key in keys:
            model = self.official.setting(key) if self.official is not None else None
            if isinstance(model, str) and model.startswith("mae_") and MODEL_NAME_SIZE.search(model) and (
                decoder_width, decoder_depth) == (512, 8):
                self.set("decoder_num_attention_heads", MAE_DECODER_HEADS, f"file: {key}={model!r} (MAE decoder)")
                return
        if (decoder_width, decoder_depth) == (512, 8):
            self.default("decoder_num_attention_heads", MAE_DECODER_HEADS, "official MAE decoder (512 wide, 8 blocks)")
            return
        self.need(
            "decoder_num_attention_heads",
            f"the decoder's number of attention heads cannot be read from the weights (decoder {decoder_width} wide, "
            f"{decoder_depth} blocks is no official MAE decoder) and the file names no official model: pass "
            "--decoder_num_attention_heads N",
        )


@dataclass
class ConversionReport:
    """What a conversion did: the source file, every config value with its source, each official key."""

    converted: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why
    settings: list[tuple[str, object, str]] = field(default_factory=list)  # (field, value, source)
    source: OfficialFile | None = None
    teacher_source: OfficialFile | None = None  # dBOT's teacher file, MaskDistill's CLIP file

    def record_config(self, config, settings: Settings | None) -> None:
        """Every field of `config` with its source (fields no one set are hf_mim's defaults)."""
        sources = settings.sources if settings is not None else {}
        names = [name for name in inspect.signature(type(config).__init__).parameters if name not in ("self", "kwargs")]
        names += [name for name in sources if name not in names]
        own_default = f"default: hf_mim {type(config).__name__}"
        self.settings = [(name, getattr(config, name, None), sources.get(name, own_default)) for name in names]

    def summary(self) -> str:
        lines = []
        if self.source is not None:
            lines.append(f"source: {self.source.name} (sha256 {self.source.sha256})")
            lines.append(f"  layout: {self.source.layout}")
        if self.teacher_source is not None:
            lines.append(f"teacher source: {self.teacher_source.name} (sha256 {self.teacher_source.sha256})")
            lines.append(f"  layout: {self.teacher_source.layout}")
        if self.settings:
            lines.append("settings:")
            width = max(len(f"{name} = {value!r}") for name, value, _ in self.settings)
            for name, value, source in self.settings:
                lines.append(f"  {f'{name} = {value!r}':<{width}}  <- {source}")
        lines.append(f"converted {len(self.converted)} tensors")
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
    from ..vit_blocks import sincos_2d_table

    grid = config.image_size // config.patch_size
    expected = sincos_2d_table(config.decoder_hidden_size, grid, grid)
    if state["decoder_pos_embed"].shape != expected.shape or not torch.allclose(
        state["decoder_pos_embed"].float(), expected, atol=1e-5
    ):
        raise CheckpointFormatError("decoder_pos_embed is not the fixed 2-D sin-cos table hf_mim recomputes")
