"""transformers' own common model tests (ModelTesterMixin, ConfigTester, BackboneTesterMixin) for the
INSTALLED transformers version, obtained from its source distribution at test-setup time.

The files are never copied into this repository: `pip download` fetches the sdist of the installed
version once into a cache folder (`$HF_MIM_TEST_CACHE`, default ~/.cache/hf_mim/transformers-tests),
its top-level `tests/*.py` are unpacked there as the package `transformers_common_tests`, and later
runs reuse them. The sdist ships only the top-level test files, so three modules they import from
subfolders get small stand-ins written here (generation and export testers, common config kwargs).
Test-only dependencies missing from the environment (`parameterized`) are installed into the same
cache with `pip install --target`. When any of this fails (no index reachable), `load()` raises
`SuiteUnavailable` with the reason; the tests skip with it.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
TEST_DEPENDENCIES = {"parameterized": "parameterized"}  # import name -> pip requirement

# Stand-ins for the modules that live in subfolders of transformers' tests/ and are not in the sdist.
STANDINS = {
    # Generation tests do not apply to image encoders: an empty mixin (no test is inherited from it).
    "generation/test_utils.py": '''
class GenerationTesterMixin:
    """Stand-in: hf_mim models do not generate."""
''',
    # ModelTesterMixin derives from ExportTesterMixin; hf_mim's own export/compile tests are in
    # tests/test_transformers_common.py (they check outputs against eager, which is what matters here).
    "exporters/test_export.py": '''
class ExportTesterMixin:
    """Stand-in: export and full-graph compilation are tested by hf_mim's own tests."""
''',
    # ConfigTester.check_config_arguments_init sets these PreTrainedConfig fields to non-default values
    # and checks that every config keeps them.
    "utils/test_configuration_utils.py": '''
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


class SuiteUnavailable(RuntimeError):
    """The common test files of the installed transformers version could not be obtained."""


def cache_dir() -> Path:
    root = os.environ.get("HF_MIM_TEST_CACHE") or Path.home() / ".cache" / "hf_mim"
    return Path(root) / "transformers-tests" / transformers.__version__


def _pip(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SuiteUnavailable(f"pip {args[0]} failed: {tail[0]}")


def _unpack(root: Path) -> None:
    """Download the sdist of the installed version and unpack its top-level tests/*.py as PACKAGE."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", f"transformers=={version}", "-d", tmp)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if not archives:
            raise SuiteUnavailable(f"pip download gave no transformers-{version} source archive")
        staging = Path(tmp) / PACKAGE
        staging.mkdir()
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py") and member.isfile():
                    (staging / parts[2]).write_bytes(archive.extractfile(member).read())
        if not (staging / "test_modeling_common.py").exists():
            raise SuiteUnavailable(f"the transformers-{version} sdist has no tests/test_modeling_common.py")
        (staging / "__init__.py").touch()
        for relative, text in STANDINS.items():
            path = staging / relative
            path.parent.mkdir(exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text.lstrip())
        target = root / PACKAGE
        if not target.exists():
            staging.rename(target)  # atomic: a half-unpacked folder is never seen as complete


def _ensure_dependencies(root: Path) -> None:
    deps = root / "deps"
    if deps.is_dir() and str(deps) not in sys.path:
        sys.path.insert(0, str(deps))
    missing = [req for name, req in TEST_DEPENDENCIES.items() if importlib.util.find_spec(name) is None]
    if missing:
        _pip("install", "--quiet", "--no-deps", "--target", str(deps), *missing)
        if str(deps) not in sys.path:
            sys.path.insert(0, str(deps))
        importlib.invalidate_caches()


def load():
    """The package of transformers' common test files (import its modules as PACKAGE.<module>)."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not (root / PACKAGE / "test_modeling_common.py").exists():
            _unpack(root)
        _ensure_dependencies(root)
    except (OSError, subprocess.SubprocessError) as error:
        raise SuiteUnavailable(f"{type(error).__name__}: {error}") from error
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(PACKAGE)
    except ImportError as error:
        raise SuiteUnavailable(f"transformers' common tests do not import here: {error}") from error
