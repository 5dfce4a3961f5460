"""Hub repos: self-contained saves of any hf_mim object, native exports, evaluation preprocessing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import perturbed, run_without_hf_mim
from conftest import REPO_ROOT
from PIL import Image

import hf_mim
from hf_mim import MODEL_FAMILIES
from hf_mim.data.transforms import EvalTransform
from hf_mim.hub import build_image_processor, full_auto_map, save_hub_folder
from hf_mim.hub import native as native_export
from hf_mim.hub.native import NotExpressible, to_native

LABELS = {0: "cat", 1: "dog", 2: "fish"}


def tiny(family, **overrides):
    return family.config_class.from_preset(
        "tiny", num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **overrides
    )


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A photo-like (smooth) RGB image: upsampled noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1, 3)) * 255).astype("uint8"))
    return small.resize((width, height), Image.BILINEAR)


# ---------------------------------------------------------------- 1. self-contained saves


def made_in_python(tmp_path):
    return hf_mim.DbotForImageClassification(tiny(MODEL_FAMILIES["dbot"]))


def loaded_from_plain_folder(tmp_path):
    """A folder written before this change (no auto_map, no code), loaded with hf_mim."""
    model = hf_mim.AmtModel(tiny(MODEL_FAMILIES["amt"]))
    torch.save(model.state_dict(), tmp_path / "unused.pt")
    folder = tmp_path / "plain"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("auto_map")
    (folder / "config.json").write_text(json.dumps(config))
    return hf_mim.AmtModel.from_pretrained(folder)


def momentum_backbone(tmp_path):
    return hf_mim.ExtremaForMaskedImageModeling(tiny(MODEL_FAMILIES["extrema"])).momentum_backbone()


def revcolv2_backbone(tmp_path):
    return hf_mim.RevColV2Backbone(tiny(MODEL_FAMILIES["revcolv2"]))


@pytest.mark.parametrize("make", [made_in_python, loaded_from_plain_folder, momentum_backbone, revcolv2_backbone])
def test_save_pretrained_alone_writes_code_and_the_full_auto_map(make, tmp_path):
    model = make(tmp_path)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    model_type = model.config.model_type
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == full_auto_map(model_type)
    written = {path.name for path in folder.glob("*.py")}
    needed = {f"configuration_{model_type}.py", f"modeling_{model_type}.py", "modeling_base.py", "configuration_common.py"}
    assert needed <= written, needed - written


@pytest.mark.slow  # the local-Hub round trip covers it too
def test_a_remotely_loaded_model_saves_a_self_contained_folder_again(tmp_path):
    """Without hf_mim: load (trust_remote_code), save again, load the copy with every head."""
    family = MODEL_FAMILIES["dbot"]
    save_hub_folder(family.image_classification_class(tiny(family)), tmp_path / "first")
    result = run_without_hf_mim(
        f"""
        import json, transformers
        model = transformers.AutoModelForImageClassification.from_pretrained({str(tmp_path / "first")!r}, trust_remote_code=True)
        model.save_pretrained({str(tmp_path / "second")!r})
        for auto in ("AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification"):
            getattr(transformers, auto).from_pretrained({str(tmp_path / "second")!r}, trust_remote_code=True)
        print(json.dumps(json.load(open({str(tmp_path / "second" / "config.json")!r}))["auto_map"]))
        """,
        tmp_path,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == full_auto_map("dbot")


# ---------------------------------------------------------------- 4. preprocessing = evaluation


@pytest.mark.parametrize("height,width,size", [(200, 300, 224), (300, 200, 224), (41, 57, 32)])
def test_saved_processor_reproduces_the_evaluation_transform_on_non_square_images(height, width, size, tmp_path):
    from transformers import AutoImageProcessor

    image = smooth_image(height, width)
    expected = EvalTransform(size, crop_pct=0.875)(image)
    build_image_processor(size).save_pretrained(tmp_path)
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")(image, return_tensors="pt").pixel_values[0]
    assert pil.shape == expected.shape
    assert (pil - expected).abs().max().item() <= 1e-4
    # transformers' default backend (torchvision) resizes uint8 tensors: at most one grey level apart
    default = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt").pixel_values[0]
    assert (default - expected).abs().max().item() <= 1 / 255 / 0.224 + 1e-6


def test_old_square_processor_differed_from_evaluation():
    """What the issue measured: squashing to S x S is far from the evaluation crop."""
    from transformers import ViTImageProcessor

    image = smooth_image(200, 300)
    squashed = ViTImageProcessor(
        size={"height": 224, "width": 224}, resample=3, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )(image, return_tensors="pt").pixel_values[0]
    assert (squashed - EvalTransform(224)(image)).abs().max().item() > 0.1


# ---------------------------------------------------------------- 2. native export

EXPORTS = [
    ("dbot", {}, "classifier", "BeitForImageClassification"),
    ("dbot", {}, "backbone", "BeitModel"),
    ("amt", {"variant": "mae"}, "classifier", "BeitForImageClassification"),
    ("amt", {"variant": "simmim"}, "classifier", "BeitForImageClassification"),
    # the official SimMIM ViT scales only the MLP branch (as the fixture's classifier)
    ("amt", {"variant": "simmim", "apply_attention_layer_scale": False}, "classifier", "BeitForImageClassification"),
    ("amt", {"variant": "mae"}, "backbone", "BeitModel"),
    ("maskdistill", {}, "classifier", "BeitForImageClassification"),
    ("maskdistill", {}, "backbone", "BeitModel"),
    ("extrema", {"pooling": "mean"}, "classifier", "BeitForImageClassification"),
    ("extrema", {"pooling": "class_attention"}, "classifier", None),
    ("revcolv2", {}, "classifier", None),
    ("revcolv2", {}, "backbone", None),
]


@pytest.mark.parametrize("model_type,overrides,head,native_class", EXPORTS, ids=lambda v: str(v))
def test_native_export_equals_the_hf_mim_model_or_is_refused(model_type, overrides, head, native_class):
    family = MODEL_FAMILIES[model_type]
    cls = family.image_classification_class if head == "classifier" else family.base_model_class
    torch.manual_seed(0)
    model = perturbed(cls(tiny(family, **overrides)))
    if native_class is None:
        with pytest.raises(NotExpressible) as refusal:
            to_native(model)
        assert "\n" not in str(refusal.value)
        return
    native, difference = to_native(model)
    assert type(native).__name__ == native_class
    assert difference <= 1e-5
    # independently of the check inside to_native: the native model on other images
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model(pixels), native(pixels)
    key = "logits" if head == "classifier" else "pooler_output"
    assert (ours[key] - theirs[key]).abs().max().item() <= 1e-5


def test_export_refuses_a_model_it_does_not_reproduce(monkeypatch):
    """Without the bias entry that hides BEiT's cls token, ExtreMA's export differs: refused."""
    monkeypatch.setattr(native_export, "HIDDEN_CLS", 0.0)
    family = MODEL_FAMILIES["extrema"]
    torch.manual_seed(0)
    with pytest.raises(NotExpressible, match="differs"):
        to_native(perturbed(family.image_classification_class(tiny(family, pooling="mean"))))


def test_exported_folder_serves_the_evaluation_logits_without_hf_mim(tmp_path):
    """CLI export -> AutoModelForImageClassification and pipeline() in a process without hf_mim and
    without trust_remote_code; the pipeline's logits equal the evaluation loop's."""
    from hf_mim.data import ClassificationCollator
    from hf_mim.export import main as export_main

    family = MODEL_FAMILIES["maskdistill"]
    torch.manual_seed(0)
    model = perturbed(family.image_classification_class(tiny(family)))
    save_hub_folder(model, tmp_path / "hf_mim_form")
    assert export_main(["--model_name_or_path", str(tmp_path / "hf_mim_form"), "--output_dir", str(tmp_path / "native")]) == 0
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "beit"
    assert not list((tmp_path / "native").glob("*.py"))

    images = [smooth_image(41, 57, seed=1), smooth_image(60, 45, seed=2)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
    batch = ClassificationCollator(EvalTransform(32))([{"image": image, "label": 0, "example_id": str(i)} for i, image in enumerate(images)])
    with torch.no_grad():
        evaluation = model(batch["pixel_values"]).logits  # what the evaluation loop computes
    result = run_without_hf_mim(
        f"""
        import json
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
        folder = {str(tmp_path / "native")!r}
        model = AutoModelForImageClassification.from_pretrained(folder)
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(2)]
        report = {{}}
        for backend in ("pil", None):
            kwargs = {{"backend": backend}} if backend else {{}}
            classify = pipeline("image-classification", model=model, image_processor=AutoImageProcessor.from_pretrained(folder, **kwargs))
            rows = []
            for image in images:
                scores = {{p["label"]: p["score"] for p in classify(image, top_k=3, function_to_apply="none")}}
                rows.append([scores[model.config.id2label[i]] for i in range(3)])
            report[backend or "default"] = rows
        default = pipeline("image-classification", model=folder)(images[0], top_k=3)
        report["plain_pipeline_labels"] = sorted(p["label"] for p in default)
        print(json.dumps(report))
        """,
        tmp_path,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["plain_pipeline_labels"] == ["cat", "dog", "fish"]
    assert (torch.tensor(report["pil"]) - evaluation).abs().max().item() <= 1e-5
    # default (torchvision) backend: pixels at most one grey level apart, logits close
    assert (torch.tensor(report["default"]) - evaluation).abs().max().item() <= 1e-2


# ---------------------------------------------------------------- 5. clean loads of pretraining folders

PRETRAINING = [("dbot", {}), ("amt", {"variant": "mae"}), ("amt", {"variant": "simmim"}), ("extrema", {}),
               ("maskdistill", {}), ("revcolv2", {})]


def pretrained_representation(mim, pixels):
    """By hand from the pretraining model's own encoder: (tokens after its final norm, pooled as the
    card says)."""
    encoder = mim.base_model
    tokens = encoder(pixels).last_hidden_state
    model_type = mim.config.model_type
    if model_type == "extrema":  # the class-attention instance token, before the final norm
        return tokens, encoder.encoder(pixels).cls_token
    if model_type == "amt" and not mim.config.use_mean_pooling:  # SimMIM: cls token after the final norm
        return tokens, tokens[:, 0]
    prefix = 1 if model_type != "revcolv2" else encoder.num_prefix_tokens
    return tokens, tokens[:, prefix:].mean(dim=1)


@pytest.mark.parametrize("model_type,overrides", PRETRAINING, ids=lambda v: str(v))
def test_pretraining_folder_loads_clean_and_automodel_is_the_pretrained_encoder(model_type, overrides, tmp_path):
    from transformers import AutoModel, AutoModelForImageClassification

    family = MODEL_FAMILIES[model_type]
    torch.manual_seed(0)
    mim = perturbed(family.masked_image_modeling_class(tiny(family, **overrides)))
    save_hub_folder(mim, tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert type(base) is family.base_model_class
    prefix = family.base_model_class.base_model_prefix
    classifier, info = AutoModelForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    new_head = {"classifier.weight", "classifier.bias", f"{prefix}.pooler.fc_norm.weight", f"{prefix}.pooler.fc_norm.bias"}
    assert set(info["missing_keys"]) <= new_head, info["missing_keys"]

    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tokens, pooled = pretrained_representation(mim, pixels)
        output = base.eval()(pixels)
    assert (output.last_hidden_state - tokens).abs().max().item() <= 1e-6
    assert (output.pooler_output - pooled).abs().max().item() <= 1e-6
    # saved again, the pretrained-encoder layout loads as itself
    base.save_pretrained(tmp_path / "again")
    _, info = AutoModel.from_pretrained(tmp_path / "again", output_loading_info=True)
    assert not any(info.values()), info


def test_folders_saved_before_the_layout_field_follow_their_saved_class(tmp_path):
    family = MODEL_FAMILIES["dbot"]
    save_hub_folder(family.masked_image_modeling_class(tiny(family)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("base_model_layout") == "pretrained_encoder"
    (tmp_path / "config.json").write_text(json.dumps(config))
    from transformers import AutoModel

    _, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info


def test_a_fine_tuned_folder_gives_automodel_its_fine_tuned_fc_norm(tmp_path):
    from transformers import AutoModel

    family = MODEL_FAMILIES["dbot"]
    torch.manual_seed(0)
    classifier = perturbed(family.image_classification_class(tiny(family)))
    save_hub_folder(classifier, tmp_path)
    base, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and set(info["unexpected_keys"]) <= {"classifier.weight", "classifier.bias"}
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(base.eval()(pixels).pooler_output, classifier.dbot(pixels).pooler_output, atol=1e-6)


def test_a_bad_layout_value_names_the_field():
    family = MODEL_FAMILIES["dbot"]
    config = tiny(family)
    config.base_model_layout = "whatever"
    with pytest.raises(ValueError, match="base_model_layout"):
        family.base_model_class(config)


# ---------------------------------------------------------------- a real client against a local Hub


@pytest.mark.slow
def test_round_trips_through_a_local_hub_endpoint(tmp_path, monkeypatch, fixtures_dir):
    """The real huggingface_hub client pushes to a Hub API on 127.0.0.1; every repo loads from it
    with trust_remote_code where hf_mim is blocked, and without it where hf_mim is imported; the
    training script publishes the native form on main and the hf_mim form on a branch."""
    import os
    import subprocess
    import sys

    from hub_stub import HubStub
    from safetensors.torch import load_file

    from hf_mim.convert import convert_dbot_checkpoint
    from hf_mim.hub import push_model

    token = "hf_local_test_token"
    with HubStub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")

        rows = {}
        # made in Python, pushed with transformers' own push_to_hub
        hf_mim.DbotForImageClassification(tiny(MODEL_FAMILIES["dbot"])).push_to_hub("tester/made-in-python")
        rows["made-in-python"] = ("DbotForImageClassification()", "model.push_to_hub")
        # converted from the official layout, pushed with its processor
        official = load_file(str(fixtures_dir / "dbot" / "official_state_dict.safetensors"))
        converted, _ = convert_dbot_checkpoint(official, overrides={"num_attention_heads": 2, "decoder_num_attention_heads": 2})
        push_model(converted, "tester/converted", image_processor=build_image_processor(converted.config.image_size))
        rows["converted"] = (f"convert_dbot_checkpoint -> {type(converted).__name__}", "hf_mim.hub.push_model")
        # loaded with hf_mim from a folder written without code or auto_map
        loaded_from_plain_folder(tmp_path).push_to_hub("tester/loaded")
        rows["loaded"] = ("AmtModel.from_pretrained(plain folder)", "model.push_to_hub")
        # loaded from the Hub without hf_mim, pushed again from there
        run_without_hf_mim(
            """
            import transformers
            model = transformers.AutoModelForImageClassification.from_pretrained("tester/made-in-python", trust_remote_code=True)
            model.push_to_hub("tester/remote-again")
            """,
            tmp_path,
            env_overrides={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                           "HF_HOME": str(tmp_path / "hf_home_remote")},
        )
        rows["remote-again"] = ("AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True), no hf_mim", "model.push_to_hub")

        # the classification script: native form on main, hf_mim form on the hf_mim branch
        script = REPO_ROOT / "training_scripts" / "run_image_classification.py"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_DATASETS_OFFLINE="1")
        result = subprocess.run(
            [sys.executable, str(script), "--model_type", "dbot", "--model_size", "tiny", "--output_dir", str(tmp_path / "run"),
             "--max_train_steps", "2", "--per_device_train_batch_size", "8", "--num_warmup_steps", "1",
             "--per_device_eval_batch_size", "128", "--push_to_hub", "--hub_model_id", "tester/digits"],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-4000:]

        # what reached the Hub
        for repo in ("tester/made-in-python", "tester/converted", "tester/loaded", "tester/remote-again"):
            folder = hub.folder(repo)
            config = json.loads((folder / "config.json").read_text())
            model_type = config["model_type"]
            assert config["auto_map"] == full_auto_map(model_type), repo
            assert {f"modeling_{model_type}.py", "modeling_base.py", f"configuration_{model_type}.py"} <= {
                p.name for p in folder.glob("*.py")}
        assert (hub.folder("tester/converted") / "preprocessor_config.json").is_file()
        main, branch = hub.folder("tester/digits"), hub.folder("tester/digits", "hf_mim")
        main_config = json.loads((main / "config.json").read_text())
        assert main_config["model_type"] == "beit" and "auto_map" not in main_config
        assert not list(main.glob("*.py"))
        assert "auto_map" in json.loads((branch / "config.json").read_text())
        assert ("tester/digits", "hf_mim") in hub.branches
        card = (main / "README.md").read_text()
        metadata = card.split("---")[1]
        assert "resolve/main/samples/" in metadata and list((main / "samples").glob("*.jpg"))
        values = [float(v) for v in re.findall(r"value: ([0-9.]+)", metadata)]
        assert values and all(0 <= v <= 1 for v in values), values
        assert 'revision="hf_mim"' in card and "custom_code" not in metadata
        summaries = {(c["repo"], c["revision"]): c["summary"] for c in hub.commits}
        assert "run_image_classification.py: DbotForImageClassification" in summaries[("tester/digits", "main")]
        assert "steps on" in summaries[("tester/digits", "main")]
        assert hub.tokens == {token}
        assert token not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "hub").rglob("*") if p.is_file())

        # loads from the endpoint: without hf_mim (remote code; native without), and with hf_mim
        repos = ["tester/made-in-python", "tester/converted", "tester/loaded", "tester/remote-again"]
        report = json.loads(run_without_hf_mim(
            f"""
            import json, transformers
            from transformers import pipeline
            report = {{}}
            for repo in {repos!r}:
                heads = [getattr(transformers, auto).from_pretrained(repo, trust_remote_code=True).__class__.__name__
                         for auto in ("AutoModel", "AutoModelForMaskedImageModeling", "AutoModelForImageClassification")]
                report[repo] = heads
            classify = pipeline("image-classification", model="tester/digits")
            report["tester/digits"] = [type(classify.model).__name__, len(classify({str(tmp_path / "image.png")!r}, top_k=3))]
            print(json.dumps(report))
            """,
            tmp_path,
            env_overrides={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
                           "HF_HOME": str(tmp_path / "hf_home_load")},
            before=lambda: smooth_image(40, 50).save(tmp_path / "image.png"),
        ).stdout.strip().splitlines()[-1])
        assert report["tester/digits"] == ["BeitForImageClassification", 3]
        from transformers import AutoModel

        with_hf_mim = {
            repo: type(AutoModel.from_pretrained(repo, cache_dir=tmp_path / "cache")).__module__.startswith("hf_mim.")
            for repo in repos
        }
        assert all(with_hf_mim.values()), with_hf_mim

    print("\nround trip: repo | made how | pushed with | loads without hf_mim (trust_remote_code) | loads with hf_mim")
    for repo in repos:
        made, pushed = rows[repo.split("/")[1]]
        print(f"{repo} | {made} | {pushed} | {', '.join(report[repo])} | {with_hf_mim[repo]}")
    print(f"tester/digits | run_image_classification.py --push_to_hub | script | main: {report['tester/digits'][0]} "
          "(no trust_remote_code, pipeline ok) | hf_mim branch")


def test_a_pretrained_encoder_backbone_is_refused_with_a_reason(tmp_path):
    family = MODEL_FAMILIES["dbot"]
    save_hub_folder(family.masked_image_modeling_class(tiny(family)), tmp_path)
    from transformers import AutoModel

    with pytest.raises(NotExpressible, match="pretrained encoder"):
        to_native(AutoModel.from_pretrained(tmp_path))
