"""After a conversion: check the written folder really loads and runs, and describe the conversion in the
model card (source file and checksum, every setting with its source, what was converted and dropped)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageClassification, AutoModelForMaskedImageModeling, PreTrainedModel

from .common import ConversionReport
from .files import CheckpointFormatError


def verify_folder(folder: str | Path, model: PreTrainedModel) -> str:
    """Load `folder` through the Auto classes (as a user would), check every weight equals the converted
    model's, and run one forward on a random image (a MaskDistill student with a teacher also computes its
    loss, which loads the teacher from where the config points). Returns a one-line summary."""
    classifier = type(model).__name__.endswith("ForImageClassification")
    auto = AutoModelForImageClassification if classifier else AutoModelForMaskedImageModeling
    loaded = auto.from_pretrained(str(folder)).eval()
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name in expected and not torch.equal(tensor, expected[name]):
            raise CheckpointFormatError(f"{folder}: weight {name} differs after save and reload")
    config = loaded.config
    pixel_values = torch.randn(1, config.num_channels, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.random.fork_rng():  # masks drawn from a fixed seed: the same line every run
        torch.manual_seed(0)
        output = loaded(pixel_values=pixel_values)
    value = output.logits if classifier else (output.loss if output.loss is not None else output[0])
    if not torch.isfinite(value).all():
        raise CheckpointFormatError(f"{folder}: the reloaded model's forward gives non-finite values")
    what = "logits" if classifier else ("loss" if output.loss is not None else "predictions (no loss: no teacher)")
    shown = f"{value.item():.6g}" if value.numel() == 1 else f"shape {tuple(value.shape)}"
    return f"verified: {type(loaded).__name__}.from_pretrained({str(folder)!r}) + one forward, {what} {shown}"


def conversion_section(report: ConversionReport, command: str) -> str:
    """Markdown appended to the method's card."""
    lines = ["", "## Conversion", ""]
    if report.source is not None:
        lines += [
            f"Converted from the official file `{report.source.name}` (sha256 `{report.source.sha256}`, layout "
            f"`{report.source.layout}`) with",
            "",
            "```bash",
            command,
            "```",
            "",
        ]
    if report.teacher_source is not None:
        lines += [
            f"Teacher from `{report.teacher_source.name}` (sha256 `{report.teacher_source.sha256}`, layout "
            f"`{report.teacher_source.layout}`).",
            "",
        ]
    lines += ["| setting | value | source |", "|---|---|---|"]
    lines += [f"| `{name}` | `{value!r}` | {source} |" for name, value, source in report.settings]
    lines += ["", f"{len(report.converted)} tensors converted."]
    if report.dropped:
        lines += ["", "Dropped or set without a tensor from the file:", ""]
        lines += [f"- `{key}`: {why}" for key, why in sorted(report.dropped.items())]
    return "\n".join(lines) + "\n"


def write_conversion_card(folder: str | Path, model: PreTrainedModel, repo_id: str, report: ConversionReport, command: str) -> Path:
    """The method's model card (hf_mim.hub) with a Conversion section."""
    from ..hub.card import render_model_card

    card = render_model_card(model, repo_id)
    card.text = card.text.rstrip("\n") + "\n" + conversion_section(report, command)
    path = Path(folder) / "README.md"
    card.save(path)
    return path
