import pytest
import yaml

from sgmft.cli import main
from sgmft.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, save_config


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    cfg = load_config(None, ["train.lr=3e-4", "model.backbone.policy=frozen", "data.path=/x"])
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.train.lr == pytest.approx(3e-4)
    assert again.model.backbone.policy == "frozen"


@pytest.mark.parametrize(
    "values, key",
    [
        ({"train": {"lrr": 1}}, "train.lrr"),
        ({"model": {"backbone": {"policy": "half"}}}, "model.backbone.policy"),
        ({"train": {"epochs": "five"}}, "train.epochs"),
        ({"train": {"epochs": 2.5}}, "train.epochs"),
        ({"model": {"coarse_guidance": "yes"}}, "model.coarse_guidance"),
        ({"serve": {"max_batch_size": 64, "max_ongoing_requests": 8}}, "serve.max_ongoing_requests"),
        ({"model": {"d_model": 66, "num_heads": 4}}, "model.d_model"),
        ({"nonsense": {}}, "nonsense"),
        ({"pretrain": {"synth_n": 100, "synth_val_frac": 0.001}}, "pretrain.synth_val_frac"),
        ({"pretrain": {"synth_val_frac": 0.6, "synth_test_frac": 0.5}}, "pretrain.synth_test_frac"),
    ],
)
def test_bad_values_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(values)


def test_int_and_exponent_strings_are_accepted_where_float_is_expected():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=3e-4x"])


def test_overrides_parse_yaml_scalars_and_optional():
    values = apply_overrides({}, ["train.fail_once_at_step=3", "train.fail_once_at_step=null", "tune.search_space={a: 1}"])
    cfg = config_from_dict(values)
    assert cfg.train.fail_once_at_step is None
    assert cfg.tune.search_space == {"a": 1}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_reports_config_errors(capsys):
    assert main(["model", "summary", "--preset", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_shipped_job_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
    assert configs, "jobs/configs has no YAML configs"
    for path in configs:
        loaded = config_to_dict(load_config(path))
        # every value the file sets is the value the config holds (no key dropped or coerced away)
        for dotted, value in _leaves(yaml.safe_load(path.read_text())):
            node = loaded
            for part in dotted:
                node = node[part]
            assert node == value or (isinstance(value, int) and node == float(value)), (path.name, dotted, value, node)


def _leaves(values, prefix=()):
    for key, value in values.items():
        if isinstance(value, dict) and not (prefix + (key,) == ("tune", "search_space")):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_every_preset_a_config_may_name_has_a_head_width_and_an_input_size():
    """The presets live in one table (sgmft.config): each one a config accepts is buildable."""
    from sgmft.cli import build_parser
    from sgmft.config import BACKBONE_PRESETS, image_size_of, model_config_for

    for preset in BACKBONE_PRESETS:
        assert model_config_for(preset).backbone.preset == preset and image_size_of(preset) > 0
    with pytest.raises(ConfigError, match="ViT-B-16"):
        load_config(None, ["model.backbone.preset=ViT-Z-99"])
    # the command line offers what the config allows, read from the same place
    with pytest.raises(SystemExit):
        build_parser().parse_args(["model", "summary", "--implementation", "onnx"])
    assert build_parser().parse_args(["model", "summary", "--preset", "RN50", "--implementation", "hf"]).implementation == "hf"


def test_local_weight_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    """Workers read the backbone's weights from another working directory (a Tune trial's own)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.backbone.checkpoint=runs/pretrain/backbone/weights.pt", "model.backbone.download_root=w"])
    assert cfg.model.backbone.checkpoint == str(tmp_path / "runs/pretrain/backbone/weights.pt")
    assert cfg.model.backbone.download_root == str(tmp_path / "w")
    remote = load_config(None, ["model.backbone.checkpoint=s3://bucket/weights.pt"])
    assert remote.model.backbone.checkpoint == "s3://bucket/weights.pt"
