"""Publishing a LoRA adapter: by default the adapter itself, which llama.cpp applies on the base
as the merged model would be served; as an option merged into a GGUF that llama.cpp serves, the
merge really changing the model. A publish killed midway leaves its work only in `<out>.part`,
which the next publish clears."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from clinicloop.backends.kinds import open_backend
from clinicloop.config import EngineSettings
from clinicloop.rl.publish import publishable_adapter, publishable_gguf
from tests.rl.killed import run_killed_after


def _logits(gguf, tokens):
    llama = Llama(model_path=str(gguf), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llama.eval(tokens)
    out = np.array(llama.scores[: len(tokens)])
    llama.close()
    return out


def _adapter(tiny_model, out: Path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                    "v_proj"]))
    with torch.no_grad():  # a trained adapter has non-zero B; a fresh one is an identity
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.full_like(p, 0.05))
    peft_model.save_pretrained(out)
    return peft_model


def test_adapter_merges_into_a_servable_gguf(tiny_model, tmp_path):
    peft_model = _adapter(tiny_model, tmp_path / "adapter")

    merged = publishable_gguf(tiny_model.hf_dir, tmp_path / "adapter", tmp_path / "v1")
    assert merged.gguf.name == "model-q8_0.gguf" and merged.gguf.exists()
    assert not list(tmp_path.glob("**/*.part"))
    tokens = Llama(model_path=str(merged.gguf), vocab_only=True, verbose=False).tokenize(
        b"<|im_start|>user\nI have a cough.<|im_end|>\n", add_bos=False, special=True)
    before, after = _logits(tiny_model.gguf_f16, tokens), _logits(merged.gguf_f16, tokens)
    assert before.shape == after.shape and not np.allclose(before, after, atol=1e-3)
    # What llama.cpp serves is what peft trained: the same next-token choices.
    with torch.no_grad():
        trained = peft_model(torch.tensor([tokens])).logits[0].numpy()
    assert (trained.argmax(-1) == after.argmax(-1)).mean() > 0.9
    assert np.abs(trained - after).max() < 0.1


def test_a_killed_publish_leaves_nothing_unowned(tiny_model, tmp_path):
    _adapter(tiny_model, tmp_path / "adapter")
    # Killed once the merged model's weights are on disk, before they are renamed into place.
    killed = run_killed_after(
        "transformers.modeling_utils:PreTrainedModel.save_pretrained",
        "from pathlib import Path; from clinicloop.rl.publish import publishable_gguf; "
        f"publishable_gguf(Path({str(tiny_model.hf_dir)!r}), Path({str(tmp_path / 'adapter')!r}),"
        f" Path({str(tmp_path / 'v1')!r}))")
    assert killed.returncode == -9, killed.stderr
    # The merged model lies in the publish's own work directory, nothing elsewhere.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "v1.part"]
    assert list((tmp_path / "v1.part").glob("*/model.safetensors"))

    merged = publishable_gguf(tiny_model.hf_dir, tmp_path / "adapter", tmp_path / "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "v1"]
    assert sorted(p.name for p in merged.hf_dir.parent.iterdir()) == [
        "hf", "model-f16.gguf", "model-q8_0.gguf"]


PROMPTS = ["I have had a cough and a fever for two days.", "My child has a rash on her arms.",
           "Is it safe to take ibuprofen with a headache?"]


def _greedy(gguf: Path, lora: Path | None = None) -> list[str]:
    llama = Llama(model_path=str(gguf), lora_path=lora and str(lora), n_ctx=256, n_threads=1,
                  verbose=False)
    texts = []
    for prompt in PROMPTS:
        llama.reset()
        out = llama.create_completion(f"<|im_start|>user\n{prompt}<|im_end|>\n"
                                      "<|im_start|>assistant\n", max_tokens=48, temperature=0)
        texts.append(out["choices"][0]["text"])
    llama.close()
    return texts


def test_an_adapter_publish_is_served_on_the_base_as_the_merged_model(bench, bench_lora,
                                                                      tmp_path):
    backend = open_backend(EngineSettings(kind="llamacpp"), tmp_path)
    lora = publishable_adapter(backend, bench.hf_dir, bench_lora.adapter_dir, tmp_path / "v1")
    assert lora == tmp_path / "v1" / "adapter.gguf"
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["adapter", "adapter.gguf"]
    # The peft directory is kept whole: the next refresh goes on training it.
    assert sorted(p.name for p in (tmp_path / "v1" / "adapter").iterdir()) == sorted(
        p.name for p in bench_lora.adapter_dir.iterdir())
    merged = publishable_gguf(bench.hf_dir, bench_lora.adapter_dir, tmp_path / "v2")
    assert not list(tmp_path.glob("*.part"))

    served = _greedy(bench.gguf_f16, lora)
    assert served == _greedy(merged.gguf_f16)
    assert served != _greedy(bench.gguf_f16)  # the adapter changes what is served


def test_a_killed_adapter_publish_leaves_nothing_unowned(bench, bench_lora, tmp_path):
    args = (f"Path({str(bench.hf_dir)!r}), Path({str(bench_lora.adapter_dir)!r}), "
            f"Path({str(tmp_path / 'v1')!r})")
    # Killed once the adapter GGUF is written, before the directory is renamed into place.
    killed = run_killed_after(
        "clinicloop.backends.kinds:LlamaCppBackend.publish_adapter",
        "from pathlib import Path; from clinicloop.backends.kinds import open_backend; "
        "from clinicloop.config import EngineSettings; "
        "from clinicloop.rl.publish import publishable_adapter; "
        f"publishable_adapter(open_backend(EngineSettings(), Path('.')), {args})")
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1.part"]
    assert (tmp_path / "v1.part" / "adapter.gguf").is_file()

    backend = open_backend(EngineSettings(), tmp_path)
    publishable_adapter(backend, bench.hf_dir, bench_lora.adapter_dir, tmp_path / "v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["adapter", "adapter.gguf"]
