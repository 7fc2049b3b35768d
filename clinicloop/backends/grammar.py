"""JSON schema → GBNF for llama.cpp, and the check that llama.cpp really accepts a grammar.

A request's `response_format` becomes a grammar here, before the request is admitted: a schema
this module cannot translate, or whose grammar llama.cpp refuses, is a `GrammarError` (a 400
naming the part of the schema), never a NULL sampler in the decode thread.

Every grammar describes JSON *text*: string contents (`const`, `enum`, property names, `pattern`
characters) are JSON-encoded first (quote, backslash, control characters, DEL and lone
surrogates as escapes) and then written as GBNF literals or character classes whose non-printable
characters are `\\x`/`\\u`/`\\U` escapes, so no schema text can break the grammar's syntax, and
no grammar asks the model for a character UTF-8 cannot carry.

Enforced: `type` (one or a list), `const`, `enum`, `anyOf`/`oneOf` (as anyOf), `allOf` of object
parts, local `$ref` (recursion included), `properties`/`required`/`additionalProperties`,
`items`/`prefixItems`/`minItems`/`maxItems`, `minLength`/`maxLength`, `pattern` (regular
expressions without lookaround, backreferences or flags; unanchored ends match anything), the
`date`/`time`/`date-time`/`uuid` formats, and integer `minimum`/`maximum` when the range is at
most `MAX_ENUMERATED_INTEGERS` values or is "at least 0". Annotations (`title`, `description`,
other formats, ...) are ignored; any other keyword is refused. A repetition asks for at most
`MAX_REPEAT` items (a larger maximum is lowered to it: every output still satisfies the schema; a
larger minimum is refused), and a whole grammar for at most `MAX_SYMBOLS` symbols.

`tool_call_gbnf` builds, with the same converter, the grammar of a forced `tool_choice`: Hermes
`<tool_call>` blocks whose arguments satisfy each function's `parameters` schema.
"""

from __future__ import annotations

import functools
import json
import math
import re
from re import _constants as sre_c  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]
from typing import Any

from clinicloop.backends.textstream import THINK_CLOSE
from clinicloop.backends.toolcalls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

#: The most items one repetition (`minLength`, `maxItems`, `{m,n}`, ...) may ask for.
MAX_REPEAT = 10_000
#: The most symbols (literal characters, rule references) one grammar may hold.
MAX_SYMBOLS = 200_000
#: The deepest nesting of schemas (and of groups in a pattern).
MAX_DEPTH = 64
#: An integer range enforced by listing its values holds at most this many.
MAX_ENUMERATED_INTEGERS = 1_000

_ANNOTATIONS = frozenset({
    "$schema", "$id", "$comment", "$defs", "definitions", "$anchor", "title", "description",
    "default", "examples", "deprecated", "readOnly", "writeOnly", "format", "strict",
    "contentMediaType", "contentEncoding",
})
_ENFORCED = frozenset({
    "type", "const", "enum", "anyOf", "oneOf", "allOf", "$ref", "properties", "required",
    "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "minLength",
    "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

_BUILTINS = {
    "space": '" "?',
    "char": r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\"" space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "integral-part": "[0] | [1-9] [0-9]{0,15}",
    "integer": '"-"? integral-part space',
    "number": '"-"? integral-part ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,16})? space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space (string ":" space value ("," space string ":" space value)*)? "}" space',
    "array": '"[" space (value ("," space value)*)? "]" space',
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [1-2] [0-9] | "3" [0-1])',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? '
            '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])',
    "date-time": 'date "T" time',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
            '[0-9a-fA-F]{12}',
}
_BUILTIN_DEPS = {
    "char": (), "space": (), "string": ("char", "space"), "boolean": ("space",),
    "null": ("space",), "integral-part": (), "integer": ("integral-part", "space"),
    "number": ("integral-part", "space"),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("space", "string", "value"), "array": ("space", "value"), "date": (),
    "time": (), "date-time": ("date", "time"), "uuid": (),
}
_FORMATS = {"date": "date", "time": "time", "date-time": "date-time", "uuid": "uuid"}
_STARTS = ((sre_c.AT, sre_c.AT_BEGINNING), (sre_c.AT, sre_c.AT_BEGINNING_STRING))
_ENDS = ((sre_c.AT, sre_c.AT_END), (sre_c.AT, sre_c.AT_END_STRING))

# Code point ranges (inclusive) used by character classes.
_MAX_CP = 0x10FFFF
Ranges = list[tuple[int, int]]
_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                  (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
                  (0xFEFF, 0xFEFF)]
_LINE_END: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
_SURROGATES: Ranges = [(0xD800, 0xDFFF)]
#: Characters JSON text carries only as escapes here (controls, quote, backslash, DEL).
_ESCAPED: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_SHORT_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r",
                  0x09: "\\t"}


class GrammarError(ValueError):
    """A schema that cannot be enforced; the message names the part (a JSON pointer)."""


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    start = 0
    for lo, hi in _normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _MAX_CP:
        out.append((start, _MAX_CP))
    return out


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    return _complement(_complement(a) + _complement(b))


def _escape_char(cp: int) -> str:
    """One code point as GBNF source, inside a literal or a class."""
    if 0x20 <= cp < 0x7F and chr(cp) not in '"\\[]-^':
        return chr(cp)
    if cp <= 0xFF:
        return f"\\x{cp:02X}"
    return f"\\u{cp:04X}" if cp <= 0xFFFF else f"\\U{cp:08X}"


def _json_escape(cp: int) -> str:
    """A character JSON text carries only as an escape, as that escape."""
    return _SHORT_ESCAPES.get(cp) or f"\\u{cp:04x}"


def gbnf_literal(json_text: str) -> str:
    """JSON text as a GBNF string literal."""
    return '"' + "".join(_escape_char(ord(c)) for c in json_text) + '"'


def json_text(value: Any) -> str:
    """`value` as compact JSON text; DEL and lone surrogates (UTF-8 cannot carry them) are
    escapes, as in every string the grammar's `char` allows."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise GrammarError(f"a value JSON cannot represent: {exc}") from None
    return re.sub("[\x7f\ud800-\udfff]", lambda m: _json_escape(ord(m.group())), text)


def _pointer(path: tuple[str, ...]) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path) if path else "/"


class _Converter:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self._by_body: dict[str, str] = {}
        self._refs: dict[str, str] = {}
        self._chains: dict[str, int] = {}
        self.symbols = 0
        self.where = ""  # the request part `root` is, when not a whole schema (errors name it)

    # -- rules -------------------------------------------------------------------------------

    def fail(self, path: tuple[str, ...], message: str) -> GrammarError:
        where = self.where + _pointer(path) if path or not self.where else self.where
        return GrammarError(f"at {where}: {message}")

    def spend(self, n: int, path: tuple[str, ...]) -> None:
        self.symbols += n
        if self.symbols > MAX_SYMBOLS:
            raise self.fail(path, f"the schema needs a grammar of more than {MAX_SYMBOLS} symbols")

    def fresh(self, hint: str) -> str:
        # Single dashes only: chain rules (`upto`) are named with a double one.
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-")[:40] or "r"
        name, i = base, 0
        while name in self.rules or name in _BUILTINS or name == "root":
            i += 1
            name = f"{base}-{i}"
        self.rules[name] = ""  # reserved
        return name

    def rule(self, hint: str, body: str) -> str:
        """A rule for `body` (one per distinct body)."""
        if (name := self._by_body.get(body)) is None:
            name = self._by_body[body] = self.fresh(hint)
            self.rules[name] = body
        return name

    def builtin(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _BUILTINS[name]
            for dep in _BUILTIN_DEPS[name]:
                self.builtin(dep)
        return name

    def repeat(self, atom: str, lo: int, hi: int | None, path: tuple[str, ...]) -> str:
        """`atom` (a rule name) lo to hi times (None: unbounded), as a GBNF sequence."""
        if lo > MAX_REPEAT:
            raise self.fail(path, f"a minimum of {lo} repetitions is above the {MAX_REPEAT} "
                                  "this server enforces")
        if hi is not None and hi < lo:
            raise self.fail(path, f"a maximum of {hi} below the minimum of {lo} matches nothing")
        hi = None if hi is None else min(hi, MAX_REPEAT)
        parts = [atom] * lo
        if hi is None:
            parts.append(f"{atom}*")
        elif hi > lo:
            parts.append(self.upto(atom, hi - lo))
        self.spend(lo + (0 if hi is None else 2 * (hi - lo)) + 1, path)
        return " ".join(parts)

    def upto(self, atom: str, k: int) -> str:
        """A rule for `atom` 0 to k times: a chain of rules, each one step (no deep nesting)."""
        built = self._chains.get(atom, 0)
        for j in range(built + 1, k + 1):
            body = f"{atom}?" if j == 1 else f"({atom} {atom}--upto{j - 1})?"
            self.rules[f"{atom}--upto{j}"] = body
        self._chains[atom] = max(built, k)
        return f"{atom}--upto{k}"

    # -- schemas -----------------------------------------------------------------------------

    def visit(self, schema: Any, path: tuple[str, ...], depth: int = 0) -> str:
        """A GBNF expression (one rule name) for the JSON values `schema` accepts."""
        if depth > MAX_DEPTH:
            raise self.fail(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        if schema is True:
            return self.builtin("value")
        if not isinstance(schema, dict):
            raise self.fail(path, "a schema must be an object (or true)")
        unknown = sorted(set(schema) - _ENFORCED - _ANNOTATIONS)
        if unknown:
            raise self.fail(path, f"keyword {unknown[0]!r} cannot be enforced")
        hint = path[-1] if path else "root"
        return self.rule(hint, self._body(schema, path, depth))

    def _body(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        d = depth + 1
        if "$ref" in schema:
            if set(schema) - _ANNOTATIONS - {"$ref"}:
                raise self.fail(path, "$ref next to other keywords cannot be enforced")
            return self.ref(schema["$ref"], path, d)
        if "const" in schema:
            return self.literal(json_text(schema["const"]), path)
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail(path + ("enum",), "enum must be a non-empty list")
            return " | ".join(self.literal(json_text(v), path + ("enum",)) for v in values)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                alts = schema[key]
                if not isinstance(alts, list) or not alts:
                    raise self.fail(path + (key,), f"{key} must be a non-empty list")
                rest = {k: v for k, v in schema.items() if k != key}
                return " | ".join(
                    self.visit(_merge(rest, alt, self.fail, path + (key, str(i))),
                               path + (key, str(i)), d)
                    for i, alt in enumerate(alts))
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or not parts:
                raise self.fail(path + ("allOf",), "allOf must be a non-empty list")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(parts):
                part = self.resolve(part["$ref"], path) if isinstance(part, dict) and \
                    "$ref" in part else part
                merged = _merge(merged, part, self.fail, path + ("allOf", str(i)))
            return self.visit(merged, path, d)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise self.fail(path + ("type",), "type must not be an empty list")
            return " | ".join(self.visit({**schema, "type": t}, path, d) for t in kind)
        if kind is not None and kind not in _TYPES:
            raise self.fail(path + ("type",), f"unknown type {kind!r}")
        if kind is None:
            kind = _implied_type(schema)
        if kind is None:
            return self.builtin("value")
        return getattr(self, f"_{kind}")(schema, path, d)

    def literal(self, text: str, path: tuple[str, ...]) -> str:
        self.spend(len(text), path)
        return f'{gbnf_literal(text)} {self.builtin("space")}'

    def resolve(self, ref: Any, path: tuple[str, ...]) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(path + ("$ref",), "only local references (#/...) are supported")
        target: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise self.fail(path + ("$ref",), f"reference {ref!r} points nowhere")
        return target

    def ref(self, ref: Any, path: tuple[str, ...], depth: int) -> str:
        target = self.resolve(ref, path)
        if ref not in self._refs:  # named before it is visited: a recursive reference
            name = self._refs[ref] = self.fresh(ref.rsplit("/", 1)[-1] or "ref")
            self.rules[name] = self.visit(target, path + ("$ref",), depth)
        return self._refs[ref]

    def _null(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        return self.builtin("null")

    def _boolean(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        return self.builtin("boolean")

    def _number(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum")):
            raise self.fail(path, "bounds on a number cannot be enforced (use an integer, or "
                                  "an enum)")
        return self.builtin("number")

    def _integer(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        lo, hi = _integer_bounds(schema, lambda m: self.fail(path, m))
        if lo is None and hi is None:
            return self.builtin("integer")
        if lo is not None and hi is not None:
            if hi < lo:
                raise self.fail(path, "the integer range is empty")
            if hi - lo < MAX_ENUMERATED_INTEGERS:
                return " | ".join(self.literal(str(v), path) for v in range(lo, hi + 1))
        if hi is None and lo == 0:
            return f'{self.builtin("integral-part")} {self.builtin("space")}'
        raise self.fail(path, f"integer bounds are enforced for a range of at most "
                              f"{MAX_ENUMERATED_INTEGERS} values or for minimum 0 alone")

    def _string(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        space = self.builtin("space")
        lengths = "minLength" in schema or "maxLength" in schema
        if "pattern" in schema:
            if lengths:
                raise self.fail(path, "pattern with minLength/maxLength cannot be enforced")
            return f'"\\"" {self.pattern(schema["pattern"], path + ("pattern",))} "\\"" {space}'
        fmt = schema.get("format")
        fmt = _FORMATS.get(fmt) if isinstance(fmt, str) else None
        if fmt is not None and not lengths:
            return f'"\\"" {self.builtin(fmt)} "\\"" {space}'
        if not lengths:
            return self.builtin("string")
        lo = _count(schema.get("minLength", 0), self.fail, path + ("minLength",))
        hi = schema.get("maxLength")
        hi = None if hi is None else _count(hi, self.fail, path + ("maxLength",))
        chars = self.repeat(self.builtin("char"), lo, hi, path)
        return f'"\\"" {chars} "\\"" {space}'

    def _array(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        space = self.builtin("space")
        items = schema.get("items", True)
        prefix = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, False
        lo = _count(schema.get("minItems", 0), self.fail, path + ("minItems",))
        hi = schema.get("maxItems")
        hi = None if hi is None else _count(hi, self.fail, path + ("maxItems",))
        if prefix is not None:
            if not isinstance(prefix, list) or items is not False or lo or hi is not None:
                raise self.fail(path, "prefixItems are enforced as an exact tuple only "
                                      "(items false, no minItems/maxItems)")
            inner = ' "," space '.join(self.visit(s, path + ("prefixItems", str(i)), depth)
                                       for i, s in enumerate(prefix))
            return f'"[" {space} {inner} "]" {space}'
        if items is False:
            return f'"[" {space} "]" {space}'
        item = self.visit(items, path + ("items",), depth)
        if hi == 0:
            return f'"[" {space} "]" {space}'
        more = self.repeat(self.rule(f"{item}-more", f'"," {space} {item}'), max(lo - 1, 0),
                           None if hi is None else hi - 1, path)
        body = f"{item} {more}"
        return f'"[" {space} {body if lo else f"({body})?"} "]" {space}'

    def _object(self, schema: dict[str, Any], path: tuple[str, ...], depth: int) -> str:
        space = self.builtin("space")
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", not props)
        if not isinstance(props, dict) or not isinstance(required, list) or not all(
                isinstance(r, str) for r in required):
            raise self.fail(path, "properties must be an object and required a list of names")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.fail(path + ("required",), f"required {missing[0]!r} is not among the "
                                                  "properties")
        kvs = {}
        for name, sub in props.items():
            value = self.visit(sub, path + ("properties", name), depth)
            kvs[name] = self.rule(f"{value}-kv",
                                  f'{self.literal(json_text(name), path)} ":" {space} {value}')
        if extra is not False:
            value = self.visit(extra, path + ("additionalProperties",), depth)
            kvs[None] = self.rule(f"{value}-extra-kv",
                                  f'{self.builtin("string")} ":" {space} {value}')
        req = [kvs[r] for r in dict.fromkeys(required)]
        opt = [kv for name, kv in kvs.items() if name not in required]
        # Optional members in declared order, each one or none (extra ones: any number, last).
        tails = [""]
        for kv in reversed(opt):
            star = "*" if kv == kvs.get(None) else "?"
            tails.insert(0, self.rule(f"{kv}-tail", f'("," {space} {kv}){star} {tails[0]}'))
        if req:
            body = f' "," {space} '.join(req) + f" {tails[0]}"
        elif opt:
            # The first member present has no comma before it; extra members may repeat.
            firsts = [f"{kv} {tails[i] if kv == kvs.get(None) else tails[i + 1]}"
                      for i, kv in enumerate(opt)]
            body = f'({" | ".join(firsts)})?'
        else:
            body = ""
        return f'"{{" {space} {body} "}}" {space}'

    # -- patterns ----------------------------------------------------------------------------

    def pattern(self, regex: Any, path: tuple[str, ...]) -> str:
        if not isinstance(regex, str):
            raise self.fail(path, "pattern must be a string")
        try:
            parsed = sre_parse.parse(regex)
        except (re.error, RecursionError, OverflowError) as exc:
            raise self.fail(path, f"not a supported regular expression: {exc}") from None
        if parsed.state.flags & ~sre_c.SRE_FLAG_UNICODE:
            raise self.fail(path, "regular expression flags cannot be enforced")
        items = list(parsed)
        anchored_start = bool(items) and items[0] in _STARTS
        anchored_end = len(items) > int(anchored_start) and items[-1] in _ENDS
        items = items[int(anchored_start):len(items) - int(anchored_end)]
        body = self.regex(items, path, 0)
        anything = f'{self.builtin("char")}*'
        return " ".join(p for p in (anything * (not anchored_start), body,
                                    anything * (not anchored_end)) if p) or '""'

    def regex(self, items: list[Any], path: tuple[str, ...], depth: int) -> str:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"the pattern nests deeper than {MAX_DEPTH} groups")
        out: list[str] = []
        text = ""
        for op, av in items:
            if op is sre_c.LITERAL:
                text += chr(av)
                continue
            if text:
                out.append(self.string_literal(text, path))
                text = ""
            out.append(self.regex_item(op, av, path, depth))
        if text:
            out.append(self.string_literal(text, path))
        return " ".join(out)

    def string_literal(self, text: str, path: tuple[str, ...]) -> str:
        """Characters of a JSON string's contents, encoded as JSON text."""
        encoded = "".join(_json_escape(ord(c)) if _in(ord(c), _ESCAPED + _SURROGATES) else c
                          for c in text)
        self.spend(len(encoded), path)
        return gbnf_literal(encoded)

    def regex_item(self, op: Any, av: Any, path: tuple[str, ...], depth: int) -> str:
        if op is sre_c.NOT_LITERAL:
            return self.char_class(_complement([(av, av)]), path)
        if op is sre_c.ANY:
            return self.char_class(_complement(_LINE_END), path)
        if op is sre_c.IN:
            return self.char_class(_class_ranges(av, lambda m: self.fail(path, m)), path)
        if op is sre_c.BRANCH:
            return "(" + " | ".join(self.regex(list(b), path, depth + 1) or '""'
                                    for b in av[1]) + ")"
        if op is sre_c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise self.fail(path, "regular expression flags cannot be enforced")
            return "(" + (self.regex(list(sub), path, depth + 1) or '""') + ")"
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            if sub.getwidth()[0] == 0 and (hi is sre_c.MAXREPEAT or hi > 1):
                # `(a*)*` loops in llama.cpp's stack expansion, `(a?){0,999}` multiplies its
                # stacks; neither says more than a repetition of what is not empty would.
                raise self.fail(path, "a repeated part that can match the empty string cannot "
                                      "be enforced")
            inner = self.regex(list(sub), path, depth + 1)
            atom = self.rule("pattern-item", inner or '""')
            return self.repeat(atom, lo, None if hi is sre_c.MAXREPEAT else hi, path)
        raise self.fail(path, f"{str(op).lower()} (anchors inside, lookaround, "
                              "backreferences) cannot be enforced")

    def char_class(self, ranges: Ranges, path: tuple[str, ...]) -> str:
        """One character of `ranges` inside a JSON string, as JSON text."""
        ranges = _intersect(ranges, _complement(_SURROGATES))
        raw = _intersect(ranges, _complement(_ESCAPED))
        escaped = _intersect(ranges, _ESCAPED)
        alts = []
        if raw:
            alts.append("[" + "".join(_escape_char(lo) if lo == hi
                                      else f"{_escape_char(lo)}-{_escape_char(hi)}"
                                      for lo, hi in raw) + "]")
        alts += [gbnf_literal(_json_escape(cp)) for lo, hi in escaped for cp in range(lo, hi + 1)]
        if not alts:
            raise self.fail(path, "a character class that matches nothing")
        self.spend(len(alts), path)
        return self.rule("pattern-char", " | ".join(alts))

    def visit_root(self, root: Any, where: str) -> str:
        """A rule for the JSON values of another schema (`where` in the request), with its own
        `$ref`s, in this grammar."""
        self.root, self.where, self._refs = root, where, {}
        return self.visit(root, ())

    def grammar(self, root: str | None = None) -> str:
        """The grammar text: `root`, else the root schema's rule, as the rule `root`."""
        root = self.visit(self.root, ()) if root is None else root
        return "\n".join([f"root ::= {root}",
                          *(f"{name} ::= {body}" for name, body in self.rules.items())])


def _in(cp: int, ranges: Ranges) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _class_ranges(items: list[Any], fail: Any) -> Ranges:
    ranges: Ranges = []
    negate = False
    for op, av in items:
        if op is sre_c.NEGATE:
            negate = True
        elif op is sre_c.LITERAL:
            ranges.append((av, av))
        elif op is sre_c.RANGE:
            ranges.append(av)
        elif op is sre_c.CATEGORY:
            base = {"DIGIT": _DIGIT, "WORD": _WORD, "SPACE": _SPACE}
            name = str(av).removeprefix("CATEGORY_")
            if name in base:
                ranges += base[name]
            elif name.startswith("NOT_") and name[4:] in base:
                ranges += _complement(base[name[4:]])
            else:
                raise fail(f"character category {name} cannot be enforced")
        else:
            raise fail(f"{op} in a character class cannot be enforced")
    ranges = _normalize(ranges)
    return _complement(ranges) if negate else ranges


def _count(value: Any, fail: Any, path: tuple[str, ...]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(path, "must be a non-negative integer")
    return value


def _integer_bounds(schema: dict[str, Any], fail: Any) -> tuple[int | None, int | None]:
    def bound(key: str, shift: int, pick: Any) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise fail(f"{key} must be a finite number")
        exact = math.ceil(value) if pick is max else math.floor(value)
        return exact + shift if isinstance(value, int) or exact == value else exact

    los = [b for b in (bound("minimum", 0, max), bound("exclusiveMinimum", 1, max))
           if b is not None]
    his = [b for b in (bound("maximum", 0, min), bound("exclusiveMaximum", -1, min))
           if b is not None]
    return (max(los) if los else None), (min(his) if his else None)


def _implied_type(schema: dict[str, Any]) -> str | None:
    """The type a schema without `type` constrains, from its keywords (None: any value)."""
    for kind, keys in (("object", ("properties", "additionalProperties", "required")),
                       ("array", ("items", "prefixItems", "minItems", "maxItems")),
                       ("string", ("minLength", "maxLength", "pattern"))):
        if any(k in schema for k in keys):
            return kind
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return None


def _merge(base: Any, part: Any, fail: Any, path: tuple[str, ...]) -> Any:
    """`base` and `part` as one schema (properties and required joined); refused on conflict."""
    if part is True:
        return base
    if base is True or not base:
        return part
    if not isinstance(part, dict):
        raise fail(path, "a schema must be an object (or true)")
    merged = dict(base)
    for key, value in part.items():
        if key == "properties" and key in merged:
            if not isinstance(value, dict) or not isinstance(merged[key], dict):
                raise fail(path, "properties must be an object")
            merged[key] = {**merged[key], **value}
        elif key == "required" and key in merged:
            if not isinstance(value, list) or not isinstance(merged[key], list):
                raise fail(path, "required must be a list")
            merged[key] = [*merged[key], *value]
        elif key in merged and merged[key] != value and key not in _ANNOTATIONS:
            raise fail(path, f"{key!r} differs between the combined schemas")
        else:
            merged[key] = value
    return merged


def schema_to_gbnf(schema: Any) -> str:
    """The GBNF grammar (root rule `root`) of the JSON text `schema` accepts."""
    try:
        return _Converter(schema).grammar()
    except RecursionError:
        raise GrammarError("the schema nests too deeply") from None


@functools.cache
def json_object_gbnf() -> str:
    """The grammar of `response_format: json_object`: any JSON object."""
    return schema_to_gbnf({"type": "object"})


def check_grammar(vocab: Any, gbnf: str) -> None:
    """Parse `gbnf` with llama.cpp against `vocab` (what the decode thread will do) and free it;
    a grammar llama.cpp refuses (its sampler would be NULL) is a GrammarError."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise GrammarError("llama.cpp cannot enforce the schema's grammar (e.g. a $ref that "
                           "refers back to itself before any content)")
    llama_cpp.llama_sampler_free(sampler)


def tool_call_gbnf(tools: Any, name: str | None, parallel: bool, reasoning: bool) -> str:
    """The grammar of Qwen2.5 / Hermes call blocks
    `<tool_call>\\n{"name": "fn", "arguments": ARGS}\\n</tool_call>` whose ARGS satisfy the
    function's `parameters` schema: of the function `name`, or of any of `tools` (None, as
    `tool_choice` "required" asks); one block, or (`parallel`) one or more separated by newlines.
    `reasoning`: the prompt opened a think block, so any text without `</think>` comes first, then
    `</think>` and a little whitespace. A function without `parameters` takes `{}`."""
    if not isinstance(tools, list) or not tools:
        raise GrammarError("at tools: a non-empty list of tools is needed")
    conv = _Converter(None)
    end = gbnf_literal("}\n" + TOOL_CALL_CLOSE)
    blocks = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}].function"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise GrammarError(f"at {where}.name: a function with a name is needed")
        if name is not None and function["name"] != name:
            continue
        head = f'{TOOL_CALL_OPEN}\n{{"name": {json_text(function["name"])}, "arguments": '
        conv.spend(len(head), ())
        arguments = _arguments(conv, function.get("parameters"), where)
        blocks.append(conv.rule("tool-call", f"{gbnf_literal(head)} {arguments} {end}"))
    if not blocks:
        raise GrammarError(f"at tool_choice.function.name: no function {name!r} among the tools")
    call = conv.rule("tool-calls", " | ".join(blocks))
    root = f'{call} ("\\n" {call})*' if parallel else call
    if reasoning:
        root = f"{_until(conv, THINK_CLOSE)} [ \\t\\n]{{0,4}} {root}"
    return conv.grammar(root)


def _arguments(conv: _Converter, parameters: Any, where: str) -> str:
    """The rule of a function's arguments: a JSON object `parameters` accepts."""
    where += ".parameters"
    if parameters is None:
        return conv.literal("{}", ())
    if not isinstance(parameters, dict):
        raise GrammarError(f"at {where}: parameters must be a JSON schema object")
    kind = parameters.get("type")
    if kind is None and "$ref" not in parameters:
        parameters = {**parameters, "type": "object"}
    elif kind is not None and kind != "object":
        raise GrammarError(f"at {where}/type: the arguments must be an object, not {kind!r}")
    return conv.visit_root(parameters, where)


def _until(conv: _Converter, stop: str) -> str:
    """A rule for any text up to and including the first `stop`: the states of a matcher for
    `stop` (state k: its first k characters just seen), one right-recursive rule each."""
    names = [conv.fresh(f"until-{k}") for k in range(len(stop))]

    def after(k: int, char: str) -> int:  # the longest prefix of `stop` that `seen` ends with
        seen = stop[:k] + char
        return next(j for j in range(len(seen), -1, -1) if stop.startswith(seen[len(seen) - j:]))

    for k, rule in enumerate(names):
        moves = {c: after(k, c) for c in set(stop)}
        alts = [gbnf_literal(c) + ("" if to == len(stop) else f" {names[to]}")
                for c, to in sorted(moves.items()) if to]
        others = "".join(_escape_char(ord(c)) for c, to in sorted(moves.items()) if to)
        alts.append(f"[^{others}] {names[0]}")
        conv.rules[rule] = " | ".join(alts)
    return names[0]
