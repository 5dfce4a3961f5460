"""Top-k accuracy and segmentation metrics (confusion matrix: mIoU, pixel accuracy, per-class IoU)
without the Hub (`evaluate.load(...)` needs network access)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), ignore_index: int = -100) -> dict[int, int]:
    """How many rows have their label among the k highest logits, for each k in `ks`.

    `logits` is (..., num_classes) and `labels` the matching (...) class ids; rows labelled
    `ignore_index` are skipped. A k larger than the number of classes counts as num_classes (every
    labelled row is then correct). Ties are broken by `torch.topk`.
    """
    if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    num_classes = logits.shape[-1]
    logits = logits.detach().reshape(-1, num_classes)
    labels = labels.detach().reshape(-1).to(logits.device)
    valid = labels != ignore_index
    logits, labels = logits[valid], labels[valid]
    if labels.numel() == 0 or not ks:
        return {int(k): 0 for k in ks}
    max_k = min(max(ks), num_classes)
    hits = logits.topk(max_k, dim=-1).indices.eq(labels.unsqueeze(-1))
    cumulative = hits.cumsum(dim=-1).clamp_(max=1).sum(dim=0)  # [j] = rows with the label in the top j+1
    return {int(k): int(cumulative[min(k, num_classes) - 1].item()) for k in ks}


class AccuracyMeter:
    """Accumulates top-k correct counts and the number of examples, per process.

    In a multi-process evaluation, `meter.reduce(accelerator)` (on every process) sums the counts over
    processes. Counts are exact when each example is seen by exactly one process (sharded streams, or a
    dataloader prepared with `even_batches=False`); Accelerate's default `even_batches=True` repeats a few
    examples to even out the last batch: then gather with `accelerator.gather_for_metrics((logits,
    labels))` and update one meter with the result instead of reducing.
    It has `state_dict`/`load_state_dict`, so it can be `register_for_checkpointing`-ed.
    """

    def __init__(self, ks: Sequence[int] = (1, 5), ignore_index: int = -100):
        self.ks = tuple(int(k) for k in ks)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.correct: dict[int, int] = {k: 0 for k in self.ks}
        self.total = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        counts = topk_correct(logits, labels, self.ks, self.ignore_index)
        self.update_counts(counts, int((labels != self.ignore_index).sum().item()))

    def update_counts(self, correct: Mapping[int, int], total: int) -> None:
        for k in self.ks:
            self.correct[k] += int(correct[k])
        self.total += int(total)

    def reduce(self, accelerator) -> "AccuracyMeter":
        """A new meter with the counts summed over all processes (a collective: call it everywhere)."""
        local = torch.tensor([self.total, *(self.correct[k] for k in self.ks)], dtype=torch.int64, device=accelerator.device)
        summed = accelerator.reduce(local, reduction="sum").cpu().tolist()
        merged = AccuracyMeter(self.ks, self.ignore_index)
        merged.update_counts(dict(zip(self.ks, summed[1:])), summed[0])
        return merged

    def compute(self) -> dict[str, float]:
        """{"top1": percent, "top5": percent, ...} (ValueError before any example)."""
        if self.total == 0:
            raise ValueError("AccuracyMeter has seen no labelled example")
        return {f"top{k}": 100.0 * self.correct[k] / self.total for k in self.ks}

    def state_dict(self) -> dict:
        return {"ks": list(self.ks), "correct": {str(k): v for k, v in self.correct.items()}, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.ks = tuple(int(k) for k in state["ks"])
        self.correct = {int(k): int(v) for k, v in state["correct"].items()}
        self.total = int(state["total"])

    def __repr__(self) -> str:
        return f"AccuracyMeter(total={self.total}, correct={self.correct})"


class SegmentationMeter:
    """Semantic-segmentation metrics from a confusion matrix (rows: true class, columns: prediction),
    the mmseg / `evaluate`'s mean_iou definitions without the Hub: per-class IoU = TP / (TP + FP + FN),
    mIoU = mean over classes present in the labels or predictions (NaN classes skipped), pixel accuracy
    = TP summed / labelled pixels. Pixels labelled `ignore_index` (padding, "other") are not counted.
    `reduce(accelerator)` sums the matrix over processes (a collective: call it everywhere)."""

    def __init__(self, num_labels: int, ignore_index: int = 255):
        self.num_labels = int(num_labels)
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """`predictions` and `labels`: class ids of the same shape (any), on any device."""
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} do not match")
        labels = labels.detach().reshape(-1).to(torch.int64)
        predictions = predictions.detach().reshape(-1).to(torch.int64).to(labels.device)
        valid = labels != self.ignore_index
        labels, predictions = labels[valid], predictions[valid]
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise ValueError(
                f"label ids must lie in [0, {self.num_labels}) or be {self.ignore_index} (ignored); got "
                f"{labels.min().item()}..{labels.max().item()}: check --reduce_labels and the label set"
            )
        counts = torch.bincount(labels * self.num_labels + predictions.clamp(0, self.num_labels - 1),
                                minlength=self.num_labels ** 2)
        self.confusion += counts.reshape(self.num_labels, self.num_labels).cpu()

    def reduce(self, accelerator) -> "SegmentationMeter":
        merged = SegmentationMeter(self.num_labels, self.ignore_index)
        merged.confusion = accelerator.reduce(self.confusion.to(accelerator.device), reduction="sum").cpu()
        return merged

    def compute(self) -> dict:
        """{"mean_iou", "pixel_accuracy", "mean_accuracy" (percent), "per_class_iou": [percent or None],
        "eval_pixels"}; a class absent from labels and predictions has IoU None and is left out of the means."""
        confusion = self.confusion.to(torch.float64)
        labelled = confusion.sum()
        if labelled == 0:
            raise ValueError("SegmentationMeter has seen no labelled pixel")
        true_positive = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        per_class = [None if u == 0 else 100.0 * float(t / u) for t, u in zip(true_positive, union)]
        present = [value for value in per_class if value is not None]
        in_labels = confusion.sum(1) > 0
        accuracy = true_positive[in_labels] / confusion.sum(1)[in_labels]
        return {
            "mean_iou": sum(present) / len(present),
            "pixel_accuracy": 100.0 * float(true_positive.sum() / labelled),
            "mean_accuracy": 100.0 * float(accuracy.mean()),
            "per_class_iou": per_class,
            "eval_pixels": int(labelled),
        }
