"""The command line as a whole: fast help without torch, --quiet, one-line warnings and errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_moe_routing.cli.main import COMMANDS, build_parser, main
from hf_moe_routing.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]  # this checkout, also from another working directory


def _run(*argv, **kwargs):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "hf_moe_routing.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        **kwargs,
    )


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from hf_moe_routing.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
    for name in COMMANDS:
        assert name in done.stdout


def test_every_command_parses_its_help_and_shows_defaults(capsys):
    parser = build_parser(full=True)
    for name in COMMANDS:
        if name == "lm-eval":  # lm-eval's own parser answers its --help
            continue
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "usage:" in out
        if "--overwrite" in out:
            assert "--output-dir" in out or "--json" in out  # one meaning of --overwrite everywhere
        assert "--quiet" in out, name


def test_quiet_silences_loading_bars_and_log_lines(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", "mixtral")
    loud = _run("inspect", str(model))
    quiet = _run("inspect", str(model), "--quiet")
    assert loud.returncode == quiet.returncode == 0
    assert "Loading weights" in loud.stderr and quiet.stderr == ""
    assert quiet.stdout == loud.stdout


def test_warnings_are_one_line(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", "mixtral")
    done = _run(
        "evaluate",
        str(model),
        "--routing",
        "adak",
        "--dataset",
        str(model / "text.txt"),
        "--seq-len",
        "16",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: The adak routing") and "fatal" not in done.stderr


def test_no_git_noise_outside_a_repository(tmp_path):
    model = tiny_checkpoint(tmp_path / "model", "mixtral")
    out = tmp_path / "r.json"
    done = _run(
        "evaluate",
        str(model),
        "--dataset",
        str(model / "text.txt"),
        "--seq-len",
        "16",
        "--quiet",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert json.loads(out.read_text())["num_tokens"] > 0


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
