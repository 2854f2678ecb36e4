"""A job's request as the sequence the engine runs: its prompt (the model's chat
template, with the tools and the conversation's calls), its sampling, its grammar
and its tool-call reader. Runs on the job's own thread, before the job joins the
batch: the grammar's compile never holds up a step."""

from __future__ import annotations

import json

from shared.spec import InferenceRequest, Message
from worker.engine.sampling import SamplingParams
from worker.engine.sequence import Sequence, eos_ids
from worker.grammar.constraint import compile_constraint, ll_tokenizer
from worker.grammar.grammar import grammar_for
from worker.grammar.tool_call_stream import ToolCallStream
from worker.grammar.tool_formats import ToolFormat, ToolsNotSupported, may_think, opens_thinking, tool_format_of


class InvalidRequest(Exception):
    code = "INVALID_REQUEST"


def template_message(message: Message) -> dict:
    """A message as chat templates read it: a call's arguments as the object they
    encode (templates write them with ``tojson``; the string would be encoded twice,
    a bug peers have had), a tool's answer with the call it answers."""
    out: dict = {"role": message.role, "content": message.content or ""}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def prompt_text(tokenizer, request: InferenceRequest) -> str | None:
    """The chat template's rendering of the messages (None for a raw prompt)."""
    if request.messages is None:
        return None
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"{request.model} has no chat template: send 'prompt' instead of 'messages'")
    messages = [template_message(m) for m in request.messages]
    # With tool_choice "none" too: the model still knows its tools (as vLLM's default); only calls are not read.
    tools = [tool.model_dump(mode="json", exclude_none=True) for tool in request.tools] if request.tools else None
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError, raise_exception() in templates
        raise InvalidRequest(f"{request.model}'s chat template rejected these messages: {e}") from e


def encode_prompt(tokenizer, request: InferenceRequest, text: str | None = None) -> list[int]:
    if request.messages is not None:
        text = prompt_text(tokenizer, request) if text is None else text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(request.prompt)["input_ids"]
    if not ids:
        if tokenizer.bos_token_id is None:
            raise InvalidRequest("the prompt encodes to no tokens")
        ids = [tokenizer.bos_token_id]
    return list(ids)


def logits_width(model) -> int:
    """How many ids the model's logits score (may exceed the tokenizer's vocabulary)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def sampling_params(request: InferenceRequest, vocab: int) -> SamplingParams:
    bias = []
    for token, value in (request.logit_bias or {}).items():
        if int(token) >= vocab:
            raise InvalidRequest(f"logit_bias: token id {token} is outside the model's vocabulary (0 to {vocab - 1})")
        bias.append((int(token), float(value)))
    return SamplingParams(
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        stop=tuple(request.stop),
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=tuple(bias),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


def prepare_sequence(model, tokenizer, request: InferenceRequest) -> Sequence:
    """The job's sequence; InvalidRequest, ToolsNotSupported or UnsupportedSchema
    (shared/json_grammar.py; all answered 400) for what the model cannot do as asked."""
    text = prompt_text(tokenizer, request)
    prompt_ids = encode_prompt(tokenizer, request, text)
    vocab = logits_width(model)
    stop_ids = eos_ids(model, tokenizer)
    fmt: ToolFormat | None = tool_format_of(tokenizer) if request.tool_mode != "none" else None
    thinking = "open" if text is not None and opens_thinking(text) else "may" if text is not None and may_think(tokenizer) else ""
    grammar = grammar_for(request, fmt, thinking)
    constraint = compile_constraint(grammar, tokenizer, vocab, stop_ids) if grammar is not None else None
    params = sampling_params(request, vocab)
    if params.logprobs:
        ll_tokenizer(tokenizer, vocab, stop_ids)  # each token's exact bytes, built here rather than in a step
    tool_calls = ToolCallStream(fmt, thinking) if fmt is not None else None
    return Sequence(model, tokenizer, prompt_ids, params, stop_ids, constraint, tool_calls)


__all__ = ["InvalidRequest", "ToolsNotSupported", "encode_prompt", "prepare_sequence"]
