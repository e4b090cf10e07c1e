from pathlib import Path

import pytest

from yoto.config import Config, load_config, preset_names, redact
from yoto.errors import ConfigError


def test_every_preset_validates() -> None:
    assert {"tiny", "gpt2-124m", "gpt-1.3b"} <= set(preset_names())
    for name in preset_names():
        assert isinstance(load_config(preset=name), Config)


def test_tiny_accumulates_and_ramps_its_batch() -> None:
    cfg = load_config(preset="tiny")
    assert cfg.train.global_batch_size // cfg.train.micro_batch_size == 2
    assert cfg.train.batch_warmup.start < cfg.train.global_batch_size
    assert cfg.train.precision == "fp32"


def test_gpt2_preset_has_gpt2_shape() -> None:
    m = load_config(preset="gpt2-124m").model
    assert (m.n_layer, m.n_head, m.d_model, m.seq_len, m.vocab_size) == (12, 12, 768, 1024, 50304)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        preset="tiny",
        overrides=[
            "train.steps=7",
            "optim.lr=3e-4",
            "data.paths=[a.txt, b=c.jsonl]",
            "train.batch_warmup.start=null",
            "deepspeed.zero_optimization.overlap_comm=true",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.paths == ["a.txt", "b=c.jsonl"]
    assert cfg.train.batch_warmup.start is None
    assert cfg.deepspeed == {"zero_optimization": {"overlap_comm": True}}


def test_typo_names_the_field_and_suggests() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="tiny", overrides=["train.stpes=10"])
    msg = str(err.value)
    assert "unknown field 'train.stpes'" in msg
    assert "did you mean 'steps'" in msg
    assert "micro_batch_size" in msg  # lists the valid fields


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match="unknown field 'trian'.*did you mean 'train'"):
        load_config(overrides=["trian.steps=10"])


def test_bad_choice_names_field_value_and_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.precision=fp17"])
    msg = str(err.value)
    assert "train.precision" in msg and "'fp17'" in msg
    assert "'fp32'" in msg and "'bf16'" in msg and "'fp16'" in msg


def test_out_of_range_names_the_bound() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.steps=0"])
    msg = str(err.value)
    assert "train.steps" in msg and ">= 1" in msg and "got 0" in msg


def test_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr.*got 'fast'"):
        load_config(overrides=["optim.lr=fast"])


def test_batch_not_multiple_of_micro_batch() -> None:
    with pytest.raises(ConfigError, match="global_batch_size=20 must be a multiple of.*=8"):
        load_config(overrides=["train.micro_batch_size=8", "train.global_batch_size=20"])


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match="d_model=100 must be a multiple of model.n_head=3"):
        load_config(overrides=["model.d_model=100", "model.n_head=3"])


def test_malformed_set() -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(overrides=["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        load_config(preset="tiny", overrides=["train.steps.x=1"])


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'tinyy'.*did you mean 'tiny'.*gpt2-124m"):
        load_config(preset="tinyy")


def test_config_file(tmp_path: Path) -> None:
    file = tmp_path / "mine.yaml"
    file.write_text("train:\n  steps: 42\nmodel:\n  n_layer: 2\n")
    cfg = load_config(file=file)
    assert (cfg.train.steps, cfg.model.n_layer) == (42, 2)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=tmp_path / "bad.yaml")


def test_saved_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(preset="tiny", overrides=["train.steps=11"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert load_config(file=tmp_path / "c.yaml") == cfg


def test_redaction() -> None:
    tree = {
        "notify": {
            "slack_webhook": "https://hooks.slack.com/x/y",
            "token": "abc",
            "urls": ["https://user:pass@example.com/hook"],
        },
        "train": {"batch_warmup": {"tokens": 4096}},
        "api_key": "",
    }
    out = redact(tree)
    assert out["notify"]["slack_webhook"] == "<redacted>"
    assert out["notify"]["token"] == "<redacted>"
    assert out["notify"]["urls"] == ["https://<redacted>@example.com/hook"]
    assert out["train"]["batch_warmup"]["tokens"] == 4096  # "tokens" is not a secret
    assert out["api_key"] == ""
