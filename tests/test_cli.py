"""`--config file.yaml` gives defaults; the command line overrides them; unknown keys are refused."""

from dataclasses import dataclass, field

import pytest

from medic_hf import MedicConfig
from medic_hf.cli import parse_args


@dataclass
class Script:
    model_name_or_path: str = field(default=None, metadata={"help": "model"})
    clean_fraction: float = field(default=0.05, metadata={"help": "fraction"})


def test_yaml_defaults_and_command_line_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\nclean_fraction: 0.1\ntemperature: 7\nhook_layers: [conv, norm]\n")
    script, medic = parse_args(
        (Script, MedicConfig), ["--config", str(config), "--temperature", "3", "--output_dir", str(tmp_path)]
    )
    assert script.model_name_or_path == "m" and script.clean_fraction == 0.1
    assert medic.temperature == 3  # the command line wins
    assert medic.hook_layers == ["conv", "norm"]
    assert medic.num_train_epochs == 30  # untouched defaults stay the library's


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("temprature: 7\n")
    with pytest.raises(SystemExit, match="temprature"):
        parse_args((Script, MedicConfig), ["--config", str(config)])


def test_the_console_command_dispatches_and_lists_its_commands(capsys):
    from medic_hf import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "clone" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["sanitize"])
    assert done.value.code == 2 and "usage: medic-hf" in capsys.readouterr().err


def test_help_opens_with_the_description_and_medics_own_options(capsys):
    from medic_hf import cli

    with pytest.raises(SystemExit):
        cli.main(["clone", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: medic-hf clone [--config FILE.yaml]")
    assert text.index("Remove a backdoor") < text.index("CloneArguments options:") < text.index("MedicConfig options:")
    medic = text.index("MedicConfig options:")
    assert medic < text.index("--clone_loss_weight") < text.index("TrainingArguments options (inherited):")
    assert len(text[:medic].splitlines()) < 80  # no wall of usage before the options
