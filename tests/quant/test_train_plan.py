"""The training memory plan (`clinicloop quant plan --train`): its counts against real
transformers / peft objects on a tiny Qwen2, the 32B-on-a-4090 answer, the fit search and the
command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clinicloop.backends.plan import GPUS, PRESETS, GiB, ModelShape
from clinicloop.cli import app
from clinicloop.quant.train_plan import (
    ROLLOUT,
    STATIC,
    TRAINING,
    fit_table,
    lora_params,
    nf4_bytes,
    plan_training,
    render_training,
    training_misfit,
)

RTX4090 = GPUS["rtx4090"]
QWEN32 = PRESETS["qwen2.5-32b"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_qwen2():
    """A random Qwen2 small enough for the CPU, in bf16, and its shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    return model, ModelShape.from_config(config.to_dict(), "tiny-qwen2")


def test_a_16bit_base_counts_every_parameter_of_the_real_model(tiny_qwen2):
    model, shape = tiny_qwen2
    plan = plan_training(shape, 8 * GiB, quantized=False, search=False)
    assert plan.parts["base_4bit"] == 0
    assert plan.parts["base_16bit_parts"] == sum(p.numel() * p.element_size()
                                                 for p in model.parameters())


def test_lora_params_are_what_peft_trains(tiny_qwen2):
    from peft import LoraConfig, get_peft_model

    model, shape = tiny_qwen2
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=PROJECTIONS))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.unload()  # the fixture's model again, without adapters
    assert trainable == lora_params(shape, 8)
    assert plan_training(shape, 8 * GiB, lora_rank=8, search=False).lora_params == trainable


def test_rollout_kv_is_the_cache_generate_keeps(tiny_qwen2):
    import torch

    model, shape = tiny_qwen2
    group, prompt, new = 4, 12, 20
    out = model.generate(torch.randint(0, 320, (group, prompt)), max_new_tokens=new,
                         min_new_tokens=new, do_sample=True, return_dict_in_generate=True,
                         pad_token_id=0)
    cache = out.past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    # The last sampled token is never fed back, so the cache holds prompt + new - 1 positions.
    seq_len = prompt + new - 1
    plan = plan_training(shape, 8 * GiB, seq_len=seq_len, num_generations=group, search=False)
    assert plan.parts["rollout_kv"] == held


def test_nf4_constants_cost_what_the_qlora_paper_says():
    n = 5120 * 27648  # Qwen2.5-32B's gate_proj
    extra_bits = {dq: (nf4_bytes(n, dq) * 8 - 4 * n) / n for dq in (True, False)}
    assert extra_bits[False] == 0.5  # an fp32 absmax per 64 weights
    assert abs(extra_bits[True] - (8 / 64 + 32 / (64 * 256))) < 1e-6  # 0.127 bit


def test_32b_does_not_fit_a_4090_with_peft_kbit_preparation():
    plan = plan_training(QWEN32, RTX4090)
    assert set(plan.parts) == {*STATIC, *ROLLOUT, *TRAINING}
    assert plan.peak_bytes == plan.static_bytes + max(plan.rollout_bytes, plan.training_bytes)
    # 31.2B decoder linear weights at 4.127 bits; embeddings + lm_head in fp32.
    assert 14.9 * GiB < plan.parts["base_4bit"] < 15.1 * GiB
    assert abs(plan.parts["base_16bit_parts"] / GiB - 5.80) < 0.01
    assert plan.lora_dtype == "bf16" and plan.hidden_dtype == "fp32"
    assert not plan.fits and plan.best_fit is None
    assert plan.static_bytes > plan.usable_bytes - 0.8 * GiB  # nothing is left to train with
    assert plan.best_fit_without_upcast is not None
    line = training_misfit(plan)
    assert line is not None and "nor at any searched setting" in line
    assert "4-bit base alone is 20.80 GiB" in line and "--no-kbit-upcast" in line


def test_32b_fits_a_4090_only_with_bf16_embeddings_and_short_rollouts():
    plan = plan_training(QWEN32, RTX4090, kbit_upcast=False)
    assert plan.fits and plan.hidden_dtype == "bf16" and plan.headroom_bytes < 2 * GiB
    assert fit_table(QWEN32, RTX4090, kbit_upcast=False) == {512: 8, 1024: 4, 2048: 2, 4096: 0,
                                                              8192: 0}
    assert fit_table(QWEN32, RTX4090) == dict.fromkeys((512, 1024, 2048, 4096, 8192), 0)


def test_which_sizes_fit_the_4090():
    best = {name: plan_training(PRESETS[name], RTX4090).best_fit
            for name in ("qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b")}
    assert best["qwen2.5-32b"] is None
    assert best["qwen2.5-14b"] is not None and best["qwen2.5-14b"].seq_len == 4096
    assert best["qwen2.5-7b"] is not None and best["qwen2.5-7b"].seq_len == 8192
    assert fit_table(PRESETS["qwen2.5-14b"], RTX4090)[2048] == 8


def test_the_peak_grows_with_every_setting_and_the_engine_left_on_the_card():
    shape = PRESETS["qwen2.5-7b"]

    def peak(**kw: object) -> int:
        return plan_training(shape, RTX4090, search=False, **kw).peak_bytes  # type: ignore[arg-type]

    base = peak()
    for kw in ({"seq_len": 2048}, {"num_generations": 8}, {"lora_rank": 64},
               {"micro_batch": 2}, {"double_quant": False}, {"quantized": False},
               {"engine_resident": "asleep"}):
        assert peak(**kw) > base, kw
    serving = plan_training(shape, RTX4090, engine_resident="serving")
    assert not serving.fits and serving.best_fit is None
    assert "--engine-resident none|asleep" in (training_misfit(serving) or "")
    with pytest.raises(ValueError, match="unknown engine_resident"):
        plan_training(shape, RTX4090, engine_resident="paused")


def test_render_shows_each_part_and_the_verdict():
    text = render_training(plan_training(PRESETS["qwen2.5-14b"], RTX4090))
    for part in (*STATIC, *ROLLOUT, *TRAINING, "peak", "usable"):
        assert f"  {part} " in text, part
    assert "fits                yes" in text and "best fit            --seq-len 4096" in text


def invoke(*args: str):
    return CliRunner().invoke(app, ["quant", "plan", "--train", *args])


def test_cli_answers_the_32b_question_in_one_line_and_exit_1():
    result = invoke("--preset", "qwen2.5-32b", "--gpu", "rtx4090")
    assert result.exit_code == 1
    assert "base_4bit" in result.stdout and "fits                no" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: qwen2.5-32b does not fit 23.99 GiB for training")


def test_cli_json_and_options():
    result = invoke("--preset", "qwen2.5-32b", "--no-kbit-upcast", "--seq-len", "512",
                    "--num-generations", "8", "--lora-rank", "8", "--engine-resident", "asleep",
                    "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["fits"] and out["seq_len"] == 512 and out["num_generations"] == 8
    assert out["parts"]["engine"] == out["parts"]["cuda_context"] > 0
    assert out["allocated_peak_bytes"] == out["peak_bytes"] - 2 * out["parts"]["engine"]
    bf16 = json.loads(invoke("--preset", "qwen2.5-3b", "--base-16bit", "--json").stdout)
    assert bf16["parts"]["base_4bit"] == 0 and bf16["lora_dtype"] == "fp32"


@pytest.mark.parametrize(("args", "says"), [
    (["--train", "--weights", "w4a16"], "--weights plan serving, not --train"),
    (["--num-generations", "4"], "--num-generations need --train"),
    (["--train", "--engine-resident", "paused"], "unknown engine_resident 'paused'"),
])
def test_cli_refuses_options_of_the_other_plan(args, says):
    result = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-7b", *args])
    assert result.exit_code == 2 and says in result.stderr
