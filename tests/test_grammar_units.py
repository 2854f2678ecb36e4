"""The grammar and the tool-call reader together, without servers: under random
logits (any model at all), every answer the grammar lets through is read back as
well-formed calls whose streamed fragments join to the final arguments; and the
sampling's bias and penalties change the logits as OpenAI and transformers say."""

from __future__ import annotations

import json

import pytest
import torch

from shared.spec import InferenceRequest
from tests.tiny_models import TOOL_CHAT_TEMPLATE, build_tokenizer
from worker.engine.sampling import Penalties, SamplingParams
from worker.grammar.constraint import compile_constraint
from worker.grammar.grammar import grammar_for
from worker.grammar.tool_call_stream import ToolCallStream
from worker.grammar.tool_formats import FORMATS, ToolsNotSupported, tool_format_of

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5}}, "required": ["q"], "additionalProperties": False},
        },
    },
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def generate(tokenizer, request: InferenceRequest, fmt, thinking: str, seed: int, forced: str = "", steps: int = 300):
    """Samples under the grammar from random logits; ``forced`` text is pushed
    (strongly favoured) at the start, as a model that opens a call would."""
    vocab = len(tokenizer)
    stop = frozenset({tokenizer.eos_token_id})
    constraint = compile_constraint(grammar_for(request, fmt, thinking), tokenizer, vocab, stop)
    reader = ToolCallStream(fmt, thinking)
    generator = torch.Generator().manual_seed(seed)
    favoured = tokenizer(forced)["input_ids"] if forced else []
    content, deltas, ids = "", [], []
    for step in range(steps):
        logits = torch.randn(vocab, generator=generator)
        if step < len(favoured):
            logits[favoured[step]] += 50
        constraint.allowed(logits)
        token = int(torch.argmax(logits))
        ids.append(token)
        if token in stop:
            break
        constraint.accept(token)
        text, new = reader.feed(tokenizer.decode(ids)[len(tokenizer.decode(ids[:-1])) :])
        content, deltas = content + text, deltas + new
        if constraint.finished:
            break
    text, new = reader.feed("", final=True)
    return content + text, deltas + new, reader, constraint.finished or ids[-1] in stop


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("mode", ["auto", "required", "named"])
@pytest.mark.parametrize("thinking", ["", "open"])
@pytest.mark.parametrize("parallel", [False, True])
def test_every_call_the_grammar_allows_is_read_back_whole(tokenizer, fmt, mode, thinking, parallel):
    choice = {"type": "function", "function": {"name": "search"}} if mode == "named" else mode
    body = {"model": "a/b", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel}
    request = InferenceRequest.model_validate(body)
    forced = ("</think>" if thinking else "") + (fmt.trigger if mode == "auto" else "")
    calls = 0
    for seed in range(4):
        content, deltas, reader, ended = generate(tokenizer, request, fmt, thinking, seed, forced)
        if not parallel:
            assert ended, "one bounded call ends within the steps"
        elif not ended:  # random logits may call on and on: the last call is cut short
            reader.calls.pop()
        if mode != "auto":
            assert reader.calls and not content.replace("</think>", "").strip(" \n") or thinking
        if mode == "named" or not fmt.parallel or not parallel:
            assert len(reader.calls) <= 1
        joined: dict[int, str] = {}
        for delta in deltas:
            joined[delta.index] = joined.get(delta.index, "") + delta.arguments
        for k, call in enumerate(reader.calls):
            arguments = json.loads(call.arguments)
            assert joined[k] == call.arguments and deltas[[d.index for d in deltas].index(k)].name == call.name
            if call.name == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("c", "f") and len(arguments["city"]) <= 6
            else:
                assert call.name == ("search" if mode == "named" else call.name) and "q" in arguments
        calls += len(reader.calls)
    assert calls >= 2


def test_free_text_without_the_trigger_is_content(tokenizer):
    fmt = FORMATS[0]
    reader = ToolCallStream(fmt)
    parts = [reader.feed(piece)[0] for piece in ("Hello <tool", "_ca", "ll? no: <tool_c")]
    parts.append(reader.feed("", final=True)[0])
    assert "".join(parts) == "Hello <tool_call? no: <tool_c" and not reader.calls


def test_a_template_without_a_tool_format_is_refused():
    tokenizer = build_tokenizer()
    with pytest.raises(ToolsNotSupported):
        tool_format_of(tokenizer)
    tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    assert tool_format_of(tokenizer).name == "hermes"
    # Llama 3.1's words, as its template says them.
    tokenizer.chat_template = """{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}"""
    assert tool_format_of(tokenizer).name == "llama3_json"


def test_bias_then_penalties_as_openai_and_transformers_define_them():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0, logit_bias=((0, 3.0),))
    penalties = Penalties(params, prompt_ids=[3], vocab_size=5, device=torch.device("cpu"))
    for token in (1, 1, 2):
        penalties.accept(token)
    logits = torch.tensor([1.0, 2.0, -2.0, 4.0, 1.0])
    out = penalties.apply(logits)
    # id 0: biased only; 1: seen twice (frequency 2 × 0.5, presence 0.25), then repeated (÷2);
    # 2: once, negative: ×2 after the penalties; 3: in the prompt only: ÷2; 4: untouched.
    assert out.tolist() == pytest.approx([4.0, (2.0 - 1.0 - 0.25) / 2, (-2.0 - 0.5 - 0.25) * 2, 2.0, 1.0])
    assert logits.tolist() == [1.0, 2.0, -2.0, 4.0, 1.0]  # the batch's row is left as it was


class _Silent:
    """A reporter and metrics that drop everything: the engine runs without Redis."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def token_commands(self, token) -> list[bytes]:
        return []


class _Refusing:
    """A grammar that breaks on its second token (what an engine bug would do)."""

    finished = False

    def __init__(self):
        self.seen = 0

    def fill(self, mask) -> None:
        mask.fill_(-1)  # every token allowed

    def accept(self, token_id: int) -> None:
        self.seen += 1
        if self.seen == 2:
            raise RuntimeError("the grammar refused token")


def test_a_row_whose_sampling_fails_ends_its_job_alone(tmp_path):
    """One job's grammar (or penalties) failing ends that job with its error; the
    batch's other jobs go on to their end."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_model
    from worker.engine.running_job import RunningJob
    from worker.engine.sequence import Sequence
    from worker.engine.step_loop import Engine

    folder = build_model(tmp_path / "m")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), build_tokenizer()
    engine = Engine(model, "units", None, 4, lambda: 1 << 40, _Silent())
    try:
        jobs = []
        for k, constraint in enumerate([_Refusing(), None]):
            job = RunningJob(str(k), "units", reporter=_Silent())
            job.sequence = Sequence(model, tokenizer, [1, 2, 3], SamplingParams(max_tokens=6, temperature=0), frozenset(), constraint)
            engine.add_job(job)
            jobs.append(job)
        for job in jobs:
            assert job.done.wait(60)
    finally:
        engine.stop()
    broken, fine = jobs
    assert isinstance(broken.outcome.error, RuntimeError) and broken.tokens == 2
    assert fine.outcome.error is None and fine.outcome.stop_reason == "max_tokens" and fine.tokens == 6
