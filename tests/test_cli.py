"""Every command and sub-command says what it does; an error the user can fix is one line and a
non-zero exit, a bug keeps its traceback."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clinicloop.cli import app

COMMANDS = [[], ["serve"], ["model"], ["model", "build-tiny"], ["keys"], ["keys", "new"],
            ["store"], ["store", "migrate"], ["store", "redaction-recall"],
            ["verify"], ["verify", "score"], ["verify", "calibrate"], ["verify", "simulate"],
            ["rl"],
            ["rl", "stage-rule"], ["rl", "stage-rubric"], ["rl", "stage-multiturn"],
            ["rl", "refresh"], ["quant"], ["quant", "plan"], ["quant", "gguf"], ["quant", "awq"],
            ["quant", "gptq"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.split()) > 20


def test_keys_new_prints_a_key_and_its_hash():
    from clinicloop.serving.auth import hash_key

    out = json.loads(CliRunner().invoke(app, ["keys", "new"]).output)
    assert out["hash"] == hash_key(out["key"])


def one_line_error(args: list[str], code: int = 1) -> str:
    """Run `clinicloop <args>`: it must fail with `code` and end in one `error:` line that says
    what is wrong and what to do; nothing else goes to stderr."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


def test_a_placeholder_hf_dir_is_one_line(tmp_path):
    for command in (["quant", "awq"], ["quant", "gptq"], ["quant", "gguf"]):
        line = one_line_error([*command, "--hf-dir", "/models/Qwen2.5-32B-Instruct"])
        assert "/models/Qwen2.5-32B-Instruct is not a Hugging Face model directory" in line
    line = one_line_error(["quant", "gguf", "--hf-dir", str(tmp_path)])  # exists, no config.json
    assert "no config.json" in line


def test_bad_paths_and_values_are_one_line(tmp_path):
    line = one_line_error(["quant", "plan", "--config", "/path/to/config.json"])
    assert "no model config at /path/to/config.json" in line
    (tmp_path / "config.json").write_text("{not json")
    assert "is not JSON" in one_line_error(["quant", "plan", "--config", str(tmp_path)])
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    assert "has no num_hidden_layers" in one_line_error(["quant", "plan", "--config",
                                                         str(tmp_path)])
    usage = one_line_error(["quant", "plan", "--preset", "llama-900b"], code=2)
    assert "unknown preset 'llama-900b'" in usage and "quant plan --help'" in usage
    store = f"sqlite:///{tmp_path / 'store.db'}"
    assert "--template must be one of" in one_line_error(
        ["verify", "score", "--store-url", store, "--template", "lenient"])
    assert "is not an ISO 8601 time" in one_line_error(
        ["verify", "score", "--store-url", store, "--since", "yesterday"])
    assert "store URL must be sqlite or postgresql, not 'mysql'" in one_line_error(
        ["verify", "score", "--store-url", "mysql://db/turns"])
    assert "is not a URL" in one_line_error(["verify", "score", "--store-url", "no url"])


def test_a_plan_that_cannot_fit_says_so_and_exits_non_zero():
    args = ["quant", "plan", "--preset", "qwen2.5-32b", "--gpu", "rtx4090", "--weights", "bf16"]
    line = one_line_error(args)
    assert "does not fit" in line and "--weights w4a16" in line
    result = CliRunner().invoke(app, args)
    assert "KV pool            none" in result.stdout and "-40.58" not in result.stdout
    too_long = one_line_error(["quant", "plan", "--preset", "qwen2.5-32b", "--weights", "w4a16",
                               "--seq-len", "20000"])
    assert "does not fit" in too_long and "lower --seq-len to at most 10,004" in too_long
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["fits"] is False
    fits = CliRunner().invoke(app, [*args[:-1], "w4a16", "--kv", "fp8"])
    assert fits.exit_code == 0 and not fits.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    from clinicloop.backends import plan

    def broken(_: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(plan, "render", broken)
    result = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-32b", "--weights",
                                      "w4a16"])
    assert isinstance(result.exception, RuntimeError)


def test_the_installed_command_answers_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "clinicloop.cli", "quant", "gguf", "--hf-dir",
                           "/models/missing"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: --hf-dir /models/missing is not a Hugging Face model directory (no config.json "
        "there): give the directory of a downloaded checkpoint, or leave --hf-dir out to use "
        "the tiny model"]
