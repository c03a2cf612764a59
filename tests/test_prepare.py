"""Data preparation (lorabench/data/prepare.py) and the continual full-scale sequences against the
reference code (luk-st/continual-lora, the 10-task version), re-implemented literally here."""

import json
import random
import subprocess
import sys

import pytest

from helpers import UNLEARNCANVAS_OBJECTS, UNLEARNCANVAS_STYLES, compose, tiny_jpeg, write_unlearncanvas_tree
from lorabench.continual.tasks import order
from lorabench.data.prepare import DREAMBOOTH_CLASSES, continual_styles, main

TOKENS = ["sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws"]
OBJECT_PROMPTS = ["a {} in a purple wizard outfit", "a {} in a police outfit", "a {} wearing a santa hat",
                  "a {} in a jail", "a {} looking into a mirror"]  # eval/sample_images.py


def reference_object_tasks(order_seed):
    """generate_object_dataset.py then train_object_order.py, as written there."""
    random.seed(42)
    classes = random.sample(sorted(DREAMBOOTH_CLASSES), 10)
    objects = {c: random.choice(DREAMBOOTH_CLASSES[c]) for c in classes}
    tasks = [{"prompt": f"{TOKENS[i]} {c}", "path": objects[c], "token": TOKENS[i]} for i, c in enumerate(objects)]
    random.seed(order_seed)
    random.shuffle(tasks)
    return tasks


@pytest.mark.parametrize("order_seed", [0, 5, 10, 42])
def test_sdxl_objects_lists_the_reference_subjects_in_the_reference_orders(tmp_path, order_seed):
    cfg = compose(["experiment=continual/sdxl_objects", f"sequence.order_seed={order_seed}"], tmp_path)
    ours = order(list(cfg.sequence.tasks), cfg.sequence.order_seed)
    ref = reference_object_tasks(order_seed)
    assert [t.name for t in ours] == [t["token"] for t in ref]
    for t, r in zip(ours, ref):
        assert t.data.path.endswith("/" + r["path"])
        assert t.data.instance_prompt == f"a photo of {r['prompt']}"                       # train_object_order.py
        c = cfg.eval.concepts.concepts[t.name]
        assert c.path == t.data.path and f"{c.token} {c.cls}" == r["prompt"]
    # the evaluation prompts: the five of sample_images.py, no instance prompt
    assert cfg.eval.concepts.prompt is None
    stem = f"{cfg.eval.concepts.concepts.sks.token} {cfg.eval.concepts.concepts.sks.cls}"
    assert [p.format(token="sks", cls="sneaker") for p in cfg.eval.concepts.templates] == \
        [p.format(stem) for p in OBJECT_PROMPTS]
    if order_seed == 0:
        assert [t.name for t in ours] == ["ofl", "psq", "zwz", "twt", "uwu", "pdw", "sbu", "sks", "cws", "zsn"]


def reference_style_tasks(root):
    """generate_style_dataset.py on the tree at ``root``, as written there."""
    import os

    random.seed(42)
    objects = sorted(d for d in os.listdir(root / "Seed_Images") if (root / "Seed_Images" / d).is_dir())
    train_objects = random.sample(objects, 10)
    metric_objects = [o for o in objects if o not in train_objects]
    styles = sorted(d for d in os.listdir(root) if (root / d).is_dir())
    styles.remove("Seed_Images")
    chosen = random.sample(styles, 10)
    idx = random.choices(range(1, 21), k=len(metric_objects))
    tasks = []
    for i, style in enumerate(chosen):
        images = sorted(os.listdir(root / style / train_objects[i]))
        train = random.sample(images, 5)
        tasks.append({"style": style.lower().replace("_", " "), "train_object": train_objects[i].lower(),
                      "train": sorted(train), "metric": sorted(f"{o}_{k}.jpg" for o, k in zip(metric_objects, idx))})
    return tasks


def test_prepare_continual_styles_follows_the_reference_and_the_sequence_reads_it(tmp_path):
    src = write_unlearncanvas_tree(tmp_path / "uc")
    assert main(["continual-styles", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "config.json").read_text())
    ref = reference_style_tasks(src)
    assert [(t["style"], t["train_object"]) for t in manifest["tasks"]] == \
        [(t["style"], t["train_object"]) for t in ref]
    for t, r in zip(manifest["tasks"], ref):
        assert sorted(p.name for p in (tmp_path / "out" / t["train_path"]).iterdir()) == r["train"]
        assert sorted(p.name for p in (tmp_path / "out" / t["metric_path"]).iterdir()) == r["metric"]
    # the sequence and its evaluation set read the manifest: the reference's prompts, the metric folders
    from lorabench.continual.tasks import manifest_tasks
    from lorabench.evaluation.eval_sets import FolderStyleEval

    tasks = manifest_tasks(tmp_path / "out" / "config.json", "styles")
    assert tasks[0]["data"]["instance_prompt"] == f"{ref[0]['style']} image of {ref[0]['train_object']}"
    cfg = compose(["experiment=continual/sdxl_styles", f"sequence.manifest={tmp_path / 'out' / 'config.json'}"],
                  tmp_path)
    ev = FolderStyleEval(manifest=cfg.sequence.manifest, objects=list(cfg.eval.styles.objects), resolution=16)
    name = tasks[0]["name"]
    assert ev(name).prompts == [f"{ref[0]['style']} image of {o}" for o in
                                ("a wizard", "a policeman", "a santa hat", "a clock", "a mirror")]
    assert len(ev.references(name)) == 10
    assert cfg.sequence.tasks == [] and cfg.eval.styles.manifest == cfg.sequence.manifest


def test_prepare_continual_objects_copies_the_reference_subjects(tmp_path):
    src = tmp_path / "dataset"
    for subjects in DREAMBOOTH_CLASSES.values():
        for s in subjects:
            (src / s).mkdir(parents=True)
            (src / s / "00.jpg").write_bytes(tiny_jpeg())
    assert main(["continual-objects", "--src", str(src), "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [t["path"] for t in manifest["tasks"]] == [t["path"] for t in sorted(
        reference_object_tasks(0), key=lambda t: TOKENS.index(t["token"]))]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == \
        sorted(t["path"] for t in manifest["tasks"])


@pytest.mark.integration
@pytest.mark.parametrize("dataset,breaks,fragment", [
    ("continual-objects", "pink_sunglasses", "pink_sunglasses is missing or holds no images"),
    ("continual-styles", "Seed_Images", "has no Seed_Images folder"),
    ("faces", "id_03", "has 11 identity folders; Table 2 needs 12"),
])
def test_a_missing_folder_is_one_line_and_writes_nothing(tmp_path, dataset, breaks, fragment):
    src = tmp_path / "src"
    if dataset == "continual-objects":
        for subjects in DREAMBOOTH_CLASSES.values():
            for s in subjects:
                (src / s).mkdir(parents=True)
                (src / s / "0.jpg").write_bytes(tiny_jpeg())
    elif dataset == "continual-styles":
        write_unlearncanvas_tree(src, styles=UNLEARNCANVAS_STYLES[:10], objects=UNLEARNCANVAS_OBJECTS, images=6)
    else:
        for i in range(12):
            (src / f"id_{i:02d}").mkdir(parents=True)
            (src / f"id_{i:02d}" / "0.jpg").write_bytes(tiny_jpeg())
    import shutil

    shutil.rmtree(src / breaks)
    proc = subprocess.run([sys.executable, "-m", "lorabench.data.prepare", dataset, "--src", str(src), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --src: ") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_prepare_faces_and_pokemon_write_the_configs_layout(tmp_path):
    src = tmp_path / "faces"
    for i in range(13):
        (src / f"id_{i:02d}").mkdir(parents=True)
        (src / f"id_{i:02d}" / "a.jpg").write_bytes(tiny_jpeg(i))
    assert main(["faces", "--src", str(src), "--out", str(tmp_path / "ortha")]) == 0
    cfg = compose(["experiment=orthogonal_adaptation/chilloutmix", f"data_root={tmp_path / 'ortha'}"], tmp_path)
    for c in cfg.protocol.concepts:
        assert list((tmp_path / "ortha" / c).glob("*.jpg")), c
        assert cfg.protocol.concept_data[c].path == str(tmp_path / "ortha" / c)
    assert json.loads((tmp_path / "ortha" / "identities.json").read_text())["person12"] == "id_11"
    # Pokemon: an imagefolder with captions -> the imagefolder the trilora config reads
    poke = tmp_path / "poke"
    poke.mkdir()
    (poke / "x.jpg").write_bytes(tiny_jpeg())
    (poke / "metadata.jsonl").write_text(json.dumps({"file_name": "x.jpg", "text": "a red cartoon"}) + "\n")
    assert main(["pokemon", "--src", str(poke), "--out", str(tmp_path / "pk")]) == 0
    from lorabench.data.imagefolder import scan_folder

    items = scan_folder(tmp_path / "pk", instance_prompt=None, field="data.path")
    assert [t for _, t in items] == ["a red cartoon"]


def test_style_choice_depends_only_on_the_tree(tmp_path):
    """Two copies of the same tree give the same choice; the choice is the reference's random draws."""
    a = continual_styles(write_unlearncanvas_tree(tmp_path / "a"))
    b = continual_styles(write_unlearncanvas_tree(tmp_path / "b"))
    assert a == b and len(a[0]) == 10 and len(a[1]) == 10
