"""Data preparation: the public datasets' trees -> exactly the layout the full-scale configs read.

    python -m lorabench.data.prepare continual-objects --src dreambooth/dataset --out data/continual_objects
    python -m lorabench.data.prepare continual-styles --src unlearncanvas --out data/continual_styles
    python -m lorabench.data.prepare pokemon --src pokemon/train.parquet --out data/pokemon
    python -m lorabench.data.prepare faces --src my_faces --out data/orthogonal_adaptation

- ``continual-objects``: the continual paper's ten DreamBooth subjects, chosen as the reference's
  ``preprocess/generate_object_dataset.py`` chooses them (Python's ``random`` seeded 42: 10 classes
  sampled from the sorted keys of its 15-class table, then one subject folder per class with
  ``random.choice``; tokens sks, zwz, ... in that order). Copies ``<src>/<subject>`` to
  ``<out>/<subject>`` and writes ``<out>/config.json`` in the reference's format.
- ``continual-styles``: the reference's ``preprocess/generate_style_dataset.py`` on an UnlearnCanvas
  tree (``<src>/<Style>/<Object>/<n>.jpg`` and ``<src>/Seed_Images/<Object>``): with the same seed, 10
  training objects from the sorted objects of Seed_Images (the other 10 are the metric objects), 10
  styles from the sorted style folders, 5 training images per style (its training object's folder),
  and one metric image per held-out object in that style (indices ``random.choices(range(1, 21))``).
  Writes ``<out>/<Style>/train``, ``<out>/<Style>/metric`` and ``<out>/config.json``, which
  ``sequence=unlearncanvas_styles`` reads (``sequence.manifest``). The selection depends on the tree's
  folder names: the released 60-style tree and the 50-style list of the UnlearnCanvas code differ.
- ``pokemon``: a Pokemon BLIP captions mirror (a parquet file with ``image`` and ``text`` columns, or
  an imagefolder with ``metadata.jsonl``) -> an imagefolder (``NNNN.png`` + ``metadata.jsonl``).
- ``faces``: Orthogonal Adaptation's identities: the first 12 sub-folders of ``--src`` (sorted), each
  one person's photos, copied to ``<out>/person1`` ... ``<out>/person12`` (what
  ``experiment=orthogonal_adaptation/chilloutmix`` reads), with ``<out>/identities.json`` naming the
  source folder of each.

Every check runs before anything is written: a missing or misnamed folder is one line naming it, and
the output folder appears only when complete (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from lorabench.data.imagefolder import IMAGE_EXTENSIONS, scan_folder, to_rgb
from lorabench.errors import ConfigError
from lorabench.utils.io import atomic_dir

# preprocess/generate_object_dataset.py of luk-st/continual-lora (the 10-task version)
REFERENCE_SEED = 42
OBJECT_TOKENS = ("sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws")
DREAMBOOTH_CLASSES = {
    "backpack": ["backpack", "backpack_dog"],
    "stuffed animal": ["bear_plushie", "grey_sloth_plushie", "wolf_plushie"],
    "bowl": ["berry_bowl"],
    "can": ["can"],
    "candle": ["candle"],
    "cat": ["cat", "cat2"],
    "clock": ["clock"],
    "sneaker": ["colorful_sneaker", "shiny_sneaker"],
    "dog": ["dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"],
    "toy": ["duck_toy", "monster_toy", "poop_emoji", "rc_car", "robot_toy"],
    "boot": ["fancy_boot"],
    "glasses": ["pink_sunglasses"],
    "cartoon": ["red_cartoon"],
    "teapot": ["teapot"],
    "vase": ["vase"],
}
N_TASKS = 10
IMAGES_PER_TRAIN_STYLE = 5
N_FACES = 12


# -- the reference's choices ----------------------------------------------------------------------------
def continual_objects() -> list[dict]:
    """The reference's ten object tasks, in its config.json order: ``{token, class, subject, stem}``
    (``stem`` = "{token} {class}", what its prompts put after "a photo of" and "a ")."""
    rng = random.Random(REFERENCE_SEED)
    classes = rng.sample(sorted(DREAMBOOTH_CLASSES), N_TASKS)
    subjects = {c: rng.choice(DREAMBOOTH_CLASSES[c]) for c in classes}
    return [{"token": tok, "class": c, "subject": subjects[c], "stem": f"{tok} {c}"}
            for tok, c in zip(OBJECT_TOKENS, classes)]


def dirs(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir())


def continual_styles(src: Path) -> tuple[list[dict], list[str]]:
    """The reference's style tasks for the UnlearnCanvas tree at ``src`` (its config.json order), and
    the metric objects. Each task: ``{name, style, train_object, train_images, metric_images}`` with
    file names relative to ``src``; ``style`` and ``train_object`` lower-cased with "_" -> " " as the
    reference writes them."""
    seed_images = src / "Seed_Images"
    if not seed_images.is_dir():
        raise ConfigError("--src", f"{src} has no Seed_Images folder; give the UnlearnCanvas root (its style "
                          "folders and Seed_Images/<Object>)")
    objects = dirs(seed_images)
    if len(objects) < 2 * N_TASKS:
        raise ConfigError("--src", f"{seed_images} has {len(objects)} object folders; the reference takes "
                          f"{N_TASKS} for training and the rest for the metric, so it needs {2 * N_TASKS}")
    rng = random.Random(REFERENCE_SEED)
    train_objects = rng.sample(objects, N_TASKS)
    metric_objects = [o for o in objects if o not in train_objects]
    styles = [s for s in dirs(src) if s != "Seed_Images"]
    if len(styles) < N_TASKS:
        raise ConfigError("--src", f"{src} has {len(styles)} style folders; the reference samples {N_TASKS}")
    chosen = rng.sample(styles, N_TASKS)
    metric_idx = rng.choices(range(1, 21), k=len(metric_objects))
    tasks = []
    for i, style in enumerate(chosen):
        folder = src / style / train_objects[i]
        if not folder.is_dir():
            raise ConfigError("--src", f"{folder} does not exist; style {style} needs its {train_objects[i]} images")
        images = sorted(p.name for p in folder.iterdir() if p.is_file())
        if len(images) < IMAGES_PER_TRAIN_STYLE:
            raise ConfigError("--src", f"{folder} holds {len(images)} images; the reference samples "
                              f"{IMAGES_PER_TRAIN_STYLE}")
        train = [f"{style}/{train_objects[i]}/{name}" for name in rng.sample(images, IMAGES_PER_TRAIN_STYLE)]
        metric = [f"{style}/{obj}/{k}.jpg" for obj, k in zip(metric_objects, metric_idx)]
        for rel in metric:
            if not (src / rel).is_file():
                raise ConfigError("--src", f"{src / rel} does not exist; the metric set of style {style} needs it")
        tasks.append({"name": style, "style": style.lower().replace("_", " "),
                      "train_object": train_objects[i].lower().replace("_", " "),
                      "train_images": train, "metric_images": metric})
    return tasks, metric_objects


def read_manifest(path, field: str = "sequence.manifest") -> tuple[Path, list[dict]]:
    """``(root, tasks)`` of a prepared dataset's config.json (``python -m lorabench.data.prepare``)."""
    path = Path(str(path))
    if not path.is_file():
        raise ConfigError(field, f"{path} does not exist; write it with python -m lorabench.data.prepare "
                          "continual-styles --src <UnlearnCanvas> --out <folder>")
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(field, f"{path} is not a prepared dataset's config.json ({type(exc).__name__})") from exc
    return path.parent, list(tasks)


# -- the commands ----------------------------------------------------------------------------------------
def check_src(src: Path) -> Path:
    if not src.is_dir():
        raise ConfigError("--src", f"{src} is not a folder")
    return src


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def prepare_continual_objects(src: Path, out: Path) -> dict:
    tasks = continual_objects()
    check_src(src)
    for t in tasks:
        folder = src / t["subject"]
        if not folder.is_dir() or not images_in(folder):
            raise ConfigError("--src", f"{folder} is missing or holds no images; the continual objects need the "
                              f"DreamBooth subject {t['subject']!r} (give the DreamBooth dataset/ folder)")

    def write(tmp: Path) -> dict:
        for t in tasks:
            shutil.copytree(src / t["subject"], tmp / t["subject"])
        # the reference's config.json fields (prompt = the stem), plus where lorabench reads each task
        manifest = {"source": "luk-st/continual-lora preprocess/generate_object_dataset.py (seed 42)",
                    "tasks": [{"prompt": t["stem"], "path": t["subject"], "class": t["class"],
                               "object": t["subject"].replace("_", " "), "token": t["token"]} for t in tasks]}
        (tmp / "config.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    return _atomic(out, write)


def prepare_continual_styles(src: Path, out: Path) -> dict:
    tasks, metric_objects = continual_styles(check_src(src))

    def write(tmp: Path) -> dict:
        for t in tasks:
            for kind, key in (("train", "train_images"), ("metric", "metric_images")):
                dest = tmp / t["name"] / kind
                dest.mkdir(parents=True, exist_ok=True)
                for rel in t[key]:
                    # metric files are named <object>_<index>.jpg, as the reference copies them
                    name = Path(rel).name if kind == "train" else f"{Path(rel).parent.name}_{Path(rel).name}"
                    shutil.copy(src / rel, dest / name)
        manifest = {"source": "luk-st/continual-lora preprocess/generate_style_dataset.py (seed 42)",
                    "metric_objects": metric_objects,
                    "tasks": [{"name": t["name"], "style": t["style"], "train_object": t["train_object"],
                               "train_path": f"{t['name']}/train", "metric_path": f"{t['name']}/metric",
                               "train_images": t["train_images"], "metric_images": t["metric_images"]}
                              for t in tasks]}
        (tmp / "config.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    return _atomic(out, write)


def prepare_pokemon(src: Path, out: Path) -> dict:
    if not src.exists():
        raise ConfigError("--src", f"{src} does not exist; give the Pokemon captions parquet file or imagefolder")
    items = scan_folder(src, instance_prompt=None, field="--src")

    def write(tmp: Path) -> dict:
        lines = []
        for i, (image, text) in enumerate(items):
            name = f"{i:04d}.png"
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
                to_rgb(im).save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": text}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        return {"images": len(items)}

    return _atomic(out, write)


def prepare_faces(src: Path, out: Path) -> dict:
    folders = [check_src(src) / d for d in dirs(src)]
    if len(folders) < N_FACES:
        raise ConfigError("--src", f"{src} has {len(folders)} identity folders; Table 2 needs {N_FACES} "
                          "(one folder of photos per person)")
    folders = folders[:N_FACES]
    for f in folders:
        if not images_in(f):
            raise ConfigError("--src", f"{f} holds no images ({', '.join(IMAGE_EXTENSIONS)})")

    def write(tmp: Path) -> dict:
        ids = {}
        for i, f in enumerate(folders, 1):
            dest = tmp / f"person{i}"
            dest.mkdir()
            for p in images_in(f):
                shutil.copy(p, dest / p.name)
            ids[f"person{i}"] = f.name
        (tmp / "identities.json").write_text(json.dumps(ids, indent=2) + "\n")
        return ids

    return _atomic(out, write)


def _atomic(out: Path, write: Callable[[Path], dict]) -> dict:
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", f"{out} exists and is not empty; give a new folder")
    with atomic_dir(out) as tmp:
        return write(tmp)


COMMANDS = {"continual-objects": prepare_continual_objects, "continual-styles": prepare_continual_styles,
            "pokemon": prepare_pokemon, "faces": prepare_faces}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(COMMANDS))
    parser.add_argument("--src", required=True, type=Path, help="the downloaded dataset")
    parser.add_argument("--out", required=True, type=Path, help="a new folder, the configs' data root")
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.dataset](args.src, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    what = f"{len(result['tasks'])} tasks" if "tasks" in result else \
        f"{result['images']} images" if "images" in result else f"{len(result)} identities"
    print(f"{args.dataset}: wrote {args.out} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
