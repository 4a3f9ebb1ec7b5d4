from dataclasses import replace

import pytest

from equicsp.config import (
    OBJECTIVE_PRESETS,
    ConfigError,
    apply_overrides,
    config_from_dict,
    flatten,
    load_config,
    make_config,
)
from equicsp.engine.run_folder import resume_differences


def test_presets_follow_the_paper():
    equicsp = make_config("perov_5", "equicsp")
    assert (equicsp.model.num_layers, equicsp.model.hidden_dim, equicsp.optim.epochs) == (4, 256, 3500)
    assert make_config("mp_20").model.hidden_dim == 512
    diffcsp = make_config("perov_5", "diffcsp").objective
    assert not any([diffcsp.com_free_noise, diffcsp.von_mises, diffcsp.prob_model, diffcsp.perm_loss,
                    diffcsp.frame_average])
    assert set(OBJECTIVE_PRESETS) >= {"equicsp", "no_perm_loss", "frame_average", "no_com_free", "no_pm_vm",
                                      "no_vm", "no_pm", "diffcsp", "none"}
    assert diffcsp.lattice == "matrix" and make_config("perov_5", "none").objective.lattice == "projected"
    assert make_config("mpts_52").model.context_mean and not make_config("mp_20").model.context_mean


def test_the_mpts_52_network_is_equicsps_own_and_diffcsp_keeps_its_plain_heads():
    """The per-crystal mean in the coordinate heads is the EquiCSP code's MPTS-52 network; DiffCSP's has none."""
    for arm in ("equicsp", "no_perm_loss", "none"):
        assert make_config("mpts_52", arm).model.context_mean
    assert not make_config("mpts_52", "diffcsp").model.context_mean
    assert make_config("mpts_52", "diffcsp", {"model.context_mean": True}).model.context_mean


def test_training_batch_sizes_are_the_public_equicsp_codes_per_dataset():
    sizes = {preset: make_config(preset).optim.batch_size for preset in ("perov_5", "carbon_24", "mp_20", "mpts_52")}
    assert sizes == {"perov_5": 1024, "carbon_24": 512, "mp_20": 256, "mpts_52": 128}


def test_permutations_need_the_projected_lattice():
    for switch in ("objective.perm_loss", "objective.frame_average"):
        with pytest.raises(ConfigError, match="projected"):
            make_config("smoke", "diffcsp", {switch: True})


def test_yaml_round_trip(tmp_path):
    config = make_config("smoke", "no_vm", {"objective.perm_loss_weight": "0.25", "run.seed": 3})
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    assert config.flat()["objective.perm_loss_weight"] == 0.25


@pytest.mark.parametrize("overrides, message", [
    ({"objective.von_mises": True, "objective.com_free_noise": False, "objective.prob_model": False}, "von_mises needs"),
    ({"objective.frame_average": True}, "exclude each other"),
    ({"objective.coord_noise_weight": 0}, "prob_model needs objective.coord_noise_weight"),
    ({"diffusion.sigma_begin": 0.6}, "sigma_begin"),
    ({"run.precision": "fp8"}, "precision"),
])
def test_impossible_combinations_are_errors_with_a_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("smoke", "equicsp", overrides)


def test_unknown_names_and_bad_values_are_errors():
    with pytest.raises(ConfigError, match="unknown config field 'objective.nope'"):
        make_config("smoke", "equicsp", {"objective.nope": 1})
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("mp_21")
    with pytest.raises(ConfigError, match="cannot read 'maybe' as bool"):
        apply_overrides(make_config("smoke"), {"objective.perm_loss": "maybe"})
    with pytest.raises(ConfigError, match="unknown config field"):
        config_from_dict({"preset": "smoke", "modle": {"num_layers": 2}})


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lr": "nan"}, "optim.lr"),
    ({"optim.lr": "inf"}, "optim.lr"),
    ({"optim.lr": 0}, "optim.lr"),
    ({"optim.min_lr": "nan"}, "optim.min_lr"),
    ({"optim.grad_clip": "inf"}, "optim.grad_clip"),
    ({"sampler.step_lr": "nan"}, "sampler.step_lr"),
    ({"diffusion.sigma_end": "inf"}, "sigma_end"),
    ({"objective.perm_loss_weight": "nan"}, "perm_loss_weight"),
    ({"objective.coord_noise_weight": "inf"}, "coord_noise_weight"),
    ({"run.checkpoint_every": 0}, "run.checkpoint_every"),
    ({"run.log_every": 0}, "run.log_every"),
])
def test_rates_must_be_finite_and_positive_and_intervals_at_least_one(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config("smoke", "equicsp", overrides)


def test_an_unreadable_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: .*folder"):
        load_config(tmp_path)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {num_layers: 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_resume_compares_every_field_but_the_resumable_ones():
    stored = make_config("smoke", "equicsp", {"optim.epochs": 10, "sampler.step_lr": 1e-5})
    longer = make_config("smoke", "equicsp", {"optim.epochs": 20, "run.checkpoint_every": 5})
    assert resume_differences(stored.flat(), longer) == []
    other = make_config("smoke", "diffcsp", {"optim.epochs": 10, "run.seed": 1, "model.hidden_dim": 32})
    differences = resume_differences(stored.flat(), other)
    assert "run.seed 0 -> 1" in differences and "model.hidden_dim 128 -> 32" in differences
    assert "objective_preset equicsp -> diffcsp" in differences
    as_mlflow_params = {name: str(value) for name, value in stored.flat().items()}  # MLflow keeps strings
    assert resume_differences(as_mlflow_params, longer) == []
    assert resume_differences(as_mlflow_params, other) == differences


def test_a_run_stored_before_a_field_existed_resumes_when_the_field_has_its_default():
    config = make_config("smoke", "equicsp")
    stored = {name: value for name, value in config.flat().items() if name != "objective.lattice"}
    assert resume_differences(stored, config) == []
    assert resume_differences(stored, make_config("smoke", "diffcsp")) != []


def test_configs_saved_under_the_old_weight_names_still_read():
    saved = make_config("smoke", "equicsp").to_dict()
    saved["objective"]["cost_coord"] = saved["objective"].pop("coord_noise_weight")
    saved["objective"]["cost_type"] = 5.0
    del saved["objective"]["type_noise_weight"]
    config = config_from_dict(saved)
    assert config.objective.coord_noise_weight == 1.0 and config.objective.type_noise_weight == 5.0
    assert resume_differences(flatten(saved), replace(config, objective=replace(config.objective,
                                                                              type_noise_weight=5.0))) == []


def test_generation_samples_at_the_generation_step_sizes_unless_one_is_given():
    """DiffCSP's and EquiCSP's ab initio step sizes differ from their CSP ones (Perov-5 1e-6 against 5e-7)."""
    generation = {"diffusion.task": "generation"}
    steps = {preset: make_config(preset, "equicsp", generation).sampler.step_lr for preset in ("perov_5", "carbon_24",
                                                                                               "mp_20", "mpts_52")}
    assert steps == {"perov_5": 1e-6, "carbon_24": 1e-5, "mp_20": 5e-6, "mpts_52": 1e-5}
    assert make_config("perov_5").sampler.step_lr == 5e-7
    assert make_config("perov_5", "equicsp", {**generation, "sampler.step_lr": 3e-6}).sampler.step_lr == 3e-6
    stored = make_config("perov_5", "equicsp", {**generation, "sampler.step_lr": 3e-6})
    assert config_from_dict(stored.to_dict()) == stored


def test_every_config_field_option_is_described_by_its_comment_in_the_dataclass():
    import argparse

    from equicsp.cli.config_arguments import add_config_arguments
    from equicsp.config import make_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    options = {action.option_strings[0]: action.help for action in parser._actions
               if action.option_strings and "." in action.option_strings[0]}
    assert len(options) == len(make_config().flat()) - 2  # all but preset and objective_preset
    undescribed = [name for name, text in options.items() if text.startswith("(default")]
    assert undescribed == []
    assert options["--model.num_freqs"].startswith("Fourier features") and options["--model.num_freqs"].endswith(
        "(default: 128)")
    assert options["--optim.batch_size"].endswith("(default: 1024)")  # the perov_5 preset's, not the dataclass's
    assert "MPTS-52" in options["--model.context_mean"]  # a comment on the lines above the field
