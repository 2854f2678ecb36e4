"""JSON Schemas as llguidance grammars: one place for how Hive compiles them, so the
hive's check at submit and the worker's grammar agree.

llguidance (guidance-ai/llguidance) is the grammar engine: no dependencies (the
hive, which never imports torch, checks schemas with it too), its compile is
sub-millisecond for a tool's schema here (agents send a different tool list on
almost every call), and it names what it cannot enforce. The choice against
xgrammar is measured in docs/benchmarks.md ("Structured output and tools").
"""

from __future__ import annotations

import copy
import json

#: The JSON's layout: one space after ``:`` and ``,`` as Python's json.dumps and
#: most models write it, and no other whitespace. Flexible whitespace lets a
#: sampled answer run on in blanks to max_tokens: peers had to add a switch
#: against it; here compact output is the only behaviour.
LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
#: ``json_object``: any JSON object.
ANY_OBJECT = {"type": "object"}


class UnsupportedSchema(ValueError):
    """A schema the grammar engine cannot enforce: the request is refused (400)."""

    code = "UNSUPPORTED_SCHEMA"


def with_layout(schema: dict | None, strict: bool) -> dict:
    """The schema with Hive's layout for llguidance (its ``x-guidance`` key).
    ``strict``: a keyword llguidance cannot enforce is an error; otherwise it is
    left unenforced (``lenient``), as a non-strict tool's schema is a hint."""
    schema = copy.copy(schema) if schema else dict(ANY_OBJECT)
    schema["x-guidance"] = {**LAYOUT, "lenient": not strict}
    return schema


def json_rule(schema: dict | None, strict: bool) -> str:
    """A Lark rule body for llguidance: ``%json {...}``."""
    return "%json " + json.dumps(with_layout(schema, strict), ensure_ascii=False)


def schema_problem(schema: dict | None, strict: bool) -> str | None:
    """Why the schema cannot be enforced, or None. No tokenizer needed."""
    from llguidance import LLMatcher  # here: the hive imports this module for every request's checks

    grammar = "%llguidance {}\nstart: " + json_rule(schema, strict)
    try:
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, RuntimeError, TypeError, OverflowError) as e:  # a schema llguidance cannot even read
        return str(e)
    if failed:
        return "; ".join(messages)
    return None


def check_schema(schema: dict | None, strict: bool, where: str) -> None:
    problem = schema_problem(schema, strict)
    if problem is not None:
        raise UnsupportedSchema(f"{where}: {problem}")
