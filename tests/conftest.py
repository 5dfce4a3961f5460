"""Test-suite wide settings: offline Hub, deterministic CPU threads, shared fixtures."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared next to the checkout (CI clones the repo beside it)."""
    candidates = [REPO_ROOT.parent / "shared", Path(os.environ.get("HF_MIM_SHARED", "/nonexistent"))]
    for candidate in candidates:
        if (candidate / "fixtures").is_dir():
            return candidate
    pytest.skip("../shared/fixtures is not available")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return shared_dir() / "fixtures"


def pytest_configure(config):
    # marks used by transformers' common test files (tests/test_transformers_common.py runs them)
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")


# The heaviest of transformers' common tests (seconds per class each, x 19 classes) run with the slow tests;
# the rest of the suite stays in the default run. Half-precision eager/sdpa: this CPU has no fast fp16/bf16.
SLOW_COMMON_TESTS = (
    "test_bc_torch_dtype",
    "test_model_outputs_equivalence",
    "test_training_gradient_checkpointing",  # and its use_reentrant variants
)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if getattr(item.module, "__name__", "") != "test_transformers_common":
            continue
        half_sdpa = "eager_matches_sdpa_inference" in item.name and ("_fp16_" in item.name or "_bf16_" in item.name)
        if half_sdpa or item.name.startswith(SLOW_COMMON_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's singletons reset before and after the test (in-process Accelerators and scripts)."""
    from helpers import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()
