"""Images, masks and MVTec-style folders, read exactly as stored on disk.

Layout (MVTec AD and look-alikes)::

    <root>/<category>/train/good/*                 good training images
    <root>/<category>/test/<defect or good>/*      test images
    <root>/<category>/ground_truth/<defect>/*      one mask per defective test image

Images always come back as HxWx3 float32 RGB in [0, 1] and masks as HxW bool at the
image's original size, so metrics can be computed on the original grid. Every bad input
raises `DataError` naming the file or folder and the problem.
"""

from __future__ import annotations

import operator
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageDataset",
    "Sample",
    "image_size",
    "list_categories",
    "load_image",
    "load_mask",
    "resize_mask",
    "test_samples",
    "to_tensor",
    "train_samples",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"

_IGNORED_NAMES = frozenset({"Thumbs.db", ".DS_Store"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_DECODE_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    SyntaxError,
    EOFError,
    NotImplementedError,
    struct.error,
)
_TIFF_PHOTOMETRIC_MINISWHITE = 0
_TIFF_PHOTOMETRIC_SUPPORTED = (0, 1, 2)


class DataError(ValueError):
    """Bad input data: the message names the file or folder and what is wrong with it."""


# ---------------------------------------------------------------- single files


def _check_file(path: Path) -> None:
    """Fail early, with a clear message, on paths that cannot hold an image."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")


def _is_tiff(path: Path) -> bool:
    """Whether the file starts with a TIFF or BigTIFF signature, whatever its name."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _pillow_drops_precision(image: Image.Image) -> bool:
    """Whether Pillow would reduce a TIFF's samples (e.g. 16-bit RGB to 8 bits, uint32 wrapped into int32)."""
    if image.format != "TIFF" or image.mode == "F" or image.mode.startswith("I;16"):
        return False
    bits = image.tag_v2.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(bits) > 8


def _pillow_pixels(image: Image.Image) -> tuple[np.ndarray, float]:
    """Pixels of a loaded Pillow image as stored (HxW or HxWx3, alpha dropped) and the full-scale value."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image).astype(np.uint8), 1.0
    if mode == "L":
        return np.asarray(image), 255.0
    if mode == "LA":
        return np.asarray(image)[..., 0], 255.0
    if mode == "RGB":
        return np.asarray(image), 255.0
    if mode in ("RGBA", "RGBX"):
        return np.asarray(image)[..., :3], 255.0
    if mode.startswith("I;16"):
        return np.asarray(image), float(np.iinfo(np.uint16).max)
    if mode == "I":
        return np.asarray(image), float(np.iinfo(np.int32).max)
    if mode == "F":
        return np.asarray(image), 1.0
    return np.asarray(image.convert("RGB")), 255.0


def _tiff_array_pixels(array: np.ndarray, axes: str, photometric: int, path: Path) -> tuple[np.ndarray, float]:
    """Turn a tifffile page array into HxW or HxWx3 pixels and the full-scale value of its dtype."""
    if photometric not in _TIFF_PHOTOMETRIC_SUPPORTED:
        raise DataError(f"{path}: unsupported TIFF colour model (photometric {photometric}); save it as RGB or grayscale")
    if "S" in axes and axes.index("S") != len(axes) - 1:
        array = np.moveaxis(array, axes.index("S"), -1)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        channels = array.shape[2]
        array = array[..., 0] if channels < 3 else array[..., :3]
    if array.ndim != 2 and array.ndim != 3:
        raise DataError(f"{path}: TIFF page has shape {array.shape}, expected a single 2-D image")
    if array.dtype == np.bool_:
        array, full = array.astype(np.uint8), 1.0
    elif np.issubdtype(array.dtype, np.integer):
        full = float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        full = 1.0
    else:
        raise DataError(f"{path}: unsupported TIFF sample type {array.dtype}")
    if photometric == _TIFF_PHOTOMETRIC_MINISWHITE:
        array = full - array.astype(np.float64)
    return array, full


def _tifffile_pixels(path: Path, pillow_error: Exception | None) -> tuple[np.ndarray, float]:
    """Read the first page of a TIFF with tifffile, for files Pillow cannot read or would reduce."""
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            array = page.asarray()
            axes = page.axes
            photometric = int(page.photometric)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path}: not a readable image (Pillow: {pillow_error}; tifffile: {error})") from error
    return _tiff_array_pixels(array=array, axes=axes, photometric=photometric, path=path)


def _read_pixels(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode the first frame of an image as stored: HxW or HxWx3 pixels and the value meaning full intensity.

    Pillow reads everything it can; TIFFs it cannot read go through tifffile, and so do
    TIFFs it would read at reduced precision unless tifffile lacks their codec (LZW needs
    imagecodecs), in which case Pillow's 8-bit reading is kept. Decoding happens inside
    the try so truncated and corrupt files raise instead of returning partial pixels.
    """
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            if _pillow_drops_precision(image):
                try:
                    return _tifffile_pixels(path=path, pillow_error=None)
                except DataError:
                    pass
            image.load()
            return _pillow_pixels(image)
    except DataError:
        raise
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: image too large to decode safely ({error})") from error
    except _DECODE_ERRORS as error:
        if not _is_tiff(path):
            raise DataError(f"{path}: not a readable image ({error})") from error
        return _tifffile_pixels(path=path, pillow_error=error)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image as HxWx3 float32 RGB in [0, 1], whatever its mode on disk.

    Integer samples are divided by the largest value of their type (8-bit by 255,
    16-bit PNG/TIFF by 65535, 32-bit int by 2**31 - 1; negatives clip to 0); float
    images are taken as already in [0, 1] and clipped. Grayscale, 1-bit and 16-bit
    grayscale are replicated to 3 channels; palette, CMYK and other colour models are
    converted to RGB. Alpha is ignored (dropped, not composited on any background), so
    a fully transparent pixel keeps its stored colour. Only the first frame is read.
    16-bit colour PNGs come through Pillow at 8-bit precision (16-bit colour TIFFs keep
    their full precision through tifffile).

    EXIF orientation is deliberately NOT applied: pixels are read as stored, so masks
    drawn on the stored pixel grid stay aligned with their images.
    """
    path = Path(path)
    pixels, full = _read_pixels(path)
    work_type = np.float32 if pixels.dtype.itemsize <= 2 else np.float64
    values = pixels.astype(work_type)
    if full != 1.0:
        values = values / work_type(full)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    values = np.clip(values, 0.0, 1.0).astype(np.float32)
    if values.ndim == 2:
        values = np.repeat(values[:, :, None], 3, axis=2)
    return np.ascontiguousarray(values)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as HxW bool: any value > 0 is defect.

    0/1, 0/255, several non-zero labels and anti-aliased edges all count every non-zero
    pixel as defect; for colour and palette masks a pixel is defect when any channel of
    its colour is > 0 (alpha is ignored). With `size=(H, W)` a mask of another size
    raises, since the data layer never resizes masks silently; use `resize_mask` for
    deliberate resizing.
    """
    path = Path(path)
    pixels, _ = _read_pixels(path)
    mask = pixels > 0
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    if size is not None and tuple(mask.shape) != tuple(size):
        raise DataError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is {size[0]}x{size[1]}; "
            "masks must match their image's size"
        )
    return mask


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a mask to `size=(H, W)` with nearest-neighbour only, so it stays a hard 0/1 mask."""
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise DataError(f"resize_mask expects an HxW mask, got shape {mask.shape}")
    height, width = (int(value) for value in size)
    if height < 1 or width < 1:
        raise DataError(f"resize_mask: target size must be positive, got {size}")
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image as stored, read from the file header without decoding the pixels."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: image too large to decode safely ({error})") from error
    except _DECODE_ERRORS as error:
        if not _is_tiff(path):
            raise DataError(f"{path}: not a readable image ({error})") from error
        pillow_error = error
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            return int(page.imagelength), int(page.imagewidth)
    except _DECODE_ERRORS as error:
        raise DataError(f"{path}: not a readable image (Pillow: {pillow_error}; tifffile: {error})") from error


# ---------------------------------------------------------------- samples and folders


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where it is, its mask (None for good images), label 0 good / 1 defective."""

    image_path: Path
    mask_path: Path | None
    label: int
    defect_type: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_path", Path(self.image_path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        if self.label not in (0, 1):
            raise DataError(f"{self.image_path}: label must be 0 (good) or 1 (defective), got {self.label!r}")

    @property
    def name(self) -> str:
        """Unique id "<defect_type>/<stem>", used for output file names."""
        return f"{self.defect_type}/{self.image_path.stem}"

    def load_image(self) -> np.ndarray:
        """The image as HxWx3 float32 RGB in [0, 1] (see `load_image`)."""
        return load_image(self.image_path)

    def load_mask(self) -> np.ndarray:
        """HxW bool mask at the image's original size: all false for good images; raises on a size mismatch."""
        size = image_size(self.image_path)
        if self.mask_path is None:
            if self.label == 1:
                raise DataError(f"{self.image_path}: defective sample has no mask")
            return np.zeros(size, dtype=bool)
        return load_mask(self.mask_path, size=size)


def _is_image_file(path: Path) -> bool:
    """Visible image files only: skips hidden files, Thumbs.db/.DS_Store and other extensions."""
    return (
        not path.name.startswith(".")
        and path.name not in _IGNORED_NAMES
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder sorted by name; stems must be unique because they name samples and masks."""
    images = sorted((path for path in folder.iterdir() if _is_image_file(path)), key=lambda path: path.name)
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise DataError(
                f"{folder}: {seen[path.stem].name} and {path.name} share the name {path.stem!r}; "
                "sample names and mask look-up need one image per name"
            )
        seen[path.stem] = path
    return images


def _require_folder(folder: Path, what: str) -> None:
    """Raise a DataError saying which folder is missing or not a folder."""
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{what} {folder} {problem}")


def list_categories(root: str | Path) -> list[str]:
    """Names of the sub-folders of `root` that contain train/good, sorted."""
    root = Path(root)
    _require_folder(root, "dataset root")
    return sorted(
        path.name for path in root.iterdir() if not path.name.startswith(".") and (path / "train" / GOOD).is_dir()
    )


def _category_folder(root: str | Path, category: str) -> Path:
    """`<root>/<category>`, or a DataError listing the categories that do exist."""
    root = Path(root)
    _require_folder(root, "dataset root")
    folder = root / category
    if not folder.is_dir():
        found = list_categories(root)
        listing = ", ".join(found) if found else "none (no sub-folder has train/good)"
        raise DataError(f"category {category!r} not found: {folder} does not exist; categories under {root}: {listing}")
    return folder


def train_samples(root: str | Path, category: str) -> list[Sample]:
    """Good training images in `<root>/<category>/train/good`, sorted by file name."""
    folder = _category_folder(root, category) / "train" / GOOD
    _require_folder(folder, "training folder")
    images = _image_files(folder)
    if not images:
        raise DataError(f"training folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return [Sample(image_path=path, mask_path=None, label=0, defect_type=GOOD) for path in images]


def _mask_candidates(stem: str) -> list[tuple[str, str]]:
    """(stem, lower-case extension) pairs a mask may have, most preferred first."""
    candidates = [(f"{stem}_mask", ".png"), (stem, ".png")]
    for extension in IMAGE_EXTENSIONS:
        candidates += [(f"{stem}_mask", extension), (stem, extension)]
    return candidates


def _find_masks(images: list[Path], truth_folder: Path) -> list[Path]:
    """The mask of each defective image, or one DataError listing every image of the folder without one."""
    available: dict[tuple[str, str], Path] = {}
    if truth_folder.is_dir():
        for path in sorted(truth_folder.iterdir(), key=lambda item: item.name):
            if _is_image_file(path):
                available.setdefault((path.stem, path.suffix.lower()), path)
    masks: list[Path] = []
    missing: list[str] = []
    for image in images:
        mask = next((available[key] for key in _mask_candidates(image.stem) if key in available), None)
        if mask is None:
            missing.append(image.name)
        else:
            masks.append(mask)
    if missing:
        where = truth_folder if truth_folder.is_dir() else f"{truth_folder} (folder does not exist)"
        raise DataError(
            f"{len(missing)} defective image(s) in {images[0].parent} have no mask in {where}; "
            f"looked for <stem>_mask.png, <stem>.png, then <stem>_mask or <stem> with any of "
            f"{', '.join(IMAGE_EXTENSIONS)}: {', '.join(missing)}"
        )
    return masks


def test_samples(root: str | Path, category: str) -> list[Sample]:
    """Test images in `<root>/<category>/test/<defect or good>/`, sorted by (defect_type, file name).

    Every defective image needs a mask in `ground_truth/<defect>/`. A mask with no defect
    pixel only warns: the image stays in the set and counts as defective for image metrics.
    """
    category_folder = _category_folder(root, category)
    test_folder = category_folder / "test"
    _require_folder(test_folder, "test folder")
    truth_root = category_folder / "ground_truth"
    samples: list[Sample] = []
    defect_folders = sorted(
        (path for path in test_folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.name,
    )
    for folder in defect_folders:
        images = _image_files(folder)
        if not images:
            continue
        if folder.name == GOOD:
            samples += [Sample(image_path=path, mask_path=None, label=0, defect_type=GOOD) for path in images]
            continue
        masks = _find_masks(images=images, truth_folder=truth_root / folder.name)
        samples += [
            Sample(image_path=path, mask_path=mask, label=1, defect_type=folder.name)
            for path, mask in zip(images, masks)
        ]
    if not samples:
        raise DataError(f"test folder {test_folder} has no images in any sub-folder")
    for sample in samples:
        if sample.mask_path is not None and not load_mask(sample.mask_path).any():
            warnings.warn(
                f"{sample.mask_path}: mask of defective image {sample.image_path} has no defect pixel; "
                "the image stays in the test set as defective",
                UserWarning,
                stacklevel=2,
            )
    samples.sort(key=lambda sample: (sample.defect_type, sample.image_path.name))
    return samples


# ---------------------------------------------------------------- tensors


def to_tensor(image: np.ndarray, resolution: int) -> torch.Tensor:
    """HxWx3 image to a new 3xRxR float32 tensor in [0, 1].

    Resizes with bilinear interpolation and antialiasing (so downscaling does not alias).
    Every aspect ratio is stretched to a square: the network sees RxR, and maps are
    resized back to the image's original size for evaluation.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"to_tensor expects an HxWx3 image, got shape {image.shape}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"to_tensor: resolution must be a positive int, got {resolution!r}")
    resolution = int(resolution)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    if tuple(tensor.shape[-2:]) != (resolution, resolution):
        tensor = F.interpolate(
            tensor, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return tensor.squeeze(0).clamp(0.0, 1.0).contiguous()


class ImageDataset(Dataset):
    """Samples as 3xRxR tensors: item i is {"image": tensor, "index": i}.

    With `cache=True` each resized tensor is kept after its first load, since training
    reads every image each epoch (209 images at 256 px take about 160 MB). The cached
    tensor itself is returned, so do not modify it in place. With DataLoader workers each
    worker has its own cache; use `persistent_workers=True` to keep it across epochs.
    """

    def __init__(self, samples: Sequence[Sample], resolution: int, cache: bool = False) -> None:
        if len(samples) == 0:
            raise DataError("ImageDataset needs at least one sample")
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
            raise DataError(f"ImageDataset: resolution must be a positive int, got {resolution!r}")
        self.samples = list(samples)
        self.resolution = int(resolution)
        self.cache = cache
        self._tensors: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        index = operator.index(index)
        if index < 0:
            index += len(self.samples)
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        tensor = self._tensors.get(index)
        if tensor is None:
            tensor = to_tensor(image=self.samples[index].load_image(), resolution=self.resolution)
            if self.cache:
                self._tensors[index] = tensor
        return {"image": tensor, "index": index}
