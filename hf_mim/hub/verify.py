"""hf-mim-verify: is the code a model folder (or Hub repo) ships byte-identical to hf_mim's model zone?

A folder loaded with `trust_remote_code=True` runs the *.py files it holds. Every save by hf_mim records
in `hf_mim_code.json` which hf_mim version saved it and each code file's sha256
(`hf_mim.modeling_base.write_code_record`). This command compares the folder's code files with the model
zone of that version, file by file, and names every file that differs, is not an hf_mim file, was changed
after the save, or is missing; an `auto_map` entry that loads code from another repository counts too.

The reference of a version is the installed hf_mim's own flat files when it is that version, else
`RELEASED_MODEL_ZONES` (an entry written at each release with `python -m hf_mim.hub.verify
--release-entry`). A folder without a record (saved by an older hf_mim) is compared with the installed
version. Exit status: 0 identical, 1 something differs, 2 nothing to compare (no code, unknown version,
unreadable folder or repo).

    hf-mim-verify ./my-model
    hf-mim-verify someone/their-model [--revision main] [--token ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..modeling_base import CODE_RECORD_NAME, HF_MIM_VERSION, code_sha256

# {version: {file name: sha256}} of released hf_mim model zones other than the installed one.
RELEASED_MODEL_ZONES: dict[str, dict[str, str]] = {}


class CannotVerify(Exception):
    """Nothing to compare: no code files, an unknown version, an unreadable folder or repository."""


def installed_model_zone() -> dict[str, str]:
    """{file name: sha256} of the installed hf_mim's model zone: its flat files (hf_mim/*.py but __init__)."""
    root = Path(__file__).resolve().parents[1]
    return {name: digest for name, digest in code_sha256(root).items() if name != "__init__.py"}


def model_zone(version: str) -> dict[str, str]:
    """{file name: sha256} of hf_mim `version`'s model zone (CannotVerify when this hf_mim does not know it)."""
    if version == HF_MIM_VERSION:
        return installed_model_zone()
    if version in RELEASED_MODEL_ZONES:
        return RELEASED_MODEL_ZONES[version]
    known = ", ".join(sorted({HF_MIM_VERSION, *RELEASED_MODEL_ZONES}))
    raise CannotVerify(f"the folder was saved by hf_mim {version}, whose model zone this hf_mim ({HF_MIM_VERSION}) does not "
                       f"know (known: {known}); run hf-mim-verify of hf_mim=={version}")


@dataclass
class CodeReport:
    """The verdict on one folder: `problems` {file: why} is empty when its code is hf_mim's."""

    folder: str
    version: str
    recorded: bool
    files: list[str]
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        source = CODE_RECORD_NAME if self.recorded else f"no {CODE_RECORD_NAME}: compared with the installed hf_mim"
        out = [f"{self.folder}: {len(self.files)} code files, hf_mim {self.version} ({source})"]
        out += [f"  {name}: {why}" for name, why in sorted(self.problems.items())]
        if self.identical:
            out.append(f"OK: the {len(self.files)} code files are byte-identical to hf_mim {self.version}'s model zone")
        else:
            out.append(f"DIFFERS: {len(self.problems)} file(s) are not hf_mim {self.version}'s: {', '.join(sorted(self.problems))}")
        return out


def _short(digest: str) -> str:
    return digest[:12] + "..."


def verify_code(folder: str | Path, name: str | None = None) -> CodeReport:
    """Compare the code files of a local `folder` with the model zone of the hf_mim version that saved it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CannotVerify(f"{folder} is not a folder")
    actual = code_sha256(folder)
    record_path = folder / CODE_RECORD_NAME
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    recorded = (record or {}).get("code_sha256") or {}
    if not actual and not recorded:
        raise CannotVerify(f"{name or folder} holds no code files (*.py): nothing runs from it with trust_remote_code")
    version = (record or {}).get("hf_mim_version") or HF_MIM_VERSION
    zone = model_zone(version)
    report = CodeReport(str(name or folder), version, record is not None, sorted(actual))
    for file, digest in actual.items():
        why = []
        if file not in zone:
            why.append(f"not a file of hf_mim {version}'s model zone")
        elif digest != zone[file]:
            why.append(f"differs from hf_mim {version}'s (sha256 {_short(digest)}, released {_short(zone[file])})")
        if file in recorded and recorded[file] != digest:
            why.append("changed after the folder was saved")
        elif record is not None and file not in recorded:
            why.append("added after the folder was saved")
        if why:
            report.problems[file] = "; ".join(why)
    for file in sorted(set(recorded) - set(actual)):
        report.problems[file] = "missing (recorded when the folder was saved)"
    config = folder / "config.json"
    auto_map = (json.loads(config.read_text(encoding="utf-8")).get("auto_map") or {}) if config.is_file() else {}
    for auto_name, reference in auto_map.items():
        for ref in reference if isinstance(reference, list) else [reference]:
            if not isinstance(ref, str):
                continue
            if "--" in ref:
                report.problems[f"config.json auto_map {auto_name}"] = f"loads code from another repository ({ref})"
            elif f"{ref.split('.')[0]}.py" not in actual:
                report.problems[f"config.json auto_map {auto_name}"] = f"names {ref.split('.')[0]}.py, which the folder lacks"
    return report


def fetch_code(repo_id: str, revision: str | None, token: str | None, into: Path) -> Path:
    """The code files, the record and config.json of Hub repo `repo_id` (not its weights), under `into`."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
        wanted = [f for f in files if "/" not in f and (f.endswith(".py") or f in (CODE_RECORD_NAME, "config.json"))]
        for file in wanted:
            hf_hub_download(repo_id, file, revision=revision, token=token, local_dir=into)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, no access: one line
        message = " ".join(str(error).split())
        raise CannotVerify(f"{repo_id}: not a local folder, and the Hub repository could not be read ({message[:300]})") from None
    if not files:
        raise CannotVerify(f"{repo_id}: not a local folder, and the Hub repository could not be read (it lists no files)")
    return into


def release_entry() -> str:
    """{installed version: its model zone} as JSON: what a release adds to `RELEASED_MODEL_ZONES`."""
    return json.dumps({HF_MIM_VERSION: installed_model_zone()}, indent=4, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-mim-verify",
        description="Say whether the code files of a model folder or Hub repo are byte-identical to hf_mim's model zone.")
    parser.add_argument("source", nargs="?", help="a local folder or a Hub model id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--token", default=None, help="Hub token for a private repository")
    parser.add_argument("--release-entry", action="store_true", help="print the RELEASED_MODEL_ZONES entry of this hf_mim")
    args = parser.parse_args(argv)
    if args.release_entry:
        print(release_entry())
        return 0
    if args.source is None:
        parser.error("give a folder or a Hub model id")
    try:
        if Path(args.source).is_dir():
            report = verify_code(args.source)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                report = verify_code(fetch_code(args.source, args.revision, args.token, Path(tmp)), name=args.source)
    except CannotVerify as error:
        print(f"hf-mim-verify: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()))
    return 0 if report.identical else 1


__all__ = ["RELEASED_MODEL_ZONES", "CannotVerify", "CodeReport", "installed_model_zone", "main", "model_zone", "verify_code"]

if __name__ == "__main__":
    sys.exit(main())
