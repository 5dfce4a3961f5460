"""Two gloo ranks pretrain every method through run_mim.py and fine-tune its classifier through
run_image_classification.py, under DDP with Accelerate's defaults (find_unused_parameters=False): no head
may hold a trainable parameter without a gradient ("Expected to have finished reduction in the prior
iteration" at step 2), and the loop's end-of-run check finds the weights of the two ranks identical; the
pretraining runs also run the k-NN monitor and the downstream check's two classifiers on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_mim.training.loop import check_replicas_in_sync

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
PRETRAIN_EXTRA = {"maskdistill": ["--config_overrides", "target=pixels"],  # no teacher folder needed
                  # an attention refresh mid-run (after step 2 of 3: at the interval's end, no epoch delay)
                  "amt": ["--config_overrides", "amt_interval=0.5,amt_refresh_delay_epochs=0"]}
IN_SYNC = "weights identical on all 2 ranks"


def launch_two_ranks(script: str, port: int, *args) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         str(SCRIPTS / script), *map(str, args)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("index, model_type", list(enumerate(["amt", "dbot", "extrema", "maskdistill", "revcolv2"])))
def test_two_gloo_ranks_pretrain_and_finetune_every_method_through_the_scripts(index, model_type, tmp_path):
    pretrained = tmp_path / "pretrained"
    log = launch_two_ranks("run_mim.py", 29541 + 2 * index, "--model_type", model_type, "--model_size", "tiny",
                           "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--logging_steps", "1",
                           "--knn_eval_steps", "2", "--downstream_steps", "2", "--downstream_batch_size", "8",
                           *PRETRAIN_EXTRA.get(model_type, []), "--output_dir", pretrained)
    assert IN_SYNC in log
    assert "k-NN at step 3: top-1" in log  # the k-NN monitor and the downstream check's classifiers ran on both ranks
    log = launch_two_ranks("run_image_classification.py", 29542 + 2 * index, "--model_name_or_path", pretrained,
                           "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--num_warmup_steps", "1",
                           "--output_dir", tmp_path / "finetuned")
    assert IN_SYNC in log


class _TwoRanks:
    """An accelerator stand-in whose gather returns this rank's row and a second rank's, altered in one place."""

    num_processes = 2

    def __init__(self, alter_column: int | None):
        self.alter_column = alter_column

    def gather(self, local):
        other = local.clone()
        if self.alter_column is not None:
            other[0, self.alter_column] += 1e-12
        return torch.cat([local, other])


def test_replicas_that_differ_in_one_parameter_are_caught(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)))
        check_replicas_in_sync(_TwoRanks(None), model)
        with pytest.raises(RuntimeError, match=r"weights differ across ranks .*first: 1\.weight, 1 in all"):
            check_replicas_in_sync(_TwoRanks(2), model)
    finally:
        dist.destroy_process_group()
    check_replicas_in_sync(_TwoRanks(0), torch.nn.Linear(3, 2))  # not DDP (one process, FSDP shards): nothing to compare
