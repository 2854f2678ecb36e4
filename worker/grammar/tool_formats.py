"""How a model family writes tool calls, and which format a model uses.

A model is prompted with its own chat template (``tools=`` passed in), so it writes
calls the way it was trained to. Each format here is what that template teaches:
the same text the grammar (worker/grammar/grammar.py) forces and the parser
(worker/grammar/tool_call_stream.py) reads back, so the two cannot disagree.

The format is recognised from the chat template's text. A template that declares
none of these gets a clear refusal (``ToolsNotSupported``), never a guessed format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ToolsNotSupported(ValueError):
    """The model's chat template declares no tool-call format Hive knows."""

    code = "TOOLS_NOT_SUPPORTED"


@dataclass(frozen=True)
class ToolFormat:
    """``begin`` [``opener`` ``head`` ARGUMENTS ``closer``] (``separator`` …) ``end``;
    ``head`` holds ``{name}``. ARGUMENTS is the call's JSON object."""

    name: str
    #: Substrings of a chat template that mark it as written for this format.
    marks: tuple[str, ...]
    opener: str
    head: str
    closer: str
    separator: str = "\n"
    begin: str = ""
    end: str = ""
    #: Whether the template renders several calls in one answer.
    parallel: bool = True

    def head_for(self, name: str) -> str:
        return self.head.replace("{name}", name)

    @property
    def trigger(self) -> str:
        """What starts the calls: from it on, the answer is constrained (``auto``)."""
        start = self.begin + self.opener
        return start or self.head[: self.head.index("{name}")]


#: Measured as common on the hub's most downloaded chat models with tool templates.
FORMATS = (
    # Qwen 2.5, 3, 3.5 and QwQ, Hermes 2 Pro and 3, and their many fine-tunes.
    ToolFormat(
        "hermes",
        marks=("<tool_call>",),
        opener="<tool_call>\n",
        head='{"name": "{name}", "arguments": ',
        closer="}\n</tool_call>",
        separator="\n",
    ),
    # Llama 3.1, 3.2 and 3.3: a JSON object with "parameters", one call per answer
    # (the template raises "This model only supports single tool-calls at once!").
    ToolFormat(
        "llama3_json",
        marks=('"parameters": dictionary of argument name and its value',),
        opener="",
        head='{"name": "{name}", "parameters": ',
        closer="}",
        parallel=False,
    ),
)


def tool_format_of(tokenizer) -> ToolFormat:
    """The format the tokenizer's chat template writes calls in; ToolsNotSupported otherwise."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the one tools use, else the default
        template = template.get("tool_use") or template.get("default") or ""
    for fmt in FORMATS:
        if any(mark in template for mark in fmt.marks):
            return fmt
    known = ", ".join(f.name for f in FORMATS)
    raise ToolsNotSupported(f"this model's chat template declares no tool-call format Hive reads (known: {known})")


_THINK_OPEN = re.compile(r"<think>\s*$")


def opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the answer inside a ``<think>`` block (the
    generation prompt of a thinking model opens it): the answer is unconstrained until ``</think>``."""
    return bool(_THINK_OPEN.search(prompt_text))


def may_think(tokenizer) -> bool:
    """Whether the model may open a ``<think>`` block of its own before its answer."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "</think>" in template
