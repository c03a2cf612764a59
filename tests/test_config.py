"""Every config composes; every target resolves; the full-scale configs say what the papers say."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra.utils import get_method

from helpers import CONF, REPO, compose
from lorabench.cli import check_command, check_group_overrides, config_groups, hydra_args
from lorabench.errors import ConfigError

EXPERIMENTS = config_groups(CONF)["experiment"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_targets_resolve(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"], tmp_path)
    for group in ("model", "data", "trainer"):
        assert callable(get_method(cfg[group]._target_)) or get_method(cfg[group]._target_)
    if cfg.get("protocol"):  # a protocol trains the adapters listed under protocol.adapters
        assert callable(get_method(cfg.protocol._target_)) and cfg.get("adapter") is None
        for adapter in (cfg.protocol.get("adapters") or {}).values():  # keys are the protocol's names for them
            if adapter is None:  # an adapter of the extended experiment, dropped (protocol.adapters.<name>: null)
                continue
            if adapter.get("embeddings") is not None:  # new tokens, alone or beside an adapter
                assert adapter.embeddings.name in ("textual_inversion", "pplus")
            if adapter.get("name") is not None or adapter.get("embeddings") is None:
                assert adapter.name in importlib.import_module("lorabench.adapters").ADAPTERS
        if cfg.protocol.get("adapter"):  # the continual protocol trains one adapter type per sequence
            assert cfg.protocol.adapter.name in importlib.import_module("lorabench.adapters").ADAPTERS
            assert cfg.protocol.method.name in importlib.import_module("lorabench.continual").method_names()
            assert cfg.sequence.kind in ("objects", "styles")
            # the tasks are listed, or read from a prepared dataset's manifest (the full-scale styles)
            assert len(cfg.sequence.tasks) >= cfg.sequence.length or cfg.sequence.get("manifest")
        for method in (cfg.protocol.get("methods") or {}).values():
            assert method.adapter in cfg.protocol.adapters
            assert method.merge.name in importlib.import_module("lorabench.merging").MERGES
        if cfg.get("eval") and cfg.eval.get("scorer") is not None:
            sets = cfg.eval.get("concepts") or cfg.eval.get("styles")  # a style sequence scores styles only
            assert callable(get_method(cfg.eval.scorer._target_)) and callable(get_method(sets._target_))
        elif cfg.protocol._target_.endswith("merge_adapters.run"):  # the merge job: a top-level merge config
            assert cfg.merge.name in importlib.import_module("lorabench.merging").MERGES
        else:  # the sample job: adapter files and prompts, nothing scored
            assert cfg.protocol._target_.endswith("sample.run") and "prompts" in cfg.protocol
    elif cfg.get("adapter") is None:  # full training (world_pretrain): the whole UNet trains
        assert experiment == "world_pretrain" and cfg.module.train_text_encoder
    else:
        assert cfg.adapter.name in importlib.import_module("lorabench.adapters").ADAPTERS
    assert cfg.data.resolution == cfg.model.resolution


def test_paper_settings(tmp_path):
    c = compose(["experiment=continual_sdxl_task"], tmp_path)
    assert (c.adapter.rank, c.adapter.alpha, c.optim.lr, c.trainer.max_steps) == (64, 64, 1e-5, 850)
    assert list(c.adapter.target_modules) == ["to_q", "to_k", "to_v", "to_out.0"] and c.model.resolution == 1024
    o = compose(["experiment=orthoada_chilloutmix_concept"], tmp_path)
    assert (o.adapter.name, o.adapter.rank, o.optim.lr) == ("ortho", 20, 1e-5) and o.adapter.text_encoder_targets
    s = compose(["experiment=continual/sdxl_objects"], tmp_path)
    a = s.protocol.adapter
    assert (a.rank, a.alpha, a.init, s.optim.name, s.optim.lr, s.optim.lr_scheduler) == (
        64, 64, "gaussian", "adamw8bit", 1e-5, "constant")
    assert (s.trainer.max_steps, s.trainer.gradient_clip_val, s.data.batch_size, s.model.resolution) == (
        850, 1.0, 1, 1024)
    assert [t.name for t in s.sequence.tasks] == ["sks", "zwz", "sbu", "uwu", "pdw", "twt", "zsn", "ofl", "psq", "cws"]
    assert (s.eval.images_per_prompt, s.eval.sampler.num_inference_steps) == (8, 50)
    assert s.eval.concepts.prompt is None and len(s.eval.concepts.templates) == 5  # the reference's five
    assert set(s.eval.concepts.concepts) == {t.name for t in s.sequence.tasks}
    t = compose(["experiment=trilora/pokemon"], tmp_path)
    assert (t.model.name, t.optim.lr, t.protocol.table_epoch, t.data.max_train_samples) == ("anylora", 1e-4, 100, 100)
    assert (t.eval.sampler.num_inference_steps, t.eval.sampler.guidance_scale, t.protocol.sample_seed) == (20, 7.5, 30)
    assert [a.sigma_init for k, a in t.protocol.adapters.items() if k != "lora"] == ["svd_w0", "identity", "svd_u"]
    g = compose(["experiment=trilora/gac"], tmp_path)
    assert (g.model.name, g.optim.lr, g.protocol.table_epoch, g.data.max_train_samples) == \
        ("realistic_vision", 5e-5, 10, None)


@pytest.mark.parametrize("model", ["sd15", "sd21", "chilloutmix", "anylora", "sdxl", "realistic_vision"])
def test_hub_models_fail_clearly_offline(model, tmp_path):
    """The real models cannot be downloaded here (conftest sets HF_HUB_OFFLINE); the error must say
    which model and why, in one line."""
    from hydra.utils import instantiate

    from lorabench.cli import find_config_error

    cfg = compose([f"model={model}"], tmp_path)
    with pytest.raises(Exception) as info:
        instantiate(cfg.model)
    err = find_config_error(info.value)  # what the CLI prints, unwrapped from Hydra's InstantiationException
    assert err is not None and "\n" not in str(err)
    assert str(err).startswith(f"model.pretrained: could not load '{cfg.model.pretrained}'")
    assert "hub cannot be reached" in str(err)


def test_group_override_check():
    check_group_overrides(["adapter=lora,ortho", "model=sd15", "seed=3", "+experiment=quickstart"])
    with pytest.raises(ConfigError, match="adapter: unknown value 'lora2'"):
        check_group_overrides(["adapter=lora,lora2"])
    with pytest.raises(ConfigError, match="merge: unknown value 'avg'; valid: custom_diffusion, dare, gradient_fusion"):
        check_group_overrides(["merge=avg"])
    with pytest.raises(ConfigError, match="sequence: unknown value 'naive'; valid: dreambooth_objects, "
                       "unlearncanvas_styles, world_objects, world_styles"):
        check_group_overrides(["sequence=naive"])  # methods are protocol.method.name, not a sequence
    with pytest.raises(ConfigError, match="experiment: unknown value ''; valid: continual/regime_objects"):
        check_group_overrides(["experiment="])  # was "config: In 'train': Could not find 'experiment/'"


def test_multirun_flag_anywhere_on_the_line():
    """Why: ``lorabench experiment=quickstart -m seed=0,1`` was Hydra's "unrecognized arguments: seed=0,1" (its
    parser takes the overrides as one run of words). The flag goes first, as Hydra needs it."""
    assert check_command(["experiment=quickstart", "-m", "seed=0,1"]) == ["-m", "experiment=quickstart", "seed=0,1"]
    assert check_command(["seed=0,1", "--multirun", "experiment=quickstart"]) == \
        ["--multirun", "seed=0,1", "experiment=quickstart"]


def test_hydras_own_groups_take_hydras_options():
    """Why: ``hydra/job_logging=disabled`` (a Hydra option) was refused as "valid: none yet", and
    ``hydra/launcher=nonexist`` ended in Hydra's traceback after the checks. Hydra's groups are composed with the
    hydra config before any work: its options (and its plugins') are valid, another is one line listing them."""
    check_command(["hydra/job_logging=disabled", "experiment=quickstart"])
    check_command(["-m", "hydra/launcher=basic", "experiment=quickstart"])
    with pytest.raises(ConfigError, match=r"^hydra/launcher: unknown value 'nonexist'; valid: basic, .*local_gpus"):
        check_command(["-m", "hydra/launcher=nonexist"])
    with pytest.raises(ConfigError, match=r"^hydra/launcher: takes one option, got 'joblib,basic'"):
        check_command(["-m", "hydra/launcher=joblib,basic"])


def test_an_experiment_that_extends_another_drops_adapters_set_to_null(tmp_path):
    """trilora/regime extends trilora/world without two of its adapters: preflight and the protocol's
    inputs see LoRA and TriLoRA only."""
    from lorabench.cli import preflight
    from lorabench.protocols.cells import protocol_inputs

    cfg = compose(["experiment=trilora/regime"], tmp_path)
    preflight(cfg)
    adapters, _, seeds = protocol_inputs(cfg, "adapters", "lora")
    assert list(adapters) == ["lora", "trilora"] and seeds == [0, 1, 2]


def test_full_size_architectures_have_the_published_parameter_counts():
    """bench/bench_full_scale.py times SD1.5 and SDXL at their real sizes with random weights: the
    builder's FULL_SIZE specs give the released models' parameter counts exactly (built on the meta
    device: no memory, no time)."""
    import torch

    from lorabench.models import build_scaled_down

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        sd15 = build_scaled_down("sd15", resolution=512, text_max_length=77, full_size=True)
        sdxl = build_scaled_down("sdxl", resolution=1024, text_max_length=77, full_size=True)
    assert (count(sd15.unet), count(sd15.text_encoder), count(sd15.vae)) == (859_520_964, 123_060_480, 83_653_863)
    assert (count(sdxl.unet), count(sdxl.text_encoder), count(sdxl.text_encoder_2)) == \
        (2_567_463_684, 123_060_480, 694_659_840)


def test_code_defaults_are_the_config_defaults():
    """Two defaults the Python API needs without Hydra are written in code (the optimiser's, checks.DEFAULT_OPTIM;
    the module's, DiffusionFineTuner's keyword defaults) and in the configs a run composes (conf/optim/adamw.yaml,
    conf/train.yaml's module: block): they must not drift apart."""
    import inspect

    from omegaconf import OmegaConf

    from lorabench.checks import DEFAULT_OPTIM
    from lorabench.training import DiffusionFineTuner

    optim = OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "adamw.yaml"))
    assert {**optim, "betas": tuple(optim["betas"])} == DEFAULT_OPTIM
    module = OmegaConf.to_container(OmegaConf.load(CONF / "train.yaml"))["module"]
    params = inspect.signature(DiffusionFineTuner.__init__).parameters
    assert {k: params[k].default for k in module} == module


# -- every command the docs show --------------------------------------------------------------------------------
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "experiments" / "README.md",
        *sorted((REPO / "experiments").glob("*/README.md")), REPO / "lorabench" / "cli.py",
        *sorted(CONF.rglob("*.yaml"))]
SHELL_FENCES = ("", "bash", "sh", "shell", "console")


def documented_commands(doc: Path) -> list[str]:
    """The ``lorabench`` commands ``doc`` shows: in markdown each line of its shell blocks (continuations joined)
    and each inline code span that is one; in a config its comments' lines; in a module its docstring's.
    Commands with elided parts (``...``, ``<folder>``) are left out."""
    if doc.suffix in (".yaml", ".py"):
        text = ast.get_docstring(ast.parse(doc.read_text())) if doc.suffix == ".py" else "\n".join(
            ln.strip()[1:] for ln in doc.read_text().splitlines() if ln.strip().startswith("#"))
        return [ln for ln in shell_commands(text) if checkable(ln)]
    text, blocks, block, fence = doc.read_text(), [], None, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if block is None:
                block, fence = [], line.strip()[3:]
            else:
                blocks += ["\n".join(block)] if fence in SHELL_FENCES else []
                block = None
        elif block is not None:
            block.append(line)
    lines = [ln for b in blocks for ln in shell_commands(b)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(s.split()) for s in re.findall(r"`((?:[A-Z_]+=\S+ )*lorabench(?: [^`]+)?)`", prose)]
    return [ln for ln in lines if checkable(ln)]


def checkable(line: str) -> bool:
    """A command with a config to check: nothing elided (``...``, ``<folder>``; a quoted ``'<token>'`` is a
    value), not ``summarize``, ``tiny-model`` or ``rebuild`` (they take no config; test_first_day and
    test_protocol_battery run them)."""
    elided = "..." in line or "<" in re.sub(r"'<[^'>]*>'", "", line)
    return not elided and not re.search(r"lorabench (summarize|tiny-model|rebuild)\b", line)


def shell_commands(text: str) -> list[str]:
    """The lines of shell ``text`` (continuations joined) that run ``lorabench``."""
    command = re.compile(r"^(?:[A-Z_]+=\S+\s+)*lorabench(?:\s.*)?$")
    return [" ".join(ln.split()) for ln in re.sub(r"\\\n\s*", " ", text).splitlines() if command.match(ln.strip())]


def with_paths(args: list[str], root: Path) -> list[str]:
    """``args`` with each ``model.pretrained`` and ``data.path`` that names a path made to exist under ``root``
    (a model folder with ``unet/``, an image folder or a parquet file); absolute ones are moved under it."""
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("model.pretrained", "data.path") and value and not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
            path = root / value.lstrip("/")
            target = path if path.suffix == ".parquet" else (path / "unet" if key == "model.pretrained" else path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch() if target.suffix == ".parquet" else target.mkdir(exist_ok=True)
            arg = f"{key}={path}"
        out.append(arg)
    return out


def first_shown() -> dict[str, str]:
    """``{command: where the docs first show it}``, each command once however many docs repeat it."""
    seen: dict[str, str] = {}
    for doc in DOCS:
        for i, line in enumerate(documented_commands(doc)):
            seen.setdefault(line, f"{doc.relative_to(REPO)}:{i}")
    return seen


DOC_COMMANDS = [pytest.param(line, id=where) for line, where in first_shown().items()]


def test_the_docs_show_commands():
    assert len(DOC_COMMANDS) >= 40
    assert documented_commands(REPO / "README.md") and documented_commands(REPO / "docs" / "usage.md")


@pytest.mark.integration  # about 0.35 s a command (two compositions): out of the fast tier
@pytest.mark.parametrize("line", DOC_COMMANDS)
def test_every_documented_command_passes_the_checks_before_any_work(line, tmp_path, monkeypatch):
    """Each command the docs show composes and passes every check the CLI makes before Hydra starts (group
    options, keys, types, callbacks, a protocol's own adapters, model and data paths, which are made to exist
    here). Four had gone stale, each a top-level ``adapter=`` beside the main job's protocol (three in
    docs/usage.md, one in the CLI's docstring), and one a top-level ``embeddings=`` beside world_personalize's
    (conf/embeddings/textual_inversion.yaml), where another lost to the shell the quotes Hydra needs around
    ``'<x>'``; the command-line callback example composed but failed in Lightning (test_cli.py runs that one)."""
    args = shlex.split(line, comments=True)
    while not args[0].endswith("lorabench"):  # VAR=value before the command: its environment, as the shell sets it
        name, _, value = args.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    args = [a for a in hydra_args(args[1:]) if a not in ("-v", "--verbose")]
    monkeypatch.chdir(tmp_path)
    check_command(with_paths(args, tmp_path))


@pytest.mark.parametrize("args,message", [
    (["adapter=trilora"], "adapter: this protocol trains protocol.adapters.<name>, not adapter; override those"),
    (["experiment=continual/world_objects", "adapter=lora"], "adapter: this protocol trains protocol.adapter, not"),
    (["experiment=sample", "adapter=lora"], "adapter: this protocol reads adapter files (protocol.adapters=["),
    (["experiment=merge_adapters", "embeddings=textual_inversion"],
     "embeddings: this protocol reads adapter files (protocol.inputs=["),
    # a single run's options, which no cell takes: a protocol ran on without them, silently
    (["experiment=trilora/world", "resume=outputs/x"], "resume: continues a single training run from its checkpoint"),
    (["experiment=continual/world_objects", "eval.validation.prompts=[a photo of sks]"],
     "eval.validation.prompts: samples while a single run trains; a protocol's cells are sampled and scored by"),
    # a protocol of protocol.seeds reads no seed: a sweep seed=0,1,2 ran three identical jobs (as the docs showed)
    (["-m", "experiment=orthogonal_adaptation/chilloutmix", "seed=0,1,2"],
     "seed: this protocol takes its seeds from protocol.seeds ([0, 1, 2]) and reads no seed; set "
     "protocol.seeds=[0],[1],[2] instead"),
    (["experiment=world_concepts", "seed=3"], "seed: this protocol takes its seeds from protocol.seeds ([0])"),
    # data keys a protocol sets per cell or per task: the override trained the experiment's own list, silently
    (["experiment=world_concepts", "data.concept=zwz"],
     "data.concept: this protocol trains each of protocol.concepts (['sks', 'zwz', 'sbu']) and sets data.concept per "
     "cell; set protocol.concepts=[zwz] instead"),
    (["-m", "experiment=world_style", "data.style=monex,kandi"], "data.style: this protocol trains each of "
                                                                  "protocol.styles"),
    (["experiment=continual/world_objects", "data.concept=zwz"], "data.concept: this protocol sets it for each task "
                                                                 "(sequence.tasks, the first sequence.length of them"),
    # the full-scale tables read each concept's or task's own folder: a data.path beside them changed nothing
    (["experiment=orthogonal_adaptation/chilloutmix", "data.path=/data/faces"],
     "data.path: this protocol sets it for each concept (protocol.concept_data.<concept>.path); set it there (each "
     "under data_root=<folder> or $ORTHA_DATA)"),
    (["experiment=continual/sdxl_objects", "trainer=cpu", "data.path=/data/db"],
     "data.path: this protocol sets it for each task (sequence.tasks.<task>.data.path); set it there (each under "
     "$DREAMBOOTH_DATA)"),
    # a single training run reads no protocol group: merge= and sequence= trained as if absent, eval=world and a
    # protocol block with no _target_ ended in tracebacks after the run folder was made
    (["experiment=quickstart", "merge=ties"], "merge: a single training run reads no merge group, so merge=ties would"),
    (["experiment=quickstart", "sequence=world_objects"], "sequence: a single training run reads no sequence group"),
    (["experiment=quickstart", "eval=world"], "eval: a single training run reads no eval group, so eval=world"),
    (["experiment=quickstart", "+protocol.seeds=[1]"], "protocol: has no _target_: a protocol comes with its"),
])
def test_a_protocol_refuses_the_top_level_adapter_groups_before_any_work(args, message):
    """A protocol's adapters are its own (protocol.adapter / adapters / inputs): a top-level group beside it is
    one line before Hydra starts. The merge and sample jobs ignored one silently before. So are a single run's
    resume and samples while training."""
    with pytest.raises(ConfigError) as err:
        check_command(args)
    assert str(err.value).startswith(message), str(err.value)


def test_a_protocol_that_reads_seed_takes_it():
    """The continual sequence has no protocol.seeds: its seed (and a sweep of it) is its replicate. TriLoRA trains
    on the style its data names (no protocol.styles)."""
    assert check_command(["-m", "experiment=continual/world_objects", "seed=0,1"])[-1] == "seed=0,1"
    assert check_command(["experiment=trilora/world", "data.style=monex"])[-1] == "data.style=monex"


@pytest.mark.parametrize("args,message", [
    ([], "data: this protocol's experiment trains its cells on data=world; data=imagefolder would replace it"),
    (["experiment=trilora/world"], "data: this protocol's experiment trains its cells on data=world; data=imagefolder"),
    (["experiment=continual/sdxl_objects"], "data: this protocol's experiment trains its cells on data=dreambooth; "
                                            "data=imagefolder"),
])
def test_a_protocol_refuses_a_data_group_that_replaces_its_own(args, message):
    """Why: ``lorabench data=imagefolder data.path=...`` (the main job with one's own images) ended in a traceback
    (``Interpolation key 'data.world_seed' not found``) after the run folder was made, nine times in a row for
    nine variations; trilora/world said ``config: TypeError: ... unexpected keyword argument 'kind'``. A
    protocol's data group is its experiment's; its fields stay open, and a run without a protocol takes any."""
    with pytest.raises(ConfigError) as err:
        check_command([*args, "data=imagefolder", "data.path=/tmp"])
    assert str(err.value).startswith(message), str(err.value)
    check_command(["experiment=world_concepts", "data=world", "data.n=4"])  # its own group again: fine
    check_command(["experiment=quickstart", "data=imagefolder", "data.path=/tmp"])  # no protocol: any group


@pytest.mark.parametrize("args,message", [
    (["merge=ties"], "merge: this protocol reads no top-level merge group, so merge=ties would change nothing: "
                     "set the protocol's own options instead (lorabench --cfg job shows them, e.g. "
                     "protocol.methods.<name>.merge.name)"),
    (["experiment=continual/world_objects", "merge=ties"], "merge: this protocol reads no top-level merge group, "
                                                           "so merge=ties would change nothing: set the protocol's "
                                                           "own options instead (lorabench --cfg job shows them, "
                                                           "e.g. protocol.method.name=merge:ties)"),
    (["sequence=world_objects"], "sequence: this protocol reads no top-level sequence group"),
    (["eval=folders"], "eval: this protocol scores the mini world with its own evaluators (eval=world); eval=folders "
                       "would replace them"),
    # the world's evaluators then said "world: evaluator 'identity' was built for another world"
    (["model=sd15"], "model: this protocol trains and scores the mini world, whose evaluators know its own model "
                     "(model=world); model=sd15 would replace it"),
    (["experiment=trilora/world", "model=tiny"], "model: this protocol trains and scores the mini world"),
])
def test_a_protocol_refuses_a_group_it_does_not_read(args, message):
    """Why: ``lorabench merge=ties`` ran the main job, 3 minutes, as if the group were not there (its merges are
    protocol.methods.<name>.merge); so did a sequence beside it; ``eval=folders`` in place of the world's own
    scoring said ``eval.concepts.concepts: unknown value 'sks'``. A group the protocol reads stays open."""
    with pytest.raises(ConfigError) as err:
        check_command(args)
    assert str(err.value) == message or str(err.value).startswith(message), str(err.value)
    check_command(["experiment=merge_adapters", "merge=ties"])  # the merge job reads it
    check_command(["experiment=continual/world_objects", "sequence=world_objects"])  # its own group again
    check_command(["experiment=orthogonal_adaptation/chilloutmix", "eval=folders"])  # real concepts: any scoring
    check_command(["model=world", "model.resolution=16"])  # the world's own model
    check_command(["experiment=orthogonal_adaptation/chilloutmix", "model=sd15"])  # real concepts: any model


def test_raised_by_names_the_configured_object_whose_method_raised():
    """What turns a callback's refusal at fit start into ``callbacks.<name>: ...``: the innermost frame whose
    ``self`` is a configured object names it, through calls into other objects; an error from elsewhere is None."""
    from lorabench.errors import raised_by

    class Hook:
        def on_fit_start(self, helper):
            helper.check()

    class Helper:
        def check(self):
            raise RuntimeError("bad option")

    swa, timer, helper = Hook(), Hook(), Helper()
    with pytest.raises(RuntimeError) as info:
        timer.on_fit_start(helper)
    assert raised_by(info.value, {"swa": swa, "timer": timer}) == "timer"
    with pytest.raises(RuntimeError) as info:
        helper.check()
    assert raised_by(info.value, {"swa": swa, "timer": timer}) is None


def test_a_config_error_survives_pickling():
    """Protocol cells train in spawned processes, which send an exception back pickled: a ConfigError rebuilt
    from its joined message alone failed, and the pool read as broken."""
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("callbacks.swa", "needs an integer")))
    assert (type(err), err.field, str(err)) == (ConfigError, "callbacks.swa", "callbacks.swa: needs an integer")


def test_seeds_and_weights_are_checked_with_the_field_they_pair_with():
    """Why: seed=-1 or seed=null reached Lightning's seed_everything and ended in a traceback (numpy's seeds are
    unsigned 32-bit); weights given for a sample job without adapters said "a list of 0 numbers (one per input)",
    naming neither the adapters' field nor what to do."""
    from lorabench.checks import check_weights
    from lorabench.errors import check_seed

    assert check_seed(0, "seed") == 0 and check_seed(2**32 - 1, "seed") == 2**32 - 1
    for bad in (-1, 2**32, 1.5, None, True, "0"):
        with pytest.raises(ConfigError, match=r"^seed: must be an integer from 0 to 4294967295"):
            check_seed(bad, "seed")
    assert check_weights([1, 0.5], 2) == [1.0, 0.5] and check_weights(None, 3) is None
    with pytest.raises(ConfigError, match=r"^protocol.weights: must be null or a list of 2 numbers, one per file of "
                                          r"protocol.inputs, got \[0.7\]"):
        check_weights([0.7], 2)
    with pytest.raises(ConfigError, match=r"^protocol.weights: scales the files of protocol.adapters, which lists"):
        check_weights([1, 2], 0, "protocol.adapters")
