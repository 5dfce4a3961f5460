"""What a run must never do, tried as a user would: leak a credential, ignore a deliberate change at
resume, mix with another run's checkpoints, crash with a traceback on a typo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from helpers import reset_accelerate_state

from hf_mim.training import NonFiniteInputError, check_finite_loss, public_args, tracker_config

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_MIM = REPO_ROOT / "training_scripts" / "run_mim.py"
RUN_CLS = REPO_ROOT / "training_scripts" / "run_image_classification.py"
TINY = ["--model_type", "dbot", "--model_size", "tiny", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--seed", "3",
        "--downstream_eval", "none"]  # the downstream check (on by default with the embedded data): tests/test_downstream.py
SECRET = "hf_SeCrEtToKeNfOrTeStInG0123456789"
ENV_SECRET = "hf_EnViRoNmEnTtOkEn9876543210abcdef"


def run(script: Path, *args, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def logged_steps(stderr: str, script: str = "run_mim") -> dict[int, dict]:
    """{step: logged values} from the scripts' `<script>: step N {...}` log lines."""
    steps = {}
    for line in stderr.splitlines():
        if f"{script}: step " in line:
            step, values = line.split(f"{script}: step ", 1)[1].split(" ", 1)
            steps[int(step)] = json.loads(values)
    return steps


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ secrets


def test_public_args_drop_and_redact_credentials(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-0123456789")
    args = Namespace(hub_token=SECRET, token="other-secret", wandb_api_key="x" * 10, learning_rate=1e-3,
                     note=f"pushed with {SECRET}", tags=["wandb-key-0123456789", "ok"], hub_model_id="me/model")
    public = public_args(args)
    assert set(public) == {"learning_rate", "note", "tags", "hub_model_id"}
    assert public["note"] == "pushed with <redacted>" and public["tags"] == ["<redacted>", "ok"]
    assert "hub_token" not in tracker_config(args) and tracker_config(args)["learning_rate"] == 1e-3


@pytest.mark.parametrize("script", ["run_mim", "run_image_classification"])
def test_no_credential_in_any_written_file(script, tmp_path):
    """Tracking on, a token on the command line and one in the environment, a checkpoint, a picture, the
    card: no byte of any file in the output folder holds either token. The folder is new and
    `--resume_from_checkpoint latest` finds nothing: the run starts from scratch (the same command line
    serves the first launch and every restart)."""
    out = tmp_path / "out"
    common = ["--max_train_steps", 2, "--checkpointing_steps", 1, "--output_dir", out, "--with_tracking",
              "--hub_token", SECRET, "--token", SECRET, "--resume_from_checkpoint", "latest"]
    if script == "run_mim":
        result = run(RUN_MIM, *TINY, *common, "--picture_steps", 1, env_extra={"HF_TOKEN": ENV_SECRET})
    else:
        result = run(RUN_CLS, "--model_type", "dbot", *TINY[:TINY.index("--downstream_eval")], "--per_device_train_batch_size", 8, *common,
                     "--num_warmup_steps", 1, "--eval_steps", 1, env_extra={"HF_TOKEN": ENV_SECRET})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no checkpoint in" in result.stderr and "starting from scratch" in result.stderr
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "hparams.yml" for path in files) and (out / "training_args.json").is_file()
    for path in files:
        data = path.read_bytes()
        for secret in (SECRET, ENV_SECRET):
            assert secret.encode() not in data, f"{path.relative_to(out)} holds a token"
    assert SECRET not in result.stdout + result.stderr and ENV_SECRET not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.slow  # ~30 s of subprocess runs: in CI's slow phase (keeps the default suite near 10 min)
def test_resume_applies_this_runs_learning_rate_and_length_so_the_nan_advice_holds(tmp_path):
    """A run diverges at step k; resumed from the checkpoint the error names, with a lower learning rate
    and a longer schedule, it trains past k to the new end, logging what changed."""
    out = tmp_path / "diverge"
    first = run(RUN_MIM, *TINY, "--max_train_steps", 8, "--checkpointing_steps", 1, "--learning_rate", "1e30",
                "--num_warmup_steps", 1, "--output_dir", out)
    assert first.returncode == 1
    line = next(line for line in first.stderr.splitlines() if "non-finite training loss" in line)
    failed_at = int(line.split(" at step ", 1)[1].split(".", 1)[0])
    named = Path(line.split("--resume_from_checkpoint ", 1)[1].split(",", 1)[0])
    assert int(named.name.split("-")[1]) < failed_at, "the named checkpoint must predate the failing step"

    second = run(RUN_MIM, *TINY, "--max_train_steps", 10, "--checkpointing_steps", 1, "--learning_rate", "1e-4",
                 "--num_warmup_steps", 1, "--output_dir", out, "--resume_from_checkpoint", named)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "this run changes learning_rate 1e+30 -> 0.0001, total_steps 8 -> 10" in second.stderr
    steps = logged_steps(second.stderr)
    assert max(steps) == 10 and failed_at + 1 in steps
    assert all(values["lr"] <= 1e-4 for values in steps.values())


# ------------------------------------------------------------------------------------- output folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run(RUN_MIM, *TINY, "--max_train_steps", 2, "--checkpointing_steps", 1, "--output_dir", out, "--with_tracking")
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def run_ids(folder: Path) -> dict[str, str]:
    return {path.name: json.loads((path / "trainer_state.json").read_text())["run_id"] for path in sorted(folder.glob("checkpoint-*"))}


def main_exit(script: Path, *argv) -> tuple[int, str]:
    """(exit status, stderr) of the script's `main` run in this process (for runs that stop at setup)."""
    import contextlib
    import io

    reset_accelerate_state()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        load_script(script).main(list(map(str, argv)))
    reset_accelerate_state()
    return exit_info.value.code, err.getvalue()


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = run_ids(out)
    assert len(set(before.values())) == 1 and set(before) == {"checkpoint-1", "checkpoint-2"}

    status, err = main_exit(RUN_MIM, *TINY, "--max_train_steps", 1, "--checkpointing_steps", 1, "--output_dir", out)
    assert status == 2 and "Traceback" not in err
    assert "holds the checkpoints of another run (checkpoint-1, checkpoint-2)" in err
    assert "--overwrite_output_dir" in err
    assert run_ids(out) == before  # nothing pruned, nothing mixed

    # another run's checkpoint, resumed explicitly into this folder, would mix two runs: refused too
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    (other / "checkpoint-1" / "trainer_state.json").write_text(
        json.dumps({**json.loads((other / "checkpoint-1" / "trainer_state.json").read_text()), "run_id": "another"})
    )
    status, err = main_exit(RUN_MIM, *TINY, "--max_train_steps", 3, "--output_dir", out, "--resume_from_checkpoint", other / "checkpoint-1")
    assert status == 2 and "belongs to another run" in err and "Traceback" not in err

    overwritten = run(RUN_MIM, *TINY, "--max_train_steps", 1, "--checkpointing_steps", 1, "--output_dir", out,
                      "--overwrite_output_dir")
    assert overwritten.returncode == 0, overwritten.stderr[-4000:]
    after = run_ids(out)
    assert list(after) == ["checkpoint-1"] and after["checkpoint-1"] != before["checkpoint-1"]
    assert not (out / "runs").exists()  # the old run's tracker logs went with it


def test_latest_resumes_the_folders_own_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = run_ids(out)
    resumed = run(RUN_MIM, *TINY, "--max_train_steps", 3, "--checkpointing_steps", 1, "--output_dir", out,
                  "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "checkpoint-2 at step 2" in resumed.stderr
    assert set(run_ids(out).values()) == set(before.values())  # the resumed run keeps its identity


def test_latest_skips_a_truncated_checkpoint_and_a_named_corrupted_one_is_a_one_line_error(finished_run, tmp_path, caplog,
                                                                                          fresh_accelerate_state):
    from hf_mim.training.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    optimizer_file = out / "checkpoint-2" / "optimizer.bin"
    os.truncate(optimizer_file, optimizer_file.stat().st_size - 1000)  # a copy that stopped early
    with caplog.at_level("INFO"):
        status = load_script(RUN_MIM).main([*TINY, "--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(out),
                                            "--resume_from_checkpoint", "latest"])
    assert status == 0
    assert "resume: skipping checkpoint-2: " in caplog.text and "optimizer.bin has" in caplog.text
    assert "checkpoint-1 at step 1" in caplog.text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # total limit 2
    assert all(verify_checkpoint(out / f"checkpoint-{n}") is None for n in (2, 3))  # checkpoint-2 saved again

    weights = out / "checkpoint-3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, as a bad disk or copy leaves it
    weights.write_bytes(bytes(data))
    status, err = main_exit(RUN_MIM, *TINY, "--max_train_steps", 4, "--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-3")
    lines = [line for line in err.splitlines() if "run_mim.py: error:" in line]
    assert status == 2 and "Traceback" not in err and len(lines) == 1
    assert f"{out / 'checkpoint-3'} is corrupted: model.safetensors does not match the sha256" in lines[0]


def test_a_full_disk_stops_the_run_in_one_line_with_the_previous_checkpoint_intact(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    """The optimizer state of the step-2 checkpoint meets a full disk (simulated: half the file written,
    then ENOSPC, as torch.save hits it): the run stops with one line, checkpoint-1 stays the newest and
    verifies, and no half-written folder is left for `latest` to find."""
    import errno

    from hf_mim.training.checkpoint import list_checkpoints, verify_checkpoint

    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if Path(path).name == "optimizer.bin" and ".tmp-checkpoint-2" in str(path):
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        load_script(RUN_MIM).main([*TINY, "--max_train_steps", "3", "--checkpointing_steps", "1", "--output_dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "run_mim.py: error:" in line]
    assert exit_info.value.code == 1 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert f"saving checkpoint {out / 'checkpoint-2'} failed while writing the state" in lines[0]
    assert "No space left on device" in lines[0] and f"the newest checkpoint is still {out / 'checkpoint-1'}" in lines[0]
    assert list_checkpoints(out) == [out / "checkpoint-1"] and verify_checkpoint(out / "checkpoint-1") is None
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


# ------------------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--logging_steps", "0"], "--logging_steps must be >= 1, got 0"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps must be >= 1, got -1"),
        (["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
        (["--mask_ratio", "1.5"], "--mask_ratio must be in [0, 1), got 1.5"),
        (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
        (["--picture_steps", "0"], "--picture_steps must be >= 1"),
    ],
)
def test_invalid_flag_values_are_one_line_errors(argv, expected, capsys):
    script = load_script(RUN_MIM)
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args([*TINY, "--output_dir", "unused", *argv])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    """A classifier checkpoint and a parquet shard with an image column, a text column and a column of file
    names (strings that look like image paths, of files that do not exist)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from hf_mim import DbotConfig, DbotForImageClassification

    root = tmp_path_factory.mktemp("bad_inputs")
    DbotForImageClassification(DbotConfig.from_preset("tiny", num_labels=3)).save_pretrained(root / "classifier")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(buffer, format="PNG")
    table = pa.table({"image": [{"bytes": buffer.getvalue(), "path": None}] * 8, "text": ["a red square"] * 8,
                      "name": [f"img_{i}.png" for i in range(8)]})
    (root / "parquet").mkdir()
    pq.write_table(table, root / "parquet" / "train-0.parquet")
    return {"classifier": root / "classifier", "parquet": root / "parquet"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model_type", "mae"], "Unknown hf_mim model_type 'mae'"),
        (["--config_overrides", "mask_ratio"], "is not of the form name=value"),
        (["--config_overrides", "no_such_field=1"], "has no field(s) no_such_field"),
        (["--image_size", "30"], "image_size"),
        (["--model_name_or_path", "/nonexistent/dbot"], "--model_name_or_path /nonexistent/dbot: no such file or folder"),
        (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "checkpoint /nonexistent/checkpoint-3 does not exist"),
        (["--train_dir", "/nonexistent/images"], "/nonexistent/images"),
        (["--model_type", "extrema", "--num_stages", "2", "--max_train_steps", "2"], "has no training stages"),
        (["--model_name_or_path", "{classifier}"], "lacks"),
        (["--train_dir", "{parquet}", "--image_column_name", "text"], "--image_column_name 'text': the column has type string"),
        (["--train_dir", "{parquet}", "--image_column_name", "name"], "--image_column_name 'name': the column has type string"),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "--overwrite_output_dir deletes the checkpoints"),
    ],
)
def test_setup_errors_are_one_line(argv, expected, bad_inputs, tmp_path, capsys, fresh_accelerate_state):
    argv = [arg.format(**bad_inputs) for arg in argv]
    script = load_script(RUN_MIM)
    with pytest.raises(SystemExit) as exit_info:
        script.main([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "run_mim.py: error:" in line]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_a_classifier_checkpoint_names_the_missing_pretraining_parts(bad_inputs, tmp_path, capsys, fresh_accelerate_state):
    script = load_script(RUN_MIM)
    with pytest.raises(SystemExit):
        script.main([*TINY, "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"),
                     "--model_name_or_path", str(bad_inputs["classifier"])])
    err = capsys.readouterr().err
    assert "decoder" in err and "--ignore_missing_weights" in err


def test_non_finite_inputs_are_named_as_the_cause():
    pixel_values = torch.zeros(2, 3, 4, 4)
    pixel_values[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="1 NaN/inf values in pixel_values"):
        check_finite_loss(torch.tensor(float("nan")), 5, inputs=pixel_values)
    check_finite_loss(torch.tensor(0.5), 5, inputs=pixel_values)  # a finite loss never looks at the inputs


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model_name_or_path", "/nonexistent/dbot"], "--model_name_or_path /nonexistent/dbot: no such file or folder"),
        (["--model_type", "dbot", "--config_overrides", "drop_path_rate"], "is not of the form name=value"),
        (["--model_type", "dbot", "--eval_steps", "0"], "--eval_steps must be >= 1, got 0"),
        (["--model_type", "dbot", "--mixup_prob", "2"], "--mixup_prob must be in [0, 1], got 2.0"),
        (["--model_type", "dbot", "--train_dir", "{parquet}", "--image_column_name", "text"], "--image_column_name 'text': the column has type string"),
        (["--model_type", "dbot", "--train_dir", "{parquet}"], "no label column"),
    ],
)
def test_fine_tuning_errors_are_one_line(argv, expected, bad_inputs, tmp_path, capsys, fresh_accelerate_state):
    argv = [arg.format(**bad_inputs) for arg in argv]
    script = load_script(RUN_CLS)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model_size", "tiny", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), *argv]
                    if "--model_type" in argv else ["--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]  # argparse names the script by argv[0]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err
