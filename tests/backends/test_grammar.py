"""JSON schema → GBNF (`grammar.py`) checked by the real llama.cpp parser: schemas with quotes and
backslashes are honoured, schemas that cannot be enforced are refused with the part named, no
generated schema crashes the process or takes long to compile, and the server answers 400 for a
schema llama.cpp would have been handed as a NULL grammar."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinicloop.backends.base import Delta, EngineError, SamplingParams
from clinicloop.backends.grammar import (
    MAX_REPEAT,
    GrammarError,
    check_grammar,
    schema_to_gbnf,
)
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings

HOSTILE = ['say "hi"', "back\\slash", '\\"', "\\", '"', "new\nline", "tab\there", "\x00\x7f",
           "é ü 漢字 🙂", "\ud800", "]-[^", "::= |", "${x}"]


@pytest.fixture(scope="module")
def vocab(tiny_model):
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(tiny_model.gguf_q8_0), vocab_only=True, verbose=False)
    yield llama_cpp.llama_model_get_vocab(llama.model)
    llama.close()


def compile_schema(vocab, schema) -> str:
    gbnf = schema_to_gbnf(schema)
    check_grammar(vocab, gbnf)
    return gbnf


def test_quotes_and_backslashes_in_enum_const_and_names_compile(vocab):
    compile_schema(vocab, {"enum": HOSTILE})
    compile_schema(vocab, {"const": {"k\"ey": ['v"\\']}})
    compile_schema(vocab, {"type": "object", "properties": {h: {"const": h} for h in HOSTILE},
                           "required": HOSTILE[:3]})
    compile_schema(vocab, {"type": "string", "pattern": '^a"b\\\\c[\\]"\\\\]+$'})


@pytest.mark.parametrize(("schema", "part"), [
    ({"type": "string", "minLength": MAX_REPEAT + 1}, "above the 10000"),
    ({"type": "array", "minItems": 10**12}, "above the 10000"),
    ({"type": "string", "pattern": "^a{99999}$"}, "/pattern"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "cannot be enforced"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "cannot be enforced"),
    ({"type": "string", "pattern": "(?i)abc"}, "flags"),
    ({"type": "string", "pattern": "^(a*)*$"}, "can match the empty string"),
    ({"type": "string", "pattern": "^(a|b?){2,}$"}, "can match the empty string"),
    ({"type": "string", "pattern": "^[^\\s\\S]$"}, "matches nothing"),
    ({"type": "string", "pattern": "(unclosed"}, "not a supported regular expression"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"not": {"type": "null"}}, "keyword 'not'"),
    ({"type": "number", "minimum": 0.5}, "bounds on a number"),
    ({"type": "integer", "minimum": 3}, "integer bounds"),
    ({"enum": []}, "/enum"),
    ({"type": "object", "properties": {"a": {"type": "array", "maxItems": 1, "minItems": 2}}},
     "/properties/a: a maximum of 0 below"),
    ({"type": "object", "required": ["x"]}, "required 'x'"),
    ({"items": {"items": {"items": 5}}}, "/items/items/items"),
    (json.loads('{"items": ' * 100 + "{}" + "}" * 100), "deeper than 64"),
])
def test_schemas_that_cannot_be_enforced_are_refused_naming_the_part(schema, part):
    with pytest.raises(GrammarError, match=re.escape(part)):
        schema_to_gbnf(schema)


def test_recursion_through_ref_compiles_unless_it_consumes_nothing(vocab):
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["name", "kids"]}}, "$ref": "#/$defs/node"}
    compile_schema(vocab, tree)
    compile_schema(vocab, {"type": "array", "items": {"$ref": "#"}})
    # A reference that comes back to itself before any character: llama.cpp's left recursion,
    # whose sampler would be NULL.
    for loop in ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
                 {"anyOf": [{"$ref": "#"}, {"type": "null"}]}):
        with pytest.raises(GrammarError, match="cannot enforce"):
            compile_schema(vocab, loop)


def test_large_maxima_are_bounded_and_compile_quickly(vocab):
    start = time.monotonic()
    compile_schema(vocab, {"type": "object", "properties": {
        "note": {"type": "string", "maxLength": 10**15},
        "codes": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z]{1,10}$"},
                  "maxItems": 10**9},
        "long": {"type": "string", "minLength": 8000}}})
    assert time.monotonic() - start < 5
    with pytest.raises(GrammarError, match="more than"):  # the grammar's total size is bounded
        schema_to_gbnf({"type": "object", "properties": {
            str(i): {"type": "string", "minLength": MAX_REPEAT} for i in range(30)}})


# -- the property: no schema crashes the process or takes long -------------------------------

_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=12))
_count = st.one_of(st.integers(0, 20), st.integers(0, 10**12))
_regex = st.one_of(
    st.sampled_from(["^\\d{3}$", "a|b", "^[^\"\\\\]*$", "(a|)+", "^(?:x{2,5}){0,3}$", "[\\w-]+",
                     "^.*$", "\\", "a{,3}", "^(a+)+$", "[z-a]", "^\\u00e9$", "a{2000000000}",
                     "(((((((((((x)))))))))))", "^\\bword\\b$", "(?P<n>a)(?P=n)", "^a$|^b$"]),
    _text)
_leaf = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "number", "integer", "boolean", "null", "object", "array", "nope"])}),
    st.fixed_dictionaries({"enum": st.lists(st.one_of(_text, st.integers(), st.none()),
                                            max_size=4)}),
    st.fixed_dictionaries({"const": _text}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": _regex}),
    st.fixed_dictionaries({"type": st.just("string")},
                          optional={"minLength": _count, "maxLength": _count}),
    st.fixed_dictionaries({"type": st.just("integer")},
                          optional={"minimum": st.integers(-5, 5), "maximum": _count}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/$defs/a", "#/properties/x", "x"])}),
    st.booleans(),
)


def _extend(children):
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object"),
                               "properties": st.dictionaries(_text, children, max_size=4)},
                              optional={"required": st.lists(_text, max_size=2),
                                        "additionalProperties": st.one_of(st.booleans(),
                                                                          children)}),
        st.fixed_dictionaries({"type": st.just("array"), "items": children},
                              optional={"minItems": _count, "maxItems": _count}),
        st.fixed_dictionaries({"prefixItems": st.lists(children, max_size=3)}),
        st.fixed_dictionaries({"anyOf": st.lists(children, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(children, max_size=2)}),
        st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"a": children}),
                               "$ref": st.just("#/$defs/a")}),
    )


schemas = st.recursive(_leaf, _extend, max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas)
def test_property_no_schema_crashes_or_takes_long_to_compile(vocab, schema, capfd):
    """Compiled in this process: a crash in llama.cpp would kill pytest. llama.cpp never fails to
    parse what the converter writes: its parse error prints the whole grammar, schema text and
    all, to stderr (the server log), so only our own refusals may name a schema's content."""
    start = time.monotonic()
    try:
        compile_schema(vocab, schema)
    except GrammarError:
        pass
    assert time.monotonic() - start < 2.0
    assert "error parsing grammar" not in capfd.readouterr().err


# -- through the engine and the server -------------------------------------------------------


def _generate(tiny_model, tmp_path, schema, max_tokens=64) -> str:
    async def main():
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, n_parallel=2),
                                tmp_path)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, json_schema=schema)
            parts = [e.content async for e in engine.chat(
                [{"role": "user", "content": "Answer."}], params, {}) if isinstance(e, Delta)]
            return "".join(parts)
        finally:
            await engine.close()

    return asyncio.run(main())


def test_hostile_enum_and_pattern_are_honoured(tiny_model, tmp_path):
    value = json.loads(_generate(tiny_model, tmp_path, {"enum": HOSTILE[:4]}))
    assert value in HOSTILE[:4]
    pattern = '^[a-c]{2}"\\\\\\d{3}$'  # two letters, a quote, a backslash, three digits
    value = json.loads(_generate(tiny_model, tmp_path, {"type": "string", "pattern": pattern}))
    assert re.fullmatch(pattern.strip("^$"), value)


def test_engine_refuses_before_admission(tiny_model, tmp_path):
    async def main():
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0), tmp_path)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=4, json_schema={"$ref": "#"})
            with pytest.raises(EngineError) as err:
                async for _ in engine.complete("hello", params):
                    pass
            assert engine.healthy()
            return err.value
        finally:
            await engine.close()

    err = asyncio.run(main())
    assert err.status == 400 and err.param == "response_format"


def test_server_answers_400_for_a_schema_it_cannot_enforce(server_factory):
    server = server_factory()
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}

    def schema(s):
        return {**body, "response_format": {"type": "json_schema",
                                            "json_schema": {"name": "s", "schema": s}}}

    for bad in ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
                {"type": "string", "pattern": "^\\d{100000}$"}):
        r = httpx.post(server.v1 + "/chat/completions", json=schema(bad), timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "response_format"
    r = httpx.post(server.v1 + "/chat/completions", json=schema({"enum": ['a "quoted" word']}),
                   timeout=30)
    assert r.status_code == 200
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == 'a "quoted" word'
    assert httpx.get(server.base_url + "/health").status_code == 200
