"""The official releases of the five methods, as their repositories' READMEs list them, with the command
that converts each file and what the converted model should reproduce. `python -m hf_mim.convert --list`
prints this table; the README carries the same table.

Sources: github.com/liuxingbin/dbot README (files under lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/
mmodal/dbot/), github.com/microsoft/ExtreMA README (files under frontiers.blob.core.windows.net/pretraining/
checkpoints/extrema/). AMT (guijiejie/AMT), MaskDistill (microsoft/unilm/unimim is README-only) and
RevColV2 (megvii-research/RevCol holds v1 only) released no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

# The official ViT sizes (patch, width, depth, heads) of the released files.
SIZES = {
    "B": dict(patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "L": dict(patch_size=16, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "H": dict(patch_size=14, hidden_size=1280, num_hidden_layers=32, num_attention_heads=16),
}
CLIP_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=16, projection_dim=512)


def arch(class_name: str, size: str, **kwargs) -> tuple[str, dict]:
    if class_name.startswith("CLIP"):
        return class_name, dict(CLIP_B16, **kwargs)
    if class_name.endswith("ForImageClassification"):
        kwargs.setdefault("num_labels", 1000)
    return class_name, dict(SIZES[size], **kwargs)


def parameter_count(architecture: tuple[str, dict] | None) -> str:
    """Parameters of the converted model, counted on the meta device (nothing allocated); a dBOT teacher copy is
    not counted (it is the student's size again), ExtreMA's momentum branch is (it is in the file)."""
    if architecture is None:
        return "-"
    import torch
    import transformers

    import hf_mim

    class_name, kwargs = architecture
    model_class = getattr(hf_mim, class_name, None) or getattr(transformers, class_name)
    config_class = model_class.config_class
    if "teacher_depth" in config_class.__init__.__code__.co_varnames:
        kwargs = dict(kwargs, teacher_depth=0)
    if class_name.startswith("CLIP"):
        config_class = transformers.CLIPVisionConfig
    with torch.device("meta"):
        model = model_class(config_class(**kwargs))
    count = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("teacher."))
    return f"{count / 1e6:.1f} M"


@dataclass(frozen=True)
class Release:
    method: str  # hf_mim converter; "" = no converter for this layout
    model: str  # e.g. "ViT-B/16"
    kind: str  # "pretrained" or "fine-tuned"
    file: str
    recipe: str  # teacher / masking / data, as the README says
    accuracy: str  # ImageNet-1K top-1 the README gives for this model ("fine-tune 84.5", "linear 73.3 / fine-tune 83.7")
    architecture: tuple[str, dict] | None  # (hf_mim / transformers class, config kwargs) the file converts to
    note: str = ""  # why a file has no converter command, or what to know about it
    command_text: str = ""  # when the plain `--checkpoint <file>` command is not the one

    def command(self) -> str:
        if not self.method:
            return "not supported: " + self.note
        if self.command_text:
            return self.command_text
        output = self.file.rsplit(".", 1)[0].replace(".", "_")
        return f"python -m hf_mim.convert {self.method} --checkpoint {self.file} --output {output}"

    def description(self) -> str:
        return f"{self.recipe}; {self.note}" if self.note and self.method else self.recipe


_BEIT = "dBOT's beit branch (symmetric encoder, relative position bias): no hf_mim layout"
_WIDE_TEACHER = "student trained against a wider teacher; the code that wrote it was not released (layout unverified)"

RELEASES = [
    # ---- dBOT: ImageNet-1K, 1600 epochs; accuracies are fine-tuning top-1 (README) -------------------------
    Release("dbot", "ViT-B/16", "pretrained", "84.5_dbot_base_pre.pth", "teacher: dBOT ViT-B (bootstrapped)", "fine-tune 84.5", arch("DbotForMaskedImageModeling", "B")),
    Release("dbot", "ViT-B/16", "fine-tuned", "84.5_dbot_base_finetune.pth", "teacher: dBOT ViT-B (bootstrapped)", "84.5", arch("DbotForImageClassification", "B")),
    Release("dbot", "ViT-B/16", "pretrained", "84.6_dbot_large_base_pre.pth", "teacher: dBOT ViT-L", "fine-tune 84.6", arch("DbotForMaskedImageModeling", "B"), _WIDE_TEACHER),
    Release("dbot", "ViT-B/16", "fine-tuned", "84.6_dbot_large_base_finetune.pth", "teacher: dBOT ViT-L", "84.6", arch("DbotForImageClassification", "B")),
    Release("dbot", "ViT-B/16", "pretrained", "84.6_dbot_huge_base_pre.pth", "teacher: dBOT ViT-H", "fine-tune 84.6", arch("DbotForMaskedImageModeling", "B"), _WIDE_TEACHER),
    Release("dbot", "ViT-B/16", "fine-tuned", "84.6_dbot_huge_base_finetune.pth", "teacher: dBOT ViT-H", "84.6", arch("DbotForImageClassification", "B")),
    Release("", "ViT-B/16", "pretrained", "85.7_clip_base_pre.pth", "teacher: CLIP-B/16", "fine-tune 85.7", None, _BEIT),
    Release("", "ViT-B/16", "fine-tuned", "85.7_clip_base_finetune.pth", "teacher: CLIP-B/16", "85.7", None, _BEIT),
    Release("dbot", "ViT-L/16", "pretrained", "86.6_dbot_large_pre.pth", "teacher: dBOT ViT-L (bootstrapped)", "fine-tune 86.6", arch("DbotForMaskedImageModeling", "L")),
    Release("dbot", "ViT-L/16", "fine-tuned", "86.6_dbot_large_finetune.pth", "teacher: dBOT ViT-L (bootstrapped)", "86.6", arch("DbotForImageClassification", "L")),
    Release("dbot", "ViT-L/16", "pretrained", "86.8_dbot_huge_large_pre.pth", "teacher: dBOT ViT-H", "fine-tune 86.8", arch("DbotForMaskedImageModeling", "L"), _WIDE_TEACHER),
    Release("dbot", "ViT-L/16", "fine-tuned", "86.8_dbot_huge_large_finetune.pth", "teacher: dBOT ViT-H", "86.8", arch("DbotForImageClassification", "L")),
    Release("", "ViT-L/14", "pretrained", "87.8_clip_large_pre.pth", "teacher: CLIP-L/14", "fine-tune 87.8", None, _BEIT),
    Release("", "ViT-L/14", "fine-tuned", "87.8_clip_large_finetune.pth", "teacher: CLIP-L/14", "87.8", None, _BEIT),
    Release("dbot", "ViT-H/14", "pretrained", "87.4_dbot_huge_pre.pth", "teacher: dBOT ViT-H (bootstrapped)", "fine-tune 87.4 (88.0 at 448 px)", arch("DbotForMaskedImageModeling", "H")),
    Release("dbot", "ViT-H/14", "fine-tuned", "87.4_dbot_huge_finetune.pth", "teacher: dBOT ViT-H (bootstrapped)", "87.4", arch("DbotForImageClassification", "H")),
    Release("dbot", "ViT-H/14 @ 448 px", "fine-tuned", "88.0_dbot_huge_448_finetune.pth", "teacher: dBOT ViT-H (bootstrapped)", "88.0", arch("DbotForImageClassification", "H", image_size=448)),
    Release("", "ViT-H/14", "pretrained", "88.5_clip_huge_pre.pth", "teacher: CLIP-L/14", "fine-tune 88.5", None, _BEIT),
    Release("", "ViT-H/14", "fine-tuned", "88.5_clip_huge_finetune.pth", "teacher: CLIP-L/14", "88.5", None, _BEIT),
    Release("", "ViT-H/14 @ 448 px", "fine-tuned", "89.1_clip_huge_448_finetune.pth", "teacher: CLIP-L/14", "89.1", None, _BEIT),
    # ---- ExtreMA: ViT-B/16 full training checkpoints (online + momentum branches); README accuracies ---------
    Release("extrema", "ViT-B/16", "pretrained", "extrema_mask08x5_1k_300ep.pth", "IN-1K, 300 ep, 80% x 5 masks, no color aug", "linear 67.1 / fine-tune 82.9", arch("ExtremaForMaskedImageModeling", "B")),
    Release("extrema", "ViT-B/16", "pretrained", "extrema_mask08x5_color_1k_300ep.pth", "IN-1K, 300 ep, 80% x 5 masks, color aug", "linear 73.3 / fine-tune 83.7", arch("ExtremaForMaskedImageModeling", "B")),
    Release("extrema", "ViT-B/16", "pretrained", "extrema_mask09x8_color_1k_300ep.pth", "IN-1K, 300 ep, 90% x 8 masks, color aug", "linear 68.4 / fine-tune 83.5", arch("ExtremaForMaskedImageModeling", "B")),
    Release("extrema", "ViT-B/16", "pretrained", "extrema_mask08x5_color_22k_30ep.pth", "IN-22K, 30 ep, 80% x 5 masks, color aug", "linear 74.5 / fine-tune 83.9", arch("ExtremaForMaskedImageModeling", "B")),
    # ---- MaskDistill's teacher: OpenAI's CLIP release (TorchScript .pt); no MaskDistill weights were released --
    Release("maskdistill", "CLIP ViT-B/16 (teacher)", "teacher", "ViT-B-16.pt", "OpenAI CLIP (TorchScript); image tower only",
            "-", arch("CLIPVisionModelWithProjection", "B"),
            command_text="python -m hf_mim.convert maskdistill --checkpoint <student>.pth --teacher_checkpoint ViT-B-16.pt --output <name>"),
]

NO_RELEASE = (
    "No weights released: AMT (guijiejie/AMT: code only), MaskDistill (microsoft/unilm/unimim: README only; "
    "third-party BEiT v2-layout files convert with `maskdistill`), RevColV2 (megvii-research/RevCol: v1 only)."
)

HEADER = ("method", "model", "kind", "file", "recipe", "ImageNet-1K top-1", "parameters", "command")


def rows() -> list[tuple[str, ...]]:
    return [
        (r.method or "dbot", r.model, r.kind, r.file, r.description(), r.accuracy, parameter_count(r.architecture), r.command())
        for r in RELEASES
    ]


def zoo_table() -> str:
    """The releases as a Markdown table (the README's model zoo)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows():
        *cells, command = row
        lines.append("| " + " | ".join(cells) + f" | `{command}` |" if not command.startswith("not supported") else
                     "| " + " | ".join(cells) + f" | {command} |")
    return "\n".join(lines) + "\n\n" + NO_RELEASE
