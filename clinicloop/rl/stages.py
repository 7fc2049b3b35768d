"""The paper's three training stages as entry points, each GRPO with `PaperGRPOConfig` on TRL.

- Rule-based (verifiable answers): prompts whose right answer a machine can check — the red-flag
  consultations of the shipped corpus, where the reply must advise emergency care — rewarded by
  the rule check alone (`rule_reward`), no judge model.
- Rubric-based (open questions): prompts with rubrics, rewarded by the judge's HealthBench score
  plus the paper's length reward (`RubricPlusLength`). The rubrics come from a HealthBench-format
  JSONL file (`healthbench_rows`; a canaried row is evaluation data and is refused) or are written
  by the rubric generator for corpus prompts.
- Multi-turn: the policy consults the patient simulator for a few turns; each consultation is cut
  after a patient turn chosen at random (seeded), the generator writes fresh rubrics for that
  slice, and rubric-based GRPO trains on the slices, so the policy's next reply on a slice is what
  is scored.

Models are `Endpoint`s: an OpenAI-compatible URL (a vLLM server on a GPU, a hosted judge) or a GGUF
loaded in-process (the tiny model on CPU). The rubric-based and multi-turn stages consult a
verifier (judge, rubric generator, patient); the multi-turn stage also needs the policy as a chat
model to hold the consultations (its GGUF on CPU, or a `vllm serve` of `model_dir`). Each stage
writes the dataset it trained on (`dataset.jsonl`, by `train_grpo`) beside the adapter and
`train.json`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import AbstractAsyncContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from clinicloop.model.corpus import load_corpus
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import TrainResult, train_grpo
from clinicloop.rl.rewards import BackgroundLoop, RubricPlusLength, RubricReward, rule_reward
from clinicloop.verifier.client import ChatClient, open_client
from clinicloop.verifier.generator import SEEKS_EMERGENCY_CARE, RubricGenerator, prompt_prefix
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.patients import PatientScript
from clinicloop.verifier.rubrics import read_jsonl
from clinicloop.verifier.simulator import PatientSimulator, SimulatorOptions

Row = dict[str, Any]  # a training row: `prompt` (messages) and `rubrics` (RubricItem dicts)


class Endpoint(BaseModel):
    """Where a chat model is: an OpenAI-compatible base URL, else a GGUF run in-process (the
    tiny model when neither is given)."""

    url: str | None = None
    gguf: Path | None = None
    api_key: str | None = None
    model: str | None = None
    n_ctx: int = 4096

    def open(self, models_dir: Path) -> AbstractAsyncContextManager[ChatClient]:
        return open_client(self.url, api_key=self.api_key, model=self.model, gguf=self.gguf,
                           models_dir=models_dir, n_ctx=self.n_ctx)


@contextmanager
def client_on(loop: BackgroundLoop, endpoint: Endpoint, models_dir: Path) -> Iterator[ChatClient]:
    """A client for `endpoint` whose calls run on `loop` (where an in-process engine lives)."""
    opened = endpoint.open(models_dir)
    client = loop.run(opened.__aenter__())
    try:
        yield client
    finally:
        loop.run(opened.__aexit__(None, None, None))


def corpus_prompts(topic: str | None = None, n: int | None = None,
                   seed: int = 0) -> list[list[dict[str, Any]]]:
    """Shipped corpus dialogues (of `topic`, or all) up to their last user turn, shuffled."""
    prompts = [prompt_prefix(d["messages"]) for d in load_corpus()
               if topic is None or d["topic"] == topic]
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n else prompts


def red_flag_rows(n: int | None = None, seed: int = 0) -> list[Row]:
    """Red-flag prompts of the shipped corpus, with the rule item that grades them."""
    return [{"prompt": p, "rubrics": [SEEKS_EMERGENCY_CARE.model_dump()]}
            for p in corpus_prompts("red_flag", n, seed)]


def healthbench_rows(path: Path) -> list[Row]:
    """Training rows from a HealthBench-format JSONL file; canaried rows are refused."""
    rows = []
    for example in read_jsonl(path):
        if example.is_canaried:
            raise ValueError(f"{example.prompt_id} carries a canary: evaluation data never trains")
        rows.append({"prompt": example.prompt,
                     "rubrics": [i.model_dump(mode="json") for i in example.rubrics]})
    return rows


async def rubric_rows(prompts: list[list[dict[str, Any]]], generator: RubricGenerator) -> list[Row]:
    """Each prompt with the rubric the generator writes for it."""
    rows = []
    for prompt in prompts:  # one at a time: an in-process engine runs one sequence anyway
        rubric = await generator.for_conversation(prompt)
        rows.append({"prompt": prompt,
                     "rubrics": [i.model_dump(mode="json") for i in rubric.items]})
    return rows


async def dialogue_slices(scripts: list[PatientScript], policy: ChatClient, patient: ChatClient,
                          options: SimulatorOptions, seed: int) -> list[list[dict[str, Any]]]:
    """One slice per consultation of `policy` with the simulated patient: the messages up to a
    patient turn drawn at random, so the policy's next reply is the one to score."""
    simulator = PatientSimulator(patient, options)
    rng = random.Random(seed)
    slices = []
    for script in scripts:
        consultation = await simulator.consult(script, policy, f"rl-{script.id}", seed)
        ends = [i + 1 for i, m in enumerate(consultation.messages) if m["role"] == "user"]
        slices.append(consultation.messages[:rng.choice(ends)])
    return slices


def _train_on_rubrics(config: PaperGRPOConfig, model_dir: Path, rows: list[Row],
                      judge_client: ChatClient, loop: BackgroundLoop,
                      output_dir: Path, init_adapter: Path | None = None,
                      labels: Mapping[str, bool] | None = None) -> TrainResult:
    from transformers import AutoTokenizer

    judge = Judge(judge_client, labels=labels)
    reward = RubricPlusLength(RubricReward(judge, loop), config.num_generations,
                              config.length_threshold, AutoTokenizer.from_pretrained(model_dir))
    return train_grpo(config, model_dir, rows, [reward], output_dir, init_adapter=init_adapter)


def rule_stage(model_dir: Path, output_dir: Path, config: PaperGRPOConfig | None = None,
               rows: list[Row] | None = None, n_prompts: int | None = 32,
               init_adapter: Path | None = None) -> TrainResult:
    """Rule-based GRPO on `rows` (rubrics with `kind:rule` items), or on `n_prompts` red-flag
    prompts of the corpus; `init_adapter` as in `train_grpo`."""
    config = config or PaperGRPOConfig()
    rows = red_flag_rows(n_prompts, config.seed) if rows is None else rows
    return train_grpo(config, model_dir, rows, [rule_reward], output_dir,
                      init_adapter=init_adapter)


def rubric_stage(model_dir: Path, output_dir: Path, verifier: Endpoint,
                 config: PaperGRPOConfig | None = None, rows: list[Row] | None = None,
                 n_prompts: int = 32, *, models_dir: Path,
                 init_adapter: Path | None = None,
                 labels: Mapping[str, bool] | None = None) -> TrainResult:
    """Rubric-based GRPO on `rows` (e.g. `healthbench_rows(path)`), or on `n_prompts` corpus
    prompts with rubrics the verifier writes; `init_adapter` as in `train_grpo`; `labels`:
    reviewers' labels by verdict key, which the reward takes instead of the judge's verdict."""
    config = config or PaperGRPOConfig()
    with BackgroundLoop() as loop, client_on(loop, verifier, models_dir) as client:
        if rows is None:
            generator = RubricGenerator(client, seed=config.seed)
            rows = loop.run(rubric_rows(corpus_prompts(None, n_prompts, config.seed), generator))
        return _train_on_rubrics(config, model_dir, rows, client, loop, output_dir,
                                 init_adapter, labels)


def multiturn_stage(model_dir: Path, output_dir: Path, policy: Endpoint, verifier: Endpoint,
                    scripts: list[PatientScript], config: PaperGRPOConfig | None = None,
                    max_turns: int = 3, *, models_dir: Path) -> TrainResult:
    """Multi-turn GRPO: `policy` (the chat model of `model_dir`) consults the simulated patients
    of `scripts` for up to `max_turns` turns; slices of those dialogues with fresh rubrics are the
    rubric-based dataset."""
    config = config or PaperGRPOConfig()
    options = SimulatorOptions(max_turns=max_turns)
    with ExitStack() as stack:
        loop = stack.enter_context(BackgroundLoop())
        verifier_client = stack.enter_context(client_on(loop, verifier, models_dir))
        policy_client = verifier_client if policy == verifier else stack.enter_context(
            client_on(loop, policy, models_dir))
        slices = loop.run(dialogue_slices(scripts, policy_client, verifier_client, options,
                                          config.seed))
        rows = loop.run(rubric_rows(slices, RubricGenerator(verifier_client, seed=config.seed)))
        return _train_on_rubrics(config, model_dir, rows, verifier_client, loop, output_dir)
