"""Pushes during training (--hub_strategy every_save | checkpoint | all_checkpoints) through the real
huggingface_hub client and a Hub endpoint on 127.0.0.1 (tests/hub_stub.py), on the toy loop of
test_loop.py: what each save pushes, a failing upload in the middle, and the resume from a Hub id."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from hub_stub import HubStub, use_local_hub
from safetensors.torch import load_file
from test_loop import ToyLoop, toy_args, train_toy

from hf_mim.hub.training_pushes import TrainingPusher, hub_checkpoint_folder
from hf_mim.training import UserInputError
from hf_mim.training.arguments import add_shared_flags, validate_shared_flags

TOKEN = "hf_PuShDuRiNgTrAiNiNgToKeN0123456789"
REPO = "tester/toy"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with HubStub(tmp_path / "hub") as stub:
        use_local_hub(monkeypatch, stub, tmp_path)
        yield stub


@pytest.fixture
def each_save_waits(monkeypatch):
    """Each save's upload finishes before training goes on, so that every save makes its own commit
    (in a real run a newer save replaces a snapshot still waiting)."""
    save = TrainingPusher.save

    def save_and_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        self._jobs[-1][1].result()

    monkeypatch.setattr(TrainingPusher, "save", save_and_wait)


def pushing_args(output_dir, strategy: str, **changes) -> argparse.Namespace:
    return toy_args(output_dir, push_to_hub=True, hub_model_id=REPO, hub_token=TOKEN, hub_private_repo=False,
                    hub_strategy=strategy, **changes)


def files_of(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_no_token(hub, out, caplog) -> None:
    assert hub.tokens == {TOKEN}  # the client sent it ...
    for folder in (hub.root, out):  # ... and it is in no pushed or written file, and no log line
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_every_save_pushes_the_model_and_the_strategys_checkpoints(strategy, hub, each_save_waits, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    loop, model = train_toy(pushing_args(out, strategy), total_steps=5)  # saves at steps 2 and 4
    assert loop.finish(lambda: None) == 0

    assert [c["summary"] for c in hub.commits] == ["Training in progress, step 2", "Training in progress, step 4"]
    checkpoint_files = sorted(files_of(out / "checkpoint-4"))
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(checkpoint_files)
    expected = {
        "every_save": [[], []],
        "checkpoint": [[f"last-checkpoint/{name}" for name in checkpoint_files]] * 2,
        "all_checkpoints": [[f"checkpoint-{step}/{name}" for name in checkpoint_files] for step in (2, 4)],
    }[strategy]
    for commit, checkpoint in zip(hub.commits, expected):
        assert commit["files"] == sorted(["model.safetensors", "training_args.json", *checkpoint])
    pushed = hub.folder(REPO)
    # the root holds the model of the last save (step 4), and its checkpoint byte for byte
    at_step_4 = load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(load_file(pushed / "model.safetensors")[key], at_step_4[key]) for key in at_step_4)
    local = files_of(out / "checkpoint-4")
    if strategy == "checkpoint":
        assert files_of(pushed / "last-checkpoint") == local
    if strategy == "all_checkpoints":
        assert files_of(pushed / "checkpoint-4") == local and (pushed / "checkpoint-2" / "trainer_state.json").is_file()
    assert not list(out.glob(".hub-push-*"))  # the snapshots are gone
    assert "2 pushes to tester/toy during training (steps 2, 4)" in caplog.text
    assert_no_token(hub, out, caplog)


def test_a_failed_upload_is_one_warning_and_the_next_save_carries_its_files(hub, each_save_waits, tmp_path, caplog):
    """Saves at steps 2, 4 and 6; the push of step 4 fails: training finishes, one warning line, and the
    push of step 6 carries checkpoint-4 with checkpoint-6."""
    caplog.set_level(logging.INFO)
    hub.fail_commits = {2}
    out = tmp_path / "run"
    loop, _ = train_toy(pushing_args(out, "all_checkpoints"), total_steps=6)
    assert loop.global_step == 6
    assert loop.finish(lambda: None) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("hf_mim")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("push of step 4 to tester/toy failed (training goes on; the next save pushes again): ")
    assert "HfHubHTTPError: Server error '507 Insufficient Storage'" in warnings[0]
    assert [c["summary"] for c in hub.commits] == ["Training in progress, step 2", "Training in progress, step 6"]
    assert {f.split("/")[0] for f in hub.commits[1]["files"] if "/" in f} == {"checkpoint-4", "checkpoint-6"}
    for step in (4, 6):
        assert files_of(hub.folder(REPO) / f"checkpoint-{step}") == files_of(out / f"checkpoint-{step}")
    assert "failed at steps 4, carried by the next push" in caplog.text
    assert_no_token(hub, out, caplog)


@pytest.mark.parametrize("fails,status", [({2}, 0), ({2, 3}, 1)], ids=["retried-at-the-end", "failed-twice"])
def test_the_end_waits_retries_a_failed_last_push_and_reports_it(fails, status, hub, each_save_waits, tmp_path, caplog):
    hub.fail_commits = fails
    out = tmp_path / "run"
    loop, _ = train_toy(pushing_args(out, "checkpoint"), total_steps=5)
    final_push = []
    assert loop.finish(lambda: final_push.append(True)) == status
    assert final_push == [True]  # the finished folder is pushed (or tried) whatever happened before
    pushed = hub.folder(REPO) / "last-checkpoint"
    if status == 0:
        assert files_of(pushed) == files_of(out / "checkpoint-4")
    else:
        assert files_of(pushed) == files_of(out / "checkpoint-2")  # what reached the Hub
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert errors == [f"the push of step 4 to {REPO!r} failed and failed again at the end ({errors[0].split('(', 1)[1]}"]
        assert "\n" not in errors[0]
    assert not list(out.glob(".hub-push-*"))


class InterruptedLoop(ToyLoop):
    """Stops (as a killed job) before optimizer step 3."""

    stopped = None

    def before_step(self, step):
        if step == 3:
            InterruptedLoop.stopped = self
            raise KeyboardInterrupt


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_resume_from_the_hub_id_is_bitwise_the_uninterrupted_run(strategy, hub, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    _, uninterrupted = train_toy(toy_args(tmp_path / "full"), total_steps=5)
    import test_loop

    monkeypatch.setattr(test_loop, "ToyLoop", InterruptedLoop)
    with pytest.raises(KeyboardInterrupt):
        train_toy(pushing_args(tmp_path / "interrupted", strategy, checkpoints_total_limit=1), total_steps=5)
    monkeypatch.setattr(test_loop, "ToyLoop", ToyLoop)
    InterruptedLoop.stopped.hub_pusher._worker.shutdown(wait=True)  # as the interpreter does at exit
    assert hub_checkpoint_folder([f for c in hub.commits for f in c["files"]]) == (
        "last-checkpoint" if strategy == "checkpoint" else "checkpoint-2")

    out = tmp_path / "resumed"  # elsewhere, with only the Hub id
    resumed, model = train_toy(toy_args(out, resume_from_checkpoint=REPO, hub_token=TOKEN), total_steps=5)
    assert resumed.global_step == 5 and f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    for ours, theirs in zip(model.parameters(), uninterrupted.parameters()):
        assert torch.equal(ours, theirs)
    assert files_of(out / "checkpoint-2") == files_of(tmp_path / "interrupted" / "checkpoint-2")
    assert not list(out.glob(".tmp-*"))


def test_a_checkpoint_corrupted_on_the_hub_is_refused_before_it_is_used(hub, each_save_waits, tmp_path):
    train_toy(pushing_args(tmp_path / "pushed", "all_checkpoints"), total_steps=2)
    stored = hub.root / REPO / "main" / "checkpoint-2" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1  # same size: only the checksum recorded at save time tells
    stored.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match=r"^--resume_from_checkpoint tester/toy: the downloaded checkpoint-2/ is unusable "
                                            r"\(.*is corrupted: model\.safetensors does not match the sha256"):
        train_toy(toy_args(tmp_path / "out", resume_from_checkpoint=REPO, hub_token=TOKEN), total_steps=3)
    assert not (tmp_path / "out" / "checkpoint-2").exists()

def test_uploads_never_wait_and_a_newer_save_replaces_a_waiting_snapshot(tmp_path, monkeypatch):
    """While the upload of step 2 hangs (a slow network), the saves of steps 4 and 6 return at once; the
    snapshot of step 4, still waiting, is replaced by step 6's, which carries checkpoint-4 too."""
    import threading
    import time

    from hf_mim.hub import training_pushes

    release, uploads = threading.Event(), []

    def slow_push(folder, repo_id, **kwargs):
        release.wait(timeout=30)
        uploads.append((kwargs["commit_message"], sorted(p.name for p in Path(folder).iterdir())))

    monkeypatch.setattr(training_pushes, "push_folder_to_hub", slow_push)
    out = tmp_path / "run"
    checkpoints = []
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        checkpoints.append(out / f"checkpoint-{step}")
    pusher = TrainingPusher(out, REPO, "all_checkpoints", token=TOKEN)
    start = time.perf_counter()
    for index, step in enumerate((2, 4, 6)):
        pusher.save(step, checkpoints[index], checkpoints[: index + 1], lambda folder: (folder / "model.safetensors").write_bytes(b"w"))
        if step == 2:
            while not uploads and not pusher._jobs[0][1].running():
                time.sleep(0.001)
    assert time.perf_counter() - start < 5 and not uploads  # training was not held up
    assert not (out / ".hub-push-4").exists()  # replaced before it was uploaded
    release.set()
    assert pusher.finish() is None
    assert uploads == [("Training in progress, step 2", ["checkpoint-2", "model.safetensors"]),
                       ("Training in progress, step 6", ["checkpoint-4", "checkpoint-6", "model.safetensors"])]
    assert pusher.on_hub == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}


def test_a_hub_id_without_a_checkpoint_is_one_line(hub, tmp_path):
    from hf_mim.hub import push_folder_to_hub

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    push_folder_to_hub(tmp_path / "model", "tester/no-checkpoint")
    with pytest.raises(UserInputError, match=r"^--resume_from_checkpoint tester/no-checkpoint: the Hub repository holds no "
                                            r"last-checkpoint/ or checkpoint-N/ folder with trainer_state.json \(push them with "
                                            r"--hub_strategy checkpoint or all_checkpoints\)$"):
        train_toy(toy_args(tmp_path / "out", resume_from_checkpoint="tester/no-checkpoint"), total_steps=2)


def test_bad_hub_strategy_combinations_are_one_line_errors(capsys):
    def error(*argv):
        parser = argparse.ArgumentParser(prog="run")
        add_shared_flags(parser, {"data": "d", "model": "m", "optim": "o", "run": "r"})
        with pytest.raises(SystemExit):
            validate_shared_flags(parser, parser.parse_args(argv))
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert error("--hub_strategy", "checkpoint") == ("run: error: --hub_strategy checkpoint pushes during training: give "
                                                     "--push_to_hub (and --hub_model_id)")
    assert error("--hub_strategy", "every_save", "--push_to_hub", "--hub_model_id", "a/b") == (
        "run: error: --hub_strategy every_save pushes at every save: give --checkpointing_steps N or epoch")
    assert "invalid choice: 'sometimes'" in error("--hub_strategy", "sometimes")
    parser = argparse.ArgumentParser()
    add_shared_flags(parser, {"data": "d", "model": "m", "optim": "o", "run": "r"})
    assert parser.parse_args([]).hub_strategy == "end"  # today's behaviour: one push, at the end


# ------------------------------------------------------------------------------------------ the scripts

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
SCRIPT_BASE = {
    "run_mim": [],
    "run_image_classification": ["--model_type", "dbot", "--model_size", "tiny"],
    "run_semantic_segmentation": ["--model_type", "dbot", "--model_size", "tiny"],
}


@pytest.mark.parametrize("name", list(SCRIPT_BASE))
def test_every_script_takes_hub_strategy(name, capsys):
    from test_run_safety import load_script

    module = load_script(SCRIPTS / f"{name}.py")
    flags = [*SCRIPT_BASE[name], "--push_to_hub", "--hub_model_id", REPO, "--checkpointing_steps", "2"]
    for strategy in ("every_save", "checkpoint", "all_checkpoints"):
        assert module.parse_args([*flags, "--hub_strategy", strategy]).hub_strategy == strategy
    assert module.parse_args(SCRIPT_BASE[name]).hub_strategy == "end"
    with pytest.raises(SystemExit):
        module.parse_args([*SCRIPT_BASE[name], "--hub_strategy", "checkpoint"])
    assert capsys.readouterr().err.strip().endswith("--hub_strategy checkpoint pushes during training: give --push_to_hub "
                                                    "(and --hub_model_id)")
    if name == "run_image_classification":
        with pytest.raises(SystemExit):
            module.parse_args(["--model_name_or_path", "x", "--do_eval", *flags[4:], "--push_to_hub", "--hub_model_id", REPO,
                               "--hub_strategy", "every_save"])
        assert capsys.readouterr().err.strip().endswith("--do_eval trains nothing: not with --hub_strategy every_save "
                                                        "(the evaluated folder is pushed at the end)")


@pytest.mark.slow  # two tiny run_mim.py runs (~16 s on 2 cores)
def test_run_mim_pushes_checkpoints_and_resumes_from_the_hub_id_bitwise(tmp_path):
    """run_mim.py --hub_strategy all_checkpoints (saves at steps 2 and 4 of 4) pushes the model and each
    checkpoint during training and the finished folder at the end; a run that had pushed only checkpoint-2
    (checkpoint-4 removed from the Hub, as if killed before) resumes from the Hub id elsewhere and ends
    bitwise on the first run's weights. The token is in no pushed file, no written file and no log."""
    import os
    import shutil
    import subprocess
    import sys

    common = ["--model_type", "dbot", "--model_size", "tiny", "--per_device_train_batch_size", "4", "--seed", "3",
              "--downstream_eval", "none", "--max_train_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1"]
    with HubStub(tmp_path / "hub") as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPTS.parent), HF_DATASETS_OFFLINE="1")

        def run_mim(*argv):
            result = subprocess.run([sys.executable, str(SCRIPTS / "run_mim.py"), *common, *argv], env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-4000:]
            assert TOKEN not in result.stdout + result.stderr
            return result

        first = tmp_path / "first"
        log = run_mim("--output_dir", first, "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN,
                      "--hub_strategy", "all_checkpoints").stderr
        assert "2 pushes to tester/toy during training (steps 2, 4)" in log
        summaries = [c["summary"] for c in hub.commits]
        assert summaries[:2] == ["Training in progress, step 2", "Training in progress, step 4"]
        assert summaries[2].startswith("run_mim.py: DbotForMaskedImageModeling")  # the finished folder, at the end
        assert {"config.json", "model.safetensors", "modeling_dbot.py", "training_args.json"} <= set(hub.commits[0]["files"])
        assert files_of(hub.folder(REPO) / "checkpoint-2") == files_of(first / "checkpoint-2")
        shutil.rmtree(hub.folder(REPO) / "checkpoint-4")

        resumed = tmp_path / "resumed"
        log = run_mim("--output_dir", resumed, "--resume_from_checkpoint", REPO, "--hub_token", TOKEN).stderr
        assert f"resumed from {resumed / 'checkpoint-2'} at step 2" in log
        assert hub.tokens == {TOKEN}
    reference, restarted = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert reference.keys() == restarted.keys()
    assert all(torch.equal(reference[key], restarted[key]) for key in reference)
    for folder in (tmp_path / "hub", first, resumed):
        for path in folder.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow  # one tiny run_image_classification.py run (~15 s on 2 cores)
def test_the_native_push_at_the_end_removes_what_pushes_during_training_left_on_main(tmp_path):
    """A classifier pushed during training has its hf_mim form (custom code) on main; the finished run
    puts the native form there, so that main holds no custom code (the hf_mim form is on its branch)."""
    import os
    import subprocess
    import sys

    with HubStub(tmp_path / "hub") as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(SCRIPTS.parent), HF_DATASETS_OFFLINE="1")
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / "run_image_classification.py"), "--model_type", "dbot", "--model_size", "tiny",
             "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--num_warmup_steps", "1", "--validation_split",
             "none", "--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id",
             REPO, "--hub_token", TOKEN, "--hub_strategy", "every_save"], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    during = [c for c in hub.commits if c["summary"].startswith("Training in progress")]
    assert [c["summary"] for c in during] == ["Training in progress, step 1", "Training in progress, step 2"]
    assert "modeling_dbot.py" in during[0]["files"] and all(c["revision"] == "main" for c in during)
    main = hub.folder(REPO)
    assert not list(main.glob("*.py")) and "auto_map" not in (main / "config.json").read_text()
    assert (hub.folder(REPO, "hf_mim") / "modeling_dbot.py").is_file()
    assert "-modeling_dbot.py" in hub.commits[-1]["files"]  # deleted in the native form's commit
