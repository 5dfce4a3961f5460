"""The attention refresh pass of attention-driven masking (AMT), for the generic training loop.

Every refresh the model being trained reads each training image whole (`model.attention_scores`), one
map per image. Each rank passes over its own share of the data; the maps of every rank are then
gathered into every rank's store, because after reshuffling an example may be read by another rank
(as the official code, which all-gathers). Maps are keyed by the stable example id, so neither stream
order, shuffling nor resuming changes which image a map belongs to.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def refresh_attention_maps(model, store, dataloader, accelerator) -> dict[str, float]:
    """Run the model's `attention_scores` over `dataloader` (this rank's examples, whole images), gather
    the maps of every rank and put them into `store` (an `AttentionMapStore`). Collective: call on every
    rank. `model` may be the prepared (DDP / FSDP / DeepSpeed) model: the pass goes through its forward
    (`attention_scores_only=True`), so sharded weights are gathered as in training.
    Returns {"maps": maps in the store, "seconds": wall time}."""
    start = time.perf_counter()
    config = accelerator.unwrap_model(model).config
    ids, maps = [], []
    batches = iter(dataloader)
    while True:
        batch = next(batches, None)
        # ranks hold different numbers of batches; under FSDP / ZeRO-3 every forward is collective, so
        # all ranks step together and a rank that is done runs a throw-away batch until all are done
        if accelerator.num_processes > 1:
            busy = torch.tensor([0 if batch is None else 1], device=accelerator.device)
            if int(accelerator.gather(busy).sum()) == 0:
                break
        elif batch is None:
            break
        if batch is None:
            pixel_values = torch.zeros(1, config.num_channels, config.image_size, config.image_size, device=accelerator.device)
        else:
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
        with accelerator.autocast():
            scores = model(pixel_values=pixel_values, attention_scores_only=True, return_dict=True).attention_map
        if batch is not None:
            ids.append(batch["example_id"].to(torch.int64))
            maps.append(scores.to(torch.float16).cpu())
    grid = config.image_size // config.patch_size
    local_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)
    local_maps = torch.cat(maps) if maps else torch.zeros(0, grid, grid, dtype=torch.float16)
    if accelerator.num_processes > 1:
        # ranks hold different counts: pad to the largest (id -1 = padding; example ids are >= 0)
        padded_ids = accelerator.pad_across_processes(local_ids.to(accelerator.device), dim=0, pad_index=-1)
        padded_maps = accelerator.pad_across_processes(local_maps.to(accelerator.device), dim=0, pad_index=0)
        all_ids = accelerator.gather(padded_ids).cpu()
        all_maps = accelerator.gather(padded_maps).cpu()
        keep = all_ids >= 0
        local_ids, local_maps = all_ids[keep], all_maps[keep]
    store.update(local_ids, local_maps)
    store.num_refreshes += 1
    seconds = time.perf_counter() - start
    return {"maps": float(len(store)), "seconds": seconds}


__all__ = ["refresh_attention_maps"]
