"""Config loading: unknown keys, values of the wrong type or outside a key's choices and TOML
syntax errors are refused with a ConfigError that names the config file and the key, and the CLI
prints it as one `error:` line (exit status 2), never a traceback. All fast: no stage runs."""

from pathlib import Path

import pytest

from train import config
from train.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = '[data]\nsource = "sklearn:make_moons"\n'


def load(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return config.load(p)


def named(cases):
    """pytest.param per (config text, message) case, named by the message's start."""
    return [pytest.param(text, message, id=message.split(" (")[0]) for text, message in cases]


def refused(tmp_path, text, message):
    """The ConfigError for the config `text`: the file's path, then exactly `message`."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert str(e.value) == f"{tmp_path / 'c.toml'}: {message}"


@pytest.mark.parametrize("text, message", named([
    (BASE + "[flow]\nstepz = 10\n", "unknown key flow.stepz (did you mean flow.steps?)"),
    ("seeed = 1\n" + BASE, "unknown key seeed (did you mean seed?)"),
    (BASE + "[evalute]\nsteps = 4\n", "unknown key evalute (did you mean evaluate?)"),
    (BASE + "[flow]\nchains = 3\n", "unknown key flow.chains (did you mean posterior.chains?)"),
    (BASE + "[posterior]\nflow = 3\n", "unknown key posterior.flow (flow is a table of its own: [flow])"),
    (BASE + "flow = 3\n", "unknown key data.flow (flow is a table of its own: [flow])"),  # under [data]
    (BASE + "[flow]\nzzz = 1\n", "unknown key flow.zzz"),
]))
def test_an_unknown_key_is_refused_with_the_closest_key(tmp_path, text, message):
    refused(tmp_path, text, message)


@pytest.mark.parametrize("text, message", named([
    (BASE + "[posterior]\nchains = \"3\"\n", 'posterior.chains = "3": expected an integer, not a string'),
    (BASE.replace("\n", "\neval_fraction = \"0.25\"\n", 1),
     'data.eval_fraction = "0.25": expected a number, not a string'),
    (BASE + "[network]\nhidden = 16\n", "network.hidden = 16: expected a list of integers, not an integer"),
    (BASE + "[network]\nhidden = [\"16\"]\n", 'network.hidden = ["16"]: expected a list of integers, not a list'),
    (BASE.replace("\n", "\nfeatures = \"a,b\"\n", 1),
     'data.features = "a,b": expected a list of strings, not a string'),
    (BASE.replace("\n", "\ntarget = 3\n", 1), "data.target = 3: expected a string or a list of strings, not an integer"),
    (BASE.replace("\n", "\nargs = 3\n", 1), "data.args = 3: expected a table, not an integer"),
    ("name = 3\n" + BASE, "name = 3: expected a string, not an integer"),
    (BASE + "[flow]\nsteps = true\n", "flow.steps = true: expected an integer, not a boolean"),  # true is no 1
    (BASE + "[flow]\nsteps = 10.5\n", "flow.steps = 10.5: expected an integer, not a number"),
    (BASE + "[flow]\nema_warmup = 1\n", "flow.ema_warmup = 1: expected a boolean, not an integer"),
    (BASE + "[likelihood]\nnoise_sigma = \"mapp\"\n",
     'likelihood.noise_sigma = "mapp": expected a number or "map", not a string'),
]))
def test_a_value_of_the_wrong_type_is_refused(tmp_path, text, message):
    refused(tmp_path, text, message)


def test_a_section_that_is_not_a_table_is_refused(tmp_path):
    refused(tmp_path, "flow = 3\n" + BASE, "flow = 3: flow is a table ([flow]), not an integer")
    refused(tmp_path, "data = \"csv:x.csv\"\n", 'data = "csv:x.csv": data is a table ([data]), not a string')


def test_values_of_the_right_type_load(tmp_path):
    """An integer passes for a float, a list of integers for a list of floats; keys whose default
    is None (or a number) take what the stages accept."""
    cfg = load(tmp_path, 'name = "n"\n' + BASE.replace("\n", '\ntarget = ["a", "b"]\nfeatures = ["c"]\n', 1)
               + "[map]\nlr = 1\n[likelihood]\nnoise_sigma = \"map\"\n[bundle]\nstart_times = [0, 0.5, 1]\n")
    assert cfg["map"]["lr"] == 1 and cfg["likelihood"]["noise_sigma"] == "map"
    assert cfg["data"]["target"] == ["a", "b"] and cfg["bundle"]["start_times"] == [0, 0.5, 1]
    assert load(tmp_path, BASE.replace("\n", '\ntarget = "a"\n', 1) + "[likelihood]\nnoise_sigma = 1\n")


@pytest.mark.parametrize("text, message", named([
    (BASE + "[posterior]\nexecutor = \"thread\"\n",
     'posterior.executor = "thread": expected one of "local", "processes", "ray"'),
    (BASE.replace("\n", "\ntask = \"classify\"\n", 1),
     'data.task = "classify": expected one of "classification", "regression" (did you mean "classification"?)'),
    (BASE + "[evaluate]\nsolver = \"rk5\"\n",
     'evaluate.solver = "rk5": expected one of "euler", "heun", "rk4" (did you mean "rk4"?)'),
    (BASE + "[flow]\nweight_dtype = \"bf16\"\n",
     'flow.weight_dtype = "bf16": expected one of "f16", "f32" (did you mean "f16"?)'),
    (BASE + "[posterior]\nchains = 1\n", "posterior.chains = 1: must be at least 2 (the last chain is held out)"),
    (BASE + "[flow]\ntime_freqs = 7\n", "flow.time_freqs = 7: must be an even number >= 2 (a sine and a cosine per frequency)"),
    (BASE.replace("\n", "\neval_fraction = 1.5\n", 1), "data.eval_fraction = 1.5: must be between 0 and 1"),
    ("seed = 0\n", 'data.source is required ([data] source = "csv:PATH", "npz:PATH", "sklearn:NAME" '
                   'or "builtin:gap1d")'),
]))
def test_a_value_outside_its_choices_or_range_is_refused(tmp_path, text, message):
    refused(tmp_path, text, message)


def test_a_toml_syntax_error_names_the_file(tmp_path):
    refused(tmp_path, BASE + "[network]\nhidden = 16 16\n",
            "not valid TOML: Expected newline or end of document after a statement (at line 4, column 13)")


def test_config_choices_match_the_stages():
    """config.CHOICES is checked at load; the stages check the same sets."""
    from train import bundle, flow, np_field, posterior, sampler, sphere
    c = config.CHOICES
    assert c["flow.field"] == flow.FIELDS and c["flow.pred"] == np_field.PREDS
    assert c["flow.weight_dtype"] == flow.WEIGHT_DTYPES and c["posterior.executor"] == posterior.EXECUTORS
    assert c["evaluate.solver"] == sampler.METHODS and c["flow.geometry"] == sphere.GEOMETRIES
    assert c["bundle.anchor_dtype"] == tuple(bundle.ANCHOR_DTYPES)
    for key, words in c.items():  # the defaults are among the choices
        table, _, name = key.partition(".")
        assert config.DEFAULTS[table][name] in words, key


@pytest.mark.parametrize("path", sorted((ROOT / "train/configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert config.load(path)["data"]["source"]


def test_the_cli_prints_one_error_line_naming_the_config(tmp_path, capsys):
    from train.__main__ import main
    p = tmp_path / "c.toml"
    for text, message in [(BASE + "[flow]\nstepz = 10\n", "unknown key flow.stepz (did you mean flow.steps?)"),
                          (BASE + "[posterior]\nchains = \"3\"\n",
                           'posterior.chains = "3": expected an integer, not a string'),
                          (BASE + "[network\n", "not valid TOML: Expected ']' at the end of a table declaration "
                                                "(at line 3, column 9)")]:
        p.write_text(text)
        assert main(["build", str(p), "--out", str(tmp_path / "b"), "--work", str(tmp_path / "w")]) == 2
        assert capsys.readouterr().err == f"error: {p}: {message}\n"
    assert main(["build", str(tmp_path / "none.toml"), "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.toml'}: cannot read the config (No such file or directory)\n"
    assert not (tmp_path / "b").exists() and not (tmp_path / "w").exists()
