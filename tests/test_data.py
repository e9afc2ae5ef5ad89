"""Tests for defectdiff.data: image modes, masks, MVTec-style folders, errors and tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import shared_path
from PIL import Image, ImageFile

from defectdiff.data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageDataset,
    Sample,
    image_size,
    list_categories,
    load_image,
    load_mask,
    resize_mask,
    to_tensor,
    train_samples,
)
from defectdiff.data import test_samples as list_test_samples

HEIGHT, WIDTH = 6, 8


def _rgb(seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A small random uint8 RGB array, different per seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write an array as an image file (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def _mode(path: Path) -> str:
    """Pillow's mode for a file, to check a test really writes the mode it means to cover."""
    with Image.open(path) as image:
        return image.mode


def _mask_array(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A 0/255 mask with a small defect square."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:3, 2:5] = 255
    return mask


def _make_tree(root: Path, category: str = "widget", cracks: int = 2, masks: int | None = None) -> Path:
    """Tiny MVTec-style category: 3 train, 2 test good, `cracks` crack images with the first `masks` masks."""
    base = root / category
    for index in range(3):
        _save(base / "train" / "good" / f"{index:03d}.png", _rgb(index))
    for index in range(2):
        _save(base / "test" / "good" / f"{index:03d}.png", _rgb(10 + index))
    for index in range(cracks):
        _save(base / "test" / "crack" / f"{index:03d}.png", _rgb(20 + index))
    for index in range(cracks if masks is None else masks):
        _save(base / "ground_truth" / "crack" / f"{index:03d}_mask.png", _mask_array())
    return base


# ---------------------------------------------------------------- folders


def test_mvtec_tree_loads_with_labels_types_and_masks(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    train = train_samples(tmp_path, "widget")
    assert [sample.image_path.name for sample in train] == ["000.png", "001.png", "002.png"]
    assert all(sample.label == 0 and sample.defect_type == "good" and sample.mask_path is None for sample in train)

    test = list_test_samples(tmp_path, "widget")
    assert [sample.name for sample in test] == ["crack/000", "crack/001", "good/000", "good/001"]
    assert [sample.label for sample in test] == [1, 1, 0, 0]
    assert test[0].mask_path == tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png"
    for sample in test:
        mask = sample.load_mask()
        assert mask.dtype == np.bool_ and mask.shape == (HEIGHT, WIDTH)
        assert mask.any() == bool(sample.label)
    np.testing.assert_array_equal(test[0].load_mask(), _mask_array() > 0)
    np.testing.assert_allclose(test[0].load_image(), _rgb(20) / 255.0, atol=1e-6)
    assert list_categories(tmp_path) == ["widget"]


def test_masks_named_like_the_image_and_other_extensions_are_found(tmp_path: Path) -> None:
    base = _make_tree(tmp_path, cracks=3, masks=0)
    truth = base / "ground_truth" / "crack"
    _save(truth / "000.png", _mask_array())
    _save(truth / "001_mask.bmp", _mask_array())
    _save(truth / "002.PNG", _mask_array())
    test = list_test_samples(tmp_path, "widget")
    assert [sample.mask_path.name for sample in test if sample.label] == ["000.png", "001_mask.bmp", "002.PNG"]


def test_missing_masks_error_lists_every_unmasked_image(tmp_path: Path) -> None:
    _make_tree(tmp_path, cracks=3, masks=1)
    with pytest.raises(DataError) as info:
        list_test_samples(tmp_path, "widget")
    message = str(info.value)
    assert "001.png" in message and "002.png" in message and "000.png" not in message
    assert "crack" in message


def test_missing_ground_truth_folder_is_reported(tmp_path: Path) -> None:
    _make_tree(tmp_path, cracks=2, masks=0)
    with pytest.raises(DataError, match="does not exist") as info:
        list_test_samples(tmp_path, "widget")
    assert "000.png" in str(info.value) and "001.png" in str(info.value)


def test_junk_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    base = _make_tree(tmp_path)
    for folder in (base / "train" / "good", base / "test" / "crack", base / "ground_truth" / "crack"):
        (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
        (folder / "Thumbs.db").write_bytes(b"\x00\x01junk")
        (folder / "notes.txt").write_text("not an image")
        (folder / "._000.png").write_bytes(b"resource fork, not a png")
        _save(folder / ".hidden.png", _rgb(99))
    assert len(train_samples(tmp_path, "widget")) == 3
    test = list_test_samples(tmp_path, "widget")
    assert len(test) == 4
    assert all(not sample.image_path.name.startswith(".") for sample in test)


def test_all_zero_mask_warns_and_stays_defective(tmp_path: Path) -> None:
    base = _make_tree(tmp_path)
    _save(base / "ground_truth" / "crack" / "001_mask.png", np.zeros((HEIGHT, WIDTH), dtype=np.uint8))
    with pytest.warns(UserWarning, match="001_mask.png"):
        test = list_test_samples(tmp_path, "widget")
    empty = next(sample for sample in test if sample.name == "crack/001")
    assert empty.label == 1 and not empty.load_mask().any()


def test_mask_size_mismatch_raises_when_loaded(tmp_path: Path) -> None:
    base = _make_tree(tmp_path)
    _save(base / "ground_truth" / "crack" / "001_mask.png", _mask_array(height=HEIGHT + 1))
    sample = next(sample for sample in list_test_samples(tmp_path, "widget") if sample.name == "crack/001")
    with pytest.raises(DataError, match="001_mask.png") as info:
        sample.load_mask()
    assert f"{HEIGHT + 1}x{WIDTH}" in str(info.value) and f"{HEIGHT}x{WIDTH}" in str(info.value)


def test_missing_root_and_category_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        train_samples(tmp_path / "nowhere", "widget")
    _make_tree(tmp_path, category="widget")
    _make_tree(tmp_path, category="gadget")
    with pytest.raises(DataError) as info:
        train_samples(tmp_path, "sprocket")
    message = str(info.value)
    assert "sprocket" in message and "gadget" in message and "widget" in message
    with pytest.raises(DataError, match="gadget"):
        list_test_samples(tmp_path, "sprocket")


def test_missing_or_empty_train_good_and_missing_test_folder(tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    with pytest.raises(DataError, match="train"):
        train_samples(tmp_path, "bare")
    empty = tmp_path / "empty" / "train" / "good"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images") as info:
        train_samples(tmp_path, "empty")
    assert str(empty) in str(info.value)
    with pytest.raises(DataError, match="test folder"):
        list_test_samples(tmp_path, "empty")


def test_two_images_with_one_stem_are_rejected(tmp_path: Path) -> None:
    base = _make_tree(tmp_path)
    _save(base / "train" / "good" / "000.jpg", _rgb(5))
    with pytest.raises(DataError, match="000.jpg"):
        train_samples(tmp_path, "widget")


# ---------------------------------------------------------------- image modes


def test_image_extensions_match_case_insensitively(tmp_path: Path) -> None:
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    base = _make_tree(tmp_path)
    _save(base / "train" / "good" / "010.JPEG", _rgb(3))
    _save(base / "train" / "good" / "011.Tif", _rgb(4))
    names = [sample.image_path.name for sample in train_samples(tmp_path, "widget")]
    assert names == ["000.png", "001.png", "002.png", "010.JPEG", "011.Tif"]


def _check_rgb(image: np.ndarray, shape: tuple[int, int]) -> None:
    """Common contract: HxWx3 float32 in [0, 1]."""
    assert image.shape == (*shape, 3) and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_grayscale_modes_are_replicated_to_rgb(tmp_path: Path) -> None:
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    image = load_image(_save(tmp_path / "l.png", gray))
    _check_rgb(image, (1, 3))
    np.testing.assert_allclose(image[0, :, 0], gray[0] / 255.0, atol=1e-7)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])

    with_alpha = np.stack([gray, np.array([[255, 0, 7]], dtype=np.uint8)], axis=-1)
    path = _save(tmp_path / "la.png", with_alpha)
    assert _mode(path) == "LA"
    np.testing.assert_allclose(load_image(path)[0], np.repeat(gray[0, :, None] / 255.0, 3, axis=1), atol=1e-7)

    bits = Image.new("1", (3, 2))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    image = load_image(tmp_path / "bits.png")
    _check_rgb(image, (2, 3))
    assert image[0, 1].tolist() == [1.0, 1.0, 1.0] and image.sum() == 3.0


def test_sixteen_bit_png_and_tiff_scale_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    png = _save(tmp_path / "g16.png", values)
    assert _mode(png) == "I;16"
    tiff = tmp_path / "g16.tif"
    tifffile.imwrite(tiff, values)
    for path in (png, tiff):
        image = load_image(path)
        _check_rgb(image, (1, 3))
        np.testing.assert_allclose(image[0, :, 1], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_sixteen_bit_rgb_tiff_keeps_full_precision(tmp_path: Path) -> None:
    values = np.zeros((3, 4, 3), dtype=np.uint16)
    values[0, 0] = [65535, 0, 32768]
    values[2, 3] = [1, 257, 65534]
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, values, photometric="rgb")
    image = load_image(path)
    _check_rgb(image, (3, 4))
    np.testing.assert_allclose(image, values / 65535.0, atol=1e-6)


def test_int32_float_and_float64_tiffs(tmp_path: Path) -> None:
    ints = np.array([[0, 2**30, 2**31 - 1, -5]], dtype=np.int32)
    _save(tmp_path / "i32.tif", ints)
    assert _mode(tmp_path / "i32.tif") == "I"
    np.testing.assert_allclose(load_image(tmp_path / "i32.tif")[0, :, 0], [0.0, 0.5, 1.0, 0.0], atol=1e-6)

    floats = np.array([[0.25, 1.5, -1.0]], dtype=np.float32)
    _save(tmp_path / "f.tif", floats)
    assert _mode(tmp_path / "f.tif") == "F"
    np.testing.assert_allclose(load_image(tmp_path / "f.tif")[0, :, 2], [0.25, 1.0, 0.0])

    tifffile.imwrite(tmp_path / "f64.tif", np.array([[0.75, 0.125]], dtype=np.float64))
    np.testing.assert_allclose(load_image(tmp_path / "f64.tif")[0, :, 0], [0.75, 0.125])
    assert image_size(tmp_path / "f64.tif") == (1, 2)


def test_palette_rgba_and_cmyk(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9))
    palette.putdata([0, 1, 2, 1])
    palette.save(tmp_path / "p.png")
    assert _mode(tmp_path / "p.png") == "P"
    image = load_image(tmp_path / "p.png")
    _check_rgb(image, (2, 2))
    np.testing.assert_allclose(image[0, 1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(image[1, 0], [0.0, 128 / 255, 1.0], atol=1e-7)

    rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], dtype=np.uint8)
    image = load_image(_save(tmp_path / "rgba.png", rgba))
    _check_rgb(image, (1, 2))
    np.testing.assert_allclose(image * 255.0, rgba[..., :3], atol=1e-4)

    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert _mode(tmp_path / "cmyk.jpg") == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    _check_rgb(image, (16, 16))
    np.testing.assert_allclose(image.mean(axis=(0, 1)), [0.0, 1.0, 1.0], atol=0.05)


@pytest.mark.parametrize("shape", [(1, 1), (283, 283), (522, 512)])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_odd_sizes_keep_their_shape(tmp_path: Path, shape: tuple[int, int], suffix: str) -> None:
    path = _save(tmp_path / f"odd{suffix}", _rgb(1, *shape))
    _check_rgb(load_image(path), shape)
    assert image_size(path) == shape


def test_exif_orientation_is_ignored(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rgb(2, height=10, width=20)).save(tmp_path / "rotated.jpg", exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as stored:
        assert stored.getexif()[0x0112] == 6
    assert load_image(tmp_path / "rotated.jpg").shape == (10, 20, 3)
    assert image_size(tmp_path / "rotated.jpg") == (10, 20)


# ---------------------------------------------------------------- bad files


def test_bad_files_raise_data_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a picture\n")
    noise = _rgb(7, height=64, width=64)
    bad = [tmp_path / "missing.png", tmp_path / "empty.png", tmp_path / "text.png"]
    for suffix in (".png", ".jpg", ".tif", ".bmp"):
        full = _save(tmp_path / f"full{suffix}", noise).read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(full[: len(full) // 2])
        bad.append(tmp_path / f"cut{suffix}")
    for path in bad:
        for loader in (load_image, load_mask):
            with pytest.raises(DataError) as info:
                loader(path)
            assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_size_reads_only_the_header(tmp_path: Path) -> None:
    full = _save(tmp_path / "full.png", _rgb(8, height=40, width=30)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    assert image_size(tmp_path / "cut.png") == (40, 30)
    with pytest.raises(DataError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_decompression_bomb_becomes_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "big.png", _rgb(9, height=10, width=10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match="big.png"):
        load_image(path)


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "values",
    [
        [0, 1, 0, 1],
        [0, 255, 255, 0],
        [0, 253, 254, 255],
        list(range(0, 256, 17)),
    ],
    ids=["0-1", "0-255", "multi-label", "anti-aliased"],
)
def test_mask_any_nonzero_value_is_defect(tmp_path: Path, values: list[int]) -> None:
    array = np.array([values], dtype=np.uint8)
    mask = load_mask(_save(tmp_path / "mask.png", array))
    assert mask.dtype == np.bool_ and mask.shape == array.shape
    np.testing.assert_array_equal(mask, array > 0)


def test_rgb_1bit_and_16bit_masks(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1, 2] = 1
    rgb[1, 2, 0] = 200
    np.testing.assert_array_equal(
        load_mask(_save(tmp_path / "rgb.png", rgb)), [[False, True, False], [False, False, True]]
    )
    bits = Image.new("1", (2, 2))
    bits.putpixel((0, 1), 1)
    bits.save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "bits.png"), [[False, False], [True, False]])
    deep = np.array([[0, 1, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_mask(_save(tmp_path / "deep.png", deep)), [[False, True, True]])


def test_load_mask_size_check(tmp_path: Path) -> None:
    path = _save(tmp_path / "m_mask.png", _mask_array())
    assert load_mask(path, size=(HEIGHT, WIDTH)).shape == (HEIGHT, WIDTH)
    with pytest.raises(DataError, match="m_mask.png"):
        load_mask(path, size=(WIDTH, HEIGHT))


def test_resize_mask_is_nearest_neighbour(tmp_path: Path) -> None:
    mask = np.array([[True, False], [False, True]])
    up = resize_mask(mask, (4, 4))
    assert up.dtype == np.bool_
    np.testing.assert_array_equal(up, np.kron(mask, np.ones((2, 2), dtype=bool)))
    np.testing.assert_array_equal(resize_mask(up, (2, 2)), mask)
    assert resize_mask(np.ones((5, 7), dtype=bool), (3, 11)).all()


def test_good_sample_mask_is_all_false_at_image_size(tmp_path: Path) -> None:
    path = _save(tmp_path / "good.png", _rgb(4, height=5, width=9))
    mask = Sample(image_path=path, mask_path=None, label=0, defect_type="good").load_mask()
    assert mask.shape == (5, 9) and mask.dtype == np.bool_ and not mask.any()
    with pytest.raises(DataError, match="no mask"):
        Sample(image_path=path, mask_path=None, label=1, defect_type="crack").load_mask()


# ---------------------------------------------------------------- tensors


def test_to_tensor_shape_range_and_channels() -> None:
    image = np.zeros((10, 20, 3), dtype=np.float32)
    image[..., 0] = 1.0
    image[..., 1] = 0.3
    original = image.copy()
    tensor = to_tensor(image, resolution=16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0], torch.ones(16, 16))
    assert torch.allclose(tensor[1], torch.full((16, 16), 0.3))
    assert torch.allclose(tensor[2], torch.zeros(16, 16))
    np.testing.assert_array_equal(image, original)
    noisy = to_tensor(np.random.default_rng(0).random((37, 23, 3)), resolution=8)
    assert noisy.shape == (3, 8, 8) and noisy.min() >= 0.0 and noisy.max() <= 1.0
    with pytest.raises(DataError):
        to_tensor(np.zeros((4, 4)), resolution=8)


def test_image_dataset_items_and_cache(tmp_path: Path) -> None:
    _make_tree(tmp_path)
    samples = train_samples(tmp_path, "widget")
    dataset = ImageDataset(samples, resolution=8)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"image", "index"} and item["index"] == 1
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["index"].tolist() == [0, 1, 2]

    cached = ImageDataset(samples, resolution=8, cache=True)
    first = cached[0]["image"]
    samples[0].image_path.unlink()
    assert cached[0]["image"] is first
    with pytest.raises(DataError, match="000.png"):
        dataset[0]
    with pytest.raises(IndexError):
        dataset[3]


# ---------------------------------------------------------------- real data


def test_real_hazelnut_toy() -> None:
    shared_path("hazelnut_toy")
    root = shared_path()
    train = train_samples(root, "hazelnut_toy")
    test = list_test_samples(root, "hazelnut_toy")
    assert len(train) == 28 and len(test) == 23
    defective = [sample for sample in test if sample.label == 1]
    assert len(defective) == 17 and {sample.defect_type for sample in defective} == {"colour"}
    assert [sample.mask_path.name for sample in defective] == [f"{sample.image_path.stem}.png" for sample in defective]
    for sample in defective:
        mask = sample.load_mask()
        assert mask.shape == image_size(sample.image_path) and mask.any()
    tall = [sample for sample in train + test if image_size(sample.image_path) != (512, 512)]
    assert [sample.image_path.name for sample in tall] == ["01.jpg"]
    assert image_size(tall[0].image_path) == (522, 512)
    image = tall[0].load_image()
    assert image.shape == (522, 512, 3) and image.dtype == np.float32
    assert tall[0].load_mask().shape == (522, 512)


def test_real_mvtec_bottle() -> None:
    root = shared_path("mvtec_ad", "bottle").parent
    train = train_samples(root, "bottle")
    test = list_test_samples(root, "bottle")
    assert len(train) == 209 and len(test) == 83
    assert sum(sample.mask_path is not None for sample in test) == 63 == sum(sample.label for sample in test)
    assert {image_size(sample.image_path) for sample in train + test} == {(900, 900)}
    defective = next(sample for sample in test if sample.label == 1)
    assert defective.load_mask().shape == (900, 900) and defective.load_mask().any()
    assert defective.load_image().shape == (900, 900, 3)
