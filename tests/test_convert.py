"""Official checkpoints as users have them (issue 14): files written the way the official scripts write them
(built here from the fixtures' state dicts), read safely, every setting traced to its source, MaskDistill
teachers that travel with the student, one command from file to Hub repo, and the model zoo."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_fixture, max_abs_diff

import hf_mim  # noqa: F401  (registers the Auto classes)
from hf_mim.convert import CheckpointFormatError, read_official_file
from hf_mim.convert.__main__ import main as convert_main
from hf_mim.modeling_amt import AmtForMaskedImageModeling
from hf_mim.modeling_dbot import DbotForImageClassification, DbotForMaskedImageModeling
from hf_mim.modeling_maskdistill import MaskDistillForMaskedImageModeling

TOL = 1e-5
SCALER = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}


def optimizer_state(state: dict[str, torch.Tensor]) -> dict:
    """An AdamW state dict after one step, as `optimizer.state_dict()` is saved next to the weights."""
    params = [torch.nn.Parameter(value.detach().float().clone()) for value in list(state.values())[:3]]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer.state_dict()


def mae_pretrain_args(**values) -> argparse.Namespace:
    """The Namespace `main_pretrain.py` (MAE / dBOT / mae-AMT) saves under "args": its argparse defaults
    plus the run's values."""
    defaults = dict(
        batch_size=128, epochs=400, accum_iter=1, input_size=224, weight_decay=0.05, lr=None, blr=1.5e-4,
        min_lr=0.0, warmup_epochs=40, data_path="/ilsvrc/2012/", output_dir="./output_dir", log_dir="./output_dir",
        device="cuda", seed=0, resume="", start_epoch=0, num_workers=10, pin_mem=True, world_size=32, local_rank=-1,
        dist_on_itp=False, dist_url="env://", distributed=True, rank=0, gpu=0, dist_backend="nccl",
    )
    return argparse.Namespace(**{**defaults, **values})


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`python -m hf_mim.convert ...` in this process (interpreter start-ups are what makes CLI tests slow)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = convert_main(list(argv))
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def setting_line(report: str, name: str) -> str:
    return next(line.strip() for line in report.splitlines() if line.strip().startswith(f"{name} = "))


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this would call `exec` (what an unsafe torch.load does with a malicious file)."""

    def __reduce__(self):
        return (exec, ("open(MARKER, 'w').write('executed')",))


def test_official_pickles_load_and_arbitrary_objects_are_refused_unexecuted(tmp_path):
    state = {"w": torch.randn(2, 2)}
    torch.save(
        {"model": state, "optimizer": optimizer_state(state), "epoch": np.int64(7), "scaler": SCALER,
         "max_accuracy": np.float64(81.5), "dtype": np.dtype("float32"), "args": mae_pretrain_args(mask_ratio=0.75)},
        tmp_path / "ok.pth",
    )
    official = read_official_file(tmp_path / "ok.pth")
    assert torch.equal(official.state["w"], state["w"])
    assert official.args["mask_ratio"] == 0.75 and official.setting("args.mask_ratio") == 0.75
    assert official.extra["epoch"] == 7 and official.extra["max_accuracy"] == 81.5
    assert official.layout == "{'model', 'optimizer', 'epoch', 'scaler', 'max_accuracy', 'dtype', 'args'}"

    marker = tmp_path / "executed.txt"
    torch.save({"model": state, "payload": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointFormatError, match="not allowed and were not loaded"):
        read_official_file(tmp_path / "evil.pth")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# dBOT: {"model", "optimizer", "epoch", "scaler", "args"} (misc.save_model) + teacher {"model"}
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dbot(fixtures_dir):
    return load_fixture(fixtures_dir, "dbot")


@pytest.fixture(scope="module")
def dbot_files(dbot, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dbot_official")
    student = dbot["official_state_dict"]
    args = mae_pretrain_args(
        model="mae_vit_tiny_patch8", input_size=32, epochs=1600, mask_ratio=0.75, depth=[2, 2],
        init_teacher_encoder_depth=2, stage_epochs=[0, 800, 1600], tlayernorm=0, sdpr=0.0, tdpr=0.0,
        norm_feature_loss=True, clip_grad=3.0, teacher_resume="",
    )
    torch.save({"model": student, "optimizer": optimizer_state(student), "epoch": 799, "scaler": SCALER, "args": args},
               tmp / "checkpoint-800.pth")
    torch.save({"model": dbot["official_teacher_state_dict"]}, tmp / "checkpoint-teacher-800.pth")
    classifier = dbot["official_classifier_state_dict"]
    finetune_args = mae_pretrain_args(model="vit_tiny_patch8", nb_classes=5, global_pool=True, drop_path=0.1)
    torch.save({"model": classifier, "optimizer": optimizer_state(classifier), "epoch": 99, "scaler": SCALER,
                "args": finetune_args}, tmp / "finetune.pth")
    return tmp


def test_dbot_training_checkpoint_converts_with_its_args_and_reproduces_the_official_loss(dbot, dbot_files, tmp_path):
    student, teacher = str(dbot_files / "checkpoint-800.pth"), str(dbot_files / "checkpoint-teacher-800.pth")
    # the fixture's 2 heads cannot be known: width 32 is no official size, and 16 decoder heads would be a guess
    code, _, err = run_cli("dbot", "--checkpoint", student, "--teacher_checkpoint", teacher, "--output", str(tmp_path / "x"))
    assert code == 2 and "pass --num_attention_heads N" in err
    code, _, err = run_cli("dbot", "--checkpoint", student, "--teacher_checkpoint", teacher, "--output", str(tmp_path / "x"),
                           "--num_attention_heads", "2")
    assert code == 2 and "decoder 16 wide, 2 blocks is no official MAE decoder" in err and "--decoder_num_attention_heads" in err

    out = tmp_path / "dbot"
    code, report, err = run_cli("dbot", "--checkpoint", student, "--teacher_checkpoint", teacher, "--output", str(out),
                                "--num_attention_heads", "2", "--decoder_num_attention_heads", "2",
                                "--config_overrides", "mask_ratio=0.75")
    assert code == 0, err
    assert "layout: {'model', 'optimizer', 'epoch', 'scaler', 'args'}" in report
    assert "teacher source: checkpoint-teacher-800.pth" in report
    assert setting_line(report, "hidden_size").endswith("<- weights: cls_token width")
    assert setting_line(report, "num_attention_heads").endswith("<- command line")
    assert setting_line(report, "mask_ratio").endswith("<- command line")
    assert setting_line(report, "normalize_targets").endswith("<- file: args.norm_feature_loss=True")
    assert setting_line(report, "teacher_use_final_norm").endswith("<- file: args.tlayernorm=0")
    assert setting_line(report, "smooth_l1_beta").endswith("<- default: hf_mim DbotConfig")
    assert "verified: DbotForMaskedImageModeling.from_pretrained" in report

    inputs, expected = dbot["inputs"], dbot["outputs"]
    model = DbotForMaskedImageModeling.from_pretrained(out).eval()
    result = model(inputs["pixel_values"], noise=inputs["noise"])
    assert max_abs_diff(result.loss, expected["loss"]) <= TOL
    assert max_abs_diff(result.predictions, expected["decoder_pred"]) <= TOL

    card = (out / "README.md").read_text()
    official = read_official_file(student)
    assert f"`checkpoint-800.pth` (sha256 `{official.sha256}`" in card
    assert "| `normalize_targets` | `True` | file: args.norm_feature_loss=True |" in card
    assert "- `decoder_pos_embed`: fixed sin-cos table" in card


def test_dbot_finetuned_checkpoint_takes_drop_path_from_its_args(dbot, dbot_files, tmp_path):
    out = tmp_path / "finetune"
    code, report, err = run_cli("dbot", "--checkpoint", str(dbot_files / "finetune.pth"), "--output", str(out),
                                "--num_attention_heads", "2")
    assert code == 0, err
    assert setting_line(report, "drop_path_rate").endswith("<- file: args.drop_path=0.1")
    assert setting_line(report, "num_labels").endswith("<- weights: head rows")
    model = DbotForImageClassification.from_pretrained(out).eval()
    assert max_abs_diff(model(dbot["inputs"]["pixel_values"]).logits, dbot["outputs"]["classifier_logits"]) <= TOL


def test_official_model_names_give_the_heads_and_a_bare_unofficial_decoder_is_refused():
    """ViT-B sized weights: the file's `args.model` names the heads; without args the official width table
    is a printed default, and an unofficial decoder needs its heads on the command line."""
    from hf_mim.convert.common import Settings
    from hf_mim.convert.files import OfficialFile

    named = OfficialFile(None, "", {}, "", args={"model": "mae_vit_base_patch16"})
    settings = Settings(named)
    settings.encoder_heads(768, "args.model")
    settings.mae_decoder_heads(512, 8, "args.model")
    assert settings.finish() == {"num_attention_heads": 12, "decoder_num_attention_heads": 16}
    assert settings.sources["num_attention_heads"] == "file: args.model='mae_vit_base_patch16' (ViT-B)"
    assert settings.sources["decoder_num_attention_heads"] == "file: args.model='mae_vit_base_patch16' (MAE decoder)"

    bare = Settings(None)
    bare.encoder_heads(768)
    bare.mae_decoder_heads(512, 8)
    assert bare.finish() == {"num_attention_heads": 12, "decoder_num_attention_heads": 16}
    assert bare.sources["num_attention_heads"].startswith("default: official ViT of width 768")

    unofficial = Settings(None)
    unofficial.mae_decoder_heads(256, 4)  # divisible by 16: a silent 16 would convert with wrong numbers
    with pytest.raises(CheckpointFormatError, match="--decoder_num_attention_heads"):
        unofficial.finish()


# --------------------------------------------------------------------------------------------------
# AMT: mae-AMT {"model", ..., "args"}; SimMIM-AMT {"model", ..., "config": yacs CfgNode}
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amt_mae(fixtures_dir):
    return load_fixture(fixtures_dir, "amt_mae")


@pytest.fixture(scope="module")
def amt_simmim(fixtures_dir):
    return load_fixture(fixtures_dir, "amt_simmim")


def test_mae_amt_ratios_and_norm_pix_loss_come_from_the_files_args(amt_mae, tmp_path):
    state = amt_mae["official_state_dict"]
    args = mae_pretrain_args(model="mae_vit_base_patch16", input_size=112, batch_size_up=256, mask_ratio=0.45,
                             throw_ratio=0.4, norm_pix_loss=True, loc_interval=40, epochs=400, blr=1.5e-4)
    torch.save({"model": state, "optimizer": optimizer_state(state), "epoch": 41, "scaler": SCALER, "args": args},
               tmp_path / "checkpoint-41.pth")
    out = tmp_path / "amt"
    code, report, err = run_cli("amt", "--checkpoint", str(tmp_path / "checkpoint-41.pth"), "--output", str(out),
                                "--num_attention_heads", "12", "--decoder_num_attention_heads", "4")
    assert code == 0, err
    assert setting_line(report, "mask_ratio").endswith("<- file: args.mask_ratio=0.45")
    assert setting_line(report, "throw_ratio").endswith("<- file: args.throw_ratio=0.4")
    assert setting_line(report, "norm_pix_loss").endswith("<- file: args.norm_pix_loss=True")
    assert setting_line(report, "amt_interval").endswith("<- file: args.loc_interval=40 (of args.epochs=400)")
    delay = setting_line(report, "amt_refresh_delay_epochs")  # one epoch after each interval's end, as the script
    assert delay.startswith("amt_refresh_delay_epochs = 1 ") and "<- official code: refresh after epoch index k x interval" in delay
    # args.model names ViT-B (768 wide), not these 48-wide weights: it does not set the heads
    assert setting_line(report, "num_attention_heads").endswith("<- command line")
    model = AmtForMaskedImageModeling.from_pretrained(out).eval()
    assert model.config.norm_pix_loss and (model.config.mask_ratio, model.config.throw_ratio) == (0.45, 0.4)


def yacs_cfgnode_class(monkeypatch):
    """yacs' CfgNode if installed, else a class with the same pickled form (a dict subclass whose __dict__
    holds yacs' four bookkeeping entries), registered as `yacs.config.CfgNode` while the file is written.
    yacs is not a dependency: the converter reads the node without it."""
    try:
        from yacs.config import CfgNode

        return CfgNode
    except ImportError:
        pass

    class CfgNode(dict):
        def __init__(self, init_dict=None, key_list=None, new_allowed=False):
            init_dict = {key: CfgNode(value) if isinstance(value, dict) else value for key, value in (init_dict or {}).items()}
            super().__init__(init_dict)
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = new_allowed

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode, package.config = CfgNode, module
    monkeypatch.setitem(sys.modules, "yacs", package)
    monkeypatch.setitem(sys.modules, "yacs.config", module)
    return CfgNode


def simmim_config(CfgNode):
    """SimMIM-AMT's config.py defaults merged with simmim_amt_pretrain__vit_base.yaml, at the fixture's size."""
    config = CfgNode({
        "BASE": [""],
        "DATA": {"BATCH_SIZE": 128, "BATCH_SIZE_UP": 256, "DATA_PATH": "", "DATASET": "imagenet", "IMG_SIZE": 112,
                 "INTERPOLATION": "bicubic", "PIN_MEMORY": True, "NUM_WORKERS": 8, "MASK_PATCH_SIZE": 16,
                 "MASK_RATIO": 0.44, "THROW_RATIO": 0.26},
        "MODEL": {"TYPE": "vit", "NAME": "simmim_pretrain", "RESUME": "", "NUM_CLASSES": 1000, "DROP_RATE": 0.0,
                  "DROP_PATH_RATE": 0.1, "LABEL_SMOOTHING": 0.1,
                  "VIT": {"PATCH_SIZE": 8, "IN_CHANS": 3, "EMBED_DIM": 48, "DEPTH": 2, "NUM_HEADS": 12, "MLP_RATIO": 4,
                          "QKV_BIAS": True, "INIT_VALUES": 0.1, "USE_APE": True, "USE_RPB": False,
                          "USE_SHARED_RPB": False, "USE_MEAN_POOLING": False}},
        "TRAIN": {"START_EPOCH": 0, "EPOCHS": 200, "WARMUP_EPOCHS": 10, "WEIGHT_DECAY": 0.05, "BASE_LR": 1e-4,
                  "WARMUP_LR": 5e-7, "MIN_LR": 5e-6, "CLIP_GRAD": 5.0, "AUTO_RESUME": True, "ACCUMULATION_STEPS": 0,
                  "USE_CHECKPOINT": False, "LR_SCHEDULER": {"NAME": "cosine", "DECAY_EPOCHS": 30, "DECAY_RATE": 0.1,
                  "GAMMA": 0.1, "MULTISTEPS": []},
                  "OPTIMIZER": {"NAME": "adamw", "EPS": 1e-8, "BETAS": (0.9, 0.999), "MOMENTUM": 0.9},
                  "LAYER_DECAY": 1.0, "AMT_START_EPOCH": 40},
        "AMP_OPT_LEVEL": "", "OUTPUT": "output/simmim_pretrain", "TAG": "simmim_pretrain", "SAVE_FREQ": 20,
        "PRINT_FREQ": 100, "SEED": 0, "EVAL_MODE": False, "THROUGHPUT_MODE": False, "LOCAL_RANK": 0, "PRETRAINED": "",
    })
    config.__dict__["__immutable__"] = True  # config.freeze(), as main_simmim.py leaves it
    return config


def test_simmim_amt_yacs_checkpoint_converts_without_yacs(amt_simmim, tmp_path, monkeypatch):
    state = amt_simmim["official_state_dict"]
    CfgNode = yacs_cfgnode_class(monkeypatch)
    # utils.save_checkpoint: model, optimizer, lr_scheduler, max_accuracy, epoch, config (+ amp: AMP_OPT_LEVEL "")
    torch.save(
        {"model": state, "optimizer": optimizer_state(state), "lr_scheduler": {"t_initial": 200, "last_epoch": 41},
         "max_accuracy": 0.0, "epoch": 41, "config": simmim_config(CfgNode), "amp": {"loss_scaler0": {"loss_scale": 65536.0}}},
        tmp_path / "ckpt_epoch_41.pth",
    )
    for name in ("yacs.config", "yacs"):  # read without yacs: the node is never imported, only allow-listed by name
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "yacs").is_dir()])
    out = tmp_path / "simmim"
    code, report, err = run_cli("amt", "--checkpoint", str(tmp_path / "ckpt_epoch_41.pth"), "--output", str(out))
    assert code == 0, err
    assert "yacs" not in sys.modules
    assert "layout: {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config', 'amp'}" in report
    assert setting_line(report, "num_attention_heads").endswith("<- file: config.MODEL.VIT.NUM_HEADS=12")
    assert setting_line(report, "mask_patch_size").endswith("<- file: config.DATA.MASK_PATCH_SIZE=16")
    assert setting_line(report, "throw_ratio").endswith("<- file: config.DATA.THROW_RATIO=0.26")
    assert "warmup_mask_ratio = 0.44" in setting_line(report, "warmup_mask_ratio")
    assert setting_line(report, "amt_interval").startswith("amt_interval = 0.2 ")
    delay = setting_line(report, "amt_refresh_delay_epochs")  # one epoch after each interval's end, as the script
    assert delay.startswith("amt_refresh_delay_epochs = 1 ") and "<- official code: refresh after epoch index k x interval" in delay

    inputs, expected = amt_simmim["inputs"], amt_simmim["outputs"]
    from hf_mim.masking_attention import units_to_patches

    def bool_from(indices):
        return units_to_patches(torch.zeros(2, 49, dtype=torch.bool).scatter_(1, indices, True), 7, 2)

    model = AmtForMaskedImageModeling.from_pretrained(out).eval()
    result = model(inputs["pixel_values"], bool_masked_pos=bool_from(inputs["units_masked"]),
                   bool_thrown_pos=bool_from(inputs["units_thrown"]))
    assert max_abs_diff(result.loss, expected["loss"]) <= TOL


# --------------------------------------------------------------------------------------------------
# MaskDistill: full CLIP state dicts, TorchScript archives, a teacher that moves with the student
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def maskdistill(fixtures_dir):
    return load_fixture(fixtures_dir, "maskdistill")


def full_clip_state(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI's full CLIP state dict: the image tower under `visual.` plus a text tower whose
    `transformer.resblocks.*` keys collide with the image tower's once `visual.` is stripped."""
    generator = torch.Generator().manual_seed(0)
    text = {"positional_embedding": torch.randn(7, 24, generator=generator), "text_projection": torch.randn(24, 16, generator=generator),
            "logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(50, 24, generator=generator),
            "ln_final.weight": torch.ones(24), "ln_final.bias": torch.zeros(24)}
    for i in range(3):
        text[f"transformer.resblocks.{i}.attn.in_proj_weight"] = torch.randn(72, 24, generator=generator)
        text[f"transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.randn(96, 24, generator=generator)
    return {**visual, **text}


def torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive whose state dict is `state` (as OpenAI's `ViT-B-16.pt` is the scripted CLIP)."""
    root = torch.nn.Module()
    for key, value in state.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, torch.nn.Parameter(value.clone(), requires_grad=False))

    class Archive(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in root.named_children():
                self.add_module(name, child)
            for name, param in root.named_parameters(recurse=False):
                self.register_parameter(name, param)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is what OpenAI released
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Archive()), str(path))


@pytest.fixture(scope="module")
def maskdistill_student(maskdistill, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("maskdistill_official")
    state = maskdistill["official_state_dict"]
    args = argparse.Namespace(model="beit_base_patch16_224_8k_vocab_cls_pt", input_size=64, num_mask_patches=26,
                              max_mask_patches_per_block=None, min_mask_patches_per_block=16, drop_path=0.0,
                              layer_scale_init_value=0.1, batch_size=64, epochs=300, lr=1.5e-3)
    torch.save({"model": state, "optimizer": optimizer_state(state), "epoch": 299, "scaler": SCALER, "args": args},
               tmp / "checkpoint-299.pth")
    return tmp / "checkpoint-299.pth"


def check_maskdistill_folder(folder, maskdistill) -> None:
    """The converted student, with the teacher it carries, reproduces the official loss."""
    inputs, expected = maskdistill["inputs"], maskdistill["outputs"]
    model = MaskDistillForMaskedImageModeling.from_pretrained(folder).eval()
    assert model.config.teacher_name_or_path == "./teacher"
    result = model(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"])
    assert max_abs_diff(result.targets, expected["teacher_target"]) <= TOL
    assert max_abs_diff(result.loss, expected["loss"]) <= TOL


def test_maskdistill_full_clip_state_dict_teacher_travels_with_the_student(maskdistill, maskdistill_student, tmp_path):
    torch.save(full_clip_state(maskdistill["official_teacher_state_dict"]), tmp_path / "clip_full.pth")
    out = tmp_path / "student"
    code, report, err = run_cli("maskdistill", "--checkpoint", str(maskdistill_student), "--teacher_checkpoint",
                                str(tmp_path / "clip_full.pth"), "--output", str(out), "--teacher_num_attention_heads", "4")
    assert code == 0, err
    assert "dropped <teacher text tower>: 12 tensors outside visual.*" in report
    assert setting_line(report, "mask_ratio").endswith("<- file: args.num_mask_patches=26 (of 64 patches)")
    assert setting_line(report, "mask_min_num_patches").endswith("<- file: args.min_mask_patches_per_block=16")
    assert setting_line(report, "teacher_name_or_path").startswith("teacher_name_or_path = './teacher'")
    assert "loss" in report.split("verified:")[1].splitlines()[0]  # the verification loaded the teacher
    assert (out / "teacher" / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["teacher_name_or_path"] == "./teacher"  # no absolute path
    moved = shutil.move(str(out), str(tmp_path / "elsewhere" / "student"))  # the folder can move
    check_maskdistill_folder(moved, maskdistill)

    # the CLIP heads cannot be known at width 32 (OpenAI's width // 64): a required flag
    code, _, err = run_cli("maskdistill", "--checkpoint", str(maskdistill_student), "--teacher_checkpoint",
                           str(tmp_path / "clip_full.pth"), "--output", str(tmp_path / "y"))
    assert code == 2 and "--teacher_num_attention_heads" in err


def test_maskdistill_torchscript_teacher_archive(maskdistill, maskdistill_student, tmp_path):
    archive = tmp_path / "ViT-tiny.pt"
    torchscript_archive(full_clip_state(maskdistill["official_teacher_state_dict"]), archive)
    assert read_official_file(archive).layout.startswith("TorchScript archive")
    out = tmp_path / "student"
    code, report, err = run_cli("maskdistill", "--checkpoint", str(maskdistill_student), "--teacher_checkpoint",
                                str(archive), "--output", str(out), "--teacher_num_attention_heads", "4")
    assert code == 0, err
    assert "teacher source: ViT-tiny.pt" in report
    check_maskdistill_folder(out, maskdistill)


# --------------------------------------------------------------------------------------------------
# One command from file to Hub repo; the model zoo
# --------------------------------------------------------------------------------------------------


def test_push_to_hub_converts_verifies_writes_the_card_and_pushes_without_the_token(dbot, dbot_files, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            calls.append(("upload_folder", kwargs["repo_id"], files))
            return "https://huggingface.co/me/dbot-tiny/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code, _, err = run_cli("dbot", "--checkpoint", str(dbot_files / "finetune.pth"), "--output", str(tmp_path / "out"),
                           "--push_to_hub")
    assert code == 2 and "--hub_model_id" in err
    code, stdout, err = run_cli("dbot", "--checkpoint", str(dbot_files / "finetune.pth"), "--output", str(tmp_path / "out"),
                                "--num_attention_heads", "2", "--push_to_hub", "--hub_model_id", "me/dbot-tiny",
                                "--hub_token", "hf_secret123")
    assert code == 0, err
    assert "pushed to https://huggingface.co/me/dbot-tiny/commit/1" in stdout
    assert calls[0] == ("token", "hf_secret123")
    assert calls[1][1]["repo_id"] == "me/dbot-tiny"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(calls[2][2])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model_name: dbot-tiny" in card and "finetune.pth" in card and "--hub_model_id me/dbot-tiny" in card
    for path in (tmp_path / "out").rglob("*"):
        assert not path.is_file() or b"hf_secret123" not in path.read_bytes(), path


def test_zoo_lists_every_official_release_and_the_readme_carries_it():
    from conftest import REPO_ROOT

    from hf_mim.convert.zoo import RELEASES, zoo_table

    files = {release.file for release in RELEASES}
    assert {"84.5_dbot_base_pre.pth", "88.0_dbot_huge_448_finetune.pth", "extrema_mask09x8_color_1k_300ep.pth"} <= files
    assert len([r for r in RELEASES if r.file.endswith(("_pre.pth", "_finetune.pth"))]) == 20  # dBOT: 11 setups
    code, stdout, _ = run_cli("--list")
    table = zoo_table()
    assert code == 0 and stdout.strip() == table.strip()
    assert "| 86.6 M |" in table and "| 632.0 M |" in table  # ViT-B / ViT-H classifiers (timm: 86.6 M / 632.0 M)
    assert table in (REPO_ROOT / "README.md").read_text()


def test_a_relative_teacher_path_follows_the_student_folder_or_hub_repo(tmp_path, monkeypatch):
    from hf_mim.modeling_maskdistill import resolve_teacher_path

    (tmp_path / "student" / "teacher").mkdir(parents=True)
    assert resolve_teacher_path("./teacher", str(tmp_path / "student")) == (str(tmp_path / "student" / "teacher"), "")
    assert resolve_teacher_path("./teacher", "me/maskdistill-base") == ("me/maskdistill-base", "teacher")  # Hub subfolder
    assert resolve_teacher_path("openai/clip-vit-base-patch16", str(tmp_path / "student")) == ("openai/clip-vit-base-patch16", "")
    assert resolve_teacher_path("/abs/teacher", "me/x") == ("/abs/teacher", "")
    (tmp_path / "work" / "clip").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")  # "./clip" given on a command line: the working directory's, if the student has none
    assert resolve_teacher_path("./clip", str(tmp_path / "student")) == ("./clip", "")


def test_saving_a_converted_student_elsewhere_takes_its_teacher_along(maskdistill, maskdistill_student, tmp_path):
    """Further pretraining starts from the converted folder and saves to a new one: "./teacher" must still resolve."""
    torch.save(maskdistill["official_teacher_state_dict"], tmp_path / "clip_visual.pth")
    code, _, err = run_cli("maskdistill", "--checkpoint", str(maskdistill_student), "--teacher_checkpoint",
                           str(tmp_path / "clip_visual.pth"), "--output", str(tmp_path / "converted"),
                           "--teacher_num_attention_heads", "4")
    assert code == 0, err
    MaskDistillForMaskedImageModeling.from_pretrained(tmp_path / "converted").save_pretrained(tmp_path / "trained")
    assert (tmp_path / "trained" / "teacher" / "model.safetensors").is_file()
    check_maskdistill_folder(tmp_path / "trained", maskdistill)
