"""A job's grammar, as llguidance's Lark: what ``tool_choice`` and
``response_format`` allow the answer to be.

- ``response_format`` json_object / json_schema: the answer is that JSON.
- ``tool_choice`` required: one or more calls (one when ``parallel_tool_calls`` is
  false), in the model's own format (worker/grammar/tool_formats.py), each with
  its tool's arguments schema; named: exactly one call of that function.
- ``auto``: free text (or the response format's JSON) until the format's trigger
  (``<tool_call>``, …); from the trigger on, calls as for ``required``. So a call
  the model starts is always well-formed, whatever sampling does.
- A thinking model is free until ``</think>`` (reasoning is not constrained).

Nothing to constrain: None, and the job samples as before.
"""

from __future__ import annotations

import json

from shared.json_grammar import json_rule
from shared.spec import InferenceRequest
from worker.grammar.tool_formats import ToolFormat

#: Free text that never contains ``trigger``: a lexeme of its own, so the first
#: trigger always starts the calls (a greedy ``(.|\n)*`` would swallow it).
_FREE_TEXT = 'TEXT: /(.|\\n)*/ & ~/(.|\\n)*{trigger}(.|\\n)*/'


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_escape(text: str) -> str:
    # llguidance reads \< \_ \: as classes (word boundaries): escape the metacharacters only.
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\/\"" else c for c in text).replace("\n", "\\n")


def _calls_rules(request: InferenceRequest, fmt: ToolFormat, after_trigger: bool) -> list[str]:
    """Rules ``calls`` (every call the answer makes, ``end`` included) and one
    ``fn_<k>`` per allowed function; ``after_trigger``: ``calls`` starts after the trigger."""
    tools = request.tools
    if request.tool_mode == "named":
        tools = [t for t in tools if t.function.name == request.tool_choice.function.name]
    arguments = [json_rule(tool.function.parameters, bool(tool.function.strict)) for tool in tools]
    rules = [f"fn_{k}: {_literal(fmt.head_for(tool.function.name))} {arguments[k]} {_literal(fmt.closer)}" for k, tool in enumerate(tools)]
    one = " | ".join(f"fn_{k}" for k in range(len(tools)))
    # The first call, from where the trigger leaves off.
    first_text = fmt.begin + fmt.opener
    if after_trigger:
        first_text = first_text[len(fmt.trigger) :]
    if after_trigger and not fmt.begin + fmt.opener:
        # The trigger is the start of the head itself: each function's rest follows it.
        firsts = []
        for k, tool in enumerate(tools):
            head = fmt.head_for(tool.function.name)[len(fmt.trigger) :]
            rules.append(f"first_{k}: {_literal(head)} {arguments[k]} {_literal(fmt.closer)}")
            firsts.append(f"first_{k}")
        first = "(" + " | ".join(firsts) + ")"
    else:
        first = (f"{_literal(first_text)} " if first_text else "") + f"({one})"
    parallel = request.parallel_tool_calls and fmt.parallel and request.tool_mode != "named"
    more = f" ({_literal(fmt.separator + fmt.opener)} ({one}))*" if parallel else ""
    end = f" {_literal(fmt.end)}" if fmt.end else ""
    rules.insert(0, f"calls: {first}{more}{end}")
    return rules


def _answer(request: InferenceRequest, fmt: ToolFormat | None) -> tuple[str, list[str]] | None:
    """The answer's rule and the rules it needs, or None when the answer is free."""
    response = request.response_format
    json_answer = None
    if response is not None and response.type != "text":
        schema = response.json_schema.json_schema if response.type == "json_schema" else None
        json_answer = json_rule(schema, strict=True)
    mode = request.tool_mode
    if mode in ("required", "named"):
        return "calls", _calls_rules(request, fmt, after_trigger=False)
    if mode == "auto":
        if json_answer is not None:
            # The answer is the JSON, or calls: the first token decides.
            return "(json_answer | calls)", [f"json_answer: {json_answer}", *_calls_rules(request, fmt, after_trigger=False)]
        rules = _calls_rules(request, fmt, after_trigger=True)
        rules += [f"trigger[lazy]: TEXT {_literal(fmt.trigger)}", _FREE_TEXT.replace("{trigger}", _regex_escape(fmt.trigger))]
        return "(TEXT | trigger calls)", rules
    if json_answer is not None:
        return "json_answer", [f"json_answer: {json_answer}"]
    return None


def grammar_for(request: InferenceRequest, fmt: ToolFormat | None, thinking: str) -> str | None:
    """The job's grammar, or None when nothing constrains its answer. ``thinking``:
    "open" (the prompt left a ``<think>`` block open), "may" (the model may open
    one), or "" (it does not think)."""
    answer = _answer(request, fmt)
    if answer is None:
        return None
    start, rules = answer
    if thinking == "open":
        start = f"reasoning {start}"
    elif thinking == "may":
        start = f"(\"<think>\" reasoning)? {start}"
    if thinking:
        # Reasoning is free up to the first "</think>", then the blank lines templates put after it.
        rules.append('reasoning[lazy]: THINKING "</think>" /[ \\n]{0,4}/')
        rules.append(_FREE_TEXT.replace("TEXT", "THINKING").replace("{trigger}", "<\\/think>"))
    return "\n".join(["%llguidance {}", f"start: {start}", *rules])
