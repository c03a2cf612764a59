"""Single-concept scoring and its protocol's bookkeeping, on the shipped mini-world evaluators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorabench.errors import ConfigError


@pytest.fixture(scope="module")
def scorer():
    from lorabench.world.assets import concept_scorer

    return concept_scorer(world_seed=0)


@pytest.fixture(scope="module")
def eval_sets():
    from lorabench.world.tasks import WorldConceptEval

    return WorldConceptEval(world_seed=0, n_references=8)


def test_own_references_score_higher_than_another_identity(scorer, eval_sets):
    sks, zwz = eval_sets("sks"), eval_sets("zwz")
    own = scorer(sks.references, sks.references)
    other = scorer(zwz.references, sks.references)
    assert own["identity_similarity"] > other["identity_similarity"] + 0.3
    assert own["image_alignment"] > other["image_alignment"]
    assert own["identity_alignment"] == 1.0 and other["identity_alignment"] <= 0.25


def test_text_alignment_prefers_the_matching_text(scorer, eval_sets):
    from lorabench.world import make_world
    from lorabench.world.datasets import heldout_scenes
    from lorabench.world.evaluators import batch_tensor

    world = make_world(0)
    scenes = heldout_scenes(world, 16, seed=3)
    images = batch_tensor(scenes, world.resolution, np.random.default_rng(0))
    right = scorer(images, images, [s.caption() for s in scenes])["text_alignment"]
    wrong = scorer(images, images, [s.caption() for s in scenes[1:] + scenes[:1]])["text_alignment"]
    assert right > wrong + 0.2


def test_scorer_rejects_bad_input(scorer, eval_sets):
    from lorabench.evaluation import ConceptScorer

    with pytest.raises(ConfigError, match="eval.identity_threshold"):
        ConceptScorer(scorer.text_image, scorer.identity, identity_threshold=3.0)
    refs = eval_sets("sks").references
    with pytest.raises(ValueError, match="2 texts for 8 images"):
        scorer(refs, refs, ["a", "b"])


def test_eval_set_prompts_texts_and_references(eval_sets):
    from lorabench.world import make_world
    from lorabench.world.datasets import concept_items

    s = eval_sets("sks")
    assert s.prompts[0] == "a sks circle" and s.prompts[1] == "a sks circle at left on black"
    assert all("sks" in p for p in s.prompts) and not any("sks" in t.split() for t in s.texts)
    assert s.texts[1] == "a circle at left on black"
    train = concept_items(make_world(0), make_world(0).identity("sks"), 8, seed=0)
    train_t = torch.stack([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img, _ in train])
    assert s.references.shape == train_t.shape and not torch.equal(s.references, train_t)


def test_eval_set_bad_context_or_concept():
    from lorabench.world.tasks import WorldConceptEval

    with pytest.raises(ConfigError, match="eval.concepts.contexts: unknown value 'middle'"):
        WorldConceptEval(contexts=[["middle", "black"]])
    with pytest.raises(ConfigError, match="world.concept: unknown value 'nope'"):
        WorldConceptEval()("nope")


def test_summary_is_mean_and_population_std_over_replicates():
    from lorabench.protocols.single_concept import format_table, summarise

    rows = [{"method": "base", "identity_similarity": 0.1, "identity_alignment": 0.0, "image_alignment": 0.5,
             "context_text_alignment": 0.2},
            {"method": "base", "identity_similarity": 0.3, "identity_alignment": 0.5, "image_alignment": 0.7,
             "context_text_alignment": 0.4},
            {"method": "lora", "identity_similarity": 0.6, "identity_alignment": 1.0, "image_alignment": 0.9,
             "context_text_alignment": 0.3, "train_s": 12.0}]
    s = summarise(rows)
    assert s["base"]["identity_similarity"]["mean"] == pytest.approx(0.2)
    assert s["base"]["identity_similarity"]["std"] == pytest.approx(0.1)
    assert s["lora"]["identity_alignment"] == {"mean": 1.0, "std": 0.0, "n": 1}
    assert "train_s" not in s["base"] and "context_identity_similarity" not in s["base"]
    table = format_table(s, n_concepts=2, n_seeds=1)
    assert "| base | 0.200 +- 0.100 |" in table and "| lora | 0.600 +- 0.000 |" in table and "12.0 +- 0.0" in table


def test_one_column_spec_makes_the_markdown_and_the_csv():
    """A column prints rounded in markdown and as raw values in the CSV (several CSV columns, or none); a
    column without a label is in the CSV only."""
    from lorabench.protocols.base import mean_std_csv, pm
    from lorabench.utils.tables import Column, csv_of, markdown

    s = {"lora": {"fid": {"mean": 27.49365, "std": 2.5, "n": 3}}, "base": {}}
    columns = [Column("method", str, (("method", str),)),
               Column("FID", lambda m: pm(s[m].get("fid"), "{:.2f}"), mean_std_csv(s, ["fid"])),
               Column("note", lambda m: "markdown only"),
               Column(None, csv=(("n", lambda m: s[m].get("fid", {}).get("n")),))]
    assert markdown(columns, ["lora", "base"]).splitlines() == [
        "| method | FID | note |", "|---|---|---|", "| lora | 27.49 +- 2.50 | markdown only |",
        "| base | - | markdown only |"]
    assert csv_of(columns, ["lora", "base"]).splitlines() == [
        "method,fid_mean,fid_std,n", "lora,27.49365,2.5,3", "base,,,"]


def test_sample_seeds_are_shared_across_prompts_and_differ_by_replicate():
    from lorabench.protocols.scoring import concept_seeds

    assert concept_seeds(0, 4) == concept_seeds(0, 4) and len(set(concept_seeds(0, 4))) == 4
    assert not set(concept_seeds(0, 4)) & set(concept_seeds(1, 4))
    assert all(isinstance(s, int) for s in concept_seeds(2, 3))


def test_scores_split_the_concept_prompt_from_the_context_prompts(scorer, eval_sets):
    from lorabench.evaluation.scores import score_samples

    sks, zwz = eval_sets("sks"), eval_sets("zwz")
    n = 2  # images per prompt: the concept prompt's two are sks renders, the context ones zwz renders
    images = torch.cat([sks.references[:n], zwz.references[: n * (len(sks.prompts) - 1)]])
    out = score_samples(scorer, images, sks, n)
    alone = scorer(sks.references[:n], sks.references)
    assert out["identity_similarity"] == pytest.approx(alone["identity_similarity"])
    assert out["identity_similarity"] > out["context_identity_similarity"] + 0.3
    assert {"context_text_alignment", "context_identity_alignment", "text_alignment"} <= set(out)


@pytest.fixture(scope="module")
def styles():
    from lorabench.world.tasks import WorldStyleEval

    return WorldStyleEval(world_seed=0, n_objects=4, n_references=8)


def test_style_eval_asks_for_new_objects_and_base_prompts_lack_the_style_word(styles):
    from lorabench.world.datasets import style_object

    s = styles("vango")
    colour, cls = style_object(styles.world, styles.world.style("vango"))
    assert len(s.prompts) == 4 and all(p.startswith("vango image of a ") for p in s.prompts)
    assert f"vango image of a {colour} {cls}" not in s.prompts
    assert s.base_prompts == [p.replace("vango image of ", "") for p in s.prompts]
    with pytest.raises(ConfigError, match="world.style: unknown value 'vangogh'"):
        styles("vangogh")


def test_style_scorer_retrieves_renders_of_the_right_style(styles):
    from lorabench.world.assets import style_scorer

    scorer = style_scorer(world_seed=0, n_references=8, reference_seed=1000)
    fresh = type(styles)(world_seed=0, n_references=8, reference_seed=7).gallery()  # other renders, same styles
    top1 = [scorer(images, name)["style_top1"] for name, images in fresh.items()]
    assert len(top1) == 12 and np.mean(top1) >= 0.8
    own, other = scorer(fresh["vango"], "vango"), scorer(fresh["monex"], "vango")
    assert own["style_similarity"] > other["style_similarity"] + 0.3 and other["style_top1"] == 0.0
    with pytest.raises(ValueError, match="not in the gallery"):
        scorer(fresh["vango"], "nope")


# -- many settings sampled in one pass (protocols/scoring.py::EvalBatch) ------------------------------------------
def _trained_lora(model, seed: int, text_encoder: bool = False):
    """A LoRA injected in ``model`` with random (non-zero) up factors, as if trained."""
    from lorabench.adapters import inject_adapters

    adapters = inject_adapters(model, {"name": "lora", "rank": 2,
                                       "text_encoder_targets": ["q_proj", "v_proj"] if text_encoder else []})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.layers.values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return adapters


@pytest.mark.parametrize("scheduler", ["dpm", "ddpm"])
def test_eval_batch_equals_settings_sampled_alone(load_tiny, scheduler):
    """Settings taken with injected adapters (UNet and text encoder) and with merged deltas: one at a time
    (size 1) exactly as the sampler draws them, and several in a pass equal to that to float rounding; with a
    stochastic scheduler (DDPM) too, each image's step noise from its seed."""
    from lorabench.merging import LayerDelta, merged_into, model_weights, updates_from_adapters
    from lorabench.protocols.scoring import EvalBatch
    from lorabench.sampling import sample_prompts

    model = load_tiny()
    sampler = {"scheduler": scheduler, "num_inference_steps": 3, "progress": False}
    prompts, seeds, cpu = ["a photo of sks dog", "a dog"], [0, 1], torch.device("cpu")
    updates = []
    for i in range(2):
        adapters = _trained_lora(model, i, text_encoder=True)
        updates.append(updates_from_adapters(adapters, f"c{i}"))
        adapters.remove()
    deltas = [{k: LayerDelta(up=u, down=d) for k, (u, d) in up.layers.items()} for up in updates]
    expected = []
    for d in deltas:
        with merged_into(model_weights(model, list(d)), d):
            expected.append(sample_prompts(model, sampler, prompts, seeds, cpu))
    runs = {}
    for size in (1, 3):
        evals = EvalBatch(model, sampler, cpu, size)
        for i in range(2):  # as a protocol scores a cell: its adapter injected, its UNet update handed over
            adapters = _trained_lora(model, i, text_encoder=True)
            evals.add(("cell", i), prompts, seeds, deltas[i], injected=True)
            adapters.remove()
            evals.add(("merge", i), prompts, seeds, deltas[i])  # a merge: every layer's delta, nothing injected
            if evals.full:  # a pass's worth waits (never with size 1: sampled as added)
                evals.sample()
        assert not evals.pending and evals.passes == ([] if size == 1 else [3, 1])
        with pytest.raises(ValueError, match="added twice"):
            evals.add(("merge", 0), prompts, seeds)
        runs[size] = evals.images()
    for i in range(2):
        assert torch.equal(runs[1]["merge", i], expected[i])
        torch.testing.assert_close(runs[1]["cell", i], expected[i], atol=1e-5, rtol=0)  # adapter vs folded weights
        for key in (("cell", i), ("merge", i)):
            torch.testing.assert_close(runs[3][key], runs[1][key], atol=1e-5, rtol=0)
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    assert (expected[0] - sample_prompts(model, sampler, prompts, seeds, cpu)).abs().max() > 1e-3


@pytest.mark.parametrize("value", [0, -2, "wide", 1.5, True])
def test_eval_batch_is_checked(value):
    from lorabench.protocols.scoring import check_eval_batch

    with pytest.raises(ConfigError, match="protocol.eval_batch: must be an integer >= 1 .* or auto"):
        check_eval_batch(value)
    assert check_eval_batch("auto") == "auto" and check_eval_batch(4) == 4


def test_eval_batch_auto_is_one_setting_a_pass_on_a_cpu(load_tiny):
    from lorabench.protocols.scoring import EvalBatch

    assert EvalBatch(load_tiny(), {}, torch.device("cpu"), "auto").size == 1


def test_eval_batch_auto_extrapolates_a_probe_above_what_is_held(load_tiny, monkeypatch):
    """``auto``'s pass width on a GPU, with CUDA's memory counters faked: the probe's peaks at one and two
    settings, less the memory already held (the model, which the free memory excludes), extrapolated to 85%
    of the free memory: 1 + (850 - 100) // 50 = 16 settings; at most 64."""
    from lorabench.protocols.scoring import EvalBatch

    model = load_tiny()
    evals = EvalBatch(model, {"scheduler": "dpm", "num_inference_steps": 2, "progress": False},
                      torch.device("cpu"), 4)
    for i in range(3):
        evals.add(i, ["a dog"], [i])
    peaks = iter([1100, 1150])
    for name, fn in {"empty_cache": lambda *a: None, "memory_allocated": lambda *a: 1000,
                     "reset_peak_memory_stats": lambda *a: None, "max_memory_allocated": lambda *a: next(peaks),
                     "mem_get_info": lambda *a: (1000, 4000)}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    assert evals._auto_size(evals.pending) == 16
    peaks = iter([1100, 1101])  # a setting costs 1 more byte: the cap
    assert evals._auto_size(evals.pending) == 64


def test_eval_batch_captures_input_statistics_alone_and_in_a_pass(load_tiny, monkeypatch):
    """Settings given ``inputs`` (an InputStats on their injected adapter, UNet and text encoder): alone their
    statistics are capture_stats' bit for bit; in a pass (the text encoder's recorded when ``add`` encodes, the
    UNet's by the pass) equal to float rounding; ``auto``'s memory probe of a pass records nothing."""
    from lorabench.merging import InputStats, LayerDelta, capture_stats, updates_from_adapters
    from lorabench.protocols.scoring import EvalBatch

    model = load_tiny()
    sampler = {"scheduler": "dpm", "num_inference_steps": 2, "progress": False}
    prompts, seeds, cpu = ["a photo of sks dog"], [0, 1], torch.device("cpu")
    expected = []
    for i in range(2):
        adapters = _trained_lora(model, i, text_encoder=True)
        expected.append(capture_stats(model, adapters, prompts, seeds, sampler))
        adapters.remove()
    assert any(k.startswith("text_encoder.") for k in expected[0][0])
    for size in (1, 2):
        evals, got, inputs = EvalBatch(model, sampler, cpu, size), {}, []
        for i in range(2):
            adapters = _trained_lora(model, i, text_encoder=True)
            deltas = {k: LayerDelta(up=u, down=d) for k, (u, d) in updates_from_adapters(adapters, "c").layers.items()}
            inputs.append(InputStats(adapters))
            evals.add(i, prompts, seeds, deltas, injected=True, inputs=inputs[i],
                      then=lambda imgs, i=i: got.__setitem__(i, inputs[i].result()))
            inputs[i].remove()
            adapters.remove()
        if size == 2:
            assert got == {} and len(evals.pending) == 2
            peaks = iter([1100, 1150])
            for name, fn in {"empty_cache": lambda *a: None, "memory_allocated": lambda *a: 1000,
                             "reset_peak_memory_stats": lambda *a: None,
                             "max_memory_allocated": lambda *a: next(peaks),
                             "mem_get_info": lambda *a: (1000, 4000)}.items():
                monkeypatch.setattr(torch.cuda, name, fn)
            evals._auto_size(evals.pending)  # the probe runs the pass's hooks, and delivers nothing
            assert all(not k.startswith("unet.") for stats in inputs for k in stats.sums)
            evals.sample()
            assert evals.passes == [2]
        for i in range(2):
            (grams, rows), (want, want_rows) = got[i], expected[i]
            assert rows == want_rows and sorted(grams) == sorted(want)
            for k, g in want.items():
                if size == 1:
                    assert torch.equal(grams[k], g), k
                else:
                    torch.testing.assert_close(grams[k], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))
    unet = [k for k in expected[0][0] if k.startswith("unet.")]  # the settings' adapters move their inputs apart
    assert max(float((expected[0][0][k] - expected[1][0][k]).abs().max()) for k in unet) > 1e-4


def test_eval_batch_hands_images_over_in_the_order_settings_came(load_tiny):
    """A setting sampled alone in ``add`` (its update is on a convolution, which a batch cannot give a weight per
    setting) waits for the batched one added before it: ``then`` runs in the order the settings were added."""
    from lorabench.merging import LayerDelta
    from lorabench.protocols.scoring import EvalBatch

    model = load_tiny()
    conv = next(n for n, m in model.unet.named_modules() if isinstance(m, torch.nn.Conv2d))
    w = model.unet.get_submodule(conv).weight
    delta = {f"unet.{conv}": LayerDelta(dense=0.01 * torch.ones(w.shape[0], w[0].numel()))}
    evals = EvalBatch(model, {"scheduler": "dpm", "num_inference_steps": 2, "progress": False},
                      torch.device("cpu"), 3)
    seen = []
    for i, d in enumerate([None, delta, None]):
        evals.add(i, ["a dog"], [i], d, then=lambda imgs, i=i: seen.append((i, imgs.shape[0])))
    assert seen == [] and evals.alone == 1  # setting 1 is drawn, and waits for setting 0
    evals.sample()
    assert seen == [(0, 1), (1, 1), (2, 1)] and evals.passes == [2] and evals.images() == {}
