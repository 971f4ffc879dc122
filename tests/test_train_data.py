"""Reading a training folder: same-name .txt captions, metadata.jsonl / metadata.csv as
Hugging Face imagefolder, and the paper's resize to the training size on the short side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oms_ext.train import TrainError
from oms_ext.train.data import load_image, resized_size, scan_folder
from tests.train_helpers import write_images


def test_txt_captions_beside_images_in_subfolders_hidden_ones_skipped(tmp_path: Path) -> None:
    write_images(tmp_path / "a", {"one": "a dark room"})
    write_images(tmp_path / "a" / "deeper", {"two": "a red car", "three": None})
    write_images(tmp_path / ".hidden", {"four": "never read"})
    scan = scan_folder(tmp_path, require_captions=False)
    assert [(e.path.name, e.caption) for e in scan.examples] == [
        ("three.png", ""), ("two.png", "a red car"), ("one.png", "a dark room"),  # by path
    ]  # fmt: skip
    assert scan.uncaptioned == 1


def test_metadata_jsonl_names_files_and_captions(tmp_path: Path) -> None:
    write_images(tmp_path, {"x": None, "y": None})
    rows = [{"file_name": "x.png", "text": "a dark room"}, {"file_name": "y.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scan = scan_folder(tmp_path, require_captions=False)
    assert [(e.path.name, e.caption) for e in scan.examples] == [("x.png", "a dark room"),
                                                                  ("y.png", "")]  # fmt: skip
    assert scan.uncaptioned == 1


def test_metadata_csv_with_another_caption_column(tmp_path: Path) -> None:
    write_images(tmp_path, {"x": None})
    (tmp_path / "metadata.csv").write_text('file_name,prompt\nx.png,"a red car, at night"\n')
    scan = scan_folder(tmp_path, caption_column="prompt", require_captions=True)
    assert scan.examples[0].caption == "a red car, at night"


def test_metadata_naming_a_missing_image_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(TrainError, match="not in .*gone.png"):
        scan_folder(tmp_path, require_captions=False)


def test_broken_metadata_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n{oops\n')
    with pytest.raises(TrainError, match="line 2: not JSON"):
        scan_folder(tmp_path, require_captions=False)


@pytest.mark.parametrize(
    ("size", "want"),
    [((1000, 872), (584, 512)), ((300, 451), (512, 768)), ((512, 512), (512, 512))],
)
def test_short_side_goes_to_the_resolution_long_side_to_a_multiple_of_8(size, want) -> None:
    assert resized_size(*size, 512) == want


def test_loaded_image_is_resized_and_scaled_to_minus_one_one(tmp_path: Path) -> None:
    write_images(tmp_path, {"x": None}, size=(96, 64))
    pixels = load_image(tmp_path / "x.png", 32, min_size=16)
    assert pixels.shape == (3, 32, 48)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    assert load_image(tmp_path / "x.png", 32, min_size=65) is None  # short side 64 < 65
