"""`fvlm <subcommand>`: every subcommand's --help, --print_config and --config FILE, in-process."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from eval_fixtures import tiny_checkpoint

from fvlm import cli
from fvlm.config_files import packaged_configs, resolve_config
from fvlm.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[1]
TINY = {"shape": [24, 32, 32], "spacing": [12.0, 9.0, 9.0], "progress": False}


def run_help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--help"])
    assert exited.value.code in (0, None)
    return capsys.readouterr().out


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_overview_lists_every_subcommand_and_rejects_unknown_ones(capsys):
    text = run_help(capsys)
    for command in cli.COMMANDS:
        assert command.name in text and command.help.split()[0] in text
    names = {c.name for c in cli.COMMANDS}
    assert {"phantom", "preprocess", "fit", "validate", "test", "predict", "export", "evaluate",
            "eval-ctrate", "eval-radchestct", "ablation", "generate"} <= names  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        cli.main(["no-such-command"])
    assert exited.value.code == 2
    assert "no-such-command" in capsys.readouterr().err


def test_phantom_options_come_from_generate_phantom(capsys, tmp_path):
    text = run_help(capsys, "phantom")
    for parameter in inspect.signature(generate_phantom).parameters:
        assert f"--{parameter}" in text, parameter  # a new parameter is a new option
    config = write_yaml(tmp_path / "phantom.yaml", {"out_dir": str(tmp_path / "p"), "n_studies": 2,
                                                    **TINY})  # fmt: skip
    printed = print_config(capsys, "phantom", "--config", str(config), "--seed", "5")
    assert printed["n_studies"] == 2 and printed["seed"] == 5 and printed["shape"] == [24, 32, 32]
    # --config FILE runs, and the command line overrides the file.
    assert cli.main(["phantom", "--config", str(config), "--n_studies", "3"]) == 0
    assert "phantom manifest:" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "p" / "manifest.csv")) == 3


def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path):
    code = cli.main(["phantom", "--out_dir", str(tmp_path / "p"), "--n_studies", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "fvlm phantom: error: n_studies must be >= 1, got 0"


def test_preprocess_config_file_packaged_name_and_exit_codes(capsys, tmp_path, monkeypatch):
    text = run_help(capsys, "preprocess")
    for option in ("--manifest", "--cache", "--spacing", "--segmenter", "--llm.base_url"):
        assert option in text
    assert "Exit codes: 0 all studies ok" in " ".join(
        text.split()
    )  # the command's docstring is the help's epilog
    monkeypatch.chdir(tmp_path)  # packaged names and repository paths work from any folder
    chest = yaml.safe_load((REPO / "configs" / "preprocess" / "chest.yaml").read_text())
    for name in ("chest", "configs/preprocess/chest.yaml"):
        printed = print_config(capsys, "preprocess", "--config", name, "--manifest", "m.csv",
                               "--cache", "c")  # fmt: skip
        assert printed["spacing"] == chest["spacing"] and printed["cache"] == "c", name
    manifest = generate_phantom(tmp_path / "p", n_studies=2, **TINY)
    config = write_yaml(tmp_path / "pre.yaml", yaml.safe_load(
        (REPO / "configs" / "preprocess" / "phantom.yaml").read_text()
    ) | {"manifest": str(manifest), "cache": str(tmp_path / "cache"), "progress": False,
         "spacing": [12.0, 9.0, 9.0]})  # fmt: skip
    assert cli.main(["preprocess", "--config", str(config)]) == 0
    assert "2 processed ok" in capsys.readouterr().out
    assert (pd.read_csv(tmp_path / "cache" / "manifest.csv")["status"] == "ok").all()
    missing = ["preprocess", "--config", str(config), "--manifest", str(tmp_path / "none.csv")]
    assert cli.main(missing) == 2
    assert "none.csv" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fit", "test"])
def test_lightning_subcommands_take_a_packaged_config(capsys, command):
    printed = print_config(capsys, command, "--config", "demo", "--trainer.max_epochs", "3")
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["class_path"].startswith("fvlm.lit_modules.")


def test_lightning_subcommands_help(capsys):
    text = run_help(capsys, "validate")
    assert "--data.cache_dir" in text and "--model" in text and "--config" in text


def test_predict_is_the_scan_command_and_lightning_predict_stays_lightningcli(capsys):
    text = run_help(capsys, "predict")
    for option in ("--model", "--scans", "--mask", "--segmenter", "--query", "--out"):
        assert option in text
    assert "--data.cache_dir" not in text
    with pytest.raises(SystemExit) as exited:
        cli.lightning_main(["predict", "--help"])
    assert exited.value.code in (0, None)
    assert "--data.cache_dir" in capsys.readouterr().out


def test_repeatable_options_append():
    args = ["--query", "liver: a", "--out", "x", "--query=spleen: b"]
    assert cli._appending(args, ("query",)) == [
        "--query+", "liver: a", "--out", "x", "--query+=spleen: b"
    ]  # fmt: skip


def test_evaluate_from_a_config_file(capsys, tmp_path, paper_table, tiny_bert):
    text = run_help(capsys, "evaluate")
    for option in ("--ckpt", "--name", "--cache", "--labels", "--threshold", "--bootstrap"):
        assert option in text
    data = tmp_path / "phantom"
    manifest = generate_phantom(data, n_studies=4, splits=(0.0, 0.0, 1.0), **TINY)
    pre = yaml.safe_load(resolve_config("phantom", "preprocess").read_text())
    assert cli.main(["preprocess", "--config", "phantom", "--manifest", str(manifest), "--cache",
                     str(tmp_path / "cache"), "--spacing", "[12, 9, 9]", "--progress", "false",
                     "--workers", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert pre["anatomy_table"] == "paper"
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", len(paper_table), tiny_bert())
    config = write_yaml(tmp_path / "eval.yaml", {
        "ckpt": [str(ckpt), str(ckpt)], "name": ["A", "B"], "cache": str(tmp_path / "cache"),
        "labels": str(data / "labels.csv"), "benchmark": "phantom", "out": str(tmp_path / "out"),
    })  # fmt: skip
    printed = print_config(capsys, "evaluate", "--config", str(config), "--threshold", "youden")
    assert printed["name"] == ["A", "B"] and printed["threshold"] == "youden"
    assert cli.main(["evaluate", "--config", str(config)]) == 0
    a = pd.read_csv(tmp_path / "out" / "A" / "A_per_disease.csv", index_col=0)
    b = pd.read_csv(tmp_path / "out" / "B" / "B_per_disease.csv", index_col=0)
    phantom_keys = {d.key for d in paper_table.diseases("phantom")}
    assert set(a.index) == phantom_keys | {"macro"}
    pd.testing.assert_frame_equal(a, b)  # same checkpoint, same numbers
    counted = a.loc[sorted(phantom_keys)]
    assert (counted["n_pos"] + counted["n_neg"] + counted["not_evaluable"] == 4).all()
    assert "macro" in (tmp_path / "out" / "comparison.txt").read_text()
    bad = write_yaml(tmp_path / "bad.yaml", {**yaml.safe_load(config.read_text()), "name": ["A"]})
    assert cli.main(["evaluate", "--config", str(bad)]) == 2
    assert "one name per checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval-ctrate", "eval-radchestct"])
def test_dataset_evaluations_help_and_config(capsys, tmp_path, command):
    text = run_help(capsys, command)
    for option in ("--root", "--ckpt", "--masks", "--preprocess_config", "--workers", "--split"):
        assert option in text
    config = write_yaml(tmp_path / "c.yaml", {"root": "/data/x", "ckpt": "a.ckpt",
                                              "masks": "/data/masks", "workers": 4})  # fmt: skip
    printed = print_config(capsys, command, "--config", str(config))
    assert printed["masks"] == "/data/masks" and printed["workers"] == 4
    assert printed["preprocess_config"] == "chest"  # packaged, resolves from any folder
    assert resolve_config(printed["preprocess_config"], "preprocess").is_file()


def test_packaged_configs_resolve_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"abdomen", "chest", "phantom"} <= set(packaged_configs("preprocess"))
    assert "fvlm" in packaged_configs()
    path = resolve_config("chest", "preprocess")
    assert path.read_text() == (REPO / "configs" / "preprocess" / "chest.yaml").read_text()
    assert resolve_config("fvlm.yaml").read_text() == (REPO / "configs" / "fvlm.yaml").read_text()
    own = write_yaml(tmp_path / "chest", {"spacing": [1, 1, 1]})  # a file wins over a name
    assert resolve_config("chest", "preprocess").resolve() == own
    with pytest.raises(FileNotFoundError, match="abdomen, chest"):
        resolve_config("lungs", "preprocess")


@dataclass(frozen=True)
class _Settings:
    """Settings.

    Args:
        size: A size.
        label: A label.
    """

    size: int
    label: str = "x"


def _flat(settings: _Settings) -> int:
    """Print the settings; a dataclass parameter's fields are top-level options."""
    print(f"{settings.label}:{settings.size}")
    return settings.size % 7


def _typed(count: int, names: list[str] | None = None) -> None:
    """Print the arguments.

    Args:
        count: How many.
        names: Which.
    """
    print(count, names)


def test_registering_a_command_is_one_line(capsys, monkeypatch):
    for command in (cli.Command("flat", f"{__name__}:_flat", "Flat settings."),
                    cli.Command("typed", f"{__name__}:_typed", "Typed function.")):  # fmt: skip
        monkeypatch.setitem(cli._BY_NAME, command.name, command)
    assert "--size" in run_help(capsys, "flat") and "--names" in run_help(capsys, "typed")
    assert cli.main(["flat", "--size", "9", "--label", "y"]) == 2  # the return value: exit status
    assert cli.main(["typed", "--count", "2", "--names", "[a, b]"]) == 0
    assert capsys.readouterr().out.splitlines() == ["y:9", "2 ['a', 'b']"]


def test_the_library_side_never_imports_lightning():
    """Evaluation, checkpoints and preprocessing are plain PyTorch (a user scoring a model needs
    no Lightning); only lit_modules and the LightningDataModule load it."""
    code = (
        "import sys, fvlm.evaluation.commands, fvlm.checkpoint, fvlm.preprocess.runner, "
        "fvlm.data_modules; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
