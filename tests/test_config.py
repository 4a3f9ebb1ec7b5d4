import pytest

from equicsp.config import OBJECTIVE_PRESETS, ConfigError, apply_overrides, config_from_dict, load_config, make_config


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
    ({"objective.cost_coord": 0}, "prob_model needs objective.cost_coord"),
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
