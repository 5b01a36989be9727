"""Logger.log_image and log_text: PNGs and text captured at the call, read back by Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from steplog import FileLogger
from steplog.images import encode_png


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_a_uint8_image_round_trips_with_its_channels(channels: int, mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, channels), dtype=np.uint8)
    png = encode_png(pixels, "HWC")
    assert Image.open(io.BytesIO(png)).mode == mode
    assert (decode(png).reshape(5, 7, channels) == pixels).all()


def test_axes_are_read_as_dataformats_names_them() -> None:
    hwc = np.random.default_rng(1).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert (decode(encode_png(hwc.transpose(2, 0, 1), "CHW")) == hwc).all()
    grey = hwc[..., 0]
    assert (decode(encode_png(grey, "HW")) == grey).all()
    assert (decode(encode_png(grey.T, "WH")) == grey).all()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dataformats", ["NCHW", "NHWC"])
def test_a_batch_is_drawn_as_the_grid_tensorboard_draws(channels: int, dataformats: str) -> None:
    from torch.utils.tensorboard._utils import convert_to_HWC

    nchw = np.random.default_rng(2).integers(0, 256, (10, channels, 5, 6), dtype=np.uint8)
    batch = nchw if dataformats == "NCHW" else nchw.transpose(0, 2, 3, 1)
    assert (decode(encode_png(batch, dataformats)) == convert_to_HWC(batch, dataformats)).all()
    with pytest.raises(ValueError, match="batch must not be empty"):
        encode_png(batch[:0], dataformats)


def test_floats_are_read_as_zero_to_one_rounded_and_clipped_with_nan_as_zero() -> None:
    image = torch.tensor([[0.0, 0.5, 0.7 / 255, 1.0, 2.0, -1.0, float("nan")]])
    assert decode(encode_png(image, "HW")).tolist() == [[0, 128, 1, 255, 255, 0, 0]]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_level_survives_a_trip_through_floats(dtype: type) -> None:
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert (decode(encode_png((levels / 255).astype(dtype), "HW")) == levels).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors_are_images(dtype: torch.dtype) -> None:
    image = torch.tensor([[0.0, 0.5, 1.0]], dtype=dtype)
    assert decode(encode_png(image, "HW")).tolist() == [[0, 128, 255]]


def test_bad_images_raise_at_the_call() -> None:
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        encode_png(np.zeros((4, 4, 2)), "HWC")
    with pytest.raises(ValueError, match="3 dimensions"):
        encode_png(np.zeros((4, 4)), "CHW")
    with pytest.raises(ValueError, match="dataformats must be"):
        encode_png(np.zeros((4, 4)), "HH")
    with pytest.raises(ValueError, match="must not be empty"):
        encode_png(np.zeros((0, 4)), "HW")
    with pytest.raises(TypeError, match="real numbers"):
        encode_png(np.array([["a"]]), "HW")


def test_log_image_and_log_text_store_what_they_held_at_the_call(tmp_path: Path) -> None:
    logger = FileLogger(tmp_path / "run")
    pixels = np.full((2, 2, 3), 200, dtype=np.uint8)
    logger.log_image(pixels, "frames/obs", 12)
    logger.log_text("# notes", "notes.md")
    logger.log_text("plain", "log", 3)
    pixels[:] = 0
    with pytest.raises(TypeError, match="text must be a str"):
        logger.log_text(b"bytes", "x")  # type: ignore[arg-type]
    assert logger.close(30)
    run = tmp_path / "run"
    assert (decode((run / "frames" / "obs_12.png").read_bytes()) == 200).all()
    assert (run / "notes.md").read_text() == "# notes"
    assert (run / "log_3.txt").read_text() == "plain"


@pytest.mark.parametrize(("call", "stored"), [
    (lambda lg, img: lg.log_image(img, "attention_temp0.5", 3), "attention_temp0.5_3.png"),
    (lambda lg, img: lg.log_image(img, "samples/v1.2", 7), "samples/v1.2_7.png"),
    (lambda lg, img: lg.log_image(img, "frame.png", 2), "frame_2.png"),
    (lambda lg, img: lg.log_text("x", "notes_v1.5"), "notes_v1.5.txt"),
    (lambda lg, img: lg.log_text("x", "notes.md", 4), "notes_4.md"),
], ids=["dot in an image name", "dot in a folder", "png", "dot in a text name", "extension"])
def test_a_dot_in_a_name_is_part_of_it_unless_it_starts_an_extension(
    tmp_path: Path, call: object, stored: str
) -> None:
    logger = FileLogger(tmp_path / "run")
    call(logger, np.zeros((2, 2, 3), dtype=np.uint8))  # type: ignore[operator]
    assert logger.close(10)
    assert (tmp_path / "run" / stored).is_file()


def test_an_image_named_with_another_formats_extension_raises_at_the_call(tmp_path) -> None:
    logger = FileLogger(tmp_path / "run")
    with pytest.raises(ValueError, match="stored as PNG"):
        logger.log_image(np.zeros((2, 2, 3), dtype=np.uint8), "frame.jpg")
    assert logger.close(10)
