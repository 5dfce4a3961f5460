"""Pushes during training (`--hub_strategy`, with transformers Trainer's meaning) and resuming from them.

- `end`: nothing during training; the finished run folder is pushed at the end (`--push_to_hub`).
- `every_save`: at every checkpoint save, the model as it is then (its `save_pretrained` form and
  `training_args.json`) to the repo's root.
- `checkpoint`: as `every_save`, plus the whole resumable checkpoint in `last-checkpoint/`.
- `all_checkpoints`: as `every_save`, plus every checkpoint in its own `checkpoint-N/`.

Uploads never hold the training up. At a save the main process stages a snapshot in
`<output_dir>/.hub-push-<step>/` (the model written once, the checkpoint's files hard-linked, so that
pruning the checkpoint later leaves the snapshot whole) and one worker thread uploads it as one commit.
A newer save replaces a snapshot still waiting for the worker. A failed upload is one warning line and
nothing else: the next save's snapshot is complete again (the model, the last checkpoint, every
checkpoint not on the Hub yet), so it carries what the failed one missed. `finish` waits for the worker,
retries a failed last snapshot once and names what is not on the Hub.

`--resume_from_checkpoint <hub id>` (`download_checkpoint`) fetches `last-checkpoint/` (or the highest
`checkpoint-N/`) into `<output_dir>/checkpoint-N`, checked against its manifest; the run resumes from it
as from a local checkpoint, bitwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .push import SECRET_PATTERNS, HubPushError, push_folder_to_hub

logger = logging.getLogger(__name__)

HUB_STRATEGIES = ("end", "every_save", "checkpoint", "all_checkpoints")
STAGING_PREFIX = ".hub-push-"
LAST_CHECKPOINT = "last-checkpoint"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# what `--resume_from_checkpoint` takes for a Hub repository: owner/name
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _link_tree(source: Path, target: Path) -> None:
    """`target` as a copy of `source` made of hard links (a copy where the file system has none): the
    checkpoint's files are written once and never changed, and a link outlives the checkpoint's pruning."""
    for folder, _, files in os.walk(source):
        destination = target / Path(folder).relative_to(source)
        destination.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder) / name, destination / name)
            except OSError:
                shutil.copy2(Path(folder) / name, destination / name)


def _one_line(error: BaseException, secrets: Sequence[str]) -> str:
    """The error in one line, without credentials (a HubPushError: its cause, the client's own error)."""
    if isinstance(error, HubPushError) and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(f"{type(error).__name__}: {error}".split())
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


class TrainingPusher:
    """The main process's pushes during training: `save` at every checkpoint, `finish` at the end."""

    def __init__(self, output_dir, repo_id: str, strategy: str, token: str | None = None, private: bool | None = None,
                 secrets: Sequence[str] = ()):
        if strategy not in HUB_STRATEGIES[1:]:
            raise ValueError(f"hub strategy {strategy!r} pushes nothing during training")
        self.output_dir, self.repo_id, self.strategy = Path(output_dir), repo_id, strategy
        self.token, self.private = token, private
        self.secrets = [s for s in (token, *secrets) if s]
        self.on_hub: set[str] = set()  # the checkpoint-N folders already pushed (all_checkpoints)
        self.commits: list[int] = []  # the steps pushed
        self.failures: dict[int, str] = {}  # step: why (a later success does not remove it)
        self._jobs: list[tuple[int, Future, Path, set[str]]] = []  # (step, upload, snapshot, its checkpoint-N)
        self._in_flight: set[str] = set()  # checkpoint-N folders in a snapshot not uploaded yet
        self._lock = threading.Lock()
        self._last_step, self._checkpoints = 0, []
        self._last_failed: tuple[int, Path, set[str]] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_mim-hub-push")
        for leftover in self.output_dir.glob(f"{STAGING_PREFIX}*"):  # an interrupted run's snapshots
            shutil.rmtree(leftover, ignore_errors=True)

    # ---------------------------------------------------------------------------------- main thread
    def save(self, step: int, checkpoint: Path, checkpoints: Sequence[Path], write_model: Callable[[Path], None]) -> None:
        """Stage the snapshot of this save and queue its upload. `checkpoint`: the one just saved;
        `checkpoints`: every complete local checkpoint (for all_checkpoints); `write_model(folder)` writes
        the root's files (the model's loadable form, training_args.json)."""
        self._forget_finished()
        self._last_step, self._checkpoints = step, [Path(folder) for folder in checkpoints]
        for job in self._jobs:  # a snapshot still waiting for the worker: this newer one replaces it
            if job[1].cancel():
                with self._lock:
                    self._in_flight -= job[3]
                shutil.rmtree(job[2], ignore_errors=True)
        self._jobs = [job for job in self._jobs if not job[1].cancelled()]
        staging = self.output_dir / f"{STAGING_PREFIX}{step}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_model(staging)
        names: set[str] = set()
        if self.strategy == "checkpoint":
            _link_tree(Path(checkpoint), staging / LAST_CHECKPOINT)
        elif self.strategy == "all_checkpoints":
            with self._lock:  # on the Hub or on their way there: not again
                names = {folder.name for folder in checkpoints} - self.on_hub - self._in_flight
                self._in_flight |= names
            for folder in checkpoints:
                if folder.name in names:
                    _link_tree(Path(folder), staging / folder.name)
        self._jobs.append((step, self._worker.submit(self._upload, step, staging, names), staging, names))

    def finish(self) -> str | None:
        """Wait for the uploads, retry a failed last snapshot once; None when the last save is on the Hub,
        else why not (one line). Logs what happened during training."""
        for job in self._jobs:
            job[1].result()
        self._worker.shutdown(wait=True)
        problem, pending = None, self._last_failed
        missing = ({folder.name for folder in self._checkpoints if folder.is_dir()} - self.on_hub
                   if self.strategy == "all_checkpoints" else set())
        if pending is None and missing:  # a checkpoint whose push failed while a later one was on its way
            pending = (self._last_step, self.output_dir / f"{STAGING_PREFIX}end", set())
            pending[1].mkdir(parents=True, exist_ok=True)
        if pending is not None:
            step, staging, names = pending
            for folder in self._checkpoints:
                if folder.name in missing - names and folder.is_dir():
                    _link_tree(folder, staging / folder.name)
                    names.add(folder.name)
            logger.info("pushing again what the failed push of step %d missed to %s", step, self.repo_id)
            self._last_failed = None
            self._upload(step, staging, names, retry=True)
            if self._last_failed is not None:
                problem = (f"the push of step {step} to {self.repo_id!r} failed and failed again at the end "
                           f"({self.failures[step]}); its files are in {self.output_dir}")
        for leftover in self.output_dir.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        failed = sorted(self.failures)
        logger.info("--hub_strategy %s: %d pushes to %s during training (steps %s)%s", self.strategy, len(self.commits),
                    self.repo_id, ", ".join(map(str, self.commits)) or "none",
                    f"; failed at steps {', '.join(map(str, failed))}, carried by the next push" if failed and problem is None
                    else "")
        return problem

    def _forget_finished(self) -> None:
        for _, future, staging, _ in self._jobs:
            if future.done() and staging.exists() and (self._last_failed is None or self._last_failed[1] != staging):
                shutil.rmtree(staging, ignore_errors=True)
        self._jobs = [job for job in self._jobs if not job[1].done()]

    # ---------------------------------------------------------------------------------- worker thread
    def _upload(self, step: int, staging: Path, names: set[str], retry: bool = False) -> None:
        """One commit of the snapshot; never raises (a failure is logged on one line and remembered)."""
        try:
            push_folder_to_hub(staging, self.repo_id, token=self.token, private=self.private,
                               commit_message=f"Training in progress, step {step}", ignore_patterns=SECRET_PATTERNS)
        except Exception as error:  # noqa: BLE001 - the training goes on whatever the network does
            with self._lock:
                self._in_flight -= names  # the next save carries them
            self.failures[step] = _one_line(error, self.secrets)
            if self._last_failed is None or self._last_failed[0] <= step:
                self._last_failed = (step, staging, names)
            logger.warning("push of step %d to %s failed%s: %s", step, self.repo_id,
                           "" if retry else " (training goes on; the next save pushes again)", self.failures[step])
            return
        self.commits.append(step)
        with self._lock:
            self.on_hub |= names
            self._in_flight -= names
        if self._last_failed is not None and self._last_failed[0] <= step:
            if self._last_failed[1] != staging:
                shutil.rmtree(self._last_failed[1], ignore_errors=True)
            self._last_failed = None
        shutil.rmtree(staging, ignore_errors=True)


# -------------------------------------------------------------------------------------- resuming


def looks_like_hub_id(value) -> bool:
    """`--resume_from_checkpoint` names a Hub repository: owner/name, and no such local path."""
    return bool(value) and HUB_ID.match(str(value)) is not None and not Path(str(value)).expanduser().exists()


def hub_checkpoint_folder(files: Sequence[str]) -> str | None:
    """The folder of the repo's files to resume from: `last-checkpoint` (checkpoint strategy), else the
    highest `checkpoint-N` (all_checkpoints), each only with its trainer_state.json; None without one."""
    from ..training.checkpoint import TRAINER_STATE_NAME

    folders = {name.rsplit("/", 1)[0] for name in files if name.endswith(f"/{TRAINER_STATE_NAME}") and name.count("/") == 1}
    if LAST_CHECKPOINT in folders:
        return LAST_CHECKPOINT
    numbered = [(int(match.group(1)), folder) for folder in folders if (match := _CHECKPOINT_DIR.match(folder))]
    return max(numbered)[1] if numbered else None


def download_checkpoint(repo_id: str, output_dir, token: str | None = None, revision: str | None = None) -> Path:
    """Fetch the checkpoint pushed to `repo_id` into `output_dir/checkpoint-N` (N: its step) and return it.
    An unreachable repo or one without a checkpoint is a FileNotFoundError naming it (one line)."""
    from huggingface_hub import HfApi, hf_hub_download

    from ..training.checkpoint import TMP_PREFIX, TRAINER_STATE_NAME, _publish, checkpoint_problem

    output_dir = Path(output_dir)
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, no access
        raise FileNotFoundError(f"--resume_from_checkpoint {repo_id}: no such local folder, and the Hub repository could "
                                f"not be listed ({_one_line(error, [token] if token else [])})") from None
    folder = hub_checkpoint_folder(files)
    if folder is None:
        raise FileNotFoundError(f"--resume_from_checkpoint {repo_id}: the Hub repository holds no {LAST_CHECKPOINT}/ or "
                                f"checkpoint-N/ folder with {TRAINER_STATE_NAME} (push them with --hub_strategy checkpoint "
                                "or all_checkpoints)")
    download = output_dir / f"{TMP_PREFIX}hub-{uuid.uuid4().hex[:8]}"
    try:
        for name in sorted(f for f in files if f.startswith(f"{folder}/")):
            hf_hub_download(repo_id, name, revision=revision, token=token, local_dir=download)
        shutil.rmtree(download / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
        fetched = download / folder
        state = json.loads((fetched / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        final = output_dir / f"checkpoint-{int(state['step'])}"
        problem = checkpoint_problem(fetched, verify=True)  # sizes and checksums: a bad transfer is never published
        if problem is not None:
            raise FileNotFoundError(f"--resume_from_checkpoint {repo_id}: the downloaded {folder}/ is unusable ({problem})")
        _publish(fetched, final)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001
        raise FileNotFoundError(f"--resume_from_checkpoint {repo_id}: downloading {folder}/ failed "
                                f"({_one_line(error, [token] if token else [])})") from None
    finally:
        shutil.rmtree(download, ignore_errors=True)
    logger.info("downloaded %s/%s (step %s) to %s", repo_id, folder, state["step"], final)
    return final


__all__ = ["HUB_STRATEGIES", "LAST_CHECKPOINT", "TrainingPusher", "download_checkpoint", "hub_checkpoint_folder",
           "looks_like_hub_id"]
