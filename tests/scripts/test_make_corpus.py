"""`scripts/make_corpus.py`: the shipped corpus is exactly what it writes."""

from __future__ import annotations

from clinicloop.model.corpus import CORPUS_PATH
from scripts.make_corpus import generate, to_jsonl


def test_shipped_file_is_what_the_generator_writes() -> None:
    assert CORPUS_PATH.read_text(encoding="utf-8") == to_jsonl(generate())
