"""JSON schema → GBNF (`grammar.py`) checked by the real llama.cpp parser: schemas with quotes and
backslashes are honoured, schemas that cannot be enforced are refused with the part named, no
generated schema crashes the process or takes long to compile, generated objects of parts with
known values pass their grammar and fail it without a required key, and the server answers 400
for a schema llama.cpp would have been handed as a NULL grammar."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clinicloop.backends.base import Delta, EngineError, SamplingParams
from clinicloop.backends.grammar import (
    MAX_REPEAT,
    GrammarError,
    check_grammar,
    schema_to_gbnf,
    tool_call_gbnf,
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
# Found by this test: a pattern compiled twice (here through the `$ref`) once named a chain rule
# after a literal, `"x"--upto1`, which llama.cpp cannot parse.
@example(schema={"anyOf": [{"type": "string", "pattern": "^(?:x{2,5}){0,3}$"}, {"$ref": "#"}]})
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


# -- tool calls: the grammar of Hermes call blocks (`tool_call_gbnf`) -------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_interactions", "description": "Known interactions of two drugs.",
        "parameters": {"type": "object", "properties": {
            "drug_a": {"type": "string", "maxLength": 24},
            "drug_b": {"type": "string", "maxLength": 24}},
            "required": ["drug_a", "drug_b"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_appointment",
        "parameters": {"type": "object", "properties": {
            "day": {"enum": ["mon", "tue", "wed"]},
            "hour": {"type": "integer", "minimum": 8, "maximum": 17},
            "urgent": {"type": "boolean"}},
            "required": ["day", "hour"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "list_clinics"}},  # no parameters: {}
]
NESTED_TOOLS = [{"type": "function", "function": {
    "name": h, "parameters": {
        "$defs": {"dose": {"type": "object", "properties": {"mg": {"type": "integer"}},
                           "required": ["mg"], "additionalProperties": False}},
        "properties": {h: {"const": h}, "doses": {"type": "array", "items": {
            "$ref": "#/$defs/dose"}, "maxItems": 3}}}}} for h in HOSTILE[:4] + ["漢字 🙂"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(tiny_model.gguf_q8_0), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def accepts(llama, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's sampler for `gbnf` lets the model write `text` token by token and end
    there."""
    import ctypes

    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(llama.model),
                                                   gbnf.encode(), b"root")
    assert sampler

    def allowed(token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return data[0].logit != float("-inf")

    try:
        for token in llama.tokenize(text.encode(), add_bos=False, special=True):
            if not allowed(token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return allowed(llama.token_eos())
    finally:
        llama_cpp.llama_sampler_free(sampler)


def call_block(name: str, arguments: str) -> str:
    return (f'<tool_call>\n{{"name": {json.dumps(name, ensure_ascii=False)}, '
            f'"arguments": {arguments}}}\n</tool_call>')


@pytest.mark.parametrize("tools", [TOOLS, NESTED_TOOLS], ids=["clinic", "hostile"])
def test_tool_call_grammars_compile(vocab, tools):
    for name in (None, tools[-1]["function"]["name"]):
        for parallel in (False, True):
            for reasoning in (False, True):
                check_grammar(vocab, tool_call_gbnf(tools, name, parallel, reasoning))


def test_tool_call_grammar_accepts_exactly_the_calls_it_should(tokenizer):
    lookup = call_block("lookup_interactions", '{"drug_a": "warfarin", "drug_b": "aspirin"}')
    book = call_block("book_appointment", '{"day": "tue", "hour": 9}')
    required = tool_call_gbnf(TOOLS, None, parallel=False, reasoning=False)
    assert accepts(tokenizer, required, lookup)
    assert accepts(tokenizer, required, book)
    assert accepts(tokenizer, required, call_block("list_clinics", "{}"))
    assert not accepts(tokenizer, required, lookup + "\n" + book)  # one call only
    assert not accepts(tokenizer, required, "Sure. " + lookup)  # nothing but calls
    for bad in ('{"day": "sun", "hour": 9}', '{"day": "tue", "hour": 18}', '{"day": "tue"}',
                '{"day": "tue", "hour": 9, "note": "x"}'):
        assert not accepts(tokenizer, required, call_block("book_appointment", bad)), bad
    assert not accepts(tokenizer, required, call_block("list_clinics", '{"city": "x"}'))
    assert not accepts(tokenizer, required, call_block("unknown", "{}"))

    named = tool_call_gbnf(TOOLS, "book_appointment", parallel=True, reasoning=False)
    assert accepts(tokenizer, named, book) and accepts(tokenizer, named, book + "\n" + book)
    assert not accepts(tokenizer, named, lookup)

    thinking = tool_call_gbnf(TOOLS, None, parallel=True, reasoning=True)
    assert accepts(tokenizer, thinking, "Warfarin and aspirin <b>both</b> thin blood, so "
                                        "</thin k check.\n</think>\n\n" + lookup + "\n" + book)
    assert accepts(tokenizer, thinking, "</think>" + lookup)
    assert not accepts(tokenizer, thinking, lookup)  # the reasoning must close first
    assert not accepts(tokenizer, thinking, "a </think> b </think>\n" + lookup)


def test_a_part_used_twice_means_the_same_both_times(tokenizer):
    """The converter writes one rule per distinct body and refers to it by name: a character
    class, a repeated group or an enum used a second time means what it did the first time, not
    its alternation spliced into the sequence around it."""
    quote_or_a = schema_to_gbnf({"type": "string", "pattern": '^[a"]x[a"]$'})
    for text in ('axa', '"x"', 'ax"', '"xa'):
        assert accepts(tokenizer, quote_or_a, json.dumps(text)), text
    for text in ('"axa', '\\""', '"ax"', '"x'):
        assert not accepts(tokenizer, quote_or_a, text), text
    ab = {"type": "string", "pattern": "^(?:ab){1,2}$"}
    twice = schema_to_gbnf({"type": "object", "properties": {"a": ab, "b": ab},
                            "required": ["a", "b"], "additionalProperties": False})
    assert accepts(tokenizer, twice, '{"a": "ab", "b": "abab"}')
    assert not accepts(tokenizer, twice, '{"a": "ab", "b": "ababab"}')
    choice = {"enum": ["x", "y"]}
    both = schema_to_gbnf({"type": "object", "properties": {"a": choice, "b": choice},
                           "required": ["a", "b"], "additionalProperties": False})
    assert accepts(tokenizer, both, '{"a": "x", "b": "y"}')
    assert not accepts(tokenizer, both, '{"a": "x", "y"}')  # the second key dropped


def _spelled(value) -> str:
    """`value` in the grammar's spelling of JSON: non-ASCII text raw, DEL as an escape."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def test_del_is_an_escape_in_consts_as_in_every_other_string(tokenizer):
    for schema, value in (({"const": "a\x7f"}, "a\x7f"), ({"enum": ["a\x7f"]}, "a\x7f"),
                          ({"type": "string"}, "a\x7f"),
                          ({"type": "object", "properties": {"a\x7f": {"const": 1}}},
                           {"a\x7f": 1})):
        gbnf = schema_to_gbnf(schema)
        assert accepts(tokenizer, gbnf, _spelled(value)), schema
        assert not accepts(tokenizer, gbnf, json.dumps(value, ensure_ascii=False)), schema


# A schema part with the values it accepts: the property below builds objects and arrays of
# them, the same part often used more than once.
_plain = st.characters(codec="utf-8", exclude_categories=("Cs",))
_valued_leaf = st.one_of(
    st.lists(st.one_of(st.text(_plain, max_size=6), st.integers(), st.booleans(), st.none()),
             min_size=1, max_size=4, unique_by=json.dumps).map(
        lambda vs: ({"enum": vs}, st.sampled_from(vs))),
    st.text(_plain, max_size=6).map(lambda v: ({"const": v}, st.just(v))),
    st.just(({"type": "boolean"}, st.booleans())),
    st.just(({"type": "null"}, st.none())),
    st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(lambda b: (
        {"type": "integer", "minimum": b[0], "maximum": b[0] + b[1]},
        st.integers(b[0], b[0] + b[1]))),
    st.sampled_from(['^[a"\\\\]x{1,3}$', "^(?:ab){1,2}$", "^[0-9]{2}-[a-c]+$"]).map(
        lambda r: ({"type": "string", "pattern": r}, st.from_regex(r, fullmatch=True))),
    st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda b: (
        {"type": "string", "minLength": b[0], "maxLength": b[0] + b[1]},
        st.text(_plain, min_size=b[0], max_size=b[0] + b[1]))),
)


@st.composite
def _schema_and_instance(draw):
    leaves = draw(st.lists(_valued_leaf, min_size=1, max_size=3))
    keys = draw(st.lists(st.sampled_from(["a", "b", '"', "\\", "k y", "é"]), min_size=2,
                         max_size=4, unique=True))
    parts = [draw(st.sampled_from(leaves)) for _ in keys]  # repeats likely
    if draw(st.booleans()):
        item, values = parts[0]
        parts[0] = ({"type": "array", "items": item, "maxItems": 3},
                    st.lists(values, max_size=3))
    named = list(zip(keys, parts, strict=True))
    schema = {"type": "object", "properties": {k: part for k, (part, _) in named},
              "required": keys, "additionalProperties": False}
    instance = {k: draw(values) for k, (_, values) in named}
    return schema, instance


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_schema_and_instance())
def test_property_the_grammar_accepts_what_the_schema_does_and_needs_every_key(tokenizer, case):
    """Completeness where the values are known: any instance of the schema, in the grammar's
    spelling of JSON, passes the grammar; with a required key left out, spelled the same way, it
    does not."""
    schema, instance = case
    gbnf = schema_to_gbnf(schema)
    assert accepts(tokenizer, gbnf, _spelled(instance)), (_spelled(instance), gbnf)
    short = dict(list(instance.items())[1:])
    assert not accepts(tokenizer, gbnf, _spelled(short)), gbnf


def test_hostile_function_names_and_schemas_round_trip(tokenizer):
    for tool in NESTED_TOOLS:
        name = tool["function"]["name"]
        gbnf = tool_call_gbnf(NESTED_TOOLS, name, parallel=False, reasoning=False)
        arguments = json.dumps({name: name, "doses": [{"mg": 5}]}, ensure_ascii=False)
        assert accepts(tokenizer, gbnf, call_block(name, arguments)), name


@pytest.mark.parametrize(("tools", "name", "part"), [
    ([TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"not": {}}}}}}], None,
     "at tools[1].function.parameters/properties/x: keyword 'not'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "at tools[0].function.parameters/type: the arguments must be an object"),
    ([{"type": "function", "function": {"description": "no name"}}], None,
     "at tools[0].function.name"),
    (TOOLS, "cancel_appointment", "at tool_choice.function.name: no function "
                                  "'cancel_appointment'"),
    ([], None, "at tools:"),
])
def test_tool_schemas_that_cannot_be_enforced_are_refused_naming_the_part(tools, name, part):
    with pytest.raises(GrammarError, match=re.escape(part)):
        tool_call_gbnf(tools, name, parallel=True, reasoning=False)


def _conforms(value, schema) -> bool:
    """`value` against the keywords the TOOLS schemas use (jsonschema is not a dependency)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type", "object")
    if kind == "object":
        props = schema.get("properties", {})
        return isinstance(value, dict) and set(schema.get("required", [])) <= set(value) and (
            schema.get("additionalProperties", True) is not False or set(value) <= set(props)
        ) and all(_conforms(v, props[k]) for k, v in value.items() if k in props)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return type(value) is int and schema.get("minimum", value) <= value <= schema.get(
            "maximum", value)
    return kind == "boolean" and isinstance(value, bool)


@pytest.mark.parametrize(("tool_choice", "parallel", "thinking"), [
    ("required", False, "off"),
    ({"type": "function", "function": {"name": "book_appointment"}}, False, "off"),
    ("required", True, "off"),
    ("required", False, "on"),
])
def test_generation_under_the_tool_grammar_gives_calls_that_satisfy_the_schemas(
        tiny_model, tmp_path, tool_choice, parallel, thinking):
    """The tiny model, forced by the grammar, through the engine and the parser: every choice
    is calls of the allowed functions whose arguments satisfy their schemas."""
    schemas = {t["function"]["name"]: t["function"].get("parameters", {
        "type": "object", "additionalProperties": False}) for t in TOOLS}

    async def main():
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, n_parallel=2),
                                tmp_path)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=160, temperature=1.0, seed=3, n=3, tools=TOOLS,
                                    tool_choice=tool_choice, parallel_tool_calls=parallel)
            return [e async for e in engine.chat(
                [{"role": "user", "content": "Can I take warfarin with aspirin?"}], params,
                {"thinking_mode": thinking}) if isinstance(e, Delta)]
        finally:
            await engine.close()

    deltas = asyncio.run(main())
    for index in range(3):
        calls: dict[int, dict] = {}
        for delta in (d for d in deltas if d.index == index):
            assert "<tool_call>" not in delta.content + delta.reasoning
            for piece in delta.tool_calls:
                call = calls.setdefault(piece.index, {"name": piece.name, "arguments": ""})
                call["arguments"] += piece.arguments
        finish = [d.finish_reason for d in deltas if d.index == index and d.finish_reason]
        assert finish == ["tool_calls"] and calls, (finish, calls)
        assert parallel or len(calls) == 1
        for call in calls.values():
            assert call["name"] in schemas
            if isinstance(tool_choice, dict):
                assert call["name"] == "book_appointment"
            assert _conforms(json.loads(call["arguments"]), schemas[call["name"]]), call
