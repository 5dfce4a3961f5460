"""hf-mim-visualize / `visualize_checkpoint`: one picture per image for every method's saved pretraining folder,
masks from the model's own generator (seeded), and one-line errors for what cannot be pictured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import photo
from PIL import Image
from test_maskdistill import tiny_clip

from hf_mim.auto import family_for
from hf_mim.hub import save_hub_folder
from hf_mim.scripts.visualize import main
from hf_mim.training.visualize import visualize_checkpoint

SIZE, PATCH = 32, 8  # the tiny presets: a 4 x 4 grid
# columns of each method's picture (save_mim_picture): input, masked, then what the method's output carries
COLUMNS = {
    "dbot": 3,  # + per-patch loss
    "extrema": 2,  # (a global-feature loss: nothing per patch)
    "maskdistill": 3,  # + per-patch loss
    "revcolv2": 5,  # + per-patch loss, reconstruction, reconstruction + visible
    "amt_mae": 6,  # + per-patch loss, attention with patch kinds, reconstruction, reconstruction + visible
    "amt_simmim": 6,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """method -> a saved tiny pretraining folder (what run_mim.py's save_hub_folder writes)."""
    root = tmp_path_factory.mktemp("checkpoints")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {}
    for name in COLUMNS:
        model_type, _, variant = name.partition("_")
        config = {"variant": variant} if variant else {}
        if model_type == "maskdistill":
            config = {"teacher_name_or_path": str(tiny_clip(root)), "teacher_hidden_size": 24}
        family = family_for(model_type)
        torch.manual_seed(0)
        saved[name] = save_hub_folder(family.masked_image_modeling_class(family.config_class.from_preset("tiny", **config)), root / name)
    torch.set_num_threads(threads)
    return saved


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    photo(0).save(folder / "wide.png")  # 48 x 40
    (folder / "sub").mkdir()
    photo(1, (30, 50)).save(folder / "sub" / "tall.jpg", quality=95)
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def columns(path: Path) -> list[np.ndarray]:
    """The picture's image columns (one row): each (SIZE, SIZE, 3) uint8."""
    array = np.asarray(Image.open(path).convert("RGB"))
    return [array[14:14 + SIZE, col * (SIZE + 4):col * (SIZE + 4) + SIZE] for col in range(array.shape[1] // (SIZE + 4))]


def masked_patches(path: Path) -> set[int]:
    """Patches (raster index) that differ between the input column and the masked-input column."""
    inputs, masked = columns(path)[:2]
    differ = (inputs != masked).any(-1).reshape(SIZE // PATCH, PATCH, SIZE // PATCH, PATCH).any((1, 3))
    return set(np.flatnonzero(differ).tolist())


@pytest.mark.parametrize("name", list(COLUMNS))
def test_every_method_writes_one_picture_per_image(name, folders, images, tmp_path):
    out = tmp_path / "pictures"
    ratio = ["--mask_ratio", "0.5"] if name in ("dbot", "revcolv2") else []  # ExtreMA's tiny grid fits only its own
    assert main(["--model_name_or_path", str(folders[name]), "--images", str(images), "--output_dir", str(out), *ratio]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tall.png", "wide.png"]
    for picture in out.iterdir():
        with Image.open(picture) as image:
            image.verify()  # a valid PNG
        with Image.open(picture) as image:
            assert image.format == "PNG" and image.size == (COLUMNS[name] * (SIZE + 4), SIZE + 4 + 14)
    if name in ("dbot", "revcolv2"):  # uniform random masking: int(16 x 0.5) patches kept, the rest masked
        assert len(masked_patches(out / "wide.png")) == 8
    if name.startswith("amt"):  # the attention column shows the map the refresh pass would store, not zeros
        attention = columns(out / "wide.png")[3]
        inner = attention.reshape(4, PATCH, 4, PATCH, 3)[:, 1:-1, :, 1:-1]  # inside the patch outlines
        assert len(np.unique(inner.reshape(-1, 3), axis=0)) > 1


def test_the_command_runs_offline_in_a_subprocess(folders, images, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "hf_mim.scripts.visualize", "--model_name_or_path", str(folders["dbot"]),
                             "--images", str(images / "wide.png"), str(images / "sub"), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(tmp_path / "out" / "wide.png"), str(tmp_path / "out" / "tall.png")]
    with Image.open(tmp_path / "out" / "tall.png") as image:
        assert image.size == (3 * (SIZE + 4), SIZE + 4 + 14)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COLUMNS))
def test_the_command_in_a_subprocess_for_every_method(name, folders, images, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "hf_mim.scripts.visualize", "--model_name_or_path", str(folders[name]),
                             "--images", str(images), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for picture in ("wide.png", "tall.png"):
        with Image.open(tmp_path / "out" / picture) as image:
            assert image.size == (COLUMNS[name] * (SIZE + 4), SIZE + 4 + 14)


def test_masks_are_seeded_and_follow_mask_ratio(folders, images, tmp_path):
    """The function API: the same seed gives the same picture, another seed other masks; mask_ratio is the model's."""
    first = visualize_checkpoint(folders["dbot"], [images / "wide.png"], tmp_path / "a", seed=1)
    again = visualize_checkpoint(folders["dbot"], images / "wide.png", tmp_path / "b", seed=1)
    other = visualize_checkpoint(folders["dbot"], [images / "wide.png"], tmp_path / "c", seed=2)
    fewer = visualize_checkpoint(folders["dbot"], [images / "wide.png"], tmp_path / "d", seed=1, mask_ratio=0.25)
    assert first == [tmp_path / "a" / "wide.png"]
    assert first[0].read_bytes() == again[0].read_bytes()
    assert masked_patches(first[0]) != masked_patches(other[0])
    assert len(masked_patches(first[0])) == 12 and len(masked_patches(fewer[0])) == 4  # 16 patches x 0.75, x 0.25


def error_of(capsys, *argv) -> str:
    capsys.readouterr()  # what the test itself wrote (saving the classifier)
    with pytest.raises(SystemExit) as stopped:
        main(list(map(str, argv)))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_clear_one_line_errors(folders, images, tmp_path, capsys):
    from hf_mim import DbotConfig, DbotForImageClassification

    classifier = save_hub_folder(DbotForImageClassification(DbotConfig.from_preset("tiny", num_labels=3)), tmp_path / "classifier")
    common = ["--output_dir", tmp_path / "out"]
    line = error_of(capsys, "--model_name_or_path", classifier, "--images", images, *common)
    assert "hf-mim-visualize: error: --model_name_or_path" in line and "needs a pretraining checkpoint" not in line
    assert "pictures need a pretraining checkpoint" in line and "decoder" in line
    missing = tmp_path / "nowhere.jpg"
    assert f"--images {missing}: no such file or folder" in error_of(capsys, "--model_name_or_path", folders["dbot"], "--images", missing, *common)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    assert f"--images {broken}: not a readable image" in error_of(capsys, "--model_name_or_path", folders["dbot"], "--images", broken, *common)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--images {empty}: the folder holds no image files" in error_of(capsys, "--model_name_or_path", folders["dbot"], "--images", empty, *common)
    assert "no such file or folder" in error_of(capsys, "--model_name_or_path", tmp_path / "no_model", "--images", images, *common)
    assert not (tmp_path / "out").exists()
