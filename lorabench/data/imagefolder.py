"""Image-caption data in the HF ``imagefolder`` convention, or in one parquet file.

A folder of images, optionally with ``metadata.jsonl`` whose lines hold
``{"file_name": "0001.png", "text": "a caption"}``. With ``instance_prompt`` set,
every image gets that prompt (DreamBooth); otherwise captions come from the
metadata. Class images for prior preservation come from a second folder.

A ``.parquet`` file laid out like the Pokemon BLIP captions mirrors (an ``image`` column of
``{"bytes", "path"}`` structs or raw bytes, and a ``text`` column) works the same way; reading it
needs pyarrow (``pip install 'lorabench[parquet]'``). Every image is decoded once before training,
so a broken row fails with its row number, not mid-epoch.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from lorabench.checks import check_data_path
from lorabench.data.loader import ResumableLoader
from lorabench.errors import ConfigError, check_int
from lorabench.utils.seeding import generator

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ImageSource = Union[Path, bytes]  # a file, or the encoded bytes of one (a parquet row)


def _check_decodes(source: ImageSource, field: str, where: str) -> None:
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ConfigError(field, f"{where} is not a readable image ({exc})") from exc


def scan_parquet(path, *, instance_prompt: Optional[str], field: str, caption_column: str = "text",
                 image_column: str = "image") -> list[tuple[bytes, str]]:
    """``[(encoded image, prompt)]`` of a parquet file (HF datasets' layout: the image column holds
    ``{"bytes", "path"}`` structs or raw bytes), with every row's image checked to decode."""
    try:  # an optional dependency: pip install 'lorabench[parquet]'
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(field, "reading a parquet file needs pyarrow (pip install 'lorabench[parquet]')") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise ConfigError(field, f"{str(path)!r} is not a readable parquet file ({exc})") from exc
    prefix = field.rsplit(".", 1)[0]
    need = [(image_column, f"{prefix}.image_column")]
    if instance_prompt is None:
        need.append((caption_column, f"{prefix}.caption_column"))
    for column, key in need:
        if column not in table.column_names:
            raise ConfigError(field, f"{str(path)!r} has no column {column!r} (columns: "
                              f"{', '.join(table.column_names)}); set {key} to the right one")
    images = table.column(image_column).to_pylist()
    texts = table.column(caption_column).to_pylist() if instance_prompt is None else [instance_prompt] * len(images)
    items = []
    for row, (img, text) in enumerate(zip(images, texts)):
        data = img.get("bytes") if isinstance(img, dict) else img
        if not isinstance(data, bytes):
            raise ConfigError(field, f"{str(path)!r} row {row}: column {image_column!r} holds no image bytes")
        if not isinstance(text, str):
            raise ConfigError(field, f"{str(path)!r} row {row}: column {caption_column!r} holds no caption")
        _check_decodes(data, field, f"{str(path)!r} row {row}: the image")
        items.append((data, text))
    if not items:
        raise ConfigError(field, f"{str(path)!r} has no rows")
    return items


def scan_folder(folder, *, instance_prompt: Optional[str], field: str, caption_column: str = "text",
                image_column: Optional[str] = None) -> list[tuple[ImageSource, str]]:
    """``[(image, prompt)]`` of a folder (or a parquet file), with every image checked to be readable."""
    folder = check_data_path(folder, field)
    if folder.suffix == ".parquet":
        return scan_parquet(folder, instance_prompt=instance_prompt, field=field, caption_column=caption_column,
                            image_column=image_column or "image")
    image_column = image_column or "file_name"
    meta = folder / "metadata.jsonl"
    items: list[tuple[Path, str]] = []
    if meta.is_file():
        for i, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row[image_column], row.get(caption_column)
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(field, f"{meta}: line {i} is not a JSON object with {image_column!r} "
                                  f"({type(exc).__name__})") from exc
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(field, f"{meta}: line {i}: {image_column!r} must name an image file in "
                                  f"{str(folder)!r}, got {name!r}")
            if instance_prompt is None and not isinstance(text, str):
                raise ConfigError(field, f"{meta}: line {i} has no {caption_column!r} caption; add one or set "
                                  "data.instance_prompt")
            items.append((folder / name, instance_prompt if instance_prompt is not None else text))
    else:
        if instance_prompt is None:
            raise ConfigError(field.rsplit(".", 1)[0] + ".instance_prompt",
                              f"folder {str(folder)!r} has no metadata.jsonl captions; set an instance prompt")
        items = [(p, instance_prompt) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not items and meta.is_file():
        raise ConfigError(field, f"{meta} lists no images: one JSON object a line, e.g. "
                          f'{{"{image_column}": "0001.png", "{caption_column}": "a caption"}}')
    if not items:
        raise ConfigError(field, f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    for path, _ in items:
        if not path.is_file():
            what = "is a folder, not an image file" if path.is_dir() else "does not exist"
            raise ConfigError(field, f"image {str(path)!r} listed in metadata.jsonl {what}")
        _check_decodes(path, field, f"image {str(path)!r}")
    return items


def image_size(path: ImageSource) -> tuple[int, int]:
    """``(width, height)`` of an image as it is shown (after its EXIF orientation)."""
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# 16-bit greyscale (PNG): PIL's RGB conversion clips each value to 255, so a mid-grey image came out white
WIDE_GREY = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB, a 16-bit greyscale image scaled to 8 bits first (values / 256)."""
    if im.mode in WIDE_GREY:
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) / 256.0, 0, 255).astype(np.uint8))
    return im.convert("RGB")


def load_image(path: ImageSource, resolution: int, center_crop: bool = True, random_flip: bool = False,
               generator: Optional[torch.Generator] = None, with_size: bool = False,
               target: Optional[tuple[int, int]] = None):
    """RGB image (a file or its bytes, turned upright by its EXIF orientation, as diffusers' training
    scripts do) -> float tensor (3, res, res) in [-1, 1]: resize shorter side, crop, maybe flip. ``target``
    ``(height, width)``: that size instead of the square (an aspect-ratio bucket): resized to cover it, then
    cropped. With ``with_size``, also SDXL's size conditioning of the example: ``(original height, original
    width, crop top, crop left, target height, target width)``, the crop corner in the resized (and, if
    flipped, mirrored) image, as diffusers' SDXL scripts compute ``add_time_ids``."""
    th, tw = target or (resolution, resolution)
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
        im = to_rgb(ImageOps.exif_transpose(im))
        w, h = im.size
        s = max(tw / w, th / h)
        nw, nh = max(tw, round(w * s)), max(th, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        if center_crop:
            left, top = (nw - tw) // 2, (nh - th) // 2
        else:
            left = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
            top = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
        im = im.crop((left, top, left + tw, top + th))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if random_flip and bool(torch.rand((), generator=generator) < 0.5):
        x = x.flip(-1)
        left = nw - tw - left  # the crop's corner in the mirrored image
    if with_size:
        return x, torch.tensor([h, w, top, left, th, tw], dtype=torch.long)
    return x


def make_buckets(resolution: int, step: int = 64, min_size: int = 256, max_size: int = 2048) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's scripts make them: ``(height, width)`` pairs, multiples of ``step``
    within ``[min_size, max_size]``, of area at most ``resolution ** 2`` (each width with the largest height
    that fits, and its transpose), the square among them."""
    area = resolution * resolution
    out = {(resolution // step * step,) * 2}
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, area // w // step * step)
        if h >= min_size:
            out |= {(h, w), (w, h)}
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is nearest the image's ``(width, height)`` (in log
    ratio; the larger bucket on a tie)."""
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log((b[1] / b[0]) / (w / h))), -b[0] * b[1]))


class BucketBatchSampler(Sampler):
    """Batches of one aspect-ratio bucket each: every epoch, each bucket's examples in a seeded random order,
    cut into batches of ``batch_size`` (the last of a bucket may be smaller), and the batches shuffled."""

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int):
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(buckets):
            self.by_bucket.setdefault(b, []).append(i)
        self.batch_size, self.generator = batch_size, torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return sum(-(-len(ix) // self.batch_size) for ix in self.by_bucket.values())

    def __iter__(self):
        batches = []
        for ix in self.by_bucket.values():
            order = [ix[k] for k in torch.randperm(len(ix), generator=self.generator).tolist()]
            batches += [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        for k in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[k]


class ImageCaptionDataset(Dataset):
    """``targets``: each item's (height, width) (its aspect-ratio bucket); None: the square resolution.

    Random crops and flips draw from the dataset's own generator (named by ``augment_key``; None: the global
    one), which the training loader keeps in its checkpoints with its shuffling (:mod:`lorabench.data.loader`):
    a run resumed mid-epoch crops and flips as the uninterrupted run did (from the global generator, which
    Lightning does not keep, it did not). In a loader's worker process each worker draws from its own global
    generator, which PyTorch seeds per worker, as before (one generator copied into every worker would draw
    alike in each)."""

    def __init__(self, items: list[tuple[ImageSource, str]], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, repeats: int = 1, size_conditioning: bool = False,
                 targets: Optional[list[tuple[int, int]]] = None, augment_key: Optional[str] = None):
        self.items, self.resolution = items, resolution
        self.center_crop, self.random_flip, self.repeats = center_crop, random_flip, repeats
        self.size_conditioning, self.targets = size_conditioning, targets
        augments = random_flip or not center_crop
        self.generator = generator("augment", augment_key) if augments and augment_key is not None else None

    @property
    def generators(self) -> list[torch.Generator]:
        """The generators the examples' augmentations draw from (kept by :class:`ResumableLoader`)."""
        return [self.generator] if self.generator is not None else []

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def target(self, i: int) -> Optional[tuple[int, int]]:
        return self.targets[i % len(self.items)] if self.targets else None

    def __getitem__(self, i: int) -> dict:
        path, prompt = self.items[i % len(self.items)]
        target = self.target(i)
        gen = self.generator if get_worker_info() is None else None
        if self.size_conditioning:
            x, size = load_image(path, self.resolution, self.center_crop, self.random_flip, with_size=True,
                                 target=target, generator=gen)
            return {"pixel_values": x, "prompt": prompt, "index": i, "time_ids": size}
        return {"pixel_values": load_image(path, self.resolution, self.center_crop, self.random_flip, target=target,
                                           generator=gen),
                "prompt": prompt, "index": i}


class PriorPreservationDataset(Dataset):
    """Pairs each instance example with a class example (DreamBooth's prior preservation)."""

    def __init__(self, instance: Dataset, klass: Dataset):
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass))

    @property
    def generators(self) -> list[torch.Generator]:
        """The instance examples' augmentation generators, then the class examples'."""
        return [*self.instance.generators, *self.klass.generators]

    def __getitem__(self, i: int) -> dict:
        return {"instance": self.instance[i % len(self.instance)], "class": self.klass[i % len(self.klass)]}


def collate(examples: list[dict]) -> dict:
    """Stack a batch; with prior preservation the class half follows the instance half."""
    if "instance" in examples[0]:
        inst = [e["instance"] for e in examples]
        cls = [e["class"] for e in examples]
        out = collate(inst + cls)
        out["num_prior"] = len(cls)
        return out
    out = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
           "prompts": [e["prompt"] for e in examples], "num_prior": 0,
           "index": torch.tensor([e.get("index", -1) for e in examples])}
    if all("time_ids" in e for e in examples):  # SDXL's per-example size conditioning (data.size_conditioning)
        out["time_ids"] = torch.stack([e["time_ids"] for e in examples])
    return out


BUCKET_DEFAULTS = {"step": 64, "min_size": 256, "max_size": 2048}


def check_buckets(buckets, resolution: int, class_data_dir) -> Optional[dict]:
    """``data.buckets``: null (square crops) or ``{step, min_size, max_size}`` (kohya's bucket options; missing
    keys take :data:`BUCKET_DEFAULTS`)."""
    if not buckets:
        return None
    opts = {**BUCKET_DEFAULTS, **dict(buckets)}
    bad = sorted(set(opts) - set(BUCKET_DEFAULTS))
    if bad:
        raise ConfigError(f"data.buckets.{bad[0]}", f"not a bucket option; valid: {', '.join(BUCKET_DEFAULTS)}")
    for key, v in opts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"data.buckets.{key}", f"must be an integer >= 1, got {v!r}")
    if not opts["min_size"] <= resolution <= opts["max_size"]:
        raise ConfigError("data.buckets", f"min_size {opts['min_size']} <= model resolution {resolution} <= max_size "
                          f"{opts['max_size']} must hold")
    if class_data_dir is not None:
        raise ConfigError("data.buckets", "prior preservation (data.class_data_dir) pairs each image with a class "
                          "image in one batch; train it with square crops (data.buckets=null)")
    return opts


class ImageFolderDataModule(L.LightningDataModule):
    """Training images (and a fixed validation subset) from an imagefolder or a parquet file.

    ``size_conditioning`` (SDXL): each example carries its own size conditioning (original size, crop
    corner; :func:`load_image`), which the module passes as the UNet's ``time_ids`` instead of the
    square default, as diffusers' SDXL training scripts do.
    ``max_train_samples`` keeps a random subset (seeded by ``sample_seed``) for training, as diffusers'
    text-to-image script does; ``all_items`` keeps the whole set (a style protocol's evaluation prompts
    and FID references). ``val_samples`` > 0 adds a validation loader over the first images, with no
    random augmentation, on which the module measures a fixed-noise loss.
    """

    def __init__(self, path: str, resolution: int = 512, batch_size: int = 1, num_workers: int = 0,
                 center_crop: bool = True, random_flip: bool = False, instance_prompt: Optional[str] = None,
                 caption_column: str = "text", image_column: Optional[str] = None,
                 max_train_samples: Optional[int] = None,
                 sample_seed: int = 0, repeats: int = 1, class_data_dir: Optional[str] = None,
                 class_prompt: Optional[str] = None, val_samples: int = 0, seed: int = 0, name: str = "imagefolder",
                 size_conditioning: bool = False, buckets: Optional[dict] = None):
        super().__init__()
        self.size_conditioning = bool(size_conditioning)
        self.buckets = check_buckets(buckets, int(resolution), class_data_dir)
        if batch_size < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        self.path, self.resolution, self.batch_size, self.num_workers = path, int(resolution), batch_size, num_workers
        self.center_crop, self.random_flip, self.instance_prompt = center_crop, random_flip, instance_prompt
        self.caption_column, self.image_column = caption_column, image_column
        if max_train_samples is not None and max_train_samples < 1:
            raise ConfigError("data.max_train_samples",
                              f"must be >= 1 or null (the whole set), got {max_train_samples}")
        self.max_train_samples, self.sample_seed, self.repeats = max_train_samples, sample_seed, repeats
        if class_prompt and class_data_dir is None:  # trained without prior preservation, without a word
            raise ConfigError("data.class_prompt", f"{class_prompt!r} with no class images: prior preservation needs "
                                                   "data.class_data_dir=<folder of class images> too (or leave "
                                                   "data.class_prompt null)")
        self.class_data_dir, self.class_prompt = class_data_dir, class_prompt
        self.val_samples = check_int(val_samples, "data.val_samples", minimum=0)  # the first images; 0: none
        check_int(repeats, "data.repeats", minimum=1)
        self.seed, self.name = seed, name
        self.items: list[tuple[ImageSource, str]] = []
        self.all_items: list[tuple[ImageSource, str]] = []

    def prepare(self) -> "ImageFolderDataModule":
        """Scan and check the folders (idempotent). Called by setup; call it early to fail fast."""
        if self.items:
            return self
        items = scan_folder(self.path, instance_prompt=self.instance_prompt, field="data.path",
                            caption_column=self.caption_column, image_column=self.image_column)
        self.all_items = items
        n = self.max_train_samples
        if n is not None and n > len(items):
            warnings.warn(f"data.max_train_samples={n} is larger than the dataset ({len(items)} images at "
                          f"{self.path}); training on the whole set", stacklevel=2)
        elif n is not None and n < len(items):
            g = torch.Generator().manual_seed(self.sample_seed)
            items = [items[i] for i in torch.randperm(len(items), generator=g)[:n].tolist()]
        self.items = items
        self.class_items = None
        if self.class_data_dir is not None:
            if not self.class_prompt:
                raise ConfigError("data.class_prompt", "prior preservation needs a class prompt")
            self.class_items = scan_folder(self.class_data_dir, instance_prompt=self.class_prompt,
                                           field="data.class_data_dir")
        return self

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare()

    def eval_set(self, max_items: Optional[int] = None, batch_size: int = 64):
        """The whole set (its first ``max_items``) as a style protocol scores against it: every caption,
        and a function yielding the images at the model's resolution in [0, 1], center-cropped, batch by
        batch (833 images at 512 px need not sit in memory at once)."""
        items = self.prepare().all_items
        items = items[:max_items] if max_items else items

        def references():
            for i in range(0, len(items), batch_size):
                batch = torch.stack([load_image(src, self.resolution, center_crop=True)
                                     for src, _ in items[i:i + batch_size]])
                yield (batch + 1) / 2

        return [text for _, text in items], references

    def _dataset(self, items, train: bool, role: str = "instance") -> ImageCaptionDataset:
        targets = None
        if train and self.buckets:  # validation keeps the square crops: a fixed-noise loss comparable across runs
            sizes = make_buckets(self.resolution, **self.buckets)
            targets = [nearest_bucket(image_size(path), sizes) for path, _ in items]
        return ImageCaptionDataset(items, self.resolution, center_crop=self.center_crop or not train,
                                   random_flip=self.random_flip and train, repeats=self.repeats if train else 1,
                                   size_conditioning=self.size_conditioning, targets=targets,
                                   augment_key=f"{role}:{self.seed}" if train else None)

    def train_dataset(self) -> Dataset:
        ds = self._dataset(self.items, True)
        if self.class_items:
            ds = PriorPreservationDataset(ds, self._dataset(self.class_items, True, role="class"))
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        # worker processes that crop or flip at random start afresh each epoch, seeded from the loader's generator,
        # which a checkpoint keeps: a resumed run's workers then draw what the stopped run's drew (persistent ones
        # carry their generators across epochs, which no checkpoint holds)
        workers = {"num_workers": self.num_workers,
                   "persistent_workers": self.num_workers > 0 and not getattr(ds, "generators", ())}
        if self.buckets:
            targets = [ds.target(i) for i in range(len(ds))]
            seeds = {"generator": torch.Generator().manual_seed(self.seed)} if self.num_workers else {}  # workers'
            return ResumableLoader(ds, batch_sampler=BucketBatchSampler(targets, self.batch_size, self.seed),
                                   collate_fn=collate, **workers, **seeds)
        return ResumableLoader(ds, batch_size=self.batch_size, shuffle=True, collate_fn=collate,
                               generator=torch.Generator().manual_seed(self.seed), drop_last=False, **workers)

    def val_dataloader(self):
        if not self.val_samples:
            return []
        ds = self._dataset(self.items[: self.val_samples], False)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, collate_fn=collate, num_workers=0)


def caption_eval_set(data: Mapping, max_items: Optional[int] = None):
    """Every caption of the dataset the config ``data`` describes (its first ``max_items``) and a function
    yielding its images (:meth:`ImageFolderDataModule.eval_set`), the training subset
    (``max_train_samples``) left out: what a style protocol scores against, FID's reference set. Fewer than
    two images is one line naming ``data``."""
    prompts, references = instantiate({k: v for k, v in data.items() if k != "max_train_samples"},
                                      _convert_="all").eval_set(max_items)
    if len(prompts) < 2:
        raise ConfigError("data", f"the dataset has {len(prompts)} image(s); FID needs at least 2")
    return prompts, references
