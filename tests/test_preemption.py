"""Preemption (hf_mim/training/preemption.py): a signal stops the run after the current optimizer step with a
checkpoint of it and exit status 75; `--resume_from_checkpoint latest` then ends bitwise as the uninterrupted run.

In-process tests on the toy loop of test_loop.py send the signal from inside a step, an evaluation or a save;
the slow ones send it to run_mim.py subprocesses at random moments (one process, DataLoader workers and the
whole process group signalled, two gloo ranks with one signalled)."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_mim.training import read_trainer_state
from hf_mim.training.loop import run_script
from hf_mim.training.preemption import HANDLER, PREEMPTED_EXIT_STATUS, Preempted, parse_signals
from test_loop import ToyCollator, ToyLoop, ToyStream, toy_args, toy_batches
from test_run_mim import SCRIPT, TINY

TOTAL = 5


class SignallingLoop(ToyLoop):
    """The toy loop, sending itself `signum` at step `at` from `where`: "step" (in `after_step`, the step's
    own work), "evaluation" (inside an evaluation that goes on afterwards) or "save" (inside the checkpoint
    save, from a registered object's state_dict)."""

    signal_at, where, signum = None, "step", signal.SIGTERM

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluations, self.signalled = [], False
        self.probe = SaveProbe(self)

    def checkpointed_objects(self):
        return [self.probe]

    def send(self):
        if not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), self.signum)

    def after_step(self, step, output):
        if step == self.signal_at and self.where == "step":
            self.send()
        if step == self.signal_at and self.where == "evaluation":
            self.send()
            time.sleep(0.05)  # the evaluation goes on after the signal, and ends
            self.evaluations.append(step)


class SaveProbe:
    def __init__(self, loop):
        self.loop = loop

    def state_dict(self):
        if self.loop.global_step == self.loop.signal_at and self.loop.where == "save":
            self.loop.send()
        return {"step": self.loop.global_step}

    def load_state_dict(self, state):
        pass


def toy_run(args, total_steps=TOTAL, signal_at=None, where="step", signum=signal.SIGTERM):
    """run_script over the toy loop: (exit status, the loop)."""
    from hf_mim.training import RunHyperparameters, StagedSchedule, build_adamw, start_run

    made = {}

    def train(args, phase=None):
        run = start_run(args)
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        optimizer = build_adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=0.1)
        schedule = StagedSchedule(optimizer, base_lr=0.1, steps_per_stage=[total_steps], warmup_steps=1)
        hyperparameters = RunHyperparameters.from_args(args, 0.1, total_steps, lr_scheduler_type="cosine")
        loop = SignallingLoop(args, run, model, optimizer, schedule, hyperparameters, (toy_batches(), ToyStream(), ToyCollator()))
        loop.signal_at, loop.where, loop.signum = signal_at, where, signum
        made["loop"] = loop
        loop.prepare()
        loop.train(phase)
        return loop.finish(lambda: None)

    return run_script("toy", train, args), made["loop"]


@pytest.mark.parametrize("where, signum", [("step", signal.SIGTERM), ("evaluation", signal.SIGUSR1), ("save", signal.SIGTERM)])
def test_a_signal_stops_after_the_step_with_its_checkpoint_and_resume_is_exact(where, signum, tmp_path, caplog):
    """Signalled at step 2 (checkpoints every 2 steps: during a save the save of step 2 itself is the one
    kept, not written twice): status 75 after step 2, the evaluation under way finished, and resuming
    with `latest` ends bitwise as the uninterrupted 5 steps."""
    status, full = toy_run(toy_args(tmp_path / "full"))
    assert status == 0 and full.global_step == TOTAL
    out = tmp_path / "preempted"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status, stopped = toy_run(toy_args(out), signal_at=2, where=where, signum=signum)
    assert status == PREEMPTED_EXIT_STATUS == 75
    assert stopped.global_step == 2 and (where != "evaluation" or stopped.evaluations == [2])
    name = signal.Signals(signum).name
    line = re.search(rf"preempted at step 2 by {name}, checkpoint (\S+), (\d+\.\d) s from signal to exit", caplog.text)
    assert line and line.group(1) == str(out / "checkpoint-2"), caplog.text
    assert float(line.group(2)) < 5
    assert read_trainer_state(out / "checkpoint-2")["global_step"] == 2
    assert caplog.text.count("Saving current state to") == 1  # step 2's periodic save is the preemption's checkpoint
    assert signal.getsignal(signum) is signal.SIG_DFL  # the run gave the handler back

    status, resumed = toy_run(toy_args(out, resume_from_checkpoint="latest"))
    assert status == 0 and resumed.global_step == TOTAL
    for ours, theirs in zip(resumed.unwrapped.parameters(), full.unwrapped.parameters()):
        assert torch.equal(ours, theirs)


def test_a_signal_in_the_last_step_checkpoints_it_and_a_resume_only_finishes(tmp_path, caplog):
    out = tmp_path / "run"
    status, _ = toy_run(toy_args(out, checkpointing_steps=None), signal_at=TOTAL)
    assert status == 75 and (out / f"checkpoint-{TOTAL}").is_dir()
    with caplog.at_level(logging.INFO):
        status, resumed = toy_run(toy_args(out, checkpointing_steps=None, resume_from_checkpoint="latest"))
    assert status == 0 and resumed.global_step == TOTAL and f"resumed from {out / f'checkpoint-{TOTAL}'}" in caplog.text


def test_a_signal_during_the_finishing_work_stops_its_nested_training_and_checkpoints_the_last_step(tmp_path, caplog):
    """As run_mim's downstream check: after the last step, a loop trained inside `loop.finishing()` (on a
    lent run, no checkpoints of its own) is signalled at its step 1; it stops there, and the run's own loop
    checkpoints its last step (not saved periodically) and exits with status 75."""
    from hf_mim.training import RunHyperparameters, StagedSchedule, build_adamw, start_run
    from hf_mim.training.loop import RunStart

    made = {}

    def train(args, phase=None):
        run = start_run(args)

        def loop_on(run, args, signal_at):
            torch.manual_seed(1)
            model = torch.nn.Linear(3, 1)
            optimizer = build_adamw([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=0.1)
            schedule = StagedSchedule(optimizer, base_lr=0.1, steps_per_stage=[TOTAL], warmup_steps=1)
            loop = SignallingLoop(args, run, model, optimizer, schedule, RunHyperparameters.from_args(args, 0.1, TOTAL, "cosine"),
                                  (toy_batches(), ToyStream(), ToyCollator()))
            loop.signal_at = signal_at
            loop.prepare()
            return loop

        made["outer"] = outer = loop_on(run, args, None)
        outer.train(phase)
        with outer.finishing():
            lent = RunStart(run.accelerator, run.output_dir / "downstream", None, run.run_id, None)
            made["nested"] = nested = loop_on(lent, toy_args(lent.output_dir, checkpointing_steps=None), 1)
            nested.train()
            raise AssertionError("the nested loop went on")
        return 0

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        status = run_script("toy", train, toy_args(out, checkpointing_steps=None))
    assert status == 75 and made["nested"].global_step == 1
    assert f"preempted at step {TOTAL} by SIGTERM, checkpoint {out / f'checkpoint-{TOTAL}'}" in caplog.text
    assert read_trainer_state(out / f"checkpoint-{TOTAL}")["global_step"] == TOTAL
    assert not (out / "downstream").exists()


def test_before_training_a_signal_ends_the_run_at_once_with_the_same_status(tmp_path, caplog):
    """No loop trains yet (set-up, evaluation-only runs): nothing to save, the handler raises at once."""

    def setup_only(args, phase=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal did not stop the run")

    with caplog.at_level(logging.INFO):
        assert run_script("toy", setup_only, toy_args(tmp_path / "run")) == 75
    assert "preempted before training by SIGTERM, nothing new to save" in caplog.text


def test_preemption_signals_none_keeps_the_default_action_and_names_are_checked(tmp_path):
    assert parse_signals("none") == () and parse_signals("sigterm, USR1") == (signal.SIGTERM, signal.SIGUSR1)
    with pytest.raises(ValueError, match=r"^--preemption_signals TERM,KILL: KILL is not one of TERM, USR1"):
        parse_signals("TERM,KILL")
    from hf_mim.training.classification_run import parse_classification_args

    with pytest.raises(SystemExit) as stop:  # every script's parser: one line naming the flag
        parse_classification_args(["--model_type", "dbot", "--model_size", "tiny", "--preemption_signals", "KILL"])
    assert stop.value.code == 2
    seen = {}

    def train(args, phase=None):
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        return 0

    assert run_script("toy", train, toy_args(tmp_path / "a", preemption_signals="none")) == 0
    assert seen["handler"] is signal.SIG_DFL
    assert run_script("toy", train, toy_args(tmp_path / "b")) == 0
    assert seen["handler"] is HANDLER and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_dataloader_workers_ignore_the_signals_the_training_process_handles(tmp_path):
    """A worker sent SIGTERM (as by a signal to the whole process group) keeps delivering batches while the
    run's handler is installed; torch would otherwise fail the next batch ("worker killed by signal")."""
    from hf_mim.data import embedded_pretraining_dir, load_image_stream, make_dataloader, prepare_stream

    raw, column, _ = load_image_stream(train_dir=embedded_pretraining_dir())
    stream = prepare_stream(raw, column, seed=0, buffer_size=0, rank=0, world_size=1)
    HANDLER.install(parse_signals("TERM"))
    try:
        loader = make_dataloader(stream, lambda examples: len(examples), batch_size=2, num_workers=1, drop_last=False)
        batches = iter(loader)
        first = next(batches)
        (worker,) = batches._workers
        os.kill(worker.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert worker.is_alive()
        assert first + sum(batches) == 22  # every embedded photo delivered
    finally:
        HANDLER.uninstall()


# ------------------------------------------------------------------------------- run_mim.py subprocesses


def start_script(script, *args, env_extra=None, launcher=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    command = [*(launcher or [sys.executable]), str(script), *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def finish_script(script, *args) -> subprocess.CompletedProcess:
    process = start_script(script, *args)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-5000:]
    return subprocess.CompletedProcess(process.args, 0, stdout, stderr)


SENT_AT = {}  # when signal_when last sent its signal (time.time())


def signal_when(process, pattern: str, send, delay: float) -> tuple[str, str]:
    """Read the run's log until `pattern` appears, wait `delay` s, `send()`; return (stdout, stderr) once the
    process has exited; SENT_AT["exit"]: seconds from the signal to the exit seen from outside."""
    lines, sent = [], threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if not sent.is_set() and re.search(pattern, line):
                sent.set()
                time.sleep(delay)
                SENT_AT["sent"] = time.time()
                send()

    reader = threading.Thread(target=read)
    reader.start()
    stdout = process.stdout.read()
    process.wait(timeout=600)
    SENT_AT["exit"] = time.time() - SENT_AT.get("sent", math.nan)
    reader.join()
    return stdout, "".join(lines)


def assert_same_weights(a, b):
    reference, other = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert reference.keys() == other.keys()
    for key in reference:
        assert torch.equal(reference[key], other[key]), key


def preempt_and_resume(tmp_path, common, rng, *, group=False, steps=8, script=SCRIPT, logger="run_mim", signum=signal.SIGTERM):
    """One uninterrupted run; one signalled (after a random logged step and a random delay, the process or
    its whole group) and resumed with `latest` until it ends; the weights compared bitwise."""
    full = tmp_path / "full"
    finish_script(script, *common, "--output_dir", full)
    out = tmp_path / "preempted"
    after, delay = rng.randint(1, steps - 4), rng.uniform(0.0, 0.3)  # well before the end
    process = start_script(script, *common, "--output_dir", out, "--resume_from_checkpoint", "latest")
    send = (lambda: os.killpg(process.pid, signum)) if group else (lambda: process.send_signal(signum))
    _, log = signal_when(process, rf"{logger}: step {after} ", send, delay)
    context = f"signalled after step {after} + {delay:.2f} s:\n{log[-4000:]}"
    assert process.returncode == PREEMPTED_EXIT_STATUS, context
    name = signal.Signals(signum).name
    stopped = re.search(rf"preempted at step (\d+) by {name}, checkpoint (\S+), (\d+\.\d) s from signal to exit", log)
    assert stopped, context
    step, seconds = int(stopped.group(1)), float(stopped.group(3))
    assert after <= step <= steps and stopped.group(2) == str(out / f"checkpoint-{step}"), context
    assert "Traceback" not in log and "killed by signal" not in log, context
    print(f"{Path(script).name}: {name} after step {after} + {delay:.2f} s: stopped at step {step}, {seconds} s from signal to exit "
          f"(logged), {SENT_AT['exit']:.2f} s to the process's end")
    resumed = finish_script(script, *common, "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / f'checkpoint-{step}'}" in resumed.stderr
    assert_same_weights(full, out)
    return step, seconds


@pytest.mark.slow  # ~40 s: three tiny runs
def test_run_mim_signalled_at_a_random_moment_resumes_bitwise(tmp_path):
    """Validation loss evaluated at every step and checkpoints every 3 steps: the signal lands in a step, an
    evaluation or a save."""
    seed = int(os.environ.get("PREEMPTION_SEED", random.randrange(10**6)))
    print(f"PREEMPTION_SEED={seed}")
    common = [*TINY, "--max_train_steps", 8, "--checkpointing_steps", 3, "--train_val_split", 0.2, "--eval_steps", 1,
              "--config_overrides", "drop_path_rate=0.1"]
    preempt_and_resume(tmp_path, common, random.Random(seed))


@pytest.mark.slow  # ~40 s
def test_run_mim_with_dataloader_workers_and_the_whole_group_signalled(tmp_path):
    """SIGTERM to the process group (the training process and its 2 DataLoader workers, as SLURM or a
    container stop sends it): the workers ignore it, the run stops cleanly and resumes bitwise."""
    from hf_mim.data import embedded_pretraining_dir

    seed = int(os.environ.get("PREEMPTION_SEED", random.randrange(10**6)))
    print(f"PREEMPTION_SEED={seed}")
    common = [*TINY, "--max_train_steps", 8, "--dataloader_num_workers", 2, "--train_dir", embedded_pretraining_dir()]
    preempt_and_resume(tmp_path, common, random.Random(seed), group=True)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of rank `rank` among the launcher's descendants (its RANK environment variable)."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "run_mim.py" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under the launcher")


@pytest.mark.slow  # ~90 s: three 2-process launches
def test_two_gloo_ranks_stop_at_the_same_step_when_one_is_signalled(tmp_path):
    """Only rank 1 gets SIGTERM: the per-step all-reduce stops both after the same step, the checkpoint
    holds both ranks' positions, and resuming on 2 ranks ends bitwise as the uninterrupted 2-rank run."""
    env = {"ACCELERATE_USE_CPU": "1"}
    common = [*TINY, "--max_train_steps", 40]  # room for the signal on a loaded machine (8 steps could end before it)

    def launcher(port):
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]

    def launch(out, port, *extra):
        result = subprocess.run([*launcher(port), str(SCRIPT), *map(str, common), "--output_dir", str(out), *extra],
                                capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                                                                         **env), timeout=900)
        assert result.returncode == 0, result.stderr[-5000:]
        return result

    full = tmp_path / "full"
    launch(full, 29571)
    out = tmp_path / "preempted"
    process = start_script(SCRIPT, *common, "--output_dir", out, env_extra=env, launcher=launcher(29572))
    target = {}

    def send():
        target["pid"] = rank_pid(process, 1)
        os.kill(target["pid"], signal.SIGTERM)

    _, log = signal_when(process, r"run_mim: step 2 ", send, 0.1)
    stopped = re.findall(r"preempted at step (\d+) by SIGTERM, checkpoint (\S+), (\d+\.\d) s from signal to exit", log)
    # the launcher takes the first rank's status 75 for a failure: it stops the other (which has logged its stop
    # too: SIGTERM after its handler is gone, or 75 if it exits first) and exits with status 1
    assert process.returncode == 1 and "exitcode  : 75" in log, log[-5000:]
    # no rank died of a traceback in the checkout's code (the launcher's own traceback, from the venv, is expected)
    checkout = re.escape(str(Path(SCRIPT).resolve().parents[1]))
    assert not re.search(rf'File "{checkout}/(training_scripts|hf_mim)/', log), log[-5000:]
    # each rank logs the same step and checkpoint; on a loaded machine the launcher may kill the slower rank (after
    # the shared checkpoint, which holds both ranks' positions: checked below) before its line is written
    assert 1 <= len(stopped) <= 2 and len({line[:2] for line in stopped}) == 1, log[-5000:]
    step = int(stopped[0][0])
    state = read_trainer_state(out / f"checkpoint-{step}")
    assert state["global_step"] == step and len(state["positions"]) == 2
    print(f"2 ranks, rank 1 signalled after step 2: both stopped at step {step}, {stopped[0][2]} s from signal to exit "
          f"(logged), {SENT_AT['exit']:.2f} s to the launcher's end")
    launch(out, 29573, "--resume_from_checkpoint", "latest")
    assert_same_weights(full, out)


@pytest.mark.slow  # ~60 s: three tiny fine-tuning runs on the embedded digits
def test_run_image_classification_signalled_during_an_evaluation_resumes_bitwise(tmp_path):
    """Fine-tuning from random initialisation, evaluated every 2 steps (359 digits): SIGUSR1 after a random step
    lands in a step or its evaluation; the run stops after that step and resumes bitwise."""
    seed = int(os.environ.get("PREEMPTION_SEED", random.randrange(10**6)))
    print(f"PREEMPTION_SEED={seed}")
    script = SCRIPT.parent / "run_image_classification.py"
    common = ["--model_type", "dbot", "--model_size", "tiny", "--max_train_steps", 6, "--per_device_train_batch_size", 8,
              "--num_warmup_steps", 1, "--eval_steps", 2, "--per_device_eval_batch_size", 64, "--logging_steps", 1]
    preempt_and_resume(tmp_path, common, random.Random(seed), steps=6, script=script, logger="run_image_classification",
                       signum=signal.SIGUSR1)


@pytest.mark.slow  # ~60 s
def test_run_mim_signalled_in_its_downstream_check_checkpoints_the_last_step_and_redoes_the_check(tmp_path):
    """After the last of 3 steps (no periodic checkpoint), SIGTERM while the downstream check fine-tunes: the
    check stops at its next step, the run checkpoints step 3 and exits with 75; the resume only redoes the
    check (its line printed) and ends with the weights of a run without the check."""
    from test_downstream import LINE, SMALL_CHECK

    common = [*TINY, "--max_train_steps", 3]
    reference = tmp_path / "reference"
    finish_script(SCRIPT, *common, "--output_dir", reference)
    check = [arg if arg != "2" else "8" for arg in SMALL_CHECK]  # --downstream_steps 8
    assert check[check.index("--downstream_steps") + 1] == "8"
    argv = [*[arg for arg in common if arg not in ("--downstream_eval", "none")], *check, "--downstream_eval", "finetune"]
    out = tmp_path / "run"
    process = start_script(SCRIPT, *argv, "--output_dir", out, "--resume_from_checkpoint", "latest")
    _, log = signal_when(process, r"run_mim: finetune \S+ .* for 8 steps", lambda: process.send_signal(signal.SIGTERM), 0.2)
    assert process.returncode == 75, log[-4000:]
    assert re.search(rf"preempted at step 3 by SIGTERM, checkpoint {re.escape(str(out / 'checkpoint-3'))}, \d+\.\d s", log), log[-4000:]
    assert not list(out.glob("downstream*/checkpoint-*")) and not (out / "model.safetensors").exists()
    resumed = finish_script(SCRIPT, *argv, "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert f"resumed from {out / 'checkpoint-3'}" in resumed.stderr and LINE.search(resumed.stdout)
    assert_same_weights(reference, out)
