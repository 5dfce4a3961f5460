"""python -m hf_mim.convert <method> --checkpoint <official .pth> --output <dir> [...]

Writes a Hub-ready folder (model.safetensors, config.json with the full auto_map, model code,
preprocessor_config.json) and prints what was converted and what was dropped.
"""

from __future__ import annotations

import argparse
import sys

from ..training.overrides import parse_overrides
from .common import CheckpointFormatError, load_official_state_dict


def convert_amt(args: argparse.Namespace):
    """mae-AMT or SimMIM-AMT, pretraining or fine-tuned: the layout is read off the keys. Heads default to
    the official width table (768 -> 12); SimMIM's mask unit (mask_patch_size) to 2 patches."""
    from .amt import convert_amt_checkpoint

    if args.teacher_checkpoint:
        raise ValueError("AMT has no teacher: --teacher_checkpoint is not used")
    return convert_amt_checkpoint(load_official_state_dict(args.checkpoint), parse_overrides(args.config_overrides))


def convert_dbot(args: argparse.Namespace):
    from .dbot import convert_dbot_checkpoint

    state = load_official_state_dict(args.checkpoint)
    teacher = load_official_state_dict(args.teacher_checkpoint) if args.teacher_checkpoint else None
    return convert_dbot_checkpoint(state, teacher, parse_overrides(args.config_overrides))


def convert_extrema(args: argparse.Namespace):
    from .extrema import convert_extrema_checkpoint, load_extrema_checkpoint

    return convert_extrema_checkpoint(load_extrema_checkpoint(args.checkpoint), parse_overrides(args.config_overrides))


def convert_maskdistill(args: argparse.Namespace):
    """Student (BEiT v2 layout); with --teacher_checkpoint (OpenAI CLIP image tower) the teacher is written
    to `<output>-teacher` and the student's config points at it. `teacher_num_attention_heads=...` in
    --config_overrides sets the teacher's heads (default width // 64)."""
    from pathlib import Path

    from .maskdistill import convert_maskdistill_checkpoint, convert_openai_clip_visual, save_teacher_folder

    overrides = parse_overrides(args.config_overrides)
    teacher_heads = overrides.pop("teacher_num_attention_heads", None)
    model, report = convert_maskdistill_checkpoint(load_official_state_dict(args.checkpoint), overrides)
    if args.teacher_checkpoint:
        teacher = convert_openai_clip_visual(load_official_state_dict(args.teacher_checkpoint), teacher_heads)
        folder = save_teacher_folder(teacher, Path(args.output).resolve().parent / (Path(args.output).name + "-teacher"))
        model.config.teacher_name_or_path = str(folder)
        report.dropped["<teacher>"] = f"written to {folder} (not part of the student's folder)"
    return model, report


CONVERTERS = {"amt": convert_amt, "dbot": convert_dbot, "extrema": convert_extrema, "maskdistill": convert_maskdistill}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.convert", description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(CONVERTERS))
    parser.add_argument("--checkpoint", required=True, help="official checkpoint (.pth, weights under 'model')")
    parser.add_argument("--output", required=True, help="folder to write the hf_mim model into")
    parser.add_argument("--teacher_checkpoint", help="dBOT: the matching checkpoint-teacher-*.pth; MaskDistill: the CLIP image tower (optional)")
    parser.add_argument(
        "--config_overrides", help="comma-separated config values the weights do not fix, e.g. num_attention_heads=6"
    )
    args = parser.parse_args(argv)

    from ..hub import save_hub_folder

    try:
        model, report = CONVERTERS[args.method](args)
    except (CheckpointFormatError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    save_hub_folder(model, args.output)
    print(report.summary())
    print(f"wrote {type(model).__name__} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
