"""PHI redaction: hand-checked cases, the synthetic set's recall and retention, whole records."""

from __future__ import annotations

import json
import typing

import pytest

from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.store.redact import redact, redact_record
from clinicloop.store.redact_eval import PhiKind, evaluate, load_cases, main


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "My name is John Carter, call me at 555-867-5309. I have chest pain.",
            "My name is [NAME], call me at [PHONE]. I have chest pain.",
        ),
        (
            "I'm Daniel, 34, DOB March 14, 1962, MRN: 00482913, SSN 123-45-6789.",
            "I'm [NAME], 34, DOB [DATE], MRN: [ID], SSN [SSN].",
        ),
        (
            "Dr. Okonkwo at 1420 Maple Avenue, Apt 3B saw me on 14 Mar 2024.",
            "Dr. [NAME] at [ADDRESS] saw me on [DATE].",
        ),
        (
            "Mail jane.doe84@example.com, see https://mychart.example.org/p/1 from 192.168.14.201.",
            "Mail [EMAIL], see [URL] from [IP].",
        ),
        (
            "Patient: Samuel O'Brien\nPolicy #BCX99812, PO Box 7781, +44 20 7946 0958",
            "Patient: [NAME]\nPolicy #[ID], [ADDRESS], [PHONE]",
        ),
        ("Thanks for the advice!\nBest,\nGretchen", "Thanks for the advice!\nBest,\n[NAME]"),
    ],
)
def test_hand_cases(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "I'm worried about my 45-year-old husband who has had a fever for 3 days.",
        "I'm 45 and my blood pressure is 140/90 on lisinopril 10 mg daily.",
        "Take 500 mg twice a day for 7 days; HbA1c 8.1%, SpO2 94%, pain 3/10.",
        "Patient: 67-year-old woman, I am not sure, I'm Type 1 diabetic since 2015.",
        "May I take 2 tablets of 325 mg every 4-6 hours at 9:45 am?",
    ],
)
def test_clinical_text_is_left_alone(text):
    assert redact(text) == text


def test_synthetic_set_recall_and_retention():
    cases = load_cases()
    report = evaluate(cases)
    assert len(cases) >= 60
    assert set(report.per_kind) == set(typing.get_args(PhiKind))
    assert sum(1 for c in cases if not c.phi) >= 15, "negative cases"
    assert report.recall >= 0.95, report.misses
    assert report.keep_retention >= 0.95, report.misses


def test_eval_cli_prints_json(capsys):
    main(["--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["cases"] >= 60 and report["recall"] >= 0.95


def test_redact_record_covers_every_text_field():
    record = TurnRecord(
        conversation_id="c",
        endpoint="chat.completions",
        model="m",
        model_version="v1",
        messages=[
            {"role": "user", "name": "maria_l", "content": "I'm Maria, DOB 03/14/1962."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Email maria.lg@example.com"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "name": "lookup_labs", "content": "MRN 00482913: K 5.9"},
        ],
        choices=[LoggedChoice(index=0, content="Ms. Lopez, see you.", reasoning_content="Maria?")],
        error="upstream said: SSN 123-45-6789 invalid",
    )
    redacted = redact_record(record)
    assert redacted.messages == [
        {"role": "user", "name": "[NAME]", "content": "I'm [NAME], DOB [DATE]."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Email [EMAIL]"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "name": "lookup_labs", "content": "MRN [ID]: K 5.9"},
    ]
    assert redacted.response == "Ms. [NAME], see you."
    assert redacted.reasoning == "Maria?"  # no cue: a bare first name is not found
    assert redacted.error == "upstream said: SSN [SSN] invalid"
    assert redacted.id == record.id and record.messages[0]["content"].startswith("I'm Maria")
