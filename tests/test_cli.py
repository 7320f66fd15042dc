"""The command line, run as a real subprocess on the real default model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from leapdecode.cli import app

CLI = [sys.executable, "-m", "leapdecode.cli"]


def leapdecode(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.real
def test_generate_compare_on_the_default_model(smollm2):  # the fixture makes sure the model cache exists
    result = leapdecode("generate", "Repeat this sentence twice: the quick brown fox jumps over the lazy dog.",
                        "--drafter", "pld", "-n", "24", "--compare")
    assert result.returncode == 0, result.stderr
    assert "fox" in result.stdout.lower()  # the model repeats the sentence it was given
    # --compare prints the speed-up and whether both runs agree; greedy speculation must be identical
    assert "outputs identical: yes" in result.stderr
    assert "speed-up" in result.stderr


@pytest.mark.real
def test_generate_streams_and_reads_stdin(smollm2):
    result = leapdecode("generate", "--drafter", "copy", "-n", "8", "--stream", "--no-stats",
                        stdin="Say hello.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr.strip() == ""  # --no-stats: nothing but the text


def test_drafters_lists_every_drafter_with_options():
    result = leapdecode("drafters")
    assert result.returncode == 0, result.stderr
    for name in ("none", "pld", "copy", "draft-model"):
        assert name in result.stdout
    assert "max_ngram=3" in result.stdout  # pld's option with its default


@pytest.mark.parametrize("args, message", [
    (["--drafter", "nope"], "unknown drafter 'nope'"),
    (["--drafter", "pld", "-O", "max_ngram=big"], "option 'max_ngram' must be a int"),
    (["--drafter", "pld", "-O", "colour=red"], "has no option 'colour'"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--model", "no-such-model"], "no-such-model"),
    (["--runner", "bogus"], "unknown runner 'bogus'"),
])
def test_bad_options_get_a_clear_error_not_a_traceback(args, message):
    # in-process (typer's runner) to keep CI fast; the subprocess tests above cover the real entry point
    result = CliRunner().invoke(app, ["generate", "hi", "-n", "4", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())  # rich may wrap long lines
    assert result.exception is None or isinstance(result.exception, SystemExit)
