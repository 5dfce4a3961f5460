"""Exact, atomic, resumable training checkpoints on top of Accelerate.

Layout of `output_dir`:

    checkpoint-{step}/          a complete checkpoint: everything `accelerator.save_state` writes
        model.safetensors       (weights, optimizer.bin, scheduler.bin if the scheduler was prepared,
        optimizer.bin           random_states_{rank}.pkl for EVERY rank, dl_state_dict.bin for stateful
        random_states_0.pkl     dataloaders, custom_checkpoint_{i}.pkl for each object passed to
        ...                     `accelerator.register_for_checkpointing`, e.g. an LR schedule or a
        trainer_state.json      per-example store), then trainer_state.json, written LAST
    .tmp-checkpoint-{step}/     a save in progress (or interrupted): never read
    .trash-checkpoint-{step}-*/ a checkpoint being deleted: never read

Atomicity: the state goes into `.tmp-checkpoint-{step}`; once every process has written its part
(barrier), the main process fsyncs every file, writes `trainer_state.json` (temp file + fsync +
`os.replace`), fsyncs the folder, and renames it to `checkpoint-{step}` in one `rename` (then fsyncs
`output_dir`). A folder counts as a checkpoint only if it is named `checkpoint-{N}`, holds a readable
`trainer_state.json`, and every file listed in its `files` manifest exists with the recorded size. A
kill at any moment therefore leaves the previous complete checkpoint as the latest one. Deleting (an
overwritten checkpoint of the same step, or pruning beyond `total_limit`) first renames the folder to
`.trash-...`, so a half-deleted folder is never mistaken for a checkpoint.

Trust: renames are not atomic on every file system, and a copy can truncate or corrupt a file. So
`trainer_state.json` also records every file's sha256 (`sha256`, read back after the fsync, before the
rename), and resuming verifies them (`verify_checkpoint`): `--resume_from_checkpoint latest` takes the
newest checkpoint that verifies, warning about each newer one it skips; a named checkpoint that fails is
an error naming the file. Sizes alone are checked wherever checkpoints are merely listed (pruning,
pushes), since hashing reads every byte. Checkpoints saved before checksums existed load unverified (an
info line says so). A save that fails (disk full, no permission) removes its temporary folder and raises
`CheckpointSaveError` naming the cause and the checkpoint that is still the newest: nothing is published.

Objects registered with `accelerator.register_for_checkpointing(obj)` (anything with
`state_dict()`/`load_state_dict()`) are saved as `custom_checkpoint_{i}.pkl` and restored by
`load_checkpoint`, in registration order: register the same objects in the same order before resuming.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
MANIFEST_NAME = "hf_mim_manifest.json"  # sizes + sha256 of a checkpoint hf_mim did not write itself (Trainer's)
FORMAT_VERSION = 2  # 2: trainer_state.json records `sha256` {file: digest} beside `files` {file: size}
LOW_DISK_SPACE = 16 << 20  # bytes: a failed save with less free space than this blames a full disk
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


class UnusableCheckpointError(FileNotFoundError):
    """A checkpoint that is incomplete, truncated or corrupted (a FileNotFoundError, as callers catch)."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, no permission...): nothing was published, the previous
    checkpoint is intact. The message is one sentence for the user; the run stops."""


# --------------------------------------------------------------------------- atomic files
def _fsync_dir(path: Path) -> None:
    """fsync a directory so a rename/creation inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one:
    a unique temp file in the same folder, fsync, `os.replace`, fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # small numpy arrays / tensors
        return obj.tolist()
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable: {obj!r}")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """`atomic_write_bytes` of `obj` as indented JSON (Paths, numpy/torch scalars and dtypes converted)."""
    return atomic_write_bytes(path, _dumps(obj).encode("utf-8"))


# --------------------------------------------------------------------------- finding checkpoints
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The `trainer_state.json` of checkpoint `path` (FileNotFoundError if it is not complete)."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise FileNotFoundError(problem)
    return json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_problem(path: str | os.PathLike, verify: bool = False) -> str | None:
    """None if `path` is a complete checkpoint, else why not (a sentence naming the path and the file).
    Sizes are always compared with the manifest; `verify=True` also compares every file's sha256 (reads
    every byte)."""
    path = Path(path)
    if not path.exists():
        return f"checkpoint {path} does not exist"
    if not path.is_dir():
        return f"checkpoint {path} is not a folder"
    state_file = path / TRAINER_STATE_NAME
    if not state_file.is_file():
        return (
            f"{path} is not a complete checkpoint: it has no {TRAINER_STATE_NAME} "
            "(written last by save_checkpoint, so the save was interrupted or this is not a checkpoint folder)"
        )
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{path} is not a complete checkpoint: {TRAINER_STATE_NAME} is unreadable ({error})"
    if not isinstance(state, dict):
        return f"{path} is not a complete checkpoint: {TRAINER_STATE_NAME} is not a JSON object"
    return _files_problem(path, state.get("files"), state.get("sha256") if verify else None)


def _files_problem(path: Path, sizes: dict | None, digests: dict | None) -> str | None:
    """Why the files of `path` do not match the recorded `sizes` ({name: bytes}) and `digests` ({name: sha256}),
    or None. Sizes first: a truncated file is found without reading it."""
    for name, size in (sizes or {}).items():
        file = path / name
        if not file.is_file():
            return f"{path} is not a complete checkpoint: {name} is missing"
        if file.stat().st_size != size:
            return f"{path} is not a complete checkpoint: {name} has {file.stat().st_size} bytes, expected {size} (truncated?)"
    for name, expected in (digests or {}).items():
        file = path / name
        if not file.is_file():
            return f"{path} is not a complete checkpoint: {name} is missing"
        actual = _sha256(file)
        if actual != expected:
            return (f"{path} is corrupted: {name} does not match the sha256 recorded when it was saved "
                    f"({actual[:12]}..., expected {expected[:12]}...)")
    return None


def write_manifest(folder: str | os.PathLike) -> Path:
    """For checkpoints written by others (transformers' Trainer): fsync every file of `folder` and record
    their sizes and sha256 in `hf_mim_manifest.json`, written last and atomically (so its presence also
    says the save finished). Returns the manifest's path."""
    folder = Path(folder)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    sizes, digests = _fsync_tree(folder)
    return write_json_atomic(folder / MANIFEST_NAME, {"format_version": FORMAT_VERSION, "files": sizes, "sha256": digests})


def manifest_problem(folder: str | os.PathLike) -> str | None:
    """Why the files of `folder` do not match its `hf_mim_manifest.json` (`write_manifest`), or None (also
    when it has none: the caller decides what a missing manifest means)."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{folder} is not a complete checkpoint: {MANIFEST_NAME} is unreadable ({error})"
    return _files_problem(folder, manifest.get("files"), manifest.get("sha256"))


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """`checkpoint_problem(path, verify=True)`; a checkpoint saved without checksums (older hf_mim) passes
    on its sizes, with an info line."""
    problem = checkpoint_problem(path, verify=True)
    if problem is None and "sha256" not in json.loads((Path(path) / TRAINER_STATE_NAME).read_text(encoding="utf-8")):
        logger.info("%s has no checksums (saved by an older hf_mim): only its file sizes were checked", path)
    return problem


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return checkpoint_problem(path) is None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete `checkpoint-N` folders of `output_dir`, oldest (smallest N) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        step = checkpoint_step(child)
        if step is not None and child.is_dir() and is_complete_checkpoint(child):
            found.append((step, child))
    return [child for _, child in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the largest step in `output_dir`, or None (sizes checked, not hashes)."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def newest_verified_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` folder of `output_dir` with the largest N that `verify_checkpoint` accepts, or
    None; every newer folder that fails is skipped with a warning naming it and why."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    numbered = sorted(((checkpoint_step(c), c) for c in output_dir.iterdir() if checkpoint_step(c) is not None), reverse=True)
    for _, candidate in numbered:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        logger.warning("resume: skipping %s: %s", candidate.name, problem)
    return None


def resolve_resume_path(arg: str | os.PathLike | None, output_dir: str | os.PathLike, missing_ok: bool = False) -> Path | None:
    """Turn `--resume_from_checkpoint` into a complete checkpoint folder.

    `arg` may be "latest" (the newest checkpoint in `output_dir` that verifies: `newest_verified_checkpoint`),
    a checkpoint folder (which must verify), or a folder holding `checkpoint-N` folders (its newest that
    verifies). None/"" gives None. Raises `UnusableCheckpointError` (a FileNotFoundError) naming the path
    and the bad file when nothing usable is there (with `missing_ok=True`, "latest" with no checkpoint
    gives None instead, for auto-resume).
    """
    if arg is None or str(arg) == "":
        return None
    if str(arg).lower() == "latest":
        latest = newest_verified_checkpoint(output_dir)
        if latest is None and not missing_ok:
            raise UnusableCheckpointError(
                f"resume from 'latest': no complete checkpoint (a checkpoint-N folder with {TRAINER_STATE_NAME} "
                f"whose files match their recorded sizes and checksums) in {Path(output_dir)}"
            )
        return latest
    path = Path(arg).expanduser()
    if path.is_dir() and checkpoint_step(path) is None and not (path / TRAINER_STATE_NAME).exists():
        latest = newest_verified_checkpoint(path)
        if latest is not None:
            return latest
        raise UnusableCheckpointError(f"{checkpoint_problem(path)}, and it holds no complete checkpoint-N folder")
    problem = verify_checkpoint(path)
    if problem is None:
        return path
    raise UnusableCheckpointError(problem)


# --------------------------------------------------------------------------- saving
def _is_writer(accelerator) -> bool:
    """The process that publishes checkpoints: the main one, or each node's local main one with
    `ProjectConfiguration(save_on_each_node=True)` (node-local disks)."""
    if getattr(accelerator.project_configuration, "save_on_each_node", False):
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def _agree(accelerator, ok: bool) -> bool:
    """A barrier that also tells every process whether all of them succeeded."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flags = accelerator.gather(torch.tensor([1 if ok else 0], device=accelerator.device))
    return bool(flags.min().item() == 1)


def _fsync_tree(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """fsync every file and folder under `root`; return ({relative path: size}, {relative path: sha256})
    of the files, the digests read back after the fsync."""
    sizes, digests = {}, {}
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            file = Path(folder) / name
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            key = file.relative_to(root).as_posix()
            sizes[key], digests[key] = file.stat().st_size, _sha256(file)
        _fsync_dir(Path(folder))
    return dict(sorted(sizes.items())), dict(sorted(digests.items()))


def _discard(path: Path) -> None:
    """Delete a folder safely: rename it out of the checkpoint namespace first, then remove it."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name.removeprefix(CHECKPOINT_PREFIX)}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(output_dir: Path) -> None:
    """Remove interrupted saves and deletions from earlier runs (only the writer calls this, before
    anyone writes, so no save of this run is in progress)."""
    for child in output_dir.iterdir():
        if child.is_dir() and (child.name.startswith(TMP_PREFIX) or child.name.startswith(TRASH_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically make `tmp` visible as `final` (an existing `final` is moved aside, then deleted)."""
    aside = None
    if final.exists():
        aside = final.parent / f"{TRASH_PREFIX}{final.name.removeprefix(CHECKPOINT_PREFIX)}-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:  # the replaced checkpoint comes back
            os.rename(aside, final)
        raise
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None, keep: Path | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain (`keep` is never
    deleted). Returns the deleted paths. `total_limit` None or <= 0 keeps everything."""
    if not total_limit or total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    keep_resolved = Path(keep).resolve() if keep is not None else None
    others = [c for c in checkpoints if c.resolve() != keep_resolved]
    excess = len(checkpoints) - total_limit  # `keep`, if it is a checkpoint, counts but is never deleted
    deleted = []
    for checkpoint in others[: max(0, excess)]:
        _discard(checkpoint)
        deleted.append(checkpoint)
    return deleted


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict | None = None,
    total_limit: int | None = None,
    *,
    epoch: int | None = None,
    batches_in_epoch: int | None = None,
    stage: int | None = None,
    **save_state_kwargs,
) -> Path:
    """Save the full training state as `output_dir/checkpoint-{step}`, atomically. Call on EVERY process.

    `trainer_state.json` holds `step`, `epoch`, `batches_in_epoch` (batches consumed in the current
    epoch), `stage` (taken from the keyword arguments, else from `trainer_state`'s keys of the same name,
    else null), every key of `trainer_state` (must be JSON-serializable; checked before anything is
    written), `format_version`, `saved_at` (unix time), `num_processes`, `files` (the manifest
    {relative path: size} used to validate the folder) and `sha256` ({relative path: digest}, verified on
    resume). Older checkpoints beyond `total_limit` are deleted afterwards. Extra keyword arguments go to
    `accelerator.save_state` (e.g. `safe_serialization`). Returns the checkpoint folder. A save that
    fails (any exception but an interrupt: disk full, permission) raises `CheckpointSaveError` on every
    process, after removing the temporary folder; the previous checkpoints stay as they were.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint names checkpoints itself: create the Accelerator without "
            "ProjectConfiguration(automatic_checkpoint_naming=True)"
        )
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    extra = dict(trainer_state or {})
    document = {
        "step": step,
        "epoch": epoch if epoch is not None else extra.pop("epoch", None),
        "batches_in_epoch": batches_in_epoch if batches_in_epoch is not None else extra.pop("batches_in_epoch", None),
        "stage": stage if stage is not None else extra.pop("stage", None),
    }
    for key in ("epoch", "batches_in_epoch", "stage"):
        extra.pop(key, None)
    document.update(extra)
    document.update(format_version=FORMAT_VERSION, num_processes=accelerator.num_processes)
    _dumps(document)  # fail now, on every process, if the state is not JSON-serializable

    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    writer = _is_writer(accelerator)

    error: BaseException | None = None
    try:
        if writer:
            output_dir.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(output_dir)
    except Exception as exc:  # noqa: BLE001 - reported on every process below
        error = exc
    if not _agree(accelerator, error is None):
        _failed_save(accelerator, writer, tmp, final, error, "while preparing its folder")

    try:
        accelerator.save_state(str(tmp), **save_state_kwargs)
    except Exception as exc:  # noqa: BLE001
        error = exc
    if not _agree(accelerator, error is None):
        _failed_save(accelerator, writer, tmp, final, error, "while writing the state")

    try:
        if writer:
            document["files"], document["sha256"] = _fsync_tree(tmp)
            document["saved_at"] = time.time()
            write_json_atomic(tmp / TRAINER_STATE_NAME, document)
            _fsync_dir(tmp)
            _publish(tmp, final)
    except Exception as exc:  # noqa: BLE001
        error = exc
    if not _agree(accelerator, error is None):
        _failed_save(accelerator, writer, tmp, final, error, "while publishing it")
    if writer:
        try:  # only once the new checkpoint is published; failing to delete an old one does not stop the run
            prune_checkpoints(output_dir, total_limit, keep=final)
        except OSError as exc:
            logger.warning("could not delete checkpoints beyond --checkpoints_total_limit: %s", exc)
    return final


def _failed_save(accelerator, writer: bool, tmp: Path, final: Path, error: BaseException | None, when: str):
    """Remove the half-written `tmp` (it holds disk space and is never read) and raise a `CheckpointSaveError`
    naming the cause and the newest checkpoint that is still there. Any exception counts: torch.save reports
    a full disk as a RuntimeError ("file write failed"), safetensors as its own error type
    (HF_MIM_TRACEBACK=1 shows the original traceback)."""
    try:
        free = shutil.disk_usage(final.parent).free  # before the half-written folder frees its space
    except OSError:
        free = None
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        cause = "it failed on another process"
    else:
        cause = " ".join(str(error).split()) or type(error).__name__
        if len(cause) > 300:
            cause = cause[:300] + "..."
        if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause += " (no permission to write there)"
        elif getattr(error, "errno", None) == errno.ENOSPC or "no space left" in cause.lower():
            cause += " (the disk is full)"
        elif free is not None and free < LOW_DISK_SPACE:  # torch.save says "unexpected pos ..."
            cause += f" (the disk is full: {free} bytes were free)"
    previous = find_latest_checkpoint(final.parent)
    kept = f"the newest checkpoint is still {previous}" if previous is not None else "no checkpoint was saved before"
    raise CheckpointSaveError(
        f"saving checkpoint {final} failed {when}: {cause}; nothing was published and {kept} "
        "(fix the cause, then continue with --resume_from_checkpoint latest)"
    ) from error


def load_checkpoint(accelerator, path: str | os.PathLike, **load_state_kwargs) -> dict:
    """Restore everything `save_checkpoint` saved (models, optimizers, prepared schedulers, dataloader
    states, objects registered for checkpointing, every rank's RNG states) with
    `accelerator.load_state`, and return the checkpoint's `trainer_state.json`. Call on EVERY process,
    after `accelerator.prepare` and `register_for_checkpointing`."""
    path = Path(path)
    state = read_trainer_state(path)
    saved_world = state.get("num_processes")
    if saved_world is not None and saved_world != accelerator.num_processes:
        logger.warning(
            "%s was saved by %d processes and is loaded by %d: RNG and data positions will not resume exactly",
            path, saved_world, accelerator.num_processes,
        )
    accelerator.load_state(str(path), **load_state_kwargs)
    return state


__all__ = [
    "TRAINER_STATE_NAME",
    "atomic_write_bytes",
    "write_json_atomic",
    "checkpoint_step",
    "checkpoint_problem",
    "verify_checkpoint",
    "newest_verified_checkpoint",
    "write_manifest",
    "manifest_problem",
    "UnusableCheckpointError",
    "CheckpointSaveError",
    "is_complete_checkpoint",
    "list_checkpoints",
    "find_latest_checkpoint",
    "resolve_resume_path",
    "read_trainer_state",
    "prune_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
]
