"""Every command and sub-command says what it does."""

import pytest
from typer.testing import CliRunner

from clinicloop.cli import app

COMMANDS = [[], ["serve"], ["model"], ["model", "build-tiny"], ["keys"], ["keys", "new"],
            ["store"], ["store", "migrate"], ["store", "redaction-recall"],
            ["verify"], ["verify", "score"], ["verify", "simulate"], ["rl"],
            ["rl", "stage-rule"], ["rl", "stage-rubric"], ["rl", "stage-multiturn"],
            ["rl", "refresh"], ["quant"], ["quant", "plan"], ["quant", "gguf"], ["quant", "awq"],
            ["quant", "gptq"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.split()) > 20


def test_keys_new_prints_a_key_and_its_hash():
    import json

    from clinicloop.serving.auth import hash_key

    out = json.loads(CliRunner().invoke(app, ["keys", "new"]).output)
    assert out["hash"] == hash_key(out["key"])
