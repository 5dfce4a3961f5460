"""Two gloo ranks train every method's classifier and pretraining head under DDP with Accelerate's
defaults (find_unused_parameters=False): no head may hold a trainable parameter without a gradient
("Expected to have finished reduction in the prior iteration" at step 2), and after a few steps the
weights of the two ranks are identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from accelerate import Accelerator
    from safetensors.torch import save_file
    from hf_mim import MODEL_FAMILIES

    out = sys.argv[1]
    accelerator = Accelerator(cpu=True)  # Accelerate's default DDP: find_unused_parameters=False
    rank = accelerator.process_index
    overrides = {"maskdistill": {"target": "pixels"}}  # no teacher folder needed
    for model_type, family in sorted(MODEL_FAMILIES.items()):
        for head in ("image_classification_class", "masked_image_modeling_class"):
            torch.manual_seed(0)  # same initial weights on both ranks
            config = family.config_class.from_preset("tiny", num_labels=3, **overrides.get(model_type, {}))
            model = getattr(family, head)(config).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            model, optimizer = accelerator.prepare(model, optimizer)
            generator = torch.Generator().manual_seed(100 + rank)  # different data on each rank
            for step in range(3):
                pixel_values = torch.randn(2, 3, 32, 32, generator=generator)
                if head == "image_classification_class":
                    loss = model(pixel_values, labels=torch.randint(0, 3, (2,), generator=generator)).loss
                else:
                    loss = model(pixel_values).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            state = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
            save_file(state, f"{out}/{model_type}-{head}-rank{rank}.safetensors")
            accelerator.free_memory()
    print(f"rank {rank} done", flush=True)
    """
)


@pytest.mark.slow
def test_two_gloo_ranks_train_every_head_without_find_unused_parameters(tmp_path):
    from hf_mim import MODEL_FAMILIES

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
         str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    for model_type in MODEL_FAMILIES:
        for head in ("image_classification_class", "masked_image_modeling_class"):
            ranks = [load_file(str(tmp_path / f"{model_type}-{head}-rank{rank}.safetensors")) for rank in (0, 1)]
            assert ranks[0].keys() == ranks[1].keys()
            for key in ranks[0]:
                assert (ranks[0][key] == ranks[1][key]).all(), (model_type, head, key)
