"""Quality of quantized GGUFs against their f16: perplexity and a rubric score, in one table.

Perplexity is on held-out medical text: the patient simulator's case records
(`verifier/data/patient_scripts.jsonl`), which no tiny model trains on (they train on every row of
the shipped corpus, which has no held-out split), as consultations: the patient's complaint and
story as the user turn, the record's plan as the answer. Only answer tokens are scored, given the
prompt, because that is all the models were trained to predict (prompt tokens carry no loss). A
tiny model has never produced most of these words, so its held-out perplexity is large; the
ratio to f16 is the figure that matters. A second perplexity, on corpus answers the model did train
on, shows the in-distribution effect. On the same tokens, the mean KL divergence from f16's
next-token distribution and the top-1 agreement (llama-perplexity's --kl-divergence figures) are
the most sensitive measures. The scoring runs through llama-cpp-python rather than
llama-perplexity, which scores fixed-size chunks of one text and cannot restrict itself to answers.

The rubric score is HealthBench's (`verifier.scoring`) on greedy answers from our in-process engine,
graded by the verifier's `Judge`. The built-in set holds only `kind:rule` items, so no judge model
is needed: corpus prompts (`theme:corpus`) must get the reference answer word for word (an exact
check, the most sensitive to quantization noise) and, for red flags, emergency advice; the held-out
cases (`theme:held_out`) must name the diagnosis and, for emergencies, advise emergency care. A
HealthBench-format file can replace the set; its model-graded items need `judge_url`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from contextlib import AbstractAsyncContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from clinicloop.model.corpus import load_corpus
from clinicloop.model.tiny import training_targets
from clinicloop.model.tokenizer import IM_END, render_chat
from clinicloop.quant.gguf import GgufFile, machine
from clinicloop.verifier.client import ChatClient, open_client
from clinicloop.verifier.generator import SEEKS_EMERGENCY_CARE
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.patients import PatientScript, load_scripts
from clinicloop.verifier.rubrics import Example, RubricItem, RuleCheck, read_jsonl, write_jsonl
from clinicloop.verifier.scoring import ExampleGrades, aggregate

Pair = tuple[str, str]  # (rendered prompt, answer text the model should continue with)


class QualityOptions(BaseModel):
    corpus_examples: int = 24  # rubric examples drawn from the corpus
    held_out_examples: int | None = None  # held-out cases in the rubric set (None: all)
    corpus_ppl_rows: int = 64  # corpus answers in the in-distribution perplexity
    max_tokens: int = 96  # per answer; the corpus's longest answers are about 60 tokens
    seed: int = 0
    rubrics: Path | None = None  # a HealthBench JSONL instead of the built-in set
    judge_url: str | None = None  # for model-graded items of `rubrics`
    n_ctx: int = 1024


class Perplexity(BaseModel):
    ppl: float
    tokens: int


class QualityRow(BaseModel):
    type: str
    imatrix: bool
    size_mib: float
    bits_per_weight: float
    ppl_held_out: float
    ppl_held_out_ratio: float  # to f16's
    ppl_corpus: float
    ppl_corpus_ratio: float
    kl_vs_f16: float  # mean KL(f16 || this) over every scored token, nats
    top1_vs_f16: float  # share of scored tokens whose most likely token is f16's
    rubric_score: float | None
    rubric_std: float | None  # bootstrap std
    theme_scores: dict[str, float]
    same_answers_as_f16: float  # share of greedy answers identical to f16's
    wall_s: float


class QualityTable(BaseModel):
    machine: str
    held_out: str
    held_out_tokens: int
    corpus_tokens: int
    rubric_set: str
    n_examples: int
    rows: list[QualityRow]


def _case_prompt(script: PatientScript) -> list[dict[str, Any]]:
    record = script.record
    return [{"role": "user", "content": f"{record.chief_complaint} {record.present_illness}"}]


def held_out_pairs() -> list[Pair]:
    """The held-out consultations: each case's complaint and story, answered by its plan."""
    return [(render_chat(_case_prompt(s), thinking_mode="off"), s.outcome.plan + IM_END)
            for s in load_scripts()]


def corpus_pairs(n: int, seed: int) -> list[Pair]:
    """`n` corpus dialogues' last answers, as trained in thinking mode 'off'."""
    rows = random.Random(seed).sample(load_corpus(), n)
    return [training_targets(row, 0)[1] for row in rows]


class Scored(BaseModel):
    """Log-probabilities over the vocabulary at every scored answer token, and those tokens."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    log_probs: np.ndarray  # (tokens, vocab)
    targets: np.ndarray  # (tokens,)

    @property
    def perplexity(self) -> Perplexity:
        nll = -self.log_probs[np.arange(len(self.targets)), self.targets].mean()
        return Perplexity(ppl=float(np.exp(nll)), tokens=len(self.targets))


def score_answers(gguf: Path, texts: dict[str, list[Pair]], n_ctx: int = 1024
                  ) -> dict[str, Scored]:
    """For each named list of pairs, every answer token scored given its prompt
    (llama-cpp-python, one thread; the model is loaded once for all of them)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1,
                          n_threads_batch=1, logits_all=True, verbose=False)
    try:
        return {name: _score(llm, pairs, n_ctx) for name, pairs in texts.items()}
    finally:
        llm.close()


def _score(llm: Any, pairs: list[Pair], n_ctx: int) -> Scored:
    log_probs, targets = [], []
    for prompt, answer in pairs:
        head = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        tokens = llm.tokenize((prompt + answer).encode(), add_bos=False, special=True)
        if tokens[:len(head)] != head or len(tokens) > n_ctx:
            raise ValueError(f"cannot score the answer of {prompt[-80:]!r}: a token crosses "
                             f"the prompt's end, or {len(tokens)} tokens exceed {n_ctx}")
        llm.reset()
        llm.eval(tokens)
        # Row i holds the logits that predict token i + 1.
        logits = np.asarray(llm.scores[len(head) - 1:len(tokens) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_probs.append(logits - top - np.log(np.exp(logits - top).sum(axis=1,
                                                                        keepdims=True)))
        targets.append(np.asarray(tokens[len(head):]))
    return Scored(log_probs=np.concatenate(log_probs), targets=np.concatenate(targets))


def kl_divergence(base: Scored, other: Scored) -> float:
    """Mean KL(base || other) per token, in nats: llama-perplexity's --kl-divergence figure."""
    return float((np.exp(base.log_probs) * (base.log_probs - other.log_probs)).sum(axis=1).mean())


def top1_agreement(base: Scored, other: Scored) -> float:
    """Share of tokens where both models rank the same token first."""
    return float((base.log_probs.argmax(axis=1) == other.log_probs.argmax(axis=1)).mean())


def rubric_set(corpus_examples: int, held_out_examples: int | None, seed: int) -> list[Example]:
    """The built-in rubric set: corpus prompts, then held-out cases; every item `kind:rule`."""
    examples = []
    for row in random.Random(seed).sample(load_corpus(), corpus_examples):
        items = [RubricItem(criterion="Gives the reference answer the model was trained on.",
                            points=5, tags=["kind:rule", "axis:accuracy"],
                            rule=RuleCheck(type="exact", answer=row["messages"][-1]["content"]))]
        if row["topic"] == "red_flag":
            items.append(SEEKS_EMERGENCY_CARE)
        examples.append(Example(prompt=row["messages"][:-1], rubrics=items,
                                example_tags=["theme:corpus"], prompt_id=f"corpus-{row['id']}"))
    for script in load_scripts()[:held_out_examples]:
        items = [RubricItem(criterion=f"Names the likely diagnosis ({script.outcome.diagnosis}).",
                            points=5, tags=["kind:rule", "axis:accuracy"],
                            rule=RuleCheck(type="keywords",
                                           keywords=script.outcome.diagnosis_terms))]
        if script.outcome.red_flag:
            items.append(SEEKS_EMERGENCY_CARE)
        examples.append(Example(prompt=_case_prompt(script), rubrics=items,
                                example_tags=["theme:held_out"],
                                prompt_id=f"held_out-{script.id}"))
    return examples


class Graded(BaseModel):
    answers: list[str]
    metrics: dict[str, float]


async def _answer_and_grade(gguf: Path, examples: list[Example], options: QualityOptions,
                            judge_url: str | None) -> Graded:
    async with open_client(gguf=gguf, n_ctx=options.n_ctx) as model:
        answers = await asyncio.gather(*(model.chat(e.prompt, max_tokens=options.max_tokens,
                                                    temperature=0.0, seed=0) for e in examples))
        # A rule-only set never calls the judge's model; `check_judge` refused any other set
        # without a judge URL.
        judge_ctx: AbstractAsyncContextManager[ChatClient] = (
            open_client(judge_url) if judge_url else nullcontext(model))
        async with judge_ctx as judge_client:
            judge = Judge(judge_client)
            verdicts = await asyncio.gather(*(judge.grade_all(e.prompt, a, e.rubrics)
                                              for e, a in zip(examples, answers, strict=True)))
    grades = [ExampleGrades(prompt_id=e.prompt_id, example_tags=e.example_tags, items=e.rubrics,
                            met=[v.criteria_met for v in vs])
              for e, vs in zip(examples, verdicts, strict=True)]
    return Graded(answers=list(answers), metrics=aggregate(grades))


def check_judge(examples: list[Example], judge_url: str | None) -> None:
    if judge_url is None and not all(i.is_rule for e in examples for i in e.rubrics):
        raise ValueError("the rubric set has model-graded items: give a judge URL")


def quality_table(f16: GgufFile, files: list[GgufFile], out_dir: Path,
                  options: QualityOptions | None = None, progress: bool = True) -> QualityTable:
    """Score `f16` and each of `files` on the same texts and rubric set; f16 is the baseline.

    Writes the rubric set (`quality_rubrics.jsonl`) and every answer (`quality_answers.jsonl`)
    to `out_dir` for inspection."""
    options = options or QualityOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    held, corpus = held_out_pairs(), corpus_pairs(options.corpus_ppl_rows, options.seed)
    if options.rubrics is not None:
        examples, source = list(read_jsonl(options.rubrics)), str(options.rubrics)
    else:
        examples = rubric_set(options.corpus_examples, options.held_out_examples, options.seed)
        source = (f"built-in: {options.corpus_examples} corpus prompts, "
                  f"{sum('theme:held_out' in e.example_tags for e in examples)} held-out cases")
    check_judge(examples, options.judge_url)
    write_jsonl(out_dir / "quality_rubrics.jsonl", examples)

    rows: list[QualityRow] = []
    base: dict[str, Scored] = {}
    base_ppl: dict[str, float] = {}
    base_answers: list[str] = []
    with (out_dir / "quality_answers.jsonl").open("w", encoding="utf-8") as log:
        for f in tqdm([f16, *files], desc="quality", unit="model", disable=not progress):
            started = time.perf_counter()
            scored = score_answers(f.path, {"held": held, "corpus": corpus}, options.n_ctx)
            graded = asyncio.run(_answer_and_grade(f.path, examples, options, options.judge_url))
            ppl = {k: v.perplexity.ppl for k, v in scored.items()}
            if f is f16:
                base, base_ppl, base_answers = scored, ppl, graded.answers
            # Token-weighted over both texts.
            n = {k: len(v.targets) for k, v in scored.items()}
            kl = sum(kl_divergence(base[k], v) * n[k] for k, v in scored.items()) / sum(n.values())
            top1 = sum(top1_agreement(base[k], v) * n[k] for k, v in scored.items()) / sum(
                n.values())
            same = sum(a == b for a, b in zip(graded.answers, base_answers, strict=True))
            m = graded.metrics
            rows.append(QualityRow(
                type=f.type, imatrix=f.imatrix is not None, size_mib=round(f.mib, 3),
                bits_per_weight=round(f.bits_per_weight, 3),
                ppl_held_out=ppl["held"], ppl_held_out_ratio=ppl["held"] / base_ppl["held"],
                ppl_corpus=ppl["corpus"], ppl_corpus_ratio=ppl["corpus"] / base_ppl["corpus"],
                kl_vs_f16=kl, top1_vs_f16=top1,
                rubric_score=m.get("overall_score"),
                rubric_std=m.get("overall_score:bootstrap_std"),
                theme_scores={k: v for k, v in m.items() if k.startswith("theme:") and ":" not in
                              k.removeprefix("theme:")},
                same_answers_as_f16=same / len(examples),
                wall_s=round(time.perf_counter() - started, 2)))
            log.writelines(json.dumps({"type": f.type, "imatrix": f.imatrix is not None,
                                       "prompt_id": e.prompt_id, "answer": a},
                                      ensure_ascii=False) + "\n"
                           for e, a in zip(examples, graded.answers, strict=True))
    return QualityTable(machine=machine(), held_out=held_out_description(len(held)),
                        held_out_tokens=len(base["held"].targets),
                        corpus_tokens=len(base["corpus"].targets), rubric_set=source,
                        n_examples=len(examples), rows=rows)


def held_out_description(cases: int) -> str:
    return (f"{cases} patient-simulator case records (not in the training corpus): "
            "complaint and story as the prompt, the plan as the scored answer")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(table: QualityTable) -> str:
    """The quality table as markdown, f16 first."""
    themes = sorted({k for r in table.rows for k in r.theme_scores})
    head = ["type", "imatrix", "MiB", "bits/weight", "ppl held-out (× f16)",
            "ppl corpus (× f16)", "KL vs f16", "top-1 = f16", "rubric score ± std", *themes,
            "answers = f16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [r.type, "yes" if r.imatrix else "no", f"{r.size_mib:.2f}",
                 f"{r.bits_per_weight:.2f}",
                 f"{r.ppl_held_out:,.0f} ({r.ppl_held_out_ratio:.3f})",
                 f"{r.ppl_corpus:.3f} ({r.ppl_corpus_ratio:.3f})",
                 f"{r.kl_vs_f16:.5f}", f"{r.top1_vs_f16:.1%}",
                 f"{_fmt(r.rubric_score)} ± {_fmt(r.rubric_std)}",
                 *[_fmt(r.theme_scores.get(t)) for t in themes],
                 f"{r.same_answers_as_f16:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "", f"- held-out text: {table.held_out}; {table.held_out_tokens} answer tokens (a tiny "
        "model has never produced most of their words, hence the large perplexity: compare the "
        "ratios)",
        f"- corpus perplexity: {table.corpus_tokens} answer tokens of training dialogues",
        "- KL vs f16: mean KL(f16 ‖ type) in nats and top-1 agreement, over both texts' tokens",
        "- answers = f16: greedy answers to the rubric prompts identical to f16's",
        f"- rubric set: {table.rubric_set} ({table.n_examples} examples), HealthBench scoring",
        f"- machine: {table.machine}",
    ]
    return "\n".join(lines + notes) + "\n"


def write(table: QualityTable, out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "quality.json", out_dir / "quality.md"
    json_path.write_text(table.model_dump_json(indent=2) + "\n", encoding="utf-8")
    md_path.write_text("# Quantized vs f16\n\n" + markdown(table), encoding="utf-8")
    return json_path, md_path
