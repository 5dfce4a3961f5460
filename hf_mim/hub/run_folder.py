"""The end of every training script: the run's settings, the model card, the push."""

from __future__ import annotations

import logging
from argparse import Namespace
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import PreTrainedModel

from ..training.checkpoint import write_json_atomic
from ..training.run_setup import public_args
from .card import write_model_card
from .push import push_folder_to_hub

logger = logging.getLogger(__name__)


def finish_run_folder(
    output_dir: Path,
    model: PreTrainedModel,
    args: Namespace,
    run: Mapping[str, object],
    results: Sequence | None = None,
    is_demo: bool = False,
) -> str | None:
    """Write `training_args.json` (without credentials: `public_args`) and the model card into a saved Hub folder, then
    push it when `args.push_to_hub`. `args` carries the scripts' shared Hub flags (hub_model_id,
    hub_token, hub_private_repo, push_to_hub, license, dataset_name, model_name_or_path). Returns the
    pushed URL or None; a failed push raises `HubPushError` with the folder left intact."""
    output_dir = Path(output_dir)
    write_json_atomic(output_dir / "training_args.json", public_args(args))
    repo_id = args.hub_model_id or f"{model.config.model_type}-{output_dir.name}"
    remote_base = args.model_name_or_path if args.model_name_or_path and not Path(args.model_name_or_path).exists() else None
    write_model_card(
        output_dir,
        model,
        repo_id,
        run=run,
        results=results or None,
        datasets=[args.dataset_name] if args.dataset_name else None,
        base_model=remote_base,
        license=args.license,
        is_demo=is_demo,
    )
    logger.info("wrote the Hub-ready folder %s", output_dir)
    if not args.push_to_hub:
        return None
    url = push_folder_to_hub(output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None)
    logger.info("pushed to %s", url)
    return url
