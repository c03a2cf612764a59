"""Merge methods, input statistics, crosstalk measures and their one-line errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import assert_one_line_error, child_outlives_parent, crashed, run_here
from lorabench.errors import ConfigError
from lorabench.merging import (
    AdapterUpdate,
    LayerDelta,
    StackedDeltas,
    check_compatible,
    check_merge,
    fold,
    fuse_closed_form,
    fuse_lbfgs,
    fusion_objective,
    group_crosstalk,
    load_stats,
    merge,
    merged_into,
    merged_pairs,
    output_error,
    save_merged_adapter,
    save_stats,
)
from lorabench.merging.methods import ridge_value, trim


def random_updates(n=3, shapes=(("a", 24, 16), ("b", 12, 20)), r=4, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return [AdapterUpdate(f"c{i}", {name: (torch.randn(o, r, generator=g), torch.randn(r, i_, generator=g))
                                    for name, o, i_ in shapes}, **kw) for i in range(n)]


def random_grams(updates, tokens=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in updates:
        grams = {}
        for layer, (_, down) in updates[0].layers.items():
            x = torch.randn(tokens, down.shape[1], generator=g) * torch.linspace(0.2, 2.0, down.shape[1])
            grams[layer] = (x.T @ x / tokens)
        out.append(grams)
    return out


def test_sum_equals_w0_plus_lambda_sum_of_deltas():
    ups = random_updates(4)
    w0 = {k: torch.randn(u.shape[0], d.shape[1]) for k, (u, d) in ups[0].layers.items()}
    weights = {k: v.clone() for k, v in w0.items()}
    res = merge(ups, {"name": "sum", "lam": 0.6})
    with merged_into(weights, res.deltas):
        for k in w0:
            expect = w0[k].double() + 0.6 * sum(u.delta(k).double() for u in ups)
            err = (weights[k].double() - expect).abs().max() / expect.abs().max()
            assert err <= 1e-6, (k, float(err))
    for k in w0:  # restored exactly
        assert torch.equal(weights[k], w0[k])


def test_closed_form_objective_is_at_or_below_lbfgs():
    ups = random_updates(3)
    grams = random_grams(ups)
    for layer in ups[0].layers:
        gs = [g[layer].double() for g in grams]
        ds = [u.delta(layer).double() for u in ups]
        rho = ridge_value(gs, 1e-4)
        closed = fusion_objective(fuse_closed_form(ds, gs, rho), ds, gs, rho)
        lbfgs, _ = fuse_lbfgs(ds, gs, rho, max_iter=500)
        iterative = fusion_objective(lbfgs, ds, gs, rho)
        assert float(closed) <= float(iterative) * (1 + 1e-6)
        # and it is the minimiser: the gradient vanishes there
        d = fuse_closed_form(ds, gs, rho).requires_grad_(True)
        fusion_objective(d, ds, gs, rho).backward()
        assert float(d.grad.abs().max()) < 1e-8 * float(closed)


@pytest.mark.integration
def test_lbfgs_reaches_the_closed_form_and_the_process_pool_solves_the_same_layers():
    """On well-conditioned statistics LBFGS converges to the minimiser (so its hand-written gradient is
    the objective's); with merge.workers = 2 the layers' solves run in spawned processes and agree, as with
    ``auto`` (one per CPU the job is given); a worker count that is not a positive integer or auto is a one-line
    error."""
    ups = random_updates(3)
    grams = random_grams(ups)
    closed = merge(ups, {"name": "gradient_fusion"}, stats=grams)
    serial = merge(ups, {"name": "gradient_fusion", "solver": "lbfgs"}, stats=grams)
    pooled = merge(ups, {"name": "gradient_fusion", "solver": "lbfgs", "workers": 2}, stats=grams)
    auto = merge(ups, {"name": "gradient_fusion", "solver": "lbfgs", "workers": "auto"}, stats=grams)
    for layer in ups[0].layers:
        ref = closed.deltas[layer].dense
        for res in (serial, pooled, auto):
            assert float((res.deltas[layer].dense - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
        assert serial.info["lbfgs_iterations"][layer] < 500  # converged, not cut
    with pytest.raises(ConfigError, match=r"merge\.workers"):
        merge(ups, {"name": "gradient_fusion", "solver": "lbfgs", "workers": 0}, stats=grams)
    with pytest.raises(ConfigError, match=r"merge\.workers: must be a positive integer or auto"):
        merge(ups, {"name": "gradient_fusion", "solver": "lbfgs", "workers": "all"}, stats=grams)


def test_auto_workers_are_the_cpus_the_job_is_given(monkeypatch):
    """``merge.workers: auto`` spawns one solver process per CPU the job is given: ``$OMP_NUM_THREADS`` where
    set (a `gpu` test shard beside the world table is given 2 of a 16-core host), else the CPUs it may run on;
    a budget of one solves in the process itself."""
    from concurrent.futures import ThreadPoolExecutor

    from lorabench.merging import methods
    from lorabench.utils.cpus import cpu_budget

    asked = []

    def pool(workers):  # threads, not spawned processes: what is checked is how many were asked for
        asked.append(workers)
        return ThreadPoolExecutor(max_workers=2)

    monkeypatch.setattr(methods, "solver_pool", pool)
    ups = random_updates(2)
    grams = random_grams(ups)
    serial = merge(ups, {"name": "gradient_fusion", "solver": "lbfgs"}, stats=grams)
    for env, budget in (("3", 3), ("5,2", 5), ("1", 1)):
        monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert cpu_budget() == budget
        auto = merge(ups, {"name": "gradient_fusion", "solver": "lbfgs", "workers": "auto"}, stats=grams)
        for layer in ups[0].layers:
            assert torch.equal(auto.deltas[layer].dense, serial.deltas[layer].dense)
    assert asked == [3, 5]  # and none for a budget of one
    for env in ("", "0", "two"):  # unset or not a positive integer: the CPUs the process may run on
        monkeypatch.setenv("OMP_NUM_THREADS", env)
        assert cpu_budget() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


POOL_PARENT = """
import os, time
from lorabench.utils.cpus import spawn_pool

if __name__ == "__main__":
    pool = spawn_pool(1)
    print(pool.submit(os.getpid).result(), flush=True)  # the worker is up; its task ends here
    pool.submit(time.sleep, 120)
    time.sleep(120)
"""


def test_spawned_workers_end_with_the_process_that_started_them(tmp_path):
    """Why: a job stopped by SIGTERM or SIGKILL (kill, timeout, a scheduler) left its cell workers training
    orphaned to the end of their cells (seen: two workers at full CPU after `timeout` ended the main job).
    The pools' processes (cells, LBFGS solvers) now end within a second or two of their parent."""
    assert child_outlives_parent(tmp_path, POOL_PARENT) is False


def test_gradient_fusion_of_one_concept_returns_it_where_its_inputs_reach():
    [u] = random_updates(1)
    grams = random_grams([u])
    res = merge([u], {"name": "gradient_fusion", "ridge": 1e-9}, stats=grams)
    for layer in u.layers:
        assert torch.allclose(res.deltas[layer].to_dense(), u.delta(layer), rtol=1e-4, atol=1e-4)


def test_ties_trims_elects_and_averages_disjointly():
    a = AdapterUpdate("a", {"l": (torch.eye(2), torch.tensor([[3.0, -1.0], [0.5, 2.0]]))})
    b = AdapterUpdate("b", {"l": (torch.eye(2), torch.tensor([[1.0, 4.0], [-0.1, -2.5]]))})
    # density 0.5 keeps 2 of 4 entries per task: a -> [[3, 0], [0, 2]], b -> [[0, 4], [0, -2.5]]
    assert torch.equal(trim(a.delta("l"), 0.5), torch.tensor([[3.0, 0.0], [0.0, 2.0]]))
    out = merge([a, b], {"name": "ties", "density": 0.5, "lam": 1.0}).deltas["l"].to_dense()
    # signs: [[+, +], [0, -]]; disjoint means over agreeing kept entries
    assert torch.allclose(out, torch.tensor([[3.0, 4.0], [0.0, -2.5]]))


def test_dare_is_seeded_and_unbiased():
    ups = random_updates(2, shapes=(("l", 64, 64),))
    d1 = merge(ups, {"name": "dare", "drop": 0.5, "seed": 3}).deltas["l"].to_dense()
    d2 = merge(ups, {"name": "dare", "drop": 0.5, "seed": 3}).deltas["l"].to_dense()
    d3 = merge(ups, {"name": "dare", "drop": 0.5, "seed": 4}).deltas["l"].to_dense()
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    full = ups[0].delta("l") + ups[1].delta("l")
    kept = ((d1 != 0).float().mean())
    assert 0.6 < float(kept) < 0.9  # 1 - 0.5^2 of entries survive in at least one task
    mean = torch.stack([merge(ups, {"name": "dare", "drop": 0.5, "seed": s}).deltas["l"].to_dense()
                        for s in range(200)]).mean(0)
    assert float((mean - full).norm() / full.norm()) < 0.15


def test_svd_truncation_reports_dropped_energy_and_saves_at_rank(tmp_path):
    ups = random_updates(3, shapes=(("l", 32, 32),))
    exact = merge(ups, {"name": "sum", "lam": 1.0}).deltas["l"]
    res = merge(ups, {"name": "svd", "lam": 1.0, "rank": 4})
    s = torch.linalg.svdvals(exact.to_dense().double())
    expected = float((s[4:] ** 2).sum() / (s ** 2).sum())
    assert res.info["dropped_energy"]["l"] == pytest.approx(expected, rel=1e-6)
    assert res.deltas["l"].up.shape == (32, 4)
    pairs, dropped = merged_pairs({"l": exact}, rank=None)
    assert dropped["l"] < 1e-10 and pairs["l"][0].shape == (32, 12)  # rank 12 = exact


def test_merged_adapter_file_loads_in_lorabench_and_equals_the_merge(tmp_path, load_tiny):
    from lorabench.adapters import load_adapter
    from lorabench.merging import model_weights

    comps = load_tiny()
    ups = _two_updates(comps, rank=2)
    res = merge(ups, {"name": "sum", "lam": 0.6})
    save_merged_adapter(comps, res.deltas, tmp_path)
    for file in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
        loaded = load_adapter(comps, tmp_path / file)
        for name, d in loaded.delta_weights().items():
            assert torch.allclose(d, res.deltas[name].to_dense(), atol=1e-6), file
        loaded.remove()
    # and the UNet folder: the merged weights, loadable by diffusers
    from diffusers import UNet2DConditionModel

    from lorabench.merging import save_merged_unet

    save_merged_unet(comps, res.deltas, tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    base = model_weights(comps, list(res.deltas))
    for name, w in base.items():
        merged_w = unet.get_submodule(name.partition(".")[2]).weight
        assert torch.allclose(merged_w, w + res.deltas[name].to_dense(), atol=1e-6)


def test_a_merged_unet_folder_loads_in_place_of_the_models_own(tmp_path, tiny_model_dir):
    """experiment=merge_adapters protocol.save_as=unet wrote a UNet folder that lorabench could not use: model.unet
    now puts it in place of the model's UNet (the rest of the model its own), once its config shows the model's
    architecture; a UNet of another model, a folder without config.json and a missing one are one line each."""
    from lorabench.merging import model_weights, save_merged_unet
    from lorabench.models import build_tiny_components, load_components

    comps = load_components(str(tiny_model_dir))
    res = merge(_two_updates(comps, rank=2), {"name": "sum", "lam": 0.6})
    save_merged_unet(comps, res.deltas, tmp_path / "unet")
    swapped = load_components(str(tiny_model_dir), unet=str(tmp_path / "unet"))
    for name, w in model_weights(comps, list(res.deltas)).items():
        assert torch.equal(swapped.unet.get_submodule(name.partition(".")[2]).weight, w + res.deltas[name].to_dense())
    assert all(torch.equal(a, b) for a, b in zip(swapped.text_encoder.state_dict().values(),
                                                 comps.text_encoder.state_dict().values()))
    assert swapped.model_id == f"{tiny_model_dir} with unet {tmp_path / 'unet'}"

    build_tiny_components(cross_attention_dim=16, text_hidden_size=16).unet.save_pretrained(tmp_path / "other")
    for folder, fragments in ((tmp_path / "other", ("is a UNet of another architecture than model.pretrained",
                                                    "(cross_attention_dim: 16 here, 32 in the model); give a UNet")),
                              (tmp_path, ("has no config.json", "give a diffusers UNet2DConditionModel folder")),
                              (tmp_path / "nope", ("does not exist",))):
        with pytest.raises(ConfigError) as err:
            load_components(str(tiny_model_dir), unet=str(folder))
        assert err.value.field == "model.unet" and all(f in err.value.message for f in fragments), err.value


def test_model_unet_null_keeps_the_cell_caches_and_a_unet_folder_keys_its_own():
    """model.unet was added to the model configs after cells were cached: null hashes as if it were not there (a
    cached cell, a continual run's fingerprint stay valid); a folder is another model's cell."""
    from lorabench.protocols.cells import config_hash

    model = {"name": "sd15", "pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "resolution": 512}
    assert config_hash({"model": {**model, "unet": None}}, ["model"]) == config_hash({"model": model}, ["model"])
    assert config_hash({"model": {**model, "unet": "run/unet"}}, ["model"]) != config_hash({"model": model}, ["model"])


def test_a_file_whose_config_lorabench_refuses_says_so_not_that_it_misfits(tmp_path):
    """A file trained with alpha 0 (before the check refused it: an adapter that learned nothing) read "does not fit
    the model (trained on ..., loaded into ...): adapter.alpha: ...", though nothing about the model was wrong."""
    from safetensors.torch import save_file

    from lorabench.adapters import inject_adapters, load_adapter, read_safetensors, save_adapter
    from lorabench.models import build_tiny_components

    path = save_adapter(inject_adapters(build_tiny_components(), {"name": "lora", "rank": 4}),
                        tmp_path / "adapter.safetensors", base_model="elsewhere")
    tensors, metadata = read_safetensors(path)
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps({**json.loads(metadata["config"]),
                                                                              "alpha": 0})})
    with pytest.raises(ConfigError) as err:
        load_adapter(build_tiny_components(), path)
    assert err.value.field == f"adapter file {str(path)!r}"
    assert err.value.message.startswith("holds an adapter config lorabench refuses (adapter.alpha: must be null")
    assert "does not fit" not in str(err.value) and err.value.message.endswith("train it again with a valid one")


@pytest.mark.parametrize("case, fragment", [
    ("other_base", "trained on another base model"),
    ("other_targets", "adapt different target modules"),
    ("duplicate", "listed twice"),
    ("shared_rows", "share basis rows in disjoint mode"),
])
def test_incompatible_adapters_are_one_line_errors(case, fragment):
    ups = random_updates(2, base_fingerprint="abc")
    if case == "other_base":
        ups[1].base_fingerprint = "def"
    elif case == "other_targets":
        ups[1] = AdapterUpdate(ups[1].name, {k: v for k, v in ups[1].layers.items() if k != "b"},
                               base_fingerprint="abc")
    elif case == "duplicate":
        ups[1].name = ups[0].name
    else:
        for u, slot in zip(ups, (0, 1)):
            u.adapter_type, u.config = "ortho", {"row_mode": "disjoint", "slot": slot}
            u.layer_metadata = {"a": {"rows": [0, 1, 2, 3] if slot == 0 else [3, 4, 5, 6]}}
    with pytest.raises(ConfigError, match=fragment) as exc:
        merge(ups, {"name": "sum"})
    assert "\n" not in str(exc.value)


def test_unknown_merge_and_option_are_one_line_errors():
    ups = random_updates(2)
    with pytest.raises(ConfigError, match="merge.name: unknown value 'avg'"):
        merge(ups, {"name": "avg"})
    with pytest.raises(ConfigError, match="merge.nope: not an option of merge 'sum'"):
        merge(ups, {"name": "sum", "nope": 1})
    with pytest.raises(ConfigError, match="gradient_fusion needs one statistics file per adapter"):
        merge(ups, {"name": "gradient_fusion"})
    with pytest.raises(ConfigError, match="merge.solver"):
        merge(ups, {"name": "gradient_fusion", "solver": "adam"}, stats=random_grams(ups))


@pytest.mark.parametrize("config, fragment", [
    ({"name": "ties", "density": 2}, "merge.density: must be a number in (0, 1], got 2"),
    ({"name": "ties", "density": 0}, "merge.density: must be a number in (0, 1], got 0"),
    ({"name": "dare", "drop": 1.0}, "merge.drop: must be a number in [0, 1), got 1.0"),
    ({"name": "dare", "seed": "x"}, "merge.seed: must be an integer, got 'x'"),
    ({"name": "svd", "rank": 0}, "merge.rank: must be an integer >= 1 or null, got 0"),
    ({"name": "sum", "lam": "big"}, "merge.lam: must be a number"),
    ({"name": "gradient_fusion", "ridge": 0}, "merge.ridge: must be a number in (0, inf), got 0"),
    ({"name": "gradient_fusion", "dtype": "float16"}, "merge.dtype: unknown value 'float16'"),
    ({"name": "gradient_fusion", "max_iter": 0}, "merge.max_iter: must be an integer >= 1, got 0"),
])
def test_every_merge_option_is_checked_without_merging(config, fragment):
    """check_merge: the values a merge would reject when it runs, refused before any work."""
    with pytest.raises(ConfigError) as err:
        check_merge(config)
    assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="protocol.methods.x.merge.density"):
        check_merge({"name": "ties", "density": 3}, "protocol.methods.x.merge")
    assert check_merge({"name": "ties", "density": 0.5, "lam": 1}).name == "ties"


def assert_fold_is_per_layer(weights, deltas, alpha):
    """fold() on copies of ``weights`` equals LayerDelta.add_to_ layer by layer to 1e-6 (fp32)."""
    per_layer = {k: w.clone() for k, w in weights.items()}
    for k, d in deltas.items():
        d.add_to_(per_layer[k], alpha=alpha)
    folded = {k: w.clone() for k, w in weights.items()}
    fold(folded, deltas, alpha=alpha)
    for k in weights:
        assert torch.allclose(folded[k], per_layer[k], atol=1e-6, rtol=1e-6), k


def test_grouped_fold_equals_the_per_layer_fold():
    """fold() (layers of one shape and rank in one batched matmul, dense deltas in one multi-tensor add)
    equals LayerDelta.add_to_ layer by layer to 1e-6 in float32, for low-rank and dense deltas, layers of
    several shapes, and a layer alone in its group."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (24, 16), "b": (24, 16), "c": (24, 16), "d": (12, 20), "e": (12, 20), "f": (30, 8)}
    weights = {k: torch.randn(o, i, generator=g) for k, (o, i) in shapes.items()}
    deltas = {k: LayerDelta(up=torch.randn(o, 5, generator=g), down=torch.randn(5, i, generator=g))
              for k, (o, i) in shapes.items() if k != "e"}
    deltas["e"] = LayerDelta(dense=torch.randn(12, 20, generator=g))
    assert_fold_is_per_layer(weights, deltas, alpha=0.6)
    # merged_into folds the same way (alpha 1) and puts the exact weights back
    originals = {k: w.clone() for k, w in weights.items()}
    once = {k: w.clone() for k, w in weights.items()}
    for k, d in deltas.items():
        d.add_to_(once[k])
    with merged_into(weights, deltas):
        assert all(torch.allclose(weights[k], once[k], atol=1e-6, rtol=1e-6) for k in weights)
    assert all(torch.equal(weights[k], originals[k]) for k in weights)


def test_weighted_sum_concatenates_every_layer_as_before():
    """The sum's factors, concatenated a shape group at a time, equal the per-layer concatenation exactly."""
    ups = random_updates(3, shapes=(("a", 24, 16), ("b", 12, 20), ("c", 24, 16)))
    res = merge(ups, {"name": "sum", "lam": 0.6}).deltas
    assert list(res) == ["a", "b", "c"]
    for layer, d in res.items():
        assert torch.equal(d.up, torch.cat([u.layers[layer][0] for u in ups], dim=1) * 0.6)
        assert torch.equal(d.down, torch.cat([u.layers[layer][1] for u in ups], dim=0))


def test_stacked_sum_folds_like_the_per_layer_path():
    """Updates of one layout sum stack by stack; the fold applies whole stacks in one batched matmul and
    equals add_to_ layer by layer to 1e-6 (fp32), also for a part of a stack, for whole stacks given in
    another order than their layers', for 1x1 convs' weights and for weights of two dtypes in one stack; updates
    of different
    layouts (ranks differ per layer) take the shape-group path and give the same sums."""
    ups = random_updates(3, shapes=(("a", 24, 16), ("b", 12, 20), ("c", 24, 16), ("d", 12, 20)))
    assert [s.layers for s in ups[0].stacks] == [("a", "c"), ("b", "d")]
    assert ups[0].layers["c"][0].data_ptr() == ups[0].stacks[0].ups[1].data_ptr()  # views, not copies
    res = merge(ups, {"name": "sum", "lam": 0.6}).deltas
    assert res["a"].stack is res["c"].stack and res["a"].stack is not res["b"].stack
    g = torch.Generator().manual_seed(1)
    weights = {k: torch.randn(*d.shape, generator=g) for k, d in res.items()}
    assert res["c"].up.data_ptr() == res["c"].stack.ups[1].data_ptr()  # a view of its slice, made when read
    for part in (res, {k: res[k] for k in ("a", "b", "d")}, {k: res[k] for k in ("d", "c", "b", "a")}):
        assert_fold_is_per_layer(weights, part, alpha=0.5)  # whole, a part, and whole stacks in another order
    # the sum's mapping itself: read-only, and folded stack by stack without visiting its layers; 1x1 convs'
    # 4-D weights through 2-D views; a stack whose weights differ in dtype takes the general path
    assert isinstance(res, StackedDeltas) and len(res) == 4 and list(res) == ["a", "b", "c", "d"]
    with pytest.raises(TypeError):
        res["a"] = res["b"]
    assert_fold_is_per_layer({k: w.reshape(*w.shape, 1, 1) for k, w in weights.items()}, res, alpha=0.5)
    assert_fold_is_per_layer(dict(weights, c=weights["c"].double()), res, alpha=0.5)
    params = {k: torch.nn.Parameter(w.clone()) for k, w in weights.items()}  # a model's own weights, as they are
    for part in (res, {k: res[k] for k in ("a", "b", "d")}):
        fold(params, part)  # in place without a graph, whichever path
    assert not any(p.grad_fn for p in params.values())
    g = torch.Generator().manual_seed(2)
    other = AdapterUpdate("r", {k: (torch.randn(o, 2 + j, generator=g), torch.randn(2 + j, i, generator=g))
                                for j, (k, (o, i)) in enumerate(ups[0].shapes().items())})
    assert other.layout() != ups[0].layout()
    mixed = merge([ups[0], other], {"name": "sum", "lam": 1.0}).deltas
    for k, d in mixed.items():
        assert d.stack is None
        assert torch.allclose(d.to_dense(), ups[0].delta(k) + other.delta(k), atol=1e-5)


def test_an_update_is_read_only():
    """The factors live in the stacks; a layer's pair cannot be swapped behind them."""
    u = random_updates(1)[0]
    with pytest.raises(TypeError):
        u.layers["a"] = u.layers["a"]


def test_statistics_file_from_another_model_is_refused(tmp_path, load_tiny):
    from lorabench.adapters import inject_adapters
    from lorabench.merging import capture_stats

    comps = load_tiny()
    ad = inject_adapters(comps, {"name": "lora", "rank": 2})
    sampler = {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 2.0, "progress": False}
    grams, rows = capture_stats(comps, ad, ["a sks dog"], [0, 1], sampler)
    for name, layer in ad.layers.items():  # bounded by width squared, whatever the token count
        assert grams[name].shape == (layer.in_features, layer.in_features) and rows[name] > layer.in_features
    good = save_stats(tmp_path / "s.safetensors", grams, rows, ad.base_fingerprint())
    assert set(load_stats(good, ad)) == set(ad.layers)
    other = save_stats(tmp_path / "o.safetensors", grams, rows, "0123456789abcdef")
    with pytest.raises(ConfigError, match="captured on another base model"):
        load_stats(other, ad)
    wrong = save_stats(tmp_path / "w.safetensors", {k: torch.eye(3) for k in grams}, rows, "")
    with pytest.raises(ConfigError, match="comes from another model"):
        load_stats(wrong, ad)
    ad.remove()


def test_orthogonal_rows_have_no_weight_crosstalk_and_no_interference_in_own_subspace():
    from lorabench.adapters.ortho import orthogonal_basis, select_rows

    g = torch.Generator().manual_seed(0)
    width, r = 32, 4
    basis = orthogonal_basis(0, width)
    orth = [AdapterUpdate(f"o{s}", {"l": (torch.randn(16, r, generator=g),
                                         basis[select_rows(0, width, r, "x", "disjoint", s, 3)])}) for s in range(3)]
    grams = random_grams(orth)
    per_layer = group_crosstalk(orth, grams)["l"]
    assert per_layer["weight_crosstalk"] < 1e-6 and per_layer["subspace_overlap"] < 1e-6
    assert per_layer["subspace_interference"] < 1e-6
    merged = merge(orth, {"name": "sum", "lam": 1.0}).deltas
    assert output_error(orth[0], merged, grams[0], subspace=True)["l"] < 1e-5


def test_layer_delta_add_to_handles_conv_weights():
    w = torch.zeros(6, 4, 1, 1)
    LayerDelta(up=torch.ones(6, 2), down=torch.ones(2, 4)).add_to_(w, alpha=0.5)
    assert torch.allclose(w, torch.ones(6, 4, 1, 1))


def test_check_compatible_needs_something():
    with pytest.raises(ConfigError, match="nothing to merge"):
        check_compatible([])


# -- the merge job (lorabench experiment=merge_adapters) ------------------------------------------------
def _adapter_files(model_dir, tmp_path, seed=0):
    from lorabench.adapters import export_kohya, inject_adapters, save_adapter
    from lorabench.models import load_components

    comps = load_components(str(model_dir), name="tiny", resolution=16)
    ad = inject_adapters(comps, {"name": "lora", "rank": 2})
    torch.manual_seed(seed)
    for layer in ad.layers.values():
        torch.nn.init.normal_(layer.lora_up, std=0.1)
    native = save_adapter(ad, tmp_path / f"c{seed}" / "adapter.safetensors", base_model=str(model_dir))
    kohya = export_kohya(ad, tmp_path / f"c{seed}.kohya.safetensors")
    return native, kohya, ad


def _merge_job(model_dir, tmp_path, args, layout="adapter.safetensors"):
    """The merge job on a native and a kohya input: ``(merged deltas, input a's, input b's, its file, cli args)``,
    the merged file read back in ``layout`` by lorabench's loader."""
    from lorabench.adapters import load_adapter
    from lorabench.models import load_components

    a, _, ad_a = _adapter_files(model_dir, tmp_path, 0)
    _, b, ad_b = _adapter_files(model_dir, tmp_path, 1)
    base = ["experiment=merge_adapters", "model=sd15", f"model.pretrained={model_dir}", "model.name=tiny",
            "model.resolution=16", f"protocol.inputs=[{a},{b}]"]
    proc = run_here([*base, *args], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [out] = list((tmp_path / "outputs" / "merge_adapters").glob(f"*/{layout}"))
    comps = load_components(str(model_dir), name="tiny", resolution=16)
    return load_adapter(comps, out).delta_weights(), ad_a.delta_weights(), ad_b.delta_weights(), out, base


@pytest.mark.integration
def test_merge_job_merges_native_and_kohya_files_into_a_loadable_adapter(tmp_path, tiny_model_dir):
    merged, da, db, out, _ = _merge_job(tiny_model_dir, tmp_path, ["merge.lam=0.5"])
    for k, d in merged.items():
        assert torch.allclose(d, 0.5 * (da[k] + db[k]), atol=1e-6)
    res = json.loads((out.parent / "results.json").read_text())  # each input's update size on its base
    assert len(res["update_size"]) == 2 and all(e["weight_median"]["mean"] > 0 for e in res["update_size"].values())


def test_adapters_of_one_model_with_other_targets_are_not_called_of_another_model(tmp_path):
    """The base-weight fingerprint hashes the layers an adapter adapts: one adapter with text-encoder layers too
    was "trained on another base model" than one without, on the same model."""
    from lorabench.adapters import inject_adapters, save_adapter
    from lorabench.merging import check_compatible, read_update
    from lorabench.models import build_tiny_components

    files = []
    for i, te in enumerate(([], ["q_proj"])):
        comps = build_tiny_components()
        files.append(save_adapter(inject_adapters(comps, {"name": "lora", "rank": 4, "text_encoder_targets": te}),
                                  tmp_path / f"a{i}.safetensors"))
    comps = build_tiny_components()
    updates = [read_update(comps, f) for f in files]
    with pytest.raises(ConfigError, match=r"protocol.inputs: 'a1' and 'a0' adapt different target modules \(layer "
                                          r"'text_encoder\..*' is in one and not the other\)"):
        check_compatible(updates, "protocol.inputs")


def test_merge_job_refuses_adapters_of_another_base_model(tmp_path, tiny_model_dir):
    from lorabench.models import build_tiny_components, save_components

    other = tmp_path / "other-model"
    save_components(build_tiny_components(seed=7, words=["sks", "photo", "dog"]), other)
    a, _, _ = _adapter_files(tiny_model_dir, tmp_path / "x", 0)
    b, _, _ = _adapter_files(other, tmp_path / "y", 1)
    proc = run_here(["experiment=merge_adapters", "model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny",
                    "model.resolution=16", f"protocol.inputs=[{a},{b}]"], tmp_path)
    assert_one_line_error(proc, tmp_path, "protocol.inputs: ", "trained on another base model")


@pytest.mark.integration
def test_merge_job_fuses_with_statistics_captured_from_prompts_and_saves_a_unet(tmp_path, tiny_model_dir):

    a, _, _ = _adapter_files(tiny_model_dir, tmp_path, 0)
    _, b, _ = _adapter_files(tiny_model_dir, tmp_path, 1)
    proc = run_here(["experiment=merge_adapters", "model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny",
                    "model.resolution=16", f"protocol.inputs=[{a},{b}]", "merge=gradient_fusion",
                    "protocol.prompts=[a sks dog,a photo dog]", "protocol.save_as=unet",
                    "protocol.capture.num_inference_steps=2", "protocol.capture.images_per_prompt=1"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    [run_dir] = list((tmp_path / "outputs" / "merge_adapters").glob("*"))
    assert (run_dir / "unet" / "config.json").is_file() and len(list(run_dir.glob("stats-*.safetensors"))) == 2
    assert f"use it in place of the model's UNet: model.unet={run_dir / 'unet'}" in proc.stdout  # how to use it
    res = json.loads((run_dir / "results.json").read_text())  # on the captured inputs too
    assert all(e["output_median"]["mean"] > 0 for e in res["update_size"].values())


@pytest.mark.integration
def test_merge_job_captures_each_input_with_its_runs_new_tokens(tmp_path, tiny_model_dir):
    """An input run trained with new tokens (LoRA with textual inversion; Mix-of-Show's ED-LoRA) names its concept
    by them: its statistics were captured without them (the bound word read as the base model's word), and the
    merge said nothing of them. Now each input's capture has its tokens, and the job lists them to sample with."""
    from lorabench.adapters.tokens import inject_tokens
    from lorabench.merging.capture import load_stats
    from lorabench.models import load_components

    a, b = (_adapter_files(tiny_model_dir, tmp_path, seed)[0] for seed in (0, 1))
    tokens = inject_tokens(load_components(str(tiny_model_dir)), {"token": "<sks>", "bind": "sks"})
    with torch.no_grad():
        for row in tokens.parameters():
            row.normal_(std=3.0, generator=torch.Generator().manual_seed(0))
    words = tokens.save(a.parent / "embeddings.safetensors")
    stats = {}
    for run in ("with", "without"):
        if run == "without":
            words.unlink()
        proc = run_here(["experiment=merge_adapters", "model=sd15", f"model.pretrained={tiny_model_dir}",
                         "model.name=tiny", "model.resolution=16", f"protocol.inputs=[{a.parent},{b.parent}]",
                         "merge=gradient_fusion", "protocol.prompts=[a sks dog,a photo dog]",
                         "protocol.capture.num_inference_steps=2", "protocol.capture.images_per_prompt=1",
                         f"hydra.run.dir={tmp_path / run}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        res = json.loads((tmp_path / run / "results.json").read_text())
        assert res["model_id"] == str(tiny_model_dir)  # the base model the merge sits on
        assert res["input_embeddings"] == ([str(words)] if run == "with" else [])
        copied = tmp_path / run / "embeddings" / "c0.safetensors"  # the merge run folder samples with them
        assert res["embeddings"] == ([str(copied)] if run == "with" else [])
        assert ("copied the inputs' new tokens: embeddings/c0.safetensors" in proc.stdout) == (run == "with")
        if run == "with":
            assert copied.read_bytes() == words.read_bytes()
        stats[run] = [load_stats(tmp_path / run / f"stats-{c}.safetensors") for c in ("c0", "c1")]
    # c0's prompt reads its tokens where it had them; c1's capture is the same either way
    assert any(not torch.equal(g, stats["without"][0][k]) for k, g in stats["with"][0].items())
    assert all(torch.equal(g, stats["without"][1][k]) for k, g in stats["with"][1].items())


@pytest.mark.integration
def test_a_merge_run_folder_samples_with_every_inputs_new_tokens(tmp_path, tiny_model_dir):
    """Mix-of-Show merges ED-LoRAs into one model that keeps each concept's embeddings. lorabench's merge wrote the
    merged adapter alone and printed the inputs' token files: sampling the merge run folder read the concepts'
    words as the base model's. Now the run copies each input's tokens under embeddings/, the run folder samples with
    all of them (as the adapter and the inputs' token files given one by one), and inputs whose tokens clash are
    said, not copied."""
    import json

    import numpy as np
    from PIL import Image

    from lorabench.adapters.tokens import inject_tokens
    from lorabench.models import load_components

    a, b = (_adapter_files(tiny_model_dir, tmp_path, seed)[0] for seed in (0, 1))
    for run, word in ((a.parent, "red"), (b.parent, "blue")):
        tokens = inject_tokens(load_components(str(tiny_model_dir)), {"token": f"<{word}>", "bind": word})
        with torch.no_grad():
            tokens.parameters()[0].normal_(std=3.0, generator=torch.Generator().manual_seed(len(word)))
        tokens.save(run / "embeddings.safetensors")
    model = ["model=sd15", f"model.pretrained={tiny_model_dir}", "model.name=tiny", "model.resolution=16"]
    merged = tmp_path / "merged"
    proc = run_here(["experiment=merge_adapters", *model, f"protocol.inputs=[{a.parent},{b.parent}]",
                     f"hydra.run.dir={merged}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert sorted(p.name for p in (merged / "embeddings").iterdir()) == ["c0.safetensors", "c1.safetensors"]
    # its own line, the model as this job loaded it: a command to copy (it followed the last info line, and said
    # "model=...")
    assert (f"  sample it: lorabench sample {' '.join(model)} protocol.adapters=[{merged}] protocol.prompts=[...] "
            "(with its tokens)") in proc.stdout.splitlines()
    images = {}
    sample = ["sample", *model, "protocol.sampler.num_inference_steps=2", "protocol.seeds=[0]",
              "protocol.prompts=[a red circle and a blue square]"]
    for name, args in (("run", [f"protocol.adapters=[{merged}]"]),
                       ("files", [f"protocol.adapters=[{merged}/adapter.safetensors]",
                                  f"protocol.embeddings=[{a.parent}/embeddings.safetensors,"
                                  f"{b.parent}/embeddings.safetensors]"]),
                       ("folder", [f"protocol.adapters=[{merged}/adapter.safetensors]",
                                   f"protocol.embeddings=[{merged}]"]),  # as beside a merged UNet
                       ("adapter", [f"protocol.adapters=[{merged}/adapter.safetensors]"])):
        proc = run_here([*sample, *args, f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert proc.returncode == 0, crashed(proc)
        res = json.loads((tmp_path / name / "results.json").read_text())
        images[name] = np.asarray(Image.open(tmp_path / name / res["images"][0]), dtype=np.int16)
        assert len(res["embeddings"]) == (0 if name == "adapter" else 2)
    assert np.array_equal(images["run"], images["files"]) and np.array_equal(images["run"], images["folder"])
    assert np.abs(images["run"] - images["adapter"]).max() > 0
    # two concepts trained as the same token: one model cannot hold both, and the run says so
    (b.parent / "embeddings.safetensors").write_bytes((a.parent / "embeddings.safetensors").read_bytes())
    proc = run_here(["experiment=merge_adapters", *model, f"protocol.inputs=[{a.parent},{b.parent}]",
                     f"hydra.run.dir={tmp_path / 'clash'}"], tmp_path)
    assert proc.returncode == 0, crashed(proc)
    assert not (tmp_path / "clash" / "embeddings").exists()
    assert (f"the inputs' new tokens are not in the run: {a.parent}/embeddings.safetensors and {b.parent}/"
            "embeddings.safetensors both add the token '<red>'") in proc.stdout


def _two_updates(comps, rank=8):
    from lorabench.adapters import inject_adapters
    from lorabench.merging import updates_from_adapters

    ups = []
    for i in range(2):
        torch.manual_seed(i)
        ad = inject_adapters(comps, {"name": "lora", "rank": rank})
        for layer in ad.layers.values():
            torch.nn.init.normal_(layer.lora_up, std=0.1)
        ups.append(updates_from_adapters(ad, f"c{i}"))
        ad.remove()
    return ups


@pytest.mark.parametrize("config", [{"name": "sum", "lam": 0.6}, {"name": "task_arithmetic", "lam": 1.0},
                                    {"name": "svd", "lam": 0.6, "rank": 4}, {"name": "ties", "density": 0.2},
                                    {"name": "dare", "drop": 0.5}, {"name": "gradient_fusion"}])
def test_every_merge_output_loads_back_in_every_layout_at_a_rank_the_layers_allow(tmp_path, load_tiny, config):
    """Why: a TIES merge of two adapters wrote rank-59 factors on 32-wide layers (one padded rank per file,
    larger than the dense update) and lorabench's own loader refused the file; and the merge came only in
    diffusers' layout. Now each layer keeps its own rank (<= min(out, in)), in lorabench, diffusers and kohya
    layouts, and each file loads back as the merge."""
    from lorabench.adapters import load_adapter
    from lorabench.merging import model_weights

    comps = load_tiny()
    ups = _two_updates(comps)
    stats = None
    if config["name"] == "gradient_fusion":
        stats = [{k: torch.eye(d.shape[1]) + 0.1 for k, d in ((k, u.delta(k)) for k in u.layers)} for u in ups]
    res = merge(ups, config, stats=stats)
    paths, _ = save_merged_adapter(comps, res.deltas, tmp_path)
    assert [p.name for p in paths] == ["adapter.safetensors", "pytorch_lora_weights.safetensors",
                                       "kohya_lora.safetensors"]
    shapes = {k: tuple(w.reshape(w.shape[0], -1).shape) for k, w in model_weights(comps, list(res.deltas)).items()}
    assert min(min(s) for s in shapes.values()) == 32 and max(max(s) for s in shapes.values()) > 32
    for path in paths:
        loaded = load_adapter(comps, path)  # raised "adapter.rank: 59 exceeds min(in, out) = 32" for TIES
        try:
            for name, layer in loaded.layers.items():
                assert layer.rank <= min(shapes[name])
                d = loaded.delta_weights()[name]
                assert torch.allclose(d, res.deltas[name].to_dense(), atol=1e-5), (path.name, name)
        finally:
            loaded.remove()


@pytest.mark.integration
def test_merge_weights_scale_each_input_before_the_method(tmp_path, tiny_model_dir):
    """Why: protocol.weights=[0.7,0.3] was a six-line Hydra error, and its suggested +protocol.weights ran and
    ignored the weights. Now each input's update is scaled by its weight: sum at lam 1 gives 0.7 dA + 0.3 dB."""

    merged, da, db, out, base = _merge_job(tiny_model_dir, tmp_path, ["merge.lam=1.0", "protocol.weights=[0.7,0.3]"],
                                           "kohya_lora.safetensors")
    for k, d in merged.items():
        assert torch.allclose(d, 0.7 * da[k] + 0.3 * db[k], atol=1e-6)
    assert json.loads((out.parent / "results.json").read_text())["weights"] == [0.7, 0.3]
    (tmp_path / "bad").mkdir()
    proc = run_here([*base, "merge.lam=1.0", "protocol.weights=[0.7]"], tmp_path / "bad")
    assert_one_line_error(proc, tmp_path / "bad", "protocol.weights", "2 numbers")
