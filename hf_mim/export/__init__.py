"""`python -m hf_mim.export --model_name_or_path <folder or repo> --output_dir <out> [--push_to_hub --hub_model_id ...]`

Writes the native transformers form (BeitForImageClassification / BeitModel, no custom code) of an
hf_mim classifier or backbone whose computation a native class expresses exactly, checked against
the hf_mim model (largest difference printed, refused above 1e-5); otherwise says why in one line.
Tooling zone: never copied to the Hub.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_mim.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("--model_name_or_path", required=True, help="hf_mim classifier/backbone folder or Hub repo")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id")
    parser.add_argument("--hub_token")
    parser.add_argument("--hub_private_repo", action="store_true")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")

    import hf_mim  # noqa: F401  (registers the hf_mim classes)
    from hf_mim.hub import HubPushError, push_folder_to_hub
    from hf_mim.hub.native import NotExpressible, export_native

    try:
        native, difference = export_native(args.model_name_or_path, args.output_dir, repo_id=args.hub_model_id)
    except NotExpressible as error:
        print(f"not exported: {error}", file=sys.stderr)
        return 2
    print(f"exported {type(native).__name__} to {args.output_dir} (max difference {difference:.3g})")
    if args.push_to_hub:
        try:
            url = push_folder_to_hub(
                args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None,
                commit_message=f"Native {type(native).__name__} export of {args.model_name_or_path} (max difference {difference:.2g})",
            )
        except HubPushError as error:
            print(str(error), file=sys.stderr)
            return 1
        print(f"pushed to {url}")
    return 0

