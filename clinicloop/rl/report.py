"""The refresh run's report: `report.json` (everything, machine-readable), `report.md` (what a
person reads: the decision, the judge's calibration, held-out scores before and after, the reward
curve, a few answers that changed) and `reward_curve.png`. A run refused before training (its
judge below the floor) gets `write_refusal_report`: the same keys, with nothing evaluated or
trained, and no plot."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinicloop.rl.gate import Evaluation, GateDecision
from clinicloop.rl.runfiles import read_rows, write_atomic

EXAMPLES_SHOWN = 3


def plot_reward_curve(curve: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    steps = range(1, len(curve) + 1)
    ax.plot(steps, curve, marker=".", linewidth=1, label="mean reward")
    window = max(1, len(curve) // 5)
    if window > 1:
        tails = [curve[max(0, i - window + 1):i + 1] for i in range(len(curve))]
        smooth = [sum(t) / len(t) for t in tails]
        ax.plot(steps, smooth, linewidth=2, label=f"moving mean ({window})")
    ax.set(xlabel="GRPO step", ylabel="reward", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _changed_answers(baseline: dict[str, list[str]], candidate: dict[str, list[str]],
                     prompts: dict[str, Any]) -> list[dict[str, str]]:
    shown = []
    for prompt_id, before in baseline.items():
        after = candidate.get(prompt_id, [])
        if before and after and before[0] != after[0]:
            last_user = prompts[prompt_id][-1]["content"]
            shown.append({"prompt": last_user, "before": before[0], "after": after[0]})
        if len(shown) == EXAMPLES_SHOWN:
            break
    return shown


def _judge(run: Path) -> dict[str, Any] | None:
    """The judge's calibration on the reviewers' labels (`calibration.json`), in brief."""
    found = run / "calibration.json"
    if not found.exists():
        return None
    c = json.loads(found.read_text())
    return {"judge_model": c["judge_model"], "template": c["template"], "n": c["overall"]["n"],
            "macro_f1": c["overall"]["macro_f1"], "macro_f1_ci": c["overall"]["macro_f1_ci"]}


def _report(run: Path, state: dict[str, Any], decision: GateDecision,
            **outcome: Any) -> dict[str, Any]:
    return {
        "run_id": state["run_id"], "created_at": state["created_at"],
        "options": state["options"],
        "serving_version": state["serving_version"], "policy_hf": state["policy_hf"],
        "prompts": json.loads((run / "prompts.json").read_text()),
        "judge": _judge(run), "refused": state.get("refused"),
        "decision": decision.model_dump(mode="json"), "swapped": state["swapped"],
        "version_id": state["version_id"], "server_memory": state.get("server_memory"),
        "windows": state.get("windows", []), "step_seconds": state["done"],
        **outcome,
    }


def _write(run: Path, report: dict[str, Any], markdown: str) -> dict[str, Any]:
    write_atomic(run / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(run / "report.md", markdown)
    return report


def write_report(run: Path, state: dict[str, Any], baseline: Evaluation, candidate: Evaluation,
                 decision: GateDecision) -> dict[str, Any]:
    """The report of the run in `run`, whose state (as `state.json` holds it) is `state`."""
    train = json.loads((run / "train" / "train.json").read_text())
    prompts = {r["prompt_id"]: r["prompt"] for r in read_rows(run / "heldout.jsonl")}
    report = _report(
        run, state, decision, before=baseline.score, after=candidate.score,
        baseline_metrics=baseline.metrics, candidate_metrics=candidate.metrics,
        reward_curve=train["reward_curve"], train_wall_s=train["wall_s"],
        changed_answers=_changed_answers(baseline.responses, candidate.responses, prompts),
        files={"report_md": str(run / "report.md"), "plot": str(run / "reward_curve.png")})
    plot_reward_curve(train["reward_curve"], run / "reward_curve.png",
                      f"refresh {state['run_id']} ({state['options']['stage']} stage)")
    return _write(run, report, _markdown(report))


def write_refusal_report(run: Path, state: dict[str, Any], decision: GateDecision
                         ) -> dict[str, Any]:
    """The report of a run refused before training: why, the judge's calibration, the prompts."""
    report = _report(run, state, decision, before=None, after=None, baseline_metrics={},
                     candidate_metrics={}, reward_curve=[], train_wall_s=None,
                     changed_answers=[], files={"report_md": str(run / "report.md")})
    p = report["prompts"]
    lines = [f"# Refresh {report['run_id']}", "",
             f"From `{report['serving_version']}`; outcome: **refused before training**: "
             f"{'; '.join(decision.reasons)}.", "", _judge_line(report["judge"]), "",
             f"Prompts: {p['seen']} logged turns read, {p['train']} would have trained, "
             f"{p['heldout']} held out. Nothing was trained, evaluated or published: label more "
             "of the judge's verdicts in the console, or use a better judge, then start a new "
             "run.", "",
             "Steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["step_seconds"].items()),
             ""]
    return _write(run, report, "\n".join(lines))


def _judge_line(judge: dict[str, Any] | None) -> str:
    if judge is None:
        return "Judge: no reviewer labels to measure it on."
    ci = judge["macro_f1_ci"]
    return (f"Judge `{judge['judge_model']}` ({judge['template']}): macro-F1 "
            f"{_fmt(judge['macro_f1'])} [{_fmt(ci['low'])}, {_fmt(ci['high'])}] on {judge['n']} "
            "labelled items.")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _when(epoch: float | None) -> str:
    return "n/a" if epoch is None else f"{datetime.fromtimestamp(epoch, UTC):%H:%M:%S}"


def _markdown(r: dict[str, Any]) -> str:
    d = r["decision"]
    p = r["prompts"]
    outcome = (f"**{r['swapped']}** as `{r['version_id']}`" if r["swapped"] else
               "**not published**")
    lines = [
        f"# Refresh {r['run_id']}",
        "",
        f"Trained from `{r['serving_version']}` ({r['options']['stage']} stage, "
        f"{r['options']['grpo']['max_steps']} GRPO steps, {r['train_wall_s']:.1f} s); "
        f"outcome: {outcome}.",
        "",
        "| held-out rubric score | serving | candidate |",
        "| --- | --- | --- |",
        f"| overall ({p['heldout']} prompts) | {_fmt(r['before'])} | {_fmt(r['after'])} |",
    ]
    for name in sorted(k for k in r["baseline_metrics"] if k.startswith("axis:")
                       and k.count(":") == 1):
        lines.append(f"| {name} | {_fmt(r['baseline_metrics'][name])} | "
                     f"{_fmt(r['candidate_metrics'].get(name))} |")
    lines += [
        "",
        f"Gate (margin {d['margin']}): {'; '.join(d['reasons'])}.",
        "",
        _judge_line(r["judge"]),
        "",
        f"Prompts: {p['seen']} logged turns read, {p['duplicates']} duplicates, "
        f"{p['filtered']} filtered by score, {p['train']} trained on "
        f"({p['train_without_rubric']} without a gradable rubric skipped), {p['heldout']} held "
        "out.",
        "",
        "![reward curve](reward_curve.png)",
        "",
        "Reward per step: " + ", ".join(f"{x:.2f}" for x in r["reward_curve"]),
    ]
    if r["changed_answers"]:
        lines += ["", "## Held-out answers that changed", ""]
        for ex in r["changed_answers"]:
            lines += [f"- **patient:** {ex['prompt']}", f"  - before: {ex['before']}",
                      f"  - after: {ex['after']}"]
    if r["server_memory"]:
        m, mib = r["server_memory"], 1 << 20
        lines += ["", "## The server's memory after the swap", ""]
        if "rss_bytes" in m:  # what the gateway's process can tell (an upstream's is its own)
            lines += [f"Process RSS {m['rss_bytes'] / mib:.1f} MiB; {len(m['bases'])} base(s) "
                      "loaded: " + ", ".join(f"`{p}` {n / mib:.1f} MiB"
                                             for p, n in m["bases"].items()), ""]
        lines += ["| loaded version | KV cache (MiB) | adapter (MiB) |", "| --- | --- | --- |"]
        def mib_of(v: dict[str, int], key: str) -> str:
            return f"{v[key] / mib:.2f}" if key in v else "n/a"

        lines += [f"| {vid} | {mib_of(v, 'kv_cache_bytes')} | {mib_of(v, 'adapter_bytes')} |"
                  for vid, v in sorted(m.get("versions", {}).items())]
    if r["windows"]:
        lines += ["", "## Maintenance windows", "",
                  "| opened | closed by | treatment | engine released | queued | fallback | "
                  "refused | drain (s) | release (s) | resume (s) |", "| --- " * 10 + "|"]
        for w in r["windows"]:
            c = w["counts"]
            lines.append(
                f"| {_when(w['opened_at'])} – {_when(w['closed_at'])} | {w['closed_by']} | "
                f"{w['treatment']} | {w.get('released') or 'not released'} | {c['queued']} | "
                f"{c['fallback']} | {c['refused'] + c.get('queue_full', 0)} | "
                f"{_fmt(w.get('drain_s'))} | "
                f"{_fmt(w.get('release_s'))} | {_fmt(w.get('resume_s'))} |")
    lines += ["", "Steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["step_seconds"].items()),
              ""]
    return "\n".join(lines)
