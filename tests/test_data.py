"""The imagefolder loader: captions or instance prompt, crops and flips, subsets, prior pairs."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lorabench.data import ImageFolderDataModule, load_image, scan_folder
from lorabench.errors import ConfigError


def test_captions_from_metadata(toy_images):
    items = scan_folder(toy_images, instance_prompt=None, field="data.path")
    assert len(items) == 8 and items[0][1] == "a red square"
    items = scan_folder(toy_images, instance_prompt="a photo of sks shape", field="data.path")
    assert {p for _, p in items} == {"a photo of sks shape"}


def test_folder_without_metadata_needs_instance_prompt(tmp_path):
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="data.instance_prompt: .* has no metadata.jsonl"):
        scan_folder(tmp_path, instance_prompt=None, field="data.path")
    assert len(scan_folder(tmp_path, instance_prompt="x", field="data.path")) == 1


def test_bad_metadata_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\nnot json\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON object"):
        scan_folder(tmp_path, instance_prompt=None, field="data.path")


@pytest.mark.parametrize("lines, message", [
    # a file name that is not a string crashed on the path join, a traceback that left a run folder
    (['{"file_name": 5, "text": "x"}'], r"line 2: 'file_name' must name an image file in .*, got 5"),
    (['{"file_name": "", "text": "x"}'], r"line 2: 'file_name' must name an image file in .*, got ''"),
    (['{"file_name": "sub", "text": "x"}'], r"image '.*sub' listed in metadata.jsonl is a folder, not an image"),
])
def test_metadata_names_that_are_no_image_file_are_one_line(tmp_path, lines, message):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "metadata.jsonl").write_text("\n".join(['{"file_name": "a.png", "text": "ok"}', *lines]) + "\n")
    with pytest.raises(ConfigError, match=message):
        scan_folder(tmp_path, instance_prompt=None, field="data.path")


def test_an_empty_metadata_file_says_it_lists_no_images(tmp_path):
    """Images beside an empty metadata.jsonl: the file is what lists nothing (the folder holds images)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"data.path: .*metadata.jsonl lists no images: one JSON object a line"):
        scan_folder(tmp_path, instance_prompt="x", field="data.path")


def _epoch(loader, n=None):
    """A loader's batches of one epoch (its first ``n``)."""
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("kind", ["shuffle", "buckets", "workers"])
def test_a_loader_resumed_from_its_state_hands_out_what_the_uninterrupted_one_would(kind):
    """lorabench.data.loader: a checkpoint's loader state, taken mid-epoch or at an epoch's end, makes a new
    loader (a resumed run's) hand out the rest of that epoch and then the same epochs as the loader that went
    on; the aspect-ratio buckets' own generator is kept too (a resumed run drew fresh bucket orders). With worker
    processes (persistent: one iterator for the whole fit) the orders after the first epoch differed: the new
    iterator drew its workers' seed from the shuffling generator, the uninterrupted one's did not."""
    from lorabench.data.imagefolder import BucketBatchSampler
    from lorabench.data.loader import ResumableLoader

    def make():
        data = list(range(10))
        if kind == "buckets":
            return ResumableLoader(data, batch_sampler=BucketBatchSampler([(8, 8)] * 6 + [(8, 16)] * 4, 3, seed=0))
        workers = {"num_workers": 2, "persistent_workers": True} if kind == "workers" else {}
        return ResumableLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0),
                               **workers)

    def epoch(loader, n=None):
        out = []
        for batch in loader:
            out.append(batch.tolist())
            if len(out) == n:
                break
        return out

    going = make()
    assert epoch(going) != epoch(going)  # each epoch its own order
    first = epoch(going, 2)  # stopped after 2 of the third epoch's 4 batches
    resumed = make()
    resumed.load_state_dict(going.state_dict())
    reference = make()  # the run that was not stopped
    epoch(reference), epoch(reference)
    whole = epoch(reference)
    assert whole[:2] == first
    assert epoch(resumed) == whole[2:]
    assert epoch(resumed) == epoch(reference)  # the next epoch, drawn on from where the resumed one stood
    again = make()  # resumed from a checkpoint at an epoch's end
    again.load_state_dict(resumed.state_dict())
    assert epoch(again) == epoch(reference)


def test_a_loader_keeps_its_datasets_augmentations_and_resumes_a_checkpoint_without_them(toy_images):
    """The dataset's crops and flips (ImageCaptionDataset.generators) are kept with the loader's order: a loader
    resumed mid-epoch hands out the uninterrupted one's images, flipped and cropped alike (from the global
    generator they were not). A checkpoint written before the dataset kept its generator (the loader's own
    state alone) still puts the order back."""
    dm = ImageFolderDataModule(str(toy_images), resolution=12, batch_size=3, center_crop=False, random_flip=True,
                               seed=3).prepare()

    whole = _epoch(dm.train_dataloader())  # the run that was not stopped
    going = dm.train_dataloader()
    assert len(going.dataset.generators) == 1
    _epoch(going, 1)
    state = going.state_dict()
    assert len(state["generator_states"]) == 2 and state["batches"] == 1
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    torch.manual_seed(123)  # what the global generator holds does not matter
    rest = _epoch(resumed)
    assert len(rest) == len(whole) - 1 >= 2
    for a, b in zip(rest, whole[1:]):
        assert a["index"].tolist() == b["index"].tolist() and torch.equal(a["pixel_values"], b["pixel_values"])
    old = dm.train_dataloader()  # a state written when the dataset kept no generator: the loader's alone
    old.load_state_dict({"generator_states": state["generator_states"][:1], "batches": 1})
    assert [b["index"].tolist() for b in _epoch(old)] == [b["index"].tolist() for b in whole[1:]]


@pytest.mark.parametrize("buckets", [None, {"step": 4, "min_size": 8, "max_size": 16}], ids=["square", "buckets"])
def test_worker_processes_crop_and_flip_a_resumed_epoch_as_the_stopped_run_did(toy_images, buckets):
    """With worker processes, random crops and flips drew from each worker's own generator, which persisted across
    epochs and no checkpoint held: a loader resumed in its second epoch cropped and flipped other images than the
    uninterrupted one. Now workers that augment start afresh each epoch, seeded from the loader's generator (kept
    with its order; the buckets' loader has one too), and a resumed epoch is the stopped run's, pixel for pixel."""
    dm = ImageFolderDataModule(str(toy_images), resolution=12, batch_size=3, center_crop=False, random_flip=True,
                               seed=3, num_workers=2, buckets=buckets).prepare()

    reference = dm.train_dataloader()  # the run that was not stopped
    assert not reference.persistent_workers
    first, second = _epoch(reference), _epoch(reference)
    going = dm.train_dataloader()
    assert [b["index"].tolist() for b in _epoch(going)] == [b["index"].tolist() for b in first]
    _epoch(going, 1)  # stopped after the second epoch's first batch
    resumed = dm.train_dataloader()
    resumed.load_state_dict(going.state_dict())
    rest = _epoch(resumed)
    assert len(rest) == len(second) - 1 >= 1
    for a, b in zip(rest, second[1:]):
        assert a["index"].tolist() == b["index"].tolist() and torch.equal(a["pixel_values"], b["pixel_values"])
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, second))  # augmented


def test_a_16_bit_greyscale_image_loads_at_its_grey_not_white(tmp_path):
    """PIL's RGB conversion of a 16-bit greyscale PNG clips each value to 255: a 61%-grey image trained as white."""
    import numpy as np

    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((10, 10), 156, dtype=np.uint8)).save(tmp_path / "grey.png")
    deep, grey = load_image(tmp_path / "deep.png", 8), load_image(tmp_path / "grey.png", 8)
    assert torch.equal(deep, grey) and abs(float(deep.mean()) - (156 / 127.5 - 1)) < 1e-6


def test_resize_crop_flip(tmp_path):
    img = torch.zeros(12, 20, 3, dtype=torch.uint8)
    img[:, :10] = 255  # left half white
    Image.fromarray(img.numpy()).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 8, center_crop=True)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert x[:, :, 0].mean() > 0.9 and x[:, :, -1].mean() < -0.9
    flipped = load_image(tmp_path / "a.png", 8, random_flip=True, generator=torch.Generator().manual_seed(1))
    plain = load_image(tmp_path / "a.png", 8)
    assert torch.equal(flipped, plain) or torch.equal(flipped, plain.flip(-1))


def test_max_train_samples_is_a_seeded_subset(toy_images):
    a = ImageFolderDataModule(str(toy_images), resolution=16, max_train_samples=3, sample_seed=5).prepare()
    b = ImageFolderDataModule(str(toy_images), resolution=16, max_train_samples=3, sample_seed=5).prepare()
    assert len(a.items) == 3 and a.items == b.items


def test_prior_preservation_batch(toy_images):
    dm = ImageFolderDataModule(str(toy_images), resolution=16, batch_size=2, instance_prompt="sks",
                               class_data_dir=str(toy_images), class_prompt="a shape").prepare()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["num_prior"] == 2
    assert batch["prompts"] == ["sks", "sks", "a shape", "a shape"]


def test_write_toy_dataset_is_deterministic(tmp_path):
    from lorabench.data import write_toy_dataset

    a, b = write_toy_dataset(tmp_path / "a", seed=3), write_toy_dataset(tmp_path / "b", seed=3)
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "0000.png", "text": "a red square"}


def test_sdxl_size_conditioning_follows_diffusers_sdxl_scripts(tmp_path):
    """data.size_conditioning: each example carries (original h, w, crop top, left, res, res), the crop's
    corner in the resized image (mirrored with a flip), after the EXIF orientation is applied, as
    diffusers' SDXL DreamBooth script computes add_time_ids; the batch stacks them."""
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "wide.png")
    x, size = load_image(tmp_path / "wide.png", 16, center_crop=True, with_size=True)
    # 40 x 30 -> shorter side 16: 21 x 16, centre crop at left (21 - 16) // 2 = 2
    assert x.shape == (3, 16, 16) and size.tolist() == [30, 40, 0, 2, 16, 16]
    flipped = None
    for seed in range(20):  # a seed whose draw flips: the corner is then mirrored, 21 - 16 - 2 = 3
        _, s = load_image(tmp_path / "wide.png", 16, center_crop=True, random_flip=True,
                          generator=torch.Generator().manual_seed(seed), with_size=True)
        if s[3] != 2:
            flipped = s
            break
    assert flipped is not None and flipped.tolist() == [30, 40, 0, 3, 16, 16]
    # a photo stored sideways with EXIF orientation 6 is turned upright first: 30 wide x 40 high
    img = Image.new("RGB", (40, 30))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "sideways.jpg", exif=exif)
    assert load_image(tmp_path / "sideways.jpg", 16, with_size=True)[1].tolist()[:2] == [40, 30]
    dm = ImageFolderDataModule(str(tmp_path), resolution=16, batch_size=2, instance_prompt="a photo of sks",
                               size_conditioning=True, seed=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["time_ids"].shape == (2, 6) and sorted(batch["time_ids"][:, 0].tolist()) == [30, 40]
    plain = ImageFolderDataModule(str(tmp_path), resolution=16, batch_size=2, instance_prompt="a photo of sks")
    plain.setup()
    assert "time_ids" not in next(iter(plain.train_dataloader()))


def test_sdxl_time_ids_reach_the_unet():
    """A batch's own time_ids replace the square default in SDXL's added conditioning, and change the
    UNet's output; without them the default (res, res, 0, 0, res, res) is used, as when sampling."""
    from lorabench.models import build_scaled_down, denoise, encode_prompts

    comps = build_scaled_down("sdxl", resolution=32, words=["sks"])
    own = torch.tensor([[30, 40, 0, 2, 32, 32]])
    a = encode_prompts(comps, ["a photo of sks"], "cpu", own)
    b = encode_prompts(comps, ["a photo of sks"], "cpu")
    assert a["added_cond_kwargs"]["time_ids"].tolist() == own.float().tolist()
    assert b["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    with torch.no_grad():
        out_a, out_b = (denoise(comps.unet, x, t, c, torch.float32) for c in (a, b))
    assert not torch.allclose(out_a, out_b)


def test_aspect_ratio_buckets_batch_one_shape_and_condition_sdxl_on_it(tmp_path):
    """Why (issue 31): peers' SDXL trainers have aspect-ratio buckets (kohya), lorabench only square crops.
    data.buckets: kohya's buckets (area <= res^2, sides multiples of `step`), each image in the bucket nearest
    its aspect ratio, resized to cover it and cropped; a batch holds one bucket; SDXL's size conditioning
    names the bucket as the target size; each image once per epoch; and a tiny SDXL trains on it."""
    import lightning as L

    from lorabench.data.imagefolder import make_buckets, nearest_bucket
    from lorabench.models import build_tiny_components
    from lorabench.training import DiffusionFineTuner

    buckets = make_buckets(32, step=8, min_size=16, max_size=64)
    # by hand: width 16 -> height min(64, 1024 // 16 // 8 * 8) = 64; 24 -> 40; 32 -> 32; 40 -> 24; 48, 56, 64 -> 16
    assert buckets == sorted({(64, 16), (16, 64), (40, 24), (24, 40), (32, 32), (24, 40), (16, 48), (48, 16),
                              (16, 56), (56, 16)})
    # 40 x 30 (w/h 1.33): |log(1.67 / 1.33)| = 0.22 for 24 x 40 beats |log(1 / 1.33)| = 0.29 for the square
    assert nearest_bucket((40, 30), buckets) == (24, 40) and nearest_bucket((30, 40), buckets) == (40, 24)
    assert nearest_bucket((33, 32), buckets) == (32, 32)
    for i, (w, h) in enumerate([(40, 30), (40, 30), (30, 40), (30, 40), (30, 40), (32, 32)]):
        Image.new("RGB", (w, h), (40 * i, 10, 10)).save(tmp_path / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), resolution=32, batch_size=2, instance_prompt="a photo of sks",
                               size_conditioning=True, buckets={"step": 8, "min_size": 16, "max_size": 64}, seed=0)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == 4  # buckets of 2, 3 and 1 images in batches of 2: 1 + 2 + 1
    seen = []
    for batch in loader:
        h, w = batch["pixel_values"].shape[-2:]
        assert batch["time_ids"][:, 4:].tolist() == [[h, w]] * len(batch["prompts"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(6))
    with pytest.raises(ConfigError, match="data.buckets.stride: not a bucket option"):
        ImageFolderDataModule(str(tmp_path), resolution=32, buckets={"stride": 8})
    comps = build_tiny_components(sdxl=True, resolution=32)
    module = DiffusionFineTuner(comps, {"name": "lora", "rank": 2}, {"lr": 1e-3})
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, train_dataloaders=loader)
    assert all(torch.isfinite(p).all() for p in module.adapters.trainable_parameters())


@pytest.mark.parametrize("kwargs,message", [
    ({"val_samples": -1}, "data.val_samples: must be an integer >= 0, got -1"),  # items[:-1]: all but one, silently
    ({"repeats": 0}, "data.repeats: must be an integer >= 1, got 0"),
])
def test_counts_that_make_no_sense_are_one_line(toy_images, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        ImageFolderDataModule(path=str(toy_images), resolution=16, **kwargs)


def test_a_resolution_the_vae_cannot_encode_whole_is_refused():
    """A latent model's resolution must divide by the VAE's down-sampling (diffusers' pipelines refuse other
    sizes; training cropped them silently: 17 px trained and sampled at 16). Pixel-space models take any."""
    from lorabench.models import build_tiny_components

    with pytest.raises(ConfigError, match=r"model.resolution: must be a multiple of 2 \(the VAE's down-sampling\), "
                                          "got 17"):
        build_tiny_components(with_vae=True, resolution=17)
    assert build_tiny_components(with_vae=True, resolution=16).resolution == 16
    assert build_tiny_components(resolution=17).resolution == 17
