"""Job configs: every YAML in job/ validates; overrides, aliases and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fada_batch.config import ConfigError, JobConfig, config_from_dict, load_job, valid_keys

JOBS = sorted((Path(__file__).parent.parent / "job").glob("*.yaml"))


def test_there_are_job_files():
    names = {p.name for p in JOBS}
    assert {"validation.yaml", "full.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_job_yaml_validates(path: Path):
    cfg = load_job(path)
    assert isinstance(cfg, JobConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), "each job file starts with a comment saying what it is for"
    assert "fada-batch" in path.read_text().split("\n\n")[0] or "fada-batch" in path.read_text()[:800]


def test_validation_yaml_is_the_seed_recipe():
    cfg = load_job(Path("job/validation.yaml"))
    assert cfg.data.num_images == 5
    assert cfg.train.num_epochs == 1 and cfg.train.batch_size == 1
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model.name_or_path == "Salesforce/blip2-opt-2.7b"
    assert cfg.model.quantization == "8bit"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_full_yaml():
    cfg = load_job(Path("job/full.yaml"))
    assert cfg.data.num_images is None and cfg.train.num_epochs == 3
    assert cfg.model.name_or_path == "Salesforce/blip2-opt-2.7b"


def test_overrides_and_seed_aliases():
    cfg = load_job(
        Path("job/validation.yaml"),
        overrides=[
            "num_epochs=3",
            "learning_rate=2e-4",
            "num_images=null",
            "batch_size=4",
            "model.quantization=none",
            "lora.target_modules=[q_proj, k_proj]",
        ],
    )
    assert cfg.train.num_epochs == 3
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.data.num_images is None
    assert cfg.train.batch_size == 4
    assert cfg.model.quantization == "none"
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]


def test_unknown_key_is_refused_with_valid_keys_listed(tmp_path: Path):
    """No close match: the valid keys are listed, of the key's own section when it has one,
    else all of them grouped by section, with the aliases."""
    job = tmp_path / "bad.yaml"
    job.write_text("train:\n  zzz: 3\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as e:
        load_job(job)
    msg = str(e.value)
    assert str(job) in msg and "1 problem in the job config" in msg
    assert "unknown key 'train.zzz'\n" in msg and "did you mean" not in msg
    assert "Valid keys:\n    train: num_epochs, batch_size, " in msg
    assert "data:" not in msg and "Short aliases" not in msg  # only the section it was in
    with pytest.raises(ConfigError) as e:
        load_job(job, overrides=["bogus=1"])
    msg = str(e.value)
    assert "2 problems" in msg and "unknown key 'bogus'" in msg
    for line in ("    name", "    data: root, categories, num_images,", "    lora: r, alpha, dropout,"):
        assert f"\n{line}" in msg, line
    assert "Short aliases: num_images -> data.num_images" in msg
    listed = msg.split("Valid keys:", 1)[1]
    for key in valid_keys():  # every key, each once, under its section
        head, _, leaf = key.rpartition(".")
        assert re.search(
            rf"(^|\n)    {head + ': ' if head else ''}[^\n]*\b{leaf}\b", listed.replace("\n        ", " ")
        ), key


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("train.num_epoch", ["train.num_epochs"]),  # a near miss in its section
        ("trian.num_epochs", ["train.num_epochs"]),  # a misspelt section
        ("num_epoch", ["train.num_epochs"]),  # the leaf without its section
        ("epochs", ["train.num_epochs"]),
        ("max_steps", ["train.max_steps"]),
        ("model.max_steps", ["train.max_steps"]),  # the right leaf in the wrong section
        ("model.quantisation", ["model.quantization"]),
        ("data.rot", ["data.root"]),  # own section first: not output.root
        ("eval.max_tokens", ["eval.max_new_tokens"]),
        ("cluster.gpus", ["cluster.gpus_per_task", "cluster.gpus_per_node"]),  # a whole word of the key
        ("lr", ["train.learning_rate"]),  # names other tools use
        ("train.lr", ["train.learning_rate"]),
        ("lora_r", ["lora.r"]),
        ("lora_alpha", ["lora.alpha"]),
    ],
)
def test_unknown_key_close_to_a_valid_one_gets_did_you_mean_and_no_list(key: str, meant: list[str]):
    with pytest.raises(ConfigError) as e:
        load_job(Path("job/demo.yaml"), overrides=[f"{key}=1"])
    msg = str(e.value)
    assert f"unknown key {key!r} (did you mean {' or '.join(map(repr, meant))}?)" in msg
    assert "Valid keys" not in msg and len(msg.splitlines()) == 2  # no list of 61 keys


def test_a_misspelt_section_names_each_key_in_it():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"modle": {"device": "cpu"}, "evl": {}, "train": {"num_epoch": 3}})
    msg = str(e.value)
    assert "unknown key 'modle.device' (did you mean 'model.device'?)" in msg
    assert "unknown key 'evl' (did you mean 'eval'?)" in msg
    assert "unknown key 'train.num_epoch' (did you mean 'train.num_epochs'?)" in msg
    assert "Valid keys" not in msg


def test_wrong_types_and_values_are_all_reported():
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            {
                "train": {"num_epochs": "three", "batch_size": 0.5},
                "model": {"quantization": "16bit"},
                "lora": {"dropout": "x"},
            }
        )
    msg = str(e.value)
    assert "4 problems in the job config" in msg
    assert "train.num_epochs: expected an integer, got 'three'" in msg
    assert "train.batch_size: expected an integer" in msg
    assert "'16bit' is not one of 'auto', 'none', '8bit', '4bit'" in msg


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="sum to 1"):
        config_from_dict({"data": {"train_fraction": 0.9, "val_fraction": 0.2, "test_fraction": 0.1}})
    with pytest.raises(ConfigError, match="Unknown category 'Brain'"):
        config_from_dict({"data": {"categories": ["Brain"]}})
    with pytest.raises(ConfigError, match=r"train\.num_epochs must be >= 1"):
        config_from_dict({"train": {"num_epochs": 0}})
    # a warning in the first half of a 1-minute run would reach a task still starting
    with pytest.raises(ConfigError, match=r"cluster\.signal_delay_s must be > 0 and under half"):
        config_from_dict({"cluster": {"time_min": 1, "signal_delay_s": 55}})
    assert config_from_dict({"cluster": {"time_min": 1, "signal_delay_s": 20}}).cluster.signal_delay_s == 20


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="is not key=value"):
        load_job(Path("job/validation.yaml"), overrides=["num_epochs"])


def test_missing_job_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read job file"):
        load_job(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path: Path):
    job = tmp_path / "evil.yaml"
    job.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(job)


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "cluster.partition" in keys and "train.feature_cache" in keys


def test_relative_roots_resolve_and_hub_ids_stay(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "j.yaml"
    job.write_text(
        "data: {root: mydata}\noutput: {root: out}\nmodel: {name_or_path: Salesforce/blip2-opt-2.7b}\n"
    )
    cfg = load_job(job)
    assert cfg.data.root == str(tmp_path / "mydata")
    assert cfg.output.root == str(tmp_path / "out")
    assert cfg.model.name_or_path == "Salesforce/blip2-opt-2.7b"


def test_config_hash_changes_with_config():
    a = config_from_dict({})
    b = config_from_dict({"train": {"learning_rate": 0.001}})
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == config_from_dict({}).config_hash()


def test_eval_generation_settings_are_validated_together():
    cfg = config_from_dict({"eval": {"num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.2}})
    assert (cfg.eval.num_beams, cfg.eval.no_repeat_ngram_size, cfg.eval.repetition_penalty) == (3, 2, 1.2)
    assert (JobConfig().eval.num_beams, JobConfig().eval.repetition_penalty) == (1, 1.0)  # greedy default
    with pytest.raises(ConfigError) as err:
        config_from_dict({"eval": {"num_beams": 0, "no_repeat_ngram_size": -1, "repetition_penalty": 0}})
    msg = str(err.value)
    assert "eval.num_beams must be >= 1, got 0" in msg
    assert "eval.no_repeat_ngram_size must be >= 0, got -1" in msg
    assert "eval.repetition_penalty must be > 0" in msg
