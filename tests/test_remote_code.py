"""Hub folders load with trust_remote_code=True where hf_mim cannot be imported, and pipelines run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_without_hf_mim
from PIL import Image
from safetensors.torch import save_file

from hf_mim import MODEL_FAMILIES
from hf_mim.hub import full_auto_map, save_hub_folder

HEADS = {
    "AutoModel": "base_model_class",
    "AutoModelForMaskedImageModeling": "masked_image_modeling_class",
    "AutoModelForImageClassification": "image_classification_class",
}


# What each method's folder must ship (issue 25): its own files and the shared core, nothing of another
# method. The core every family imports; then each method's own files.
CORE_FILES = {"configuration_common.py", "modeling_base.py", "training_events.py", "vit_blocks.py", "relative_position.py",
              "backbone_common.py", "masking.py", "objectives.py"}
OWN_FILES = {
    "amt": {"configuration_amt.py", "modeling_amt.py", "masking_attention.py", "beit_init.py"},
    "dbot": {"configuration_dbot.py", "modeling_dbot.py", "teachers.py"},
    "extrema": {"configuration_extrema.py", "modeling_extrema.py", "masking_disjoint.py", "class_attention.py"},
    "maskdistill": {"configuration_maskdistill.py", "modeling_maskdistill.py", "masking_blockwise.py", "beit_init.py",
                    "teachers.py"},
    "revcolv2": {"configuration_revcolv2.py", "modeling_revcolv2.py", "reversible.py", "teachers.py"},
}


def imported_closure(family) -> set[str]:
    """The flat files the family's classes import, followed through `from .x import` statements (an ast
    walk of the sources, independent of transformers' regex)."""
    import ast
    import inspect
    from pathlib import Path

    todo = [Path(inspect.getfile(cls)) for cls in family.auto_classes().values()]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path.name in seen:
            continue
        seen.add(path.name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(path.parent / f"{node.module}.py")
    return seen


@pytest.mark.parametrize("model_type", sorted(MODEL_FAMILIES))
def test_each_folder_ships_its_method_files_and_the_core_only(model_type):
    assert imported_closure(MODEL_FAMILIES[model_type]) == CORE_FILES | OWN_FILES[model_type]


def test_no_model_zone_file_is_over_700_lines():
    from pathlib import Path

    root = Path(__import__("hf_mim").__file__).parent
    sizes = {path.name: len(path.read_text().splitlines()) for path in root.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 700} == {}


def tiny_config(family):
    return family.config_class.from_preset(
        "tiny", num_labels=3, id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2}
    )


@pytest.mark.parametrize("model_type", sorted(MODEL_FAMILIES))
def test_every_head_loads_remotely_with_identical_outputs(model_type, tmp_path):
    family = MODEL_FAMILIES[model_type]
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 32, 32)
    tensors = {"pixel_values": pixel_values}
    folders = {}
    for auto_name, attribute in HEADS.items():
        model = getattr(family, attribute)(tiny_config(family)).eval()
        kwargs = {}
        if auto_name == "AutoModelForMaskedImageModeling":
            kwargs["bool_masked_pos"] = torch.arange(16).repeat(2, 1) % 4 != 0
            tensors["bool_masked_pos"] = kwargs["bool_masked_pos"]
        output = model(pixel_values, **kwargs)
        tensors[f"{auto_name}.out"] = output[0].contiguous() if output[0].ndim else output[0].reshape(1)
        folder = save_hub_folder(model, tmp_path / auto_name)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == full_auto_map(model_type)
        shipped = {path.name for path in folder.glob("*.py")}
        assert shipped == imported_closure(family), f"{auto_name}: {sorted(shipped ^ imported_closure(family))}"
        folders[auto_name] = str(folder)
    save_file(tensors, str(tmp_path / "expected.safetensors"))

    result = run_without_hf_mim(
        f"""
        import json, torch, transformers
        from safetensors.torch import load_file
        try:
            import hf_mim
            raise SystemExit("hf_mim should not be importable here")
        except ImportError:
            pass
        expected = load_file({str(tmp_path / "expected.safetensors")!r})
        folders = json.loads({json.dumps(json.dumps(folders))})
        report = {{}}
        for auto_name, folder in folders.items():
            model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
            assert "hf_mim" not in type(model).__module__, type(model).__module__
            kwargs = {{}}
            if auto_name == "AutoModelForMaskedImageModeling":
                kwargs["bool_masked_pos"] = expected["bool_masked_pos"]
            out = model(expected["pixel_values"], **kwargs)[0]
            out = out if out.ndim else out.reshape(1)
            report[auto_name] = (out - expected[auto_name + ".out"]).abs().max().item()
        # the pretraining head also through AutoModelForPreTraining, where ViTMAE users look for it
        head = folders["AutoModelForMaskedImageModeling"]
        model = transformers.AutoModelForPreTraining.from_pretrained(head, trust_remote_code=True).eval()
        assert type(model).__name__.endswith("ForMaskedImageModeling"), type(model).__name__
        out = model(expected["pixel_values"], bool_masked_pos=expected["bool_masked_pos"])[0]
        report["AutoModelForPreTraining"] = (out.reshape(-1) - expected["AutoModelForMaskedImageModeling.out"].reshape(-1)).abs().max().item()
        print(json.dumps(report))
        """,
        tmp_path,
    )
    diffs = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(diffs) == set(HEADS) | {"AutoModelForPreTraining"}
    assert all(diff == 0.0 for diff in diffs.values()), diffs


# one family in the default suite (the pipeline machinery is shared), every family with -m slow
@pytest.mark.parametrize("model_type", [t if t == "dbot" else pytest.param(t, marks=pytest.mark.slow) for t in sorted(MODEL_FAMILIES)])
def test_pipelines_run_offline_on_remote_code(model_type, tmp_path):
    family = MODEL_FAMILIES[model_type]
    torch.manual_seed(0)
    save_hub_folder(family.image_classification_class(tiny_config(family)).eval(), tmp_path / "cls")
    save_hub_folder(family.base_model_class(tiny_config(family)).eval(), tmp_path / "base")
    image_path = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8")).save(image_path)
    result = run_without_hf_mim(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        image = Image.open({str(image_path)!r})
        classify = pipeline("image-classification", model={str(tmp_path / "cls")!r}, trust_remote_code=True)
        predictions = classify(image, top_k=3)
        extract = pipeline("image-feature-extraction", model={str(tmp_path / "base")!r}, trust_remote_code=True)
        features = extract(image)
        pooled = extract(image, pool=True)
        print(json.dumps({{"labels": sorted(p["label"] for p in predictions),
                           "scores": sum(p["score"] for p in predictions),
                           "features": [len(features), len(features[0]), len(features[0][0])],
                           "pooled": [len(pooled), len(pooled[0])]}}))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["labels"] == ["cat", "dog", "fish"]
    assert abs(report["scores"] - 1.0) < 1e-4
    assert report["features"] == [1, 17, 32]
    assert report["pooled"] == [1, 32]


def test_the_flat_folder_holds_only_files_copied_next_to_checkpoints():
    """hf_mim/*.py is the model zone (issue 13): every flat file but __init__.py is Hub code of some family
    (or of the UperNet wrapper); tooling (the family table, CLIs, optional-dependency hints) lives in
    subpackages."""
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_import_files

    from hf_mim.hub import model_zone_files

    root = Path(__import__("hf_mim").__file__).parent
    copied = {path.name for model_type in MODEL_FAMILIES for path in model_zone_files(model_type)}
    upernet = root / "modeling_upernet.py"
    if upernet.exists():
        copied |= {upernet.name, *(Path(f).name for f in get_relative_import_files(str(upernet)))}
    flat = {path.name for path in root.glob("*.py")} - {"__init__.py"}
    assert flat - copied == set(), f"tooling files in the flat model zone: {sorted(flat - copied)}"
