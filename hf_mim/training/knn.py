"""Weighted k-NN evaluation of frozen features, as DINO's `eval_knn.py` (Wu et al. 2018's weighting):

    bank, bank_labels = build_feature_bank(model, train_loader, accelerator)   # every rank: the whole bank
    votes = knn_votes(bank, bank_labels, queries, num_classes, k=20, temperature=0.07)
    results = knn_evaluate(model, train_loader, eval_loader, accelerator, num_classes)   # both in one call

Features are the base model's `pooler_output` (each method's documented representation), L2-normalised,
so the dot product is the cosine similarity. Each query takes its k most similar bank entries; entry i
votes exp(sim_i / T) for its class; votes are summed per class and the classes ranked (top-1, top-5).

Several ranks: each rank extracts the features of its own shard of the training stream, the bank is
gathered so that every rank holds all of it, and each rank classifies its own shard of the validation
stream; the correct counts are summed over ranks. The similarity is computed per query batch and per
`bank_chunk` bank entries with a running top-k, so memory is (queries x bank_chunk), never (N x N).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .metrics import AccuracyMeter

logger = logging.getLogger(__name__)

DEFAULT_K = 20  # DINO's k-NN protocol (it also reports k = 10, 100, 200)
DEFAULT_TEMPERATURE = 0.07
DEFAULT_BANK_CHUNK = 65536


@torch.no_grad()
def knn_votes(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> torch.Tensor:
    """(Q, num_classes) votes: sum over the k nearest bank entries (by dot product) of exp(sim / T),
    per class. `bank` (N, D) and `queries` (Q, D) are expected L2-normalised (cosine similarity);
    k is capped at N. Exact whatever `bank_chunk` is, up to ties at the k-th similarity."""
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (N, D) and (Q, D)")
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels {tuple(bank_labels.shape)} does not match the bank {tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("the k-NN bank is empty")
    if k < 1 or temperature <= 0 or bank_chunk < 1:
        raise ValueError(f"k ({k}) and bank_chunk ({bank_chunk}) must be >= 1, temperature ({temperature}) > 0")
    k = min(k, bank.shape[0])
    queries = queries.to(bank.dtype)
    best_sim = queries.new_empty(queries.shape[0], 0)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk):
        sim = queries @ bank[start : start + bank_chunk].T  # (Q, chunk)
        candidates = torch.cat([best_sim, sim], dim=1)
        top = candidates.topk(min(k, candidates.shape[1]), dim=1)
        kept = best_idx.shape[1]
        new_idx = top.indices - kept + start  # bank positions of the candidates from this chunk
        if kept:
            old_idx = best_idx.gather(1, top.indices.clamp(max=kept - 1))
            new_idx = torch.where(top.indices < kept, old_idx, new_idx)
        best_sim, best_idx = top.values, new_idx
    weights = (best_sim.float() / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    return votes.scatter_add_(1, bank_labels.to(queries.device)[best_idx], weights)


@torch.no_grad()
def extract_features(model, dataloader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised `pooler_output` in float32 (n, D), labels (n,)) of this rank's batches."""
    features, labels = [], []
    with accelerator.autocast():
        for batch in dataloader:
            pooled = model(pixel_values=batch["pixel_values"].to(accelerator.device)).pooler_output
            if pooled is None:
                raise ValueError(f"{type(model).__name__} returns no pooler_output: k-NN needs a pooled feature")
            features.append(F.normalize(pooled.float(), dim=-1))
            labels.append(batch["labels"].to(accelerator.device))
    if not features:
        dim = getattr(model.config, "hidden_size", 0)
        return torch.empty(0, dim, device=accelerator.device), torch.empty(0, dtype=torch.long, device=accelerator.device)
    return torch.cat(features), torch.cat(labels)


def gather_uneven(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (ranks may hold different numbers of rows), in
    rank order, on every rank."""
    if accelerator.num_processes == 1:
        return tensor
    sizes = accelerator.gather(torch.tensor([tensor.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(tensor.contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    rows = max(sizes)
    return torch.cat([gathered[rank * rows : rank * rows + size] for rank, size in enumerate(sizes)])


def build_feature_bank(model, dataloader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training bank (features, labels) on every rank, from each rank's share of the stream
    (a collective: call it on every rank)."""
    features, labels = extract_features(model, dataloader, accelerator)
    return gather_uneven(accelerator, features), gather_uneven(accelerator, labels)


def knn_evaluate(
    model,
    train_dataloader,
    eval_dataloader,
    accelerator,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> dict:
    """Top-1/top-5 (percent) of weighted k-NN over the validation stream, summed over ranks, with the
    bank size and the protocol's settings. `model` is a base model (its `pooler_output` is the
    feature), run in eval mode without gradients; its training flags are restored afterwards."""
    was_training = {name: module.training for name, module in model.named_modules()}
    model.eval()
    try:
        bank, bank_labels = build_feature_bank(model, train_dataloader, accelerator)
        if bank.shape[0] == 0:
            raise ValueError("the k-NN bank is empty: the training stream gave no labelled image")
        meter = AccuracyMeter((1, 5))
        for batch in eval_dataloader:
            with torch.no_grad(), accelerator.autocast():
                queries = model(pixel_values=batch["pixel_values"].to(accelerator.device)).pooler_output
            # the similarities in float32, outside autocast (bf16 would reorder near neighbours)
            votes = knn_votes(bank, bank_labels, F.normalize(queries.float(), dim=-1), num_classes, k, temperature, bank_chunk)
            meter.update(votes, batch["labels"].to(accelerator.device))
    finally:
        for name, module in model.named_modules():
            module.training = was_training[name]
    meter = meter.reduce(accelerator)
    results = meter.compute()
    results.update(eval_examples=meter.total, bank_size=int(bank.shape[0]), k=int(min(k, bank.shape[0])),
                   temperature=float(temperature))
    return results


def add_protocol_flags(parser) -> None:
    """The evaluation-protocol flags of run_image_classification.py: k-NN's and the label fraction."""
    protocols = parser.add_argument_group("evaluation protocols (k-NN, label fractions)")
    protocols.add_argument("--train_fraction", type=float, default=1.0,
                           help="train on a fixed, seeded, class-balanced subset of the labelled training data, "
                           "e.g. 0.01 or 0.1 (semi-supervised protocol); 1: all")
    protocols.add_argument("--knn_k", type=int, default=DEFAULT_K, help="--mode knn: neighbours that vote (DINO: 20)")
    protocols.add_argument("--knn_temperature", type=float, default=DEFAULT_TEMPERATURE,
                           help="--mode knn: a neighbour votes exp(cosine similarity / T) (DINO: 0.07)")


def check_protocol_flags(args, parser) -> None:
    """One-line parser errors for the protocol flags."""
    from ..data.fractions import check_fraction

    try:
        check_fraction(args.train_fraction)
    except ValueError as error:
        parser.error(str(error))
    if args.knn_k < 1 or not args.knn_temperature > 0:
        parser.error(f"--knn_k must be >= 1 and --knn_temperature > 0, got {args.knn_k} and {args.knn_temperature}")
    if args.mode == "knn" and args.validation_split.lower() == "none":
        parser.error("--mode knn evaluates on validation data: not with --validation_split none")


def run_knn(args, data, phase=None) -> int:
    """--mode knn: the frozen base model's features, the training bank gathered over processes, the
    validation accuracy; logged, tracked, written to eval_results.json and the card."""
    import time

    from .classification import build_feature_model, evaluation_dataloader, write_knn_outputs
    from .loop import finish_run, start_run
    from .run_setup import UserInputError, tracker_config

    if data.validation is None:
        raise UserInputError("--mode knn needs validation data: give --validation_dir or a source with a validation split")
    run = start_run(args)
    accelerator = run.accelerator
    model = build_feature_model(args).to(accelerator.device)
    image_size = model.config.image_size
    if phase is not None:
        phase.training_started()  # set-up done: from here errors keep their traceback
    start = time.perf_counter()
    results = knn_evaluate(
        model, evaluation_dataloader(args, data.train, data.image_column, data.label_column, image_size, accelerator),
        evaluation_dataloader(args, *data.validation, image_size, accelerator), accelerator, len(data.id2label),
        k=args.knn_k, temperature=args.knn_temperature,
    )
    elapsed = time.perf_counter() - start
    logger.info("k-NN (k=%d, T=%g) over %d training images: top-1 %.2f%%, top-5 %.2f%% (%d images)", results["k"],
                results["temperature"], results["bank_size"], results["top1"], results["top5"], results["eval_examples"])
    if args.with_tracking:
        accelerator.init_trackers("run_image_classification", config=tracker_config(args))
        accelerator.log({f"eval_knn_{key}": value for key, value in results.items()}, step=0)

    def write() -> None:
        write_knn_outputs(args, model, run.output_dir, results, elapsed, run.world)
        print(f"run_image_classification: mode=knn k={results['k']} bank={results['bank_size']} top1={results['top1']:.2f} "
              f"top5={results['top5']:.2f} time={elapsed:.1f}s output_dir={run.output_dir}", flush=True)

    return finish_run(accelerator, write, logger)


__all__ = [
    "DEFAULT_BANK_CHUNK", "DEFAULT_K", "DEFAULT_TEMPERATURE", "build_feature_bank", "extract_features",
    "add_protocol_flags", "check_protocol_flags", "gather_uneven", "knn_evaluate", "knn_votes", "run_knn",
]
