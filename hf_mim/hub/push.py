"""Send a Hub-ready folder to the Hub: create_repo + upload_folder, never checkpoints or secrets."""

from __future__ import annotations

from pathlib import Path

# secrets and VCS data: never uploaded, whatever is pushed
SECRET_PATTERNS = [
    "**/.git/**",
    "token",
    "**/token",
    "*.token",
    "**/*.token",
    ".env",
    "**/.env",
]

HUB_IGNORE_PATTERNS = [
    # resumable training state: checkpoints, half-written checkpoints, optimizer/scheduler/RNG states
    # (pushed only on purpose, by --hub_strategy checkpoint / all_checkpoints: hf_mim.hub.training_pushes)
    "checkpoint-*",
    "checkpoint-*/**",
    "last-checkpoint/**",
    ".tmp-*",
    ".tmp-*/**",
    ".trash-*/**",
    ".hub-push-*/**",  # snapshots of pushes during training
    "optimizer*.bin",
    "**/optimizer*.bin",
    "optimizer*.pt",
    "**/optimizer*.pt",
    "scheduler*.bin",
    "**/scheduler*.bin",
    "random_states*",
    "**/random_states*",
    "*.pth",
    "**/*.pth",
    # tensorboard logs in runs/ are uploaded: the Hub shows them as training metrics
    *SECRET_PATTERNS,
    # the native form inside a run folder goes to the main branch on its own (hf_mim.training.run_folder.NATIVE_DIR)
    "native/**",
]


class HubPushError(RuntimeError):
    """Uploading to the Hub failed; the message says which step and why."""


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload hf_mim model",
    api=None,
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
    delete_patterns: list[str] | None = None,
) -> str:
    """Create (or reuse) `repo_id` and upload `folder` without checkpoints, optimizer states or tokens,
    to `revision` (a branch, created when missing; default: main). `ignore_patterns` replaces
    `HUB_IGNORE_PATTERNS` for a folder staged on purpose (a checkpoint push still leaves `SECRET_PATTERNS` out);
    `delete_patterns`: files of the repo to delete in the same commit (those the folder holds are kept).

    Returns the commit URL. Offline mode, no network and authentication errors become a
    `HubPushError` naming the repository and the failing step; the folder stays on disk.
    """
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    folder = Path(folder)
    try:
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    except Exception as error:  # OfflineModeIsEnabled, httpx ConnectError (not an OSError), HTTP errors
        raise HubPushError(
            f"could not create or access the Hub repository {repo_id!r}: {type(error).__name__}: {error}. "
            f"The model folder is intact at {folder}; push it later with `huggingface-cli upload {repo_id} {folder}`."
        ) from error
    try:
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=HUB_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns,
            **({"revision": revision} if revision else {}),
            **({"delete_patterns": delete_patterns} if delete_patterns else {}),
        )
    except Exception as error:
        raise HubPushError(
            f"uploading {folder} to {repo_id!r} failed: {type(error).__name__}: {error}. The folder is intact."
        ) from error
    return str(getattr(info, "commit_url", info))
