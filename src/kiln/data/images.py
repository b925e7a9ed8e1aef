"""Labelled images for `kiln finetune image`: the task's config, the readers, the split and the batches.

    items = scan("data/train")                       # a folder (one subfolder per class), IDX files, or a CSV
    images = load_pixels(items, size=28, channels=1)        # uint8 [N, 28, 28, 1], every image converted and resized
    batches = ImageBatches(images, ids, 128, seed=0, mean=[0.29], std=[0.35], crop_padding=2, flip=True)

Inputs (one-line KilnErrors naming the file and what was expected):
- a folder with one subfolder per class holding PNG/JPEG (any format Pillow reads); a folder of images
  without subfolders is unlabelled (predict only). Files that are not images by their extension are counted and
  skipped; an image file Pillow cannot decode is an error;
- IDX files as MNIST/Fashion-MNIST ship them: `*-images-idx3-ubyte[.gz]` with `*-labels-idx1-ubyte[.gz]` beside
  it (gzipped or not, told by the bytes); a folder holding one such pair; counts that disagree are an error;
- a CSV with a header row and columns `path` (relative to the CSV's folder) and `label`.
Images of other sizes or modes are converted (grayscale <-> RGB) and resized (bilinear) to the model's
image size; the counts are reported. Split: stratified by label, seeded. Batch i is a pure function of
(seed, i) (kiln.data.batches.EpochSampler), augmentation included: exact resume.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from kiln.config import EpochTrainConfig, _f
from kiln.data.folders import scan_class_folders
from kiln.errors import KilnError
from kiln.model.config import ModelConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
CONFIG_FILE = "image.yaml"
if TYPE_CHECKING:  # torch is imported where tensors are made (to_tensor, ImageBatches): the CLI reads ImageConfig
    import torch   # (a recipe's mistakes are one line) before anything imports torch


# ----------------------------------------------------------------------------------------------- the config


@dataclass
class ImageDataConfig:
    train: str = _f("", "training images: a folder with one subfolder per class (PNG/JPEG), an IDX images file "
                    "(MNIST/Fashion-MNIST: *-images-idx3-ubyte[.gz], its labels file beside it) or a CSV of path,label")
    val: str = _f("", "validation images (same forms); empty = split off train (stratified, seeded)")
    test: str = _f("", "test images (same forms); empty = split off train")
    val_fraction: float = _f(0.1, "share of train held out for validation when data.val is empty", range="[0, 1)")
    test_fraction: float = _f(0.1, "share of train held out for test when data.test is empty", range="[0, 1)")
    split_seed: int = _f(-1, "seed of that split; -1 = the run's seed", range=">= -1")
    label_names: list = _f([], "class names in label order; IDX labels 0, 1, ... are these names; empty = the "
                           "labels as found (sorted)")
    mean: list = _f([], "per-channel mean of the pixel normalisation (pixels in [0, 1]); empty = the init's "
                    "(an HF preprocessor_config.json or the init run's), else the training split's")
    std: list = _f([], "per-channel std of the pixel normalisation; empty = like data.mean")
    limit: int = _f(0, "use only the first N images of data.train (quick runs); 0 = all", range=">= 0")


@dataclass
class AugmentConfig:
    crop_padding: int = _f(0, "random crop: pad each side with this many black pixels and crop back at a random "
                           "offset, anew every step; 0 = off", range=">= 0")
    flip: bool = _f(False, "random horizontal flip of half the training images, anew every step (not for digits)")


def _image_model() -> ModelConfig:
    return ModelConfig(arch="encoder", channels=0, image_size=0, patch_size=4, n_layer=4, n_head=4, d_model=128,
                       d_ff=256, position="learned", norm_eps=1e-6, tie_embeddings=False)


def _image_train() -> EpochTrainConfig:
    return EpochTrainConfig(max_steps=0, batch_size=128, lr=1e-3, min_lr=1e-5, warmup_steps=0, decay="cosine",
                       weight_decay=0.05, beta2=0.999, eval_every=0, save_every=0, keep_last=1, log_every=20)


@dataclass
class ImageConfig:
    """`kiln finetune image`: a Vision Transformer trained from scratch (model section) or from an init."""

    name: str = _f("image", "run name; the run folder is runs/<name>-<timestamp> unless --out names it")
    out: str = _f("", "run folder (default runs/<name>-<timestamp>)")
    seed: int = _f(1337, "random seed for the split, the init, data order, augmentation and dropout", range=">= 0")
    init: str = _f("", "start from: a kiln image run, a kiln ViT backbone (kiln import hf of a ViTModel) or a "
                   "Hugging Face ViT folder (imported into <run>/base); empty = from scratch (the model section)")
    init_checkpoint: str = _f("best", "checkpoint of a kiln run used as init: best | latest | a folder")
    pooling: str = _f("auto", "auto | cls | mean | pooler (auto: the class token when the model has one)",
                      choices=("auto", "cls", "mean", "pooler"))
    head_dropout: float = _f(0.0, "dropout before the classification layer", range="[0, 1)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", range="[0, 1)")
    epochs: float = _f(10.0, "passes over the training split (sets train.max_steps when that is 0)", range="> 0")
    warmup_fraction: float = _f(0.05, "share of the steps for linear warmup when train.warmup_steps is 0", range="[0, 1)")
    metric: str = _f("val_accuracy", "validation metric that picks the best checkpoint and drives early stopping",
                     choices=("val_loss", "val_accuracy", "val_macro_f1"))
    patience: int = _f(0, "stop after this many evaluations without improvement of `metric`; 0 = never", range=">= 0")
    time_budget: float = _f(0.0, "stop training after this many minutes (evaluations included; the lr schedule "
                            "ends in time); 0 = off", range=">= 0")
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: EpochTrainConfig = field(default_factory=_image_train)
    model: ModelConfig = field(default_factory=_image_model, metadata={
        "help": "the ViT from scratch (channels/image_size 0 = the training images'); with init: the init's shape"})


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class Items:
    """What a source holds, before decoding: per image a source name and a label (None: unlabelled)."""

    path: Path
    kind: str                              # folder | idx | csv
    sources: list[str]
    labels: list[str | None]
    files: list[Path] = field(default_factory=list)    # folder/CSV: the image files
    idx: np.ndarray | None = None                      # IDX: the pixels [N, H, W]
    skipped: int = 0                                   # non-image files in a folder

    def __len__(self) -> int:
        return len(self.sources)

    def sizes(self) -> Counter:
        """(width, height, gray) of each image, read from headers only."""
        if self.idx is not None:
            return Counter({(self.idx.shape[2], self.idx.shape[1], True): len(self)})
        from PIL import Image

        out = Counter()
        for f in self.files:
            try:
                with Image.open(f) as im:
                    out[(im.width, im.height, im.mode in GRAY_MODES)] += 1
            except Exception as e:
                raise _unreadable(f, e) from None
        return out

    def subset(self, index) -> "Items":
        index = list(index)
        return Items(self.path, self.kind, [self.sources[i] for i in index], [self.labels[i] for i in index],
                     [self.files[i] for i in index] if self.files else [],
                     self.idx[index] if self.idx is not None else None, self.skipped)


def _unreadable(f: Path, e: Exception) -> KilnError:
    return KilnError(f"{f}: cannot read the image ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else '-'}); "
                     f"expected a PNG/JPEG file Pillow can decode")


def scan(path: str | Path, label_names: list | None = None, require_label: bool = True) -> Items:
    path = Path(path)
    if not path.exists():
        raise KilnError(f"{path}: not found (expected an image folder, an IDX images file or a CSV of path,label)")
    if path.is_dir():
        idx = sorted(p for p in path.iterdir() if "idx3-ubyte" in p.name)
        if len(idx) > 1:
            raise KilnError(f"{path}: holds {len(idx)} IDX image files ({', '.join(p.name for p in idx)}); name one")
        items = _scan_idx(idx[0], require_label) if idx else _scan_folder(path, require_label)
    elif path.suffix.lower() == ".csv":
        items = _scan_csv(path, require_label)
    elif "idx" in path.name or path.suffix in (".gz", ".ubyte"):
        items = _scan_idx(path, require_label)
    else:
        raise KilnError(f"{path}: not an image folder, an IDX file (*-idx3-ubyte[.gz]) or a .csv of path,label")
    if label_names and items.kind == "idx":  # IDX labels are numbers: name them
        n = len(label_names)
        for i, lab in enumerate(items.labels):
            if lab is not None:
                if int(lab) >= n:
                    raise KilnError(f"{items.path}: label {lab} at image {i}, but data.label_names names {n} classes")
                items.labels[i] = str(label_names[int(lab)])
    return items


def _scan_folder(path: Path, require_label: bool) -> Items:
    expected = "expected one subfolder per class holding .png/.jpg files"
    files, labels, skipped, classes = scan_class_folders(path, IMAGE_SUFFIXES, "images", "image", expected)
    if not files:
        raise KilnError(f"{path}: no images ({expected}, IDX files or a CSV of path,label)")
    if require_label and not classes:
        raise KilnError(f"{path}: {len(files)} images but no labels ({expected})")
    return Items(path, "folder", [str(f) for f in files], labels, files, skipped=skipped)


def _scan_csv(path: Path, require_label: bool) -> Items:
    from kiln.data.tables import read_examples

    rows, _ = read_examples(path, "path", "label", require_label=require_label)
    files = []
    for r in rows:
        f = Path(r.text) if Path(r.text).is_absolute() else path.parent / r.text
        if not f.is_file():
            raise KilnError(f"{path}:{r.line}: image {r.text!r} not found (paths are relative to the CSV's folder)")
        files.append(f)
    return Items(path, "csv", [str(f) for f in files], [r.label for r in rows], files)


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """The array of an IDX file of unsigned bytes (magic 0x0000080D, D = dims), gzipped or not."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise KilnError(f"{path}: cannot read ({type(e).__name__}: {e}); expected an IDX file, gzipped or not") from None
    kind = "images (idx3)" if dims == 3 else "labels (idx1)"
    if len(raw) < 4 + 4 * dims or raw[:3] != b"\x00\x00\x08" or raw[3] != dims:
        raise KilnError(f"{path}: not an IDX {kind} file of unsigned bytes (magic {raw[:4].hex() or 'none'}, "
                        f"expected 0000080{dims})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    n = int(np.prod(shape))
    data = raw[4 + 4 * dims:]
    if len(data) != n:
        raise KilnError(f"{path}: its header promises {' x '.join(map(str, shape))} = {n:,} bytes of {kind}, "
                        f"the file holds {len(data):,}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def labels_file_for(images: Path) -> Path:
    """train-images-idx3-ubyte.gz -> train-labels-idx1-ubyte.gz (MNIST's naming)."""
    return images.with_name(images.name.replace("images", "labels").replace("idx3", "idx1"))


def _scan_idx(path: Path, require_label: bool) -> Items:
    if "idx1" in path.name:
        raise KilnError(f"{path}: an IDX labels file; name the images file (*-images-idx3-ubyte[.gz]) beside it")
    pixels = _read_idx(path, 3)
    lab_file = labels_file_for(path)
    if lab_file.is_file():
        labels = [str(int(v)) for v in _read_idx(lab_file, 1)]
        if len(labels) != len(pixels):
            raise KilnError(f"{lab_file}: {len(labels):,} labels, but {path.name} holds {len(pixels):,} images "
                            "(the counts must agree)")
    elif require_label:
        raise KilnError(f"{path}: no labels file beside it (expected {lab_file.name})")
    else:
        labels = [None] * len(pixels)
    if not len(pixels):
        raise KilnError(f"{path}: holds no images")
    return Items(path, "idx", [f"{path.name}#{i}" for i in range(len(pixels))], labels, idx=pixels)


def target_shape(items: Items, size: int, channels: int, patch: int, log) -> tuple[int, int]:
    """(image size, channels) of the model: the given ones, else those of most training images."""
    sizes = items.sizes()
    if not size:
        (w, h, _), _ = Counter({(w, h, 0): n for (w, h, _), n in sizes.items()}).most_common(1)[0]
        size = max(w, h)
        if size % patch:
            raise KilnError(f"{items.path}: images are {w}x{h}, not a multiple of model.patch_size {patch}: set "
                            "--model.image_size (a multiple) or --model.patch_size")
        log(f"model.image_size {size} (the size of most training images)")
    if not channels:
        channels = 1 if all(gray for (_, _, gray) in sizes) else 3
        log(f"model.channels {channels} ({'grayscale' if channels == 1 else 'RGB'} training images)")
    return size, channels


def load_pixels(items: Items, size: int, channels: int, log=None, what: str = "") -> np.ndarray:
    """uint8 [N, size, size, channels]: every image decoded, converted and resized (bilinear); `log` gets
    what was done, naming `what` (default: the source's path)."""
    from PIL import Image

    out = np.zeros((len(items), size, size, channels), dtype=np.uint8)
    resized = converted = 0
    if items.idx is not None:
        if items.idx.shape[1:] == (size, size):
            out[..., :] = items.idx[..., None]
        else:
            resized = len(items)
            for i, a in enumerate(items.idx):
                out[i, ..., :] = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))[..., None]
        converted = len(items) if channels == 3 else 0
    else:
        mode = "L" if channels == 1 else "RGB"
        for i, f in enumerate(items.files):
            try:
                with Image.open(f) as im:
                    im.load()
                    if im.mode != mode:
                        converted += (im.mode in GRAY_MODES) != (channels == 1)
                        im = im.convert("RGBA").convert(mode) if im.mode == "P" else im.convert(mode)
                    if im.size != (size, size):
                        resized += 1
                        im = im.resize((size, size), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except Exception as e:
                raise _unreadable(f, e) from None
            out[i] = a.reshape(size, size, channels)
    if log is not None:
        done = [f"{resized} resized to {size}x{size} (bilinear)"] if resized else []
        done += [f"{converted} converted to {'grayscale' if channels == 1 else 'RGB'}"] if converted else []
        if done:
            log(f"{what or items.path}: {' and '.join(done)} of {len(items)} images")
    return out


def stratified_split(labels: list[str], val_fraction: float, test_fraction: float, seed: int):
    """(train, val, test) index lists: per label a seeded permutation, cut val | test | train."""
    rng = np.random.default_rng([seed, 7])
    parts: list[list[int]] = [[], [], []]
    by = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    for lab in sorted(by):
        idx = [by[lab][j] for j in rng.permutation(len(by[lab]))]
        n_val, n_test = round(len(idx) * val_fraction), round(len(idx) * test_fraction)
        if n_val + n_test >= len(idx):  # keep one to train on
            n_val, n_test = min(n_val, max(len(idx) - 1, 0)), 0
        parts[1] += idx[:n_val]
        parts[2] += idx[n_val:n_val + n_test]
        parts[0] += idx[n_val + n_test:]
    return [sorted(p) for p in parts]


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), np.maximum(x.std(0), 1e-3).round(4).tolist()


# ----------------------------------------------------------------------------------------------- batches


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [B, H, W, C] -> normalised float [B, C, H, W]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return x.sub_(m[:, None, None]).div_(s[:, None, None])


def augment(images: np.ndarray, rng: np.random.Generator, padding: int, flip: bool) -> np.ndarray:
    """Random crop (zero padding) and horizontal flip of a uint8 [B, H, W, C] batch."""
    B, H, W, _ = images.shape
    rows, cols = np.arange(H)[None, :].repeat(B, 0), np.arange(W)[None, :].repeat(B, 0)
    if padding:
        images = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        rows = rows + rng.integers(0, 2 * padding + 1, (B, 1))
        cols = cols + rng.integers(0, 2 * padding + 1, (B, 1))
    if flip:
        cols = np.where(rng.random((B, 1)) < 0.5, cols[:, ::-1], cols)
    return images[np.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ImageBatches:
    """Training micro-batch i: a pure function of (seed, i), its augmentation drawn from (seed, i) too."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, mean, std,
                 crop_padding: int = 0, flip: bool = False):
        self.images, self.labels, self.seed, self.mean, self.std = images, labels, seed, mean, std
        self.padding, self.flip = crop_padding, flip
        from kiln.data.batches import EpochSampler

        self.sampler = EpochSampler(np.ones(len(images)), batch_size, seed)

    def batch(self, i: int) -> dict:
        idx = self.sampler.indices(i)
        x = self.images[idx]
        if self.padding or self.flip:
            x = augment(x, np.random.default_rng([self.seed, 11, i]), self.padding, self.flip)
        import torch

        return {"pixel_values": to_tensor(x, self.mean, self.std), "labels": torch.from_numpy(self.labels[idx])}
