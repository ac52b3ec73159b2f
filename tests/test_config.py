from pathlib import Path

import pytest
import yaml

from ptycho_core.config import ConfigError, config_from_dict, load_config, set_dotted

MINIMAL = {
    "data": {"path": "data.h5"},
    "experiment": {"energy_kev": 300, "conv_angle_mrad": 20, "dx_ang": 0.3},
}


def with_(dotted, value):
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    set_dotted(raw, dotted, value)
    return raw


def test_reference_defaults_follow_the_reference_text():
    cfg = config_from_dict(MINIMAL | {"defaults": "reference"})
    mp = cfg.model_params
    assert mp.obj_preblur_std is None and mp.detector_blur_std is None
    assert mp.optimizer_params.name == "Adam" and mp.optimizer_params.configs == {}
    assert mp.optimizer_params.load_state is None
    expected = {
        "obja": (1, 5.0e-4), "objp": (1, 5.0e-4), "obj_tilts": (None, 0.0),
        "slice_thickness": (None, 0.0), "probe": (1, 1.0e-4), "probe_pos_shifts": (1, 1.0e-4),
    }
    for name, (start, lr) in expected.items():
        rule = getattr(mp.update_params, name)
        assert (rule.start_iter, rule.lr) == (start, lr), name


def test_resolved_yaml_round_trips(tmp_path):
    cfg = config_from_dict(MINIMAL)
    text = cfg.to_yaml()
    assert "update_params" in text and "recon_params" in text
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg and again.hash() == cfg.hash()


@pytest.mark.parametrize(
    "dotted, value, message",
    [
        ("model_params.update_params.probe.lr", -1, "model_params.update_params.probe.lr: must be >= 0"),
        ("model_params.update_params.probe.start_iter", 0, "model_params.update_params.probe.start_iter: must be >= 1"),
        ("model_params.update_params.objp.lrate", 1e-3, "model_params.update_params.objp.lrate: unknown key"),
        ("recon_params.batch_size", "many", "recon_params.batch_size"),
        ("model_params.optimizer_params.name", "Adamm", "model_params.optimizer_params.name: 'Adamm' is not a torch.optim optimizer"),
        ("experiment.dk_mrad", 1.0, "experiment: give either dx_ang or dk_mrad, not both"),
        ("experiment.aberrations", {"C99x": 1}, "experiment.aberrations: unknown aberration 'C99x'"),
        ("init.object.occupancies", [1.0], None),
        ("constraint_params.obj_blur.start_iter", 30,
         "constraint_params.obj_blur: stop_iter 20 comes before start_iter 30 (stop_iter: null keeps it on to the end)"),
    ],
)
def test_bad_values_name_the_dotted_path(dotted, value, message):
    raw = with_(dotted, value)
    if message is None:  # a valid value for contrast
        config_from_dict(raw)
        return
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)


def test_missing_group_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="experiment: required but missing"):
        config_from_dict({"data": {"path": "x"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: the configuration is empty; it needs at least the groups data"):
        load_config(empty)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.path == str(tmp_path / "data.h5")


def test_every_setting_is_described():
    """Every leaf of the configuration tree says what it is (units and a typical value where it has
    them): the resolved YAML and the errors name these fields, so a newcomer must find them."""
    from ptycho_core.config import setting_fields

    undescribed = [key for key, info in setting_fields() if not info.description]
    assert not undescribed, undescribed
    assert len(list(setting_fields())) > 60


def test_every_setting_added_or_removed_says_what_ptyflow_computed():
    """A run directory an older ptyflow left unfinished must resume after an update: each setting
    added since 2026-12-05 (tests/data/settings_2026-12-05.txt, the settings checkpoints began to
    keep) is declared in config.SETTINGS_ADDED with the value that computes what ptyflow computed
    without it, a value the setting accepts; each removed since, in config.SETTINGS_REMOVED."""
    from ptycho_core.config import SETTINGS_ADDED, SETTINGS_REMOVED, config_from_dict, set_dotted, setting_fields

    known = set((Path(__file__).parent / "data" / "settings_2026-12-05.txt").read_text().split())
    now = {key for key, _ in setting_fields()}
    added, removed = dict(SETTINGS_ADDED), dict(SETTINGS_REMOVED)
    assert not sorted(now - known - added.keys()), (
        f"settings added without the value that keeps an older run's results: {sorted(now - known - added.keys())}; "
        "add (key, value) to ptycho_core.config.SETTINGS_ADDED")
    assert not sorted(known - now - removed.keys()), (
        f"settings removed without the value this ptyflow computes as: {sorted(known - now - removed.keys())}; add "
        "(key, value) to ptycho_core.config.SETTINGS_REMOVED")
    assert added.keys() <= now - known and removed.keys() <= known - now
    for key, value in SETTINGS_ADDED:
        raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
        set_dotted(raw, key, value)
        config_from_dict(raw)


def test_files_a_config_names_are_checked_before_the_run_directory_is_compared(tmp_path, small_dataset):
    """A missing or wrong optimizer state for a run directory already in use used to be reported as
    'a different configuration'; every referenced file is named, with what is wrong with it."""
    from ptycho_core.stages.prepare import prepare

    from helpers import config_with

    run_dir = tmp_path / "run"
    prepare(config_with(small_dataset), run_dir)
    missing = tmp_path / "nowhere" / "model.hdf5"
    with pytest.raises(ConfigError, match=f"model_params.optimizer_params.load_state: {missing}: file not found"):
        prepare(config_with(small_dataset, **{"model_params.optimizer_params.load_state": str(missing)}), run_dir)
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ConfigError, match=f"init.model_path: {text} is not an HDF5 file"):
        prepare(config_with(small_dataset, **{"init.model_path": str(text)}), run_dir)
    with pytest.raises(ConfigError, match=f"init.object.path: {text} is not an HDF5 file; expected a model.hdf5 or a "
                                          "result.zarr"):
        prepare(config_with(small_dataset, **{"init.object.source": "previous", "init.object.path": str(text)}),
                run_dir)


def test_a_setting_added_or_removed_changes_no_hash_for_the_same_results(monkeypatch):
    """The hashes that tell runs apart (the configuration's, the resumable part's, the preprocessing
    settings') are those an older ptyflow computed, while an added setting holds its SETTINGS_ADDED
    value and a removed one held its SETTINGS_REMOVED value; set otherwise, it counts.
    (preprocess.bin and lr_schedule.patience stand in for added settings, preprocess.old_knob and
    model_params.old_knob for removed ones.)"""
    import hashlib
    import json

    from ptycho_core import config as config_module
    from ptycho_core.io import preprocess

    def sha(tree):
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()

    config = config_from_dict(MINIMAL)
    older_whole, older_resume = config.to_dict(), config.resume_dict()
    older_prep = json.loads(preprocess._settings(config))
    for tree in (older_whole, older_resume):
        del tree["preprocess"]["bin"], tree["model_params"]["lr_schedule"]["patience"]
        tree["preprocess"]["old_knob"], tree["model_params"]["old_knob"] = 0, "off"
    del older_prep["preprocess"]["bin"]
    older_prep["preprocess"]["old_knob"] = 0
    monkeypatch.setattr(config_module, "SETTINGS_ADDED",
                        (("preprocess.bin", 1), ("model_params.lr_schedule.patience", 5)))
    monkeypatch.setattr(config_module, "SETTINGS_REMOVED", (("preprocess.old_knob", 0), ("model_params.old_knob", "off")))
    assert config.hash() == sha(older_whole)
    assert config.resume_hash() == sha(older_resume)
    assert preprocess.settings_hash(config) == sha(older_prep)
    binned = config_from_dict({**MINIMAL, "preprocess": {"bin": 2}})
    assert preprocess.settings_hash(binned) != sha(older_prep) and binned.hash() != sha(older_whole)


def test_a_removed_setting_is_read_as_what_ptyflow_computes_now(monkeypatch):
    """A run directory's config.yaml that holds a setting an update removed is read without it when
    it held the value this ptyflow computes (or the setting never changed results: a free one such
    as recon_params.compile), and refused naming it otherwise. (Stand-ins: model_params.old_knob,
    and recon_params.compile for a removed free setting.)"""
    from ptycho_core import config as config_module
    from ptycho_core.config import as_this_ptyflow_reads

    monkeypatch.setattr(config_module, "SETTINGS_REMOVED",
                        (("model_params.old_knob", "off"), ("recon_params.compile", False)))
    written = config_from_dict(MINIMAL).to_dict()
    written["model_params"]["old_knob"], written["recon_params"]["compile"] = "off", True
    read = as_this_ptyflow_reads(written, source="run/config.yaml")
    assert "old_knob" not in read["model_params"] and "compile" not in read["recon_params"]
    assert written["model_params"]["old_knob"] == "off"  # the written tree is left as it was
    config_from_dict(read)
    written["model_params"]["old_knob"] = "on"
    with pytest.raises(ConfigError, match=r"run/config.yaml: model_params.old_knob: 'on', a setting this ptyflow no "
                                          r"longer has \(it computes as model_params.old_knob: 'off'\)"):
        as_this_ptyflow_reads(written, source="run/config.yaml")
