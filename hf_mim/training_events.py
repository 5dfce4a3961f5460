"""The training-event protocol: what the generic pretraining loop calls on every model.

Model-zone file: copied next to every pretraining checkpoint; imports nothing from hf_mim.
"""

from __future__ import annotations


class MIMTrainingEventsMixin:
    """The training events the one generic loop (`hf_mim.training`, run_mim.py) calls on every
    `...ForMaskedImageModeling`. A method overrides what it needs; every default does nothing, so the
    loop calls each event unconditionally and never asks a model what it has."""

    # True when `start_new_stage` does something: `--num_stages` > 1 is refused otherwise.
    has_training_stages = False
    # Pretraining weight decay: name substrings kept out of it besides every 1-D tensor (norms, biases, layer
    # scale); None: the fine-tuning convention (hf_mim.training.DEFAULT_SKIP_NAMES: tokens, position tables).
    # A method whose official pretraining decays its cls / mask tokens (timm `add_weight_decay` with no skip
    # list, as MAE) sets ().
    pretraining_no_weight_decay: tuple[str, ...] | None = None

    @property
    def uses_attention_maps(self) -> bool:
        """True when masks are drawn from per-example attention maps: the loop then keeps a store of maps
        (saved with every checkpoint), passes it to `mask_generator` and fills it at
        `attention_refresh_steps` with the model's own attention (forward with `attention_scores_only`)."""
        return False

    def mask_generator(self, attention_maps=None):
        """How the data collator masks each example (None: the model masks inside `forward`).
        `attention_maps`: the loop's per-example store, when `uses_attention_maps`."""
        return None

    def start_new_stage(self) -> None:
        """At every stage boundary of a multi-stage run (`has_training_stages`)."""

    def on_train_step_start(self, progress: float) -> None:
        """Before the first forward of every optimizer step, with `progress` = steps done / total steps (e.g.
        ExtreMA's momentum update, which the official code applies inside the forward, before the teacher pass)."""

    def on_train_step_end(self, progress: float) -> None:
        """After every optimizer step, with `progress` = steps done / total steps."""

    def attention_refresh_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> list[int]:
        """Optimizer steps after which the attention maps are refreshed (see `uses_attention_maps`), from the
        run's length and its epoch length in optimizer steps (None: unknown, a stream trained for a step budget)."""
        return []

    def training_logs(self, output) -> dict[str, float]:
        """Extra numbers logged with the loss, read from this step's output."""
        return {}

    def exported_backbones(self) -> dict:
        """{folder name: PreTrainedModel} written beside the trained model at the end of a run (e.g. a
        momentum encoder that is linear-probed instead of the online one)."""
        return {}

