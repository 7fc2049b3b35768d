"""One QLoRA GRPO step of a Qwen2-shaped model of realistic width: step time and peak GPU memory,
against the training plan (`clinicloop.quant.train_plan.plan_training`) for the same shape.

The model is Qwen2.5-32B's width (hidden 5120, MLP 27648, 40 heads, 8 KV heads, head dim 128,
vocabulary 152064, untied embeddings) with `--layers` layers (2 by default), randomly initialised
and saved as a bf16 Hugging Face checkpoint with the tiny model's tokenizer (trained offline from
the shipped corpus; the embedding is wider than it, as Qwen's is). The step is a real one through
`clinicloop.rl.grpo.train_grpo` with `qlora=True`: the base loaded in NF4 with double
quantisation, peft's k-bit preparation, gradient checkpointing, rollouts from the training model,
a group of 4 and a cheap rule reward (the share of distinct tokens in a completion; a random
model's completions all run to the length limit, so a length reward would say nothing, and the
reward's value does not change the step's work).
Measured: `trainer.train()` wall time and `torch.cuda.max_memory_allocated` over load and step;
planned: the plan's `allocated_peak_bytes` (its peak less the CUDA context that the allocator does
not see) at the run's sequence length (longest prompt + completion tokens) and micro-batch
(`per_device_train_batch_size`, 4 completions). Writes JSON (`--out`) and prints one markdown
table row last. Without CUDA (`--device cpu`) the same step runs with no 4-bit loading, and no GPU
figures; that is the smoke test (`tests/benchmarks/test_qlora_step.py`):

    python benchmarks/qlora_step.py --device cpu --hidden 64 --intermediate 128 --heads 4 \\
        --kv-heads 2 --vocab 1024 --completion-tokens 16 --out /tmp/qlora_step.json

On the lent H200 (the `device` tool): its image has torch 2.11 (CUDA 13), transformers 5.17,
peft and accelerate but neither TRL, bitsandbytes, datasets nor pydantic, and no network, so carry
wheels. Once, here, in the repository root (`echo /.whl/ >> .git/info/exclude` first):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \\
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \\
        gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \\
        annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4

(46 MB, bitsandbytes 43 MB of it; its wheel holds the CUDA 13.0 library that torch
2.11+cu130 needs). Then `run` with `carry: [".whl"]`, `timeout_s: 600` and the command:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; \\
        python3 -m pip show pyarrow peft typing-extensions | grep -E '^(Name|Version)'; \\
        PYTHONUNBUFFERED=1 python3 benchmarks/qlora_step.py --layers 2 --gpu rtx4090 \\
        --out $OUT/qlora_step.json 2>&1 | tee $OUT/qlora_step.log

datasets 5.2 wants pyarrow >= 24 and pydantic 2.14 a recent typing-extensions: the `pip show`
says what the image has. The 2-layer checkpoint is 2.5 B parameters (5 GB in bf16, most of it the
two embeddings); `--layers 4` adds the decoder part again, to compare the slope with the plan's.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30


def distinct_tokens(prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                    **_: Any) -> list[float]:
    """Share of distinct token ids in each completion: penalises degenerate repetition."""
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


PROMPTS = [
    "My father has chest pain spreading to his left arm and he is sweating. What should we do?",
    "I have had a dry cough and a mild fever for three days. Do I need antibiotics?",
]


def build_model(out: Path, args: argparse.Namespace, device: str) -> None:
    """A randomly initialised Qwen2 checkpoint of the given shape, in bf16, with a tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from clinicloop.model.corpus import load_corpus
    from clinicloop.model.tiny import SIZES
    from clinicloop.model.tokenizer import (
        IM_END,
        save_tokenizer,
        tool_argument_words,
        train_tokenizer,
        training_texts,
    )

    rows = load_corpus()
    tokenizer = train_tokenizer(training_texts(rows), SIZES["tiny"].vocab_size,
                                tool_argument_words(rows))
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is below the tokenizer's {len(tokenizer)} tokens")
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim or args.hidden // args.heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, bos_token_id=None, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):  # initialising 2.5 B parameters is quick on the GPU, slow on CPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    del model
    gc.collect()  # what is left allocated would count in the step's measured peak
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=27648)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpu", default=None, help="card to plan for (a name of "
                        "clinicloop.backends.plan.GPUS or a size); default: this one, or "
                        "rtx4090 on a CPU")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    from clinicloop.backends.plan import GPUS, ModelShape, parse_gpu
    from clinicloop.quant.train_plan import plan_training
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.grpo import train_grpo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    config = PaperGRPOConfig(
        qlora=True, max_steps=1, num_generations=4, per_device_train_batch_size=4,
        max_completion_length=args.completion_tokens, lora_r=args.lora_rank,
        lora_alpha=2 * args.lora_rank, use_cpu=args.device == "cpu",
        bf16=args.device == "cuda")
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        started = time.perf_counter()
        build_model(model_dir, args, args.device)
        built = time.perf_counter() - started
        print(f"built {model_dir.name} in {built:.1f} s", flush=True)
        train_grpo(config, model_dir, rows, [distinct_tokens], Path(tmp) / "run", progress=False)
        report = json.loads((Path(tmp) / "run" / "train.json").read_text())
        shape = ModelShape.from_hf_config(model_dir).model_copy(
            update={"name": f"qwen2-shaped {args.layers} layers x {args.hidden}"})
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt_tokens = max(len(tokenizer(tokenizer.apply_chat_template(
            r["prompt"], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]) for r in rows)

    if args.gpu:
        gpu_name, gpu_bytes = args.gpu, parse_gpu(args.gpu)
    elif args.device == "cuda":
        gpu_name = torch.cuda.get_device_name()
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_name, gpu_bytes = "rtx4090", GPUS["rtx4090"]
    seq_len = prompt_tokens + args.completion_tokens
    quantized = report["load"]["quantization"] != "none"
    plan = plan_training(shape, gpu_bytes, lora_rank=args.lora_rank, seq_len=seq_len,
                         num_generations=config.num_generations,
                         micro_batch=config.per_device_train_batch_size, quantized=quantized,
                         double_quant=True, engine_resident="none", search=False)
    measured = report["peak_gpu_bytes"] if args.device == "cuda" else None
    ratio = measured / plan.allocated_peak_bytes if measured else None
    step_s = report["wall_s"] / report["steps"]
    result = {
        "device": args.device, "gpu_planned": gpu_name, "shape": shape.model_dump(),
        "params": shape.param_count(), "load": report["load"], "steps": report["steps"],
        "step_s": step_s, "build_s": built, "seq_len": seq_len, "prompt_tokens": prompt_tokens,
        "completion_tokens": args.completion_tokens, "reward_curve": report["reward_curve"],
        "peak_gpu_bytes": measured, "planned_allocated_bytes": plan.allocated_peak_bytes,
        "planned_peak_bytes": plan.peak_bytes, "ratio": ratio, "plan": plan.model_dump(),
    }

    def gib(n: int | None) -> str:
        return "-" if n is None else f"{n / GiB:.2f} GiB"

    row = (f"| {shape.num_layers} x {shape.hidden_size}/{shape.intermediate_size} | "
           f"{report['load']['quantization']} | {seq_len} x {config.num_generations} | "
           f"{step_s:.2f} s | {gib(measured)} | {gib(plan.allocated_peak_bytes)} | "
           f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    result["markdown"] = row
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print("| layers x hidden/mlp | base | tokens x group | step | peak allocated | planned | "
          "measured/planned |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(row)


if __name__ == "__main__":
    main()
