"""python -m hf_mim.convert <method> --checkpoint <official file> --output <dir> [--push_to_hub --hub_model_id org/name]

Reads an official file as downloaded (weights plus the args/config it was saved with), writes a Hub-ready
folder (model.safetensors, config.json with the full auto_map, model code, preprocessor_config.json, a
model card saying where every setting came from), checks that the folder loads and runs, and optionally
pushes it. `python -m hf_mim.convert --list` prints the official releases and their commands.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..training.overrides import parse_overrides
from .files import CheckpointFormatError, read_official_file

# Flags that set one config field each (the command line wins over the file and the defaults).
HEAD_FLAGS = ("num_attention_heads", "decoder_num_attention_heads")


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    overrides = parse_overrides(args.config_overrides)
    for name in HEAD_FLAGS:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return overrides


def convert_amt(args: argparse.Namespace, output: Path):
    """mae-AMT or SimMIM-AMT, pretraining or fine-tuned: the layout is read off the keys, the settings off
    the file's args (mae-AMT) or yacs config (SimMIM-AMT)."""
    from .amt import convert_amt_checkpoint

    if args.teacher_checkpoint or args.teacher_name_or_path:
        raise ValueError("AMT has no teacher: --teacher_checkpoint / --teacher_name_or_path are not used")
    return convert_amt_checkpoint(read_official_file(args.checkpoint), overrides_from(args))


def convert_dbot(args: argparse.Namespace, output: Path):
    from .dbot import convert_dbot_checkpoint

    if args.teacher_name_or_path:
        raise ValueError("dBOT's teacher is a checkpoint file: use --teacher_checkpoint checkpoint-teacher-*.pth")
    teacher = read_official_file(args.teacher_checkpoint) if args.teacher_checkpoint else None
    return convert_dbot_checkpoint(read_official_file(args.checkpoint), teacher, overrides_from(args))


def convert_extrema(args: argparse.Namespace, output: Path):
    from .extrema import convert_extrema_checkpoint, load_extrema_checkpoint

    if args.teacher_checkpoint or args.teacher_name_or_path:
        raise ValueError("ExtreMA has no teacher file (the momentum encoder is inside the checkpoint)")
    return convert_extrema_checkpoint(load_extrema_checkpoint(args.checkpoint), overrides_from(args))


TEACHER_SUBFOLDER = "teacher"


def convert_maskdistill(args: argparse.Namespace, output: Path):
    """Student (BEiT v2 layout). The teacher travels with it: --teacher_checkpoint (an OpenAI CLIP state dict,
    full or image tower, or OpenAI's TorchScript `.pt`) is converted into `<output>/teacher` and referenced
    as "./teacher" (relative to the student's folder or Hub repo); --teacher_name_or_path references a Hub id
    or folder as given."""
    from .maskdistill import convert_maskdistill_checkpoint, convert_openai_clip_visual, save_teacher_folder

    if args.teacher_checkpoint and args.teacher_name_or_path:
        raise ValueError("give either --teacher_checkpoint (converted into the output) or --teacher_name_or_path, not both")
    overrides = overrides_from(args)
    teacher_heads = overrides.pop("teacher_num_attention_heads", None)
    if args.teacher_num_attention_heads is not None:
        teacher_heads = args.teacher_num_attention_heads
    if args.teacher_name_or_path:
        overrides["teacher_name_or_path"] = args.teacher_name_or_path
    model, report = convert_maskdistill_checkpoint(read_official_file(args.checkpoint), overrides)
    if args.teacher_checkpoint:
        teacher_file = read_official_file(args.teacher_checkpoint, state_keys=("state_dict", "model"))
        teacher = convert_openai_clip_visual(teacher_file.state, teacher_heads, report)
        save_teacher_folder(teacher, output / TEACHER_SUBFOLDER)
        model.config.teacher_name_or_path = f"./{TEACHER_SUBFOLDER}"
        report.teacher_source = teacher_file
        report.settings = [
            (name, model.config.teacher_name_or_path, f"command line: --teacher_checkpoint converted into {TEACHER_SUBFOLDER}/")
            if name == "teacher_name_or_path" else (name, value, source)
            for name, value, source in report.settings
        ]
    return model, report


CONVERTERS = {"amt": convert_amt, "dbot": convert_dbot, "extrema": convert_extrema, "maskdistill": convert_maskdistill}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.convert", description=__doc__.splitlines()[0])
    parser.add_argument("method", nargs="?", choices=sorted(CONVERTERS))
    parser.add_argument("--list", action="store_true", help="print the official releases and the command for each")
    parser.add_argument("--checkpoint", help="the official file (.pth / .pt / .safetensors) as downloaded")
    parser.add_argument("--output", help="folder to write the Hub-ready hf_mim model into")
    parser.add_argument(
        "--teacher_checkpoint",
        help="dBOT: the matching checkpoint-teacher-*.pth; MaskDistill: an OpenAI CLIP file (state dict or TorchScript .pt)",
    )
    parser.add_argument("--teacher_name_or_path", help="MaskDistill: reference a teacher by Hub id (or folder) instead")
    parser.add_argument("--num_attention_heads", type=int, help="encoder heads, when the file does not name its model")
    parser.add_argument("--decoder_num_attention_heads", type=int, help="MAE decoder heads, when the file does not name its model")
    parser.add_argument("--teacher_num_attention_heads", type=int, help="MaskDistill: CLIP heads when width is no multiple of 64")
    parser.add_argument("--config_overrides", help="comma-separated config values, e.g. mask_ratio=0.9,num_masks=8")
    parser.add_argument("--push_to_hub", action="store_true", help="push the verified folder to --hub_model_id")
    parser.add_argument("--hub_model_id", help="org/name of the Hub repository (also the name in the model card)")
    parser.add_argument("--hub_token", help="Hub token (default: the saved login); never written anywhere")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    return parser


def command_line(argv: list[str]) -> str:
    """The command as run, for the model card, without the token."""
    shown, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--hub_token":
            skip = True
            continue
        if item.startswith("--hub_token="):
            continue
        shown.append(item)
    return "python -m hf_mim.convert " + shlex.join(shown)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        from .zoo import zoo_table

        print(zoo_table())
        return 0
    for flag in ("method", "checkpoint", "output"):
        if not getattr(args, flag):
            parser.error(f"{'the method' if flag == 'method' else '--' + flag} is required (or use --list)")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")

    from ..hub import HubPushError, push_folder_to_hub, save_hub_folder
    from .publish import verify_folder, write_conversion_card

    output = Path(args.output)
    try:
        model, report = CONVERTERS[args.method](args, output)
        save_hub_folder(model, output)
        verified = verify_folder(output, model)
    except (CheckpointFormatError, FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    repo_id = args.hub_model_id or f"{args.method}-{output.resolve().name}"
    write_conversion_card(output, model, repo_id, report, command_line(argv))
    print(report.summary())
    print(verified)
    print(f"wrote {type(model).__name__} to {output}")
    if args.push_to_hub:
        try:
            url = push_folder_to_hub(
                output, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None,
                commit_message=f"Convert {report.source.name if report.source else args.checkpoint} with hf_mim",
            )
        except HubPushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
