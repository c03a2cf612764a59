"""The mini world's generator: determinism, splits, vocabulary, datasets in imagefolder format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabench.errors import ConfigError
from lorabench.world import make_world
from lorabench.world.datasets import caption_items, concept_items, pretrain_items, style_items, write_imagefolder
from lorabench.world.spec import RARE_TOKENS, STYLE_WORDS
from lorabench.world.tasks import WorldConceptEval, WorldStyleEval


def test_same_seed_gives_byte_identical_datasets(tmp_path):
    for seed_dir in ("a", "b"):
        world = make_world(0)
        write_imagefolder(tmp_path / seed_dir / "pre", pretrain_items(world, 40, seed=1))
        write_imagefolder(tmp_path / seed_dir / "sks", concept_items(world, world.identity("sks"), 6))
    for sub in ("pre", "sks"):
        files = sorted(p.name for p in (tmp_path / "a" / sub).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "b" / sub).iterdir())
        for f in files:
            assert (tmp_path / "a" / sub / f).read_bytes() == (tmp_path / "b" / sub / f).read_bytes()
    other = pretrain_items(make_world(0), 40, seed=2)
    assert any(not np.array_equal(x, y) for (x, _), (y, _) in zip(other, pretrain_items(make_world(0), 40, seed=1)))


def test_experiment_and_evaluator_pools_are_disjoint():
    w = make_world(0)
    exp = {(i.cls, i.body, i.pattern, i.mark) for i in w.experiment_identities}
    ev = {(i.cls, i.body, i.pattern, i.mark) for i in w.evaluator_identities}
    assert exp and ev and not exp & ev
    exp_s = {(s.palette, s.texture, s.outline) for s in w.experiment_styles}
    ev_s = {(s.palette, s.texture, s.outline) for s in w.evaluator_styles}
    assert exp_s and ev_s and not exp_s & ev_s
    per_class = {}
    for i in w.experiment_identities:
        per_class[i.cls] = per_class.get(i.cls, 0) + 1
    assert min(per_class.values()) >= 3  # several identities per class, so same-class merges can interfere
    assert [i.name for i in w.experiment_identities[:10]] == list(RARE_TOKENS[:10])


def test_rare_tokens_and_style_words_never_in_pretraining_captions():
    w = make_world(0)
    words = {word for _, caption in pretrain_items(w, 2000) for word in caption.split()}
    assert not words & set(RARE_TOKENS) and not words & set(STYLE_WORDS)
    assert set(RARE_TOKENS) | set(STYLE_WORDS) <= set(w.vocabulary())


def test_prompts():
    w = make_world(0)
    sks = w.identity("sks")
    assert concept_items(w, sks, 1)[0][1] == f"a sks {sks.cls}"
    vango = w.style("vango")
    assert style_items(w, vango, 1)[0][1].startswith("vango image of a ")
    assert all(p.split()[0] == "a" for _, p in caption_items(w, vango, 5))


def test_world_tokenizer_has_one_token_per_world_word():
    from lorabench.world.build import build_world_model

    comps = build_world_model()
    tok = comps.tokenizer
    split = [w for w in make_world(0).vocabulary() if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert not split, f"world words that do not map to one token: {split}"
    caption = "a small purple triangle with red hstripes at right on gray in sepia scanlines darkedge"
    assert len(tok(caption, add_special_tokens=False).input_ids) == len(caption.split())


def test_unknown_concept_or_style_is_a_clear_error(tmp_path):
    from lorabench.world.build import world_datamodule

    # named by the data field the user set (it was world.concept / world.style, no key of the config)
    with pytest.raises(ConfigError, match="data.concept: unknown value 'rex'; valid: .*sks"):
        world_datamodule("concept", str(tmp_path / "c"), concept="rex")
    with pytest.raises(ConfigError, match="data.style: unknown value 'vangogh'; valid: .*vango"):
        world_datamodule("style", str(tmp_path / "s"), style="vangogh")
    with pytest.raises(ConfigError, match="data.kind: unknown value 'faces'"):
        world_datamodule("faces", str(tmp_path / "f"))
    assert not (tmp_path / "c").exists()


def test_world_dataset_reads_back_through_the_real_loader(tmp_path):
    from lorabench.world.build import world_datamodule

    dm = world_datamodule("concept", str(tmp_path / "sks"), concept="sks", n=4, batch_size=4).prepare()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and set(batch["prompts"]) == {"a sks circle"}
    meta = json.loads((tmp_path / "sks" / "world.json").read_text())
    assert meta["concept"] == "sks" and meta["world_seed"] == 0


def test_ranks_building_one_dataset_at_once_all_read_it(tmp_path):
    """Why: under trainer.strategy=ddp every rank builds a cell's world dataset in the same folder at once; each
    replaced the folder under the others, which then met a missing image (read as bad input: exit 2, the run
    folder removed) or a refused rename: before the change, two threads building and reading it 30 times each
    failed 13 times in 60. Now a folder holding the same files is left as it is; only another content is
    replaced."""
    import threading

    from lorabench.world.build import world_datamodule

    folder, errors = tmp_path / "task" / "world_data", []

    def rank() -> None:
        for _ in range(20):
            try:
                dm = world_datamodule("concept", str(folder), concept="sks", n=8, batch_size=8).prepare()
                assert len(list(dm.train_dataloader())) == 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert not [p for p in folder.parent.iterdir() if p != folder]  # no temporary folder left behind


def test_a_folder_holding_the_files_is_kept_and_another_content_replaced(tmp_path):
    from lorabench.utils.io import holds, write_folder

    files = {"a.txt": b"a", "b.bin": bytes(range(5))}
    folder = write_folder(tmp_path / "d", files)
    inode = folder.stat().st_ino
    assert holds(folder, files) and write_folder(folder, dict(files)).stat().st_ino == inode  # left as it is
    (folder / "stale.txt").write_bytes(b"x")
    assert not holds(folder, files)
    write_folder(folder, files)
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.bin"] and holds(folder, files)
    assert not holds(tmp_path / "missing", files) and not holds(folder / "a.txt", files)


def test_world_data_name_follows_concept_or_style(tmp_path):
    from helpers import compose

    assert compose(["data=world", "data.concept=zwz"], tmp_path).data.name == "zwz"
    styled = compose(["data=world", "data.kind=style", "data.concept=null", "data.style=vango"], tmp_path)
    assert styled.data.name == "vango"
    cfg = compose(["data=world", "data.kind=pretrain", "data.concept=null", "adapter=ortho"], tmp_path)
    assert cfg.data.name == "world" and cfg.adapter.concept_key == "world"


def test_pretraining_corpus_holds_out_experiment_and_heldout_combinations():
    """The corpus teaches every building block (each attribute value, pattern, palette, texture and
    outline) but never an experiment identity's marking, an experiment style, or a held-out combination."""
    from lorabench.world.datasets import corpus_scene, heldout_scenes
    from lorabench.world.spec import (
        BACKGROUNDS,
        CLASSES,
        COLOURS,
        OUTLINES,
        PALETTES,
        PATTERNS,
        POSITIONS,
        SIZES,
        TEXTURES,
        identity_key,
        style_key,
    )

    w = make_world(0)
    assert (len(w.heldout_combos), len(w.heldout_markings), len(w.heldout_styles)) == (90, 118, 9)
    rng = np.random.default_rng(0)
    scenes = [corpus_scene(w, rng) for _ in range(4000)]
    exp_markings = {identity_key(i) for i in w.experiment_identities}
    exp_styles = {style_key(s) for s in w.experiment_styles}
    markings = {identity_key(s.identity) for s in scenes if s.identity}
    styles = {style_key(s.style) for s in scenes if s.style}
    assert not {s.combo for s in scenes} & w.heldout_combos
    assert markings and not markings & (exp_markings | w.heldout_markings)
    assert styles and not styles & (exp_styles | w.heldout_styles)
    for i, values in enumerate((SIZES, COLOURS, CLASSES, POSITIONS, BACKGROUNDS)):
        assert {s.combo[i] for s in scenes} == set(values)  # every single attribute value is still taught
    assert {m[2] for m in markings} == set(PATTERNS)
    assert ({s[0] for s in styles}, {s[1] for s in styles}, {s[2] for s in styles}) == (
        set(PALETTES[1:]), set(TEXTURES), set(OUTLINES))
    held = heldout_scenes(w, 30)
    assert all(s.combo in w.heldout_combos for s in held[0::3])
    assert all(identity_key(s.identity) in w.heldout_markings for s in held[1::3])
    assert all(style_key(s.style) in w.heldout_styles for s in held[2::3])


def test_captions_name_markings_and_styles_in_plain_words():
    from lorabench.world.datasets import random_scene
    from lorabench.world.spec import Identity, Style

    rng = np.random.default_rng(0)
    scene = random_scene(rng, identity=Identity("", "circle", "red", "dot", "green"),
                         style=Style("", "sepia", "grain", "dark"), size="small", position="left", background="white")
    assert scene.caption() == "a small red circle with green dot at left on white in sepia grain darkedge"
    assert scene.caption(frozenset({"size", "position", "style"})) == "a red circle with green dot on white"


def test_concept_captions_fixed_or_per_image_context():
    w = make_world(0)
    sks = w.identity("sks")
    fixed = concept_items(w, sks, 8)
    assert {t for _, t in fixed} == {"a sks circle"}
    held = [["left", "black"], ["top", "gray"]]
    ctx = concept_items(w, sks, 8, caption_mode="context", exclude_contexts=held)
    texts = [t for _, t in ctx]
    assert texts[0::2] == ["a sks circle"] * 4
    assert all(t.startswith("a sks circle at ") for t in texts[1::2])
    assert not any(t.endswith(f"at {p} on {b}") for t in texts for p, b in held)
    with pytest.raises(ConfigError, match="data.caption_mode: unknown value 'per_image'; valid: context, fixed"):
        concept_items(w, sks, 8, caption_mode="per_image")


def test_world_model_schedule_reaches_pure_noise_and_sampling_starts_there():
    """In pixel space SD's scaled_linear schedule leaves 7% of the image at t = T, and the model
    learns to read the layout from the noise instead of the prompt. The world model's schedule ends at
    zero signal (so v-prediction), and sampling starts at t = T (trailing spacing)."""
    from lorabench.sampling import make_scheduler
    from lorabench.world.assets import load_world_model
    from lorabench.world.build import build_world_model

    for comps in (build_world_model(), load_world_model()):
        sched = comps.noise_scheduler
        assert float(sched.alphas_cumprod[-1].sqrt()) < 1e-3
        assert sched.config.prediction_type == "v_prediction"
        dpm = make_scheduler(comps, "dpm")
        dpm.set_timesteps(25)
        assert int(dpm.timesteps[0]) == 999


@pytest.mark.parametrize("build,message", [
    (lambda: WorldConceptEval(n_references=0), "eval.concepts.n_references: must be an integer >= 1, got 0"),
    (lambda: WorldStyleEval(n_references=-2), "eval.styles.n_references: must be an integer >= 1, got -2"),
    (lambda: WorldStyleEval(n_objects=0), "eval.styles.n_objects: must be an integer >= 1, got 0"),
])
def test_evaluation_set_sizes_below_one_are_one_line(build, message):
    """n_references=0 failed inside numpy (np.stack of no images), a traceback where a line names the key."""
    with pytest.raises(ConfigError, match=message):
        build()
