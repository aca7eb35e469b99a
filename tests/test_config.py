from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import fractalformer
from fractalformer import FractalError
from fractalformer.config import (
    SECTIONS,
    ConceptConfig,
    ModelConfig,
    MoEConfig,
    NestingConfig,
    RunConfig,
    TrainConfig,
    build_config,
    choices,
    config_keys,
    describe_keys,
    to_toml,
)
from fractalformer.growth import grow_model
from fractalformer.memory import check_training_fits, param_count
from fractalformer.models import build_model
from fractalformer.presets import PRESETS


def test_dense_preset_is_the_seed_dims_and_default_is_a_fractalformer() -> None:
    m = build_config("dense").model
    assert (m.vocab_size, m.block_size, m.n_layer, m.d_model) == (128, 256, 4, 128)
    assert (m.n_head, m.n_kv_head, m.head_dim, m.mlp_hidden, m.rope_theta) == (4, 1, 32, 512, 100.0)
    assert m.family == "gpt" and m.nesting.levels == 1
    d = build_config().model
    assert (d.family, d.nesting.levels, d.nesting.split, d.d_model, d.n_layer, d.n_head) == (
        "fractal", 3, 2, 128, 4, 4)
    assert len(d.sub_models()) == 7


def test_set_and_toml_overrides(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\n[model]\nn_layer = 2\n[train]\ntokenizer = "byte"\n')
    cfg = build_config(None, str(f), ["model.d_model=64", "compile=true", "data=none"])
    assert (cfg.train.lr, cfg.model.n_layer, cfg.model.d_model) == (0.01, 2, 64)
    assert cfg.train.tokenizer == "byte" and cfg.train.compile is True and cfg.train.data is None


def test_round_trip_through_dict() -> None:
    cfg = build_config("tiny", None, ["lr=0.002"])
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "sets,match",
    [
        (["n_kv_head=3"], "multiple of n_kv_head"),
        (["head_dim=7"], "even"),
        (["d_model=0"], "d_model must be positive"),
        (["d_model=abc"], "integer"),
        (["dropout=1.5"], "dropout"),
        (["lr=0.001", "min_lr=0.01"], "min_lr"),
        (["tokenizer=words"], "tokenizer must be one of"),
        (["no_such_key=1"], "unknown config key"),
        (["novalue"], "key=value"),
        (["compile=maybe"], "true or false"),
        (["lr=nan"], "finite"),
    ],
)
def test_bad_values_are_rejected_clearly(sets: list[str], match: str) -> None:
    with pytest.raises(FractalError, match=match):
        build_config("dense", None, sets)


def test_bad_toml(tmp_path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("lr = = 3")
    with pytest.raises(FractalError, match="not valid TOML"):
        build_config(None, str(f), [])
    f.write_text('n_layer = "four"')
    with pytest.raises(FractalError, match="n_layer must be of type int"):
        build_config(None, str(f), [])
    with pytest.raises(FractalError, match="not found"):
        build_config(None, str(tmp_path / "missing.toml"), [])
    with pytest.raises(FractalError, match="unknown preset"):
        build_config("huge", None, [])


def test_toml_names_its_base_preset_and_combines_with_preset(tmp_path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('preset = "dense"\nlr = 0.01\n')
    cfg = build_config(None, str(f), [])
    assert cfg.model.family == "gpt" and cfg.train.lr == 0.01
    assert build_config("dense", str(f), []) == cfg
    plain = tmp_path / "plain.toml"
    plain.write_text("lr = 0.01\n")
    assert build_config("tiny", str(plain), []).model.n_layer == 2  # --preset under --config
    assert build_config(None, str(plain), []).model.family == "fractal"  # no base named: default
    with pytest.raises(FractalError, match="disagree"):
        build_config("tiny", str(f), [])


@pytest.mark.parametrize("preset", ["tiny-fractal", "peer", "matryoshka"])
def test_printed_config_reads_back_as_the_same_config(tmp_path, preset: str) -> None:
    cfg = build_config(preset, None, ["level_weights=1,2,1"] if preset == "tiny-fractal" else [])
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg))
    assert build_config(None, str(f), []) == cfg


def test_every_key_is_described_and_choice_fields_are_literals() -> None:
    rows = describe_keys()
    assert [(r[0], r[1]) for r in rows] == [(k.part, k.dotted) for k in config_keys()]
    shared = {f.name for p in (ModelConfig(), TrainConfig()) for f in fields(p)} - set(SECTIONS)
    sectioned = {f"{name}.{f.name}" for name, section in SECTIONS.items() for f in fields(section)}
    assert {r[1] for r in rows} == shared | sectioned
    assert all(r[3] for r in rows)
    assert choices(TrainConfig, "log") == ("csv", "tensorboard")
    assert choices(ModelConfig, "family") == ("gpt", "fractal", "matformer", "mrl", "moe", "concept")
    assert choices(ConceptConfig, "combiner") == ("sum", "linear")
    assert choices(ConceptConfig, "read") == ("cross", "add")
    assert choices(ConceptConfig, "loss") == ("cosine", "mse", "l1")
    assert choices(ModelConfig, "d_model") == ()


def test_level_weights_are_numbers(tmp_path) -> None:
    f = tmp_path / "w.toml"
    f.write_text('preset = "tiny-fractal"\nlevel_weights = [2, 1, 1]\n')
    assert build_config(None, str(f), []).model.nesting.level_weights == [2.0, 1.0, 1.0]
    cfg = build_config("tiny-fractal", None, ["level_weights=2,1,1"])
    assert cfg.model.nesting.level_weights == [2.0, 1.0, 1.0]
    for bad, match in (('"2,1,1"', "list of numbers"), ("[1, true, 1]", "list of numbers")):
        f.write_text(f'preset = "tiny-fractal"\nlevel_weights = {bad}\n')
        with pytest.raises(FractalError, match=match):
            build_config(None, str(f), [])


@pytest.mark.parametrize(("key", "value"), [("d_model", 10**6), ("block_size", 10**9), ("n_layer", 10**7)])
def test_a_model_beyond_memory_is_refused_before_it_is_built(key: str, value: int) -> None:
    cfg = build_config("tiny", sets=[f"{key}={value}"])  # a valid config ...
    with pytest.raises(FractalError, match=r"needs at least [\d,.]+ GiB, more than this machine's"):
        build_model(cfg.model)  # ... that no machine here could build
    with pytest.raises(FractalError, match="choose smaller dimensions"):
        check_training_fits(cfg)


def test_a_training_step_beyond_memory_names_the_batch() -> None:
    check_training_fits(build_config("tiny"))
    with pytest.raises(FractalError, match=r"micro-batch of 1,000,000,000 x 32 tokens.*lower batch_size"):
        check_training_fits(build_config("tiny", sets=["batch_size=1000000000"]))


def test_the_size_estimate_is_a_lower_bound_of_every_preset() -> None:
    for name in PRESETS:
        cfg = build_config(name).model
        with torch.device("meta"):
            assert param_count(cfg) <= build_model(cfg).num_params(), name


def test_grow_and_load_check_sizes_before_allocating(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(FractalError, match=r"a model of d_model 32,000, .* needs at least"):
        grow_model(fractalformer.load(tiny_run).model, 1000)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    d = json.loads((run / "config.json").read_text())
    d["model"]["n_layer"] = 200_000  # fits some machines, but not the weights in model.safetensors
    (run / "config.json").write_text(json.dumps(d))
    with pytest.raises(FractalError, match=r"too few for the at least 3,07.* parameters its config.json"):
        fractalformer.load(run)


OLD = Path(__file__).parent / "old_configs"  # config.json of run folders written before the sections


@pytest.mark.parametrize(("name", "preset", "sets"), [
    ("concept", "tiny", ["family=concept", "concept_levels=2", "combo=4,2", "concept_weight=0.1,0.2",
                         "combiner=linear"]),
    ("moe", "tiny", ["family=moe", "moe=peer", "moe_layers=1", "n_experts=64", "moe_topk=4",
                     "moe_key_dim=16"]),
    ("shard", "tiny-fractal", ["data_shard=1/2", "level_weights=2,1,1", "routing=split"]),
])
def test_a_flat_old_config_json_loads_as_the_same_config(name: str, preset: str, sets: list[str]) -> None:
    old = json.loads((OLD / f"{name}.json").read_text())
    assert "n_experts" in old["model"] and "nesting" not in old["model"]  # the flat form
    model_keys = {k.flat for k in config_keys() if k.part == "model"}
    assert set(old["model"]) <= model_keys  # flat names kept
    newer = {"chunking", "concept_encoder", "chunk_size", "chunk_weight", "moe_shared", "moe_gated",
             "usage_weight", "rekey_every"}
    assert model_keys - set(old["model"]) == newer
    train_keys = {k.flat for k in config_keys() if k.part == "train"}
    assert set(old["train"]) <= train_keys
    assert train_keys - set(old["train"]) == {"sampling", "level_probs", "level_grads", "mix_weight"}  # newer
    cfg = RunConfig.from_dict(old)
    cfg.validate()
    assert cfg == build_config(preset, None, sets)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # and the sectioned form it is written in now


def test_an_old_config_drops_the_inert_keys_of_sections_its_family_does_not_use() -> None:
    old = json.loads((OLD / "extract.json").read_text())  # a dense sub-model extracted from heads nesting
    assert (old["model"]["family"], old["model"]["attn_nesting"]) == ("gpt", "heads")
    cfg = RunConfig.from_dict(old)
    cfg.validate()
    assert cfg.model.nesting == NestingConfig() and cfg.model.d_model == 16
    assert set(cfg.to_dict()["model"]) == {f.name for f in fields(ModelConfig)} - set(SECTIONS)


def test_flat_dotted_and_qualified_names_are_one_key(tmp_path: Path) -> None:
    want = build_config("peer", None, ["n_experts=1024", "moe_topk=4"])
    assert want.model.moe.n_experts == 1024 and want.model.moe.topk == 4
    for sets in (["moe.n_experts=1024", "moe.topk=4"], ["model.moe.n_experts=1024", "model.moe_topk=4"]):
        assert build_config("peer", None, sets) == want
    f = tmp_path / "c.toml"
    for text in ('n_experts = 1024\n[moe]\ntopk = 4\n', '[model.moe]\nn_experts = 1024\ntopk = 4\n',
                 '[model]\nn_experts = 1024\nmoe_topk = 4\n'):
        f.write_text(text)
        assert build_config("peer", str(f), []) == want, text


@pytest.mark.parametrize(("sets", "match"), [
    (["moe.n_experts=1024"], r"^n_experts needs family=moe \(got family gpt\)"),
    (["combo=2"], r"^combo needs family=concept \(got family gpt\)$"),
    (["split=4"], r"^split needs family=fractal, matformer or mrl \(got family gpt\)$"),
    (["family=concept", "moe=pkm"], "moe needs family=moe"),
    (["family=moe", "moe=peer", "concept_share=true"], "concept_share needs family=concept"),
])
def test_a_key_of_another_familys_section_is_one_line_error(sets: list[str], match: str) -> None:
    with pytest.raises(FractalError, match=match) as e:
        build_config("tiny", None, sets)
    assert "\n" not in str(e.value)


def test_lists_are_lists_and_their_old_string_forms_still_parse(tmp_path: Path) -> None:
    cfg = build_config("tiny", None, ["family=concept", "concept_levels=2", "combo=4,4", "concept_weight=0.1",
                                      "data_shard=0/2"])
    assert (cfg.model.concept.combo, cfg.model.concept.weight) == ([4, 4], [0.1])
    assert cfg.train.data_shard == [0, 2]
    assert cfg.model.concept.combos() == [4, 4] and cfg.model.concept.weights() == [0.1, 0.1]
    assert cfg.train.shard() == (0, 2)
    f = tmp_path / "c.toml"
    f.write_text('family = "concept"\nconcept_levels = 2\ncombo = "4,4"\nconcept_weight = "0.1"\n'
                 'data_shard = "0/2"\n')
    assert build_config("tiny", str(f), []) == cfg
    f.write_text('family = "concept"\n[train]\ndata_shard = [0, 2]\n[model.concept]\nlevels = 2\n'
                 'combo = [4, 4]\nweight = [0.1]\n')
    assert build_config("tiny", str(f), []) == cfg
    moe = build_config("peer")
    assert moe.model.moe.layers == [1, 3] and moe.model.sparse_layers() == [1, 3]
    every = build_config("peer", None, ["moe_layers=all"])
    assert every.model.moe.layers == "all" and every.model.sparse_layers() == [0, 1, 2, 3]
    assert build_config("peer", None, ["moe.layers=3,1"]).model.sparse_layers() == [1, 3]
    with pytest.raises(FractalError, match="moe_layers must be a list of integers or 'all'"):
        f.write_text('preset = "peer"\nmoe_layers = [1.5]\n')
        build_config(None, str(f), [])


def test_model_configs_from_keys_share_nothing() -> None:
    a = ModelConfig.of(family="fractal", levels=3, level_weights=[1.0, 1.0, 1.0])
    b = a.replace(glue_rank=2)
    b.nesting.level_weights[0] = 5.0
    assert (a.nesting.glue_rank, a.nesting.level_weights[0], b.nesting.glue_rank) == (0, 1.0, 2)
    assert ModelConfig.of(**{"moe.n_experts": 16}).moe.n_experts == 16
    assert a.flat_values()["levels"] == 3 and len(a.flat_values()) == 53


def test_of_and_replace_take_flat_names_and_whole_sections() -> None:
    c = ModelConfig.of(family="moe", moe="peer", n_experts=64)  # the flat key moe is moe.kind
    assert (c.moe.kind, c.moe.n_experts) == ("peer", 64)
    d = c.replace(moe=MoEConfig(kind="pkm"))  # a whole section
    assert (d.moe.kind, d.moe.n_experts, c.moe.kind) == ("pkm", MoEConfig().n_experts, "peer")
