"""`scripts/make_patient_scripts.py`: the shipped patient scripts are exactly what it writes."""

from __future__ import annotations

from clinicloop.verifier.patients import SCRIPTS_PATH
from scripts.make_patient_scripts import generate, to_jsonl


def test_generator_reproduces_shipped_file():
    assert to_jsonl(generate()) == SCRIPTS_PATH.read_text(encoding="utf-8")
