"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

BLOCK_HF_MIM = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockHfMim(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_mim" or name.startswith("hf_mim."):
                raise ImportError("hf_mim is blocked in this process (remote-code test)")
            return None
    sys.meta_path.insert(0, _BlockHfMim())
    """
)


def run_without_hf_mim(
    script: str, tmp_path: Path, timeout: int = 300, env_overrides: dict[str, str] | None = None, before=None
) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where `import hf_mim` fails, offline (unless `env_overrides`
    say otherwise, e.g. a local Hub endpoint), with a private transformers module cache so remote code
    is really loaded from the folder. `before()` runs first, here."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONPATH="")
    # the threads of this process (conftest sets them): a matmul split over another number of threads rounds
    # differently, and the remote-code tests compare outputs bitwise
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.update(env_overrides or {})
    if before is not None:
        before()
    code = BLOCK_HF_MIM + textwrap.dedent(script)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def load_fixture(fixtures_dir: Path, method: str) -> dict[str, dict]:
    folder = fixtures_dir / method
    return {
        name: load_file(str(folder / f"{name}.safetensors"))
        for name in ("inputs", "outputs", "official_state_dict", "official_teacher_state_dict",
                     "official_classifier_state_dict")
        if (folder / f"{name}.safetensors").exists()
    }


def max_abs_diff(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so an in-process script or Accelerator starts fresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    """`image` (a PIL image) encoded as a file of format `fmt`, as bytes."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def photo(seed: int, size=(48, 40)):
    """A smooth random colour image (JPEG-friendly), width x height = size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def perturbed(model):
    """Non-trivial norms, layer scales, biases, bias tables and head, so that a wrong mapping shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("norm", "gamma", "relative_position", "bias", "classifier")):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()
