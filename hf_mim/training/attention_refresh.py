"""AMT's per-example attention-map store and its refresh pass, for the generic training loop (tooling
zone: training state stays out of the Hub-copied model files; the mask generator in masking_attention.py only
reads the store).

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

from ..data import batch_to_device

logger = logging.getLogger(__name__)


class AttentionMapStore:
    """One attention map per training example, keyed by its stable example id (not a stream position).

    Held as two tensors (sorted int64 ids, float16 maps) so ImageNet-1K at 14x14 costs ~0.5 GB and a
    lookup is a binary search. `state_dict` / `load_state_dict` make it part of a training checkpoint
    (register it with `accelerator.register_for_checkpointing`).
    """

    def __init__(self) -> None:
        self.example_ids = torch.zeros(0, dtype=torch.int64)
        self.maps = torch.zeros(0, 1, 1, dtype=torch.float16)
        self.num_refreshes = 0

    def __len__(self) -> int:
        return int(self.example_ids.numel())

    def update(self, example_ids: torch.Tensor, maps: torch.Tensor) -> None:
        """Insert or replace maps (K, rows, cols) for `example_ids` (K,); the newest map of an id wins."""
        example_ids = example_ids.detach().to("cpu", torch.int64).reshape(-1)
        maps = maps.detach().to("cpu", torch.float16)
        if maps.shape[0] != example_ids.shape[0]:
            raise ValueError(f"{example_ids.shape[0]} example ids but {maps.shape[0]} maps")
        if len(self) and maps.shape[1:] != self.maps.shape[1:]:
            raise ValueError(f"maps of shape {tuple(maps.shape[1:])} differ from the stored {tuple(self.maps.shape[1:])}")
        ids = torch.cat([self.example_ids, example_ids]) if len(self) else example_ids
        all_maps = torch.cat([self.maps, maps]) if len(self) else maps
        # keep the LAST occurrence of every id: stable sort, then take each run's final element
        order = torch.sort(ids, stable=True).indices
        sorted_ids = ids[order]
        last = torch.ones_like(sorted_ids, dtype=torch.bool)
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        self.example_ids = sorted_ids[last].contiguous()
        self.maps = all_maps[order[last]].contiguous()

    def get(self, example_id: int) -> torch.Tensor | None:
        """The float32 map of one example, or None if it has none yet."""
        if not len(self):
            return None
        index = int(torch.searchsorted(self.example_ids, torch.tensor([int(example_id)])).item())
        if index < len(self) and int(self.example_ids[index]) == int(example_id):
            return self.maps[index].float()
        return None

    def state_dict(self) -> dict:
        return {"example_ids": self.example_ids, "maps": self.maps, "num_refreshes": self.num_refreshes}

    def load_state_dict(self, state: dict) -> None:
        self.example_ids = state["example_ids"].to(torch.int64)
        self.maps = state["maps"].to(torch.float16)
        self.num_refreshes = int(state["num_refreshes"])


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
            pixel_values = batch_to_device({"pixel_values": batch["pixel_values"]}, accelerator.device,
                                           getattr(dataloader, "collate_fn", None))["pixel_values"]
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


__all__ = ["AttentionMapStore", "refresh_attention_maps"]
