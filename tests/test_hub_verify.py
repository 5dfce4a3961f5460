"""hf-mim-verify and the code record every saved folder carries (hf_mim_code.json): a tampered, added,
removed or foreign code file is named, locally and through the Hub (tests/hub_stub.py)."""

from __future__ import annotations

import configparser
import hashlib
import json
from pathlib import Path

import pytest
from hub_stub import HubStub, use_local_hub

import hf_mim
from hf_mim.hub import push_folder_to_hub, save_hub_folder
from hf_mim.hub import verify as verify_module
from hf_mim.hub.verify import main, verify_code

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = hf_mim.DbotForImageClassification(hf_mim.DbotConfig.from_preset("tiny", num_labels=3))
    return save_hub_folder(model, tmp_path_factory.mktemp("verify") / "dbot")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(saved, tmp_path / "dbot"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_saved_folder_records_its_hf_mim_version_and_the_hash_of_every_code_file(saved):
    record = json.loads((saved / "hf_mim_code.json").read_text())
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert record["hf_mim_version"] == hf_mim.__version__ == setup["metadata"]["version"]
    shipped = sorted(saved.glob("*.py"))
    assert "modeling_dbot.py" in record["code_sha256"] and len(shipped) > 5
    assert record["code_sha256"] == {path.name: sha256(path) for path in shipped}
    package = Path(hf_mim.__file__).parent
    assert all(sha256(package / path.name) == sha256(path) for path in shipped)  # hf_mim's own files, unchanged


def test_an_untouched_folder_is_byte_identical(saved, capsys):
    assert main([str(saved)]) == 0
    out = capsys.readouterr().out
    assert f"OK: the {len(list(saved.glob('*.py')))} code files are byte-identical to hf_mim {hf_mim.__version__}'s model zone" in out


def test_a_tampered_file_is_named(folder, capsys):
    target = folder / "modeling_dbot.py"
    target.write_text(target.read_text().replace("def forward(", "def forward(  ", 1))  # one changed line
    assert main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert "  modeling_dbot.py: differs from hf_mim" in out and "changed after the folder was saved" in out
    assert "DIFFERS: 1 file(s) are not hf_mim" in out and out.rstrip().endswith("modeling_dbot.py")


def test_added_removed_and_foreign_code_is_named(folder):
    (folder / "helpers.py").write_text("import os\n")
    (folder / "teachers.py").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "someone/else--modeling_evil.EvilModel"
    (folder / "config.json").write_text(json.dumps(config))
    report = verify_code(folder)
    assert not report.identical
    assert report.problems["helpers.py"] == (f"not a file of hf_mim {hf_mim.__version__}'s model zone; "
                                             "added after the folder was saved")
    assert report.problems["teachers.py"] == "missing (recorded when the folder was saved)"
    assert "another repository (someone/else--modeling_evil.EvilModel)" in report.problems["config.json auto_map AutoModel"]


def test_versions_without_a_record_and_unknown_versions(folder, monkeypatch, capsys):
    record = json.loads((folder / "hf_mim_code.json").read_text())
    (folder / "hf_mim_code.json").unlink()  # saved by an older hf_mim: compared with the installed one
    report = verify_code(folder)
    assert report.identical and not report.recorded and "no hf_mim_code.json" in report.lines()[0]

    record["hf_mim_version"] = "0.0.9"
    (folder / "hf_mim_code.json").write_text(json.dumps(record))
    assert main([str(folder)]) == 2
    assert "saved by hf_mim 0.0.9, whose model zone this hf_mim" in capsys.readouterr().err
    zone = verify_module.installed_model_zone()
    monkeypatch.setitem(verify_module.RELEASED_MODEL_ZONES, "0.0.9", {**zone, "teachers.py": "0" * 64})
    report = verify_code(folder)
    assert report.version == "0.0.9" and list(report.problems) == ["teachers.py"]
    assert json.loads(verify_module.release_entry()) == {hf_mim.__version__: zone}


def test_a_hub_repo_is_verified_from_its_code_files(saved, tmp_path, monkeypatch, capsys):
    with HubStub(tmp_path / "hub") as hub:
        use_local_hub(monkeypatch, hub, tmp_path)
        push_folder_to_hub(saved, "tester/verified")
        assert main(["tester/verified"]) == 0
        assert "OK: the" in capsys.readouterr().out
        stored = hub.folder("tester/verified") / "masking.py"
        stored.write_text(stored.read_text() + "\n# patched\n")
        assert main(["tester/verified"]) == 1
        out = capsys.readouterr().out
        assert "tester/verified:" in out and "  masking.py: differs from hf_mim" in out and "model.safetensors" not in out
        assert main(["tester/missing-repo"]) == 2
        assert "tester/missing-repo: not a local folder, and the Hub repository could not be read" in capsys.readouterr().err
