"""Structured output and tools, side by side in one run, on one `hive worker`
behind `hive serve` (a real redis-server, the tiny random Llama of tests/tiny_models.py):

- (a) validity: every schema of bench/schemas/ sent as ``response_format``
  ``json_schema`` strict (and one ``json_object``), temperature 1, through the
  official ``openai`` client; each answer checked with ``jsonschema`` (formats
  included). The model is random: a valid answer can only come from the grammar.
  Each ends valid, refused with a 400 (its code), INVALID (a 200 whose text breaks
  the schema; the target is none), truncated (``length``) or another error;
- (b) cost per token: the same streams with and without a schema that cannot
  close within max_tokens, at N=1 and N=16 concurrent streams;
- (c) step stall: 16 plain streams run; a request with 50 tools and
  ``tool_choice: "required"`` joins them; the longest gap between chunks of the 16
  while it runs over their usual gap before it. Measured the same way: a plain
  request with the same prompt joining, and nobody joining (the machine's own noise).

    python -m bench.structured                        # the whole run (~3 min here)
    python -m bench.structured --parts validity --runs 1 --no-write

The corpus: one JSON Schema a file, ``bench/schemas/<category>/<name>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cluster import one_worker_cluster
from bench.doc import replace_section
from bench.figure import Figure, spread
from tests.tiny_models import build_model

CORPUS = Path(__file__).resolve().parent / "schemas"
MODEL = "bench/tiny-structured"
PARTS = ("validity", "cost", "stall")
OUTCOMES = ("valid", "refused", "INVALID", "truncated", "error")
MESSAGES = [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": "Fill in the form."}]
#: (b): an object no answer can close within COST_TOKENS tokens.
COST_SCHEMA = {
    "type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["items"], "additionalProperties": False,
}
COST_TOKENS, COST_NS = 64, (1, 16)
#: (c): the running streams, the chunks each has before the join, the joiner's tools.
STALL_STREAMS, STALL_TOKENS, JOIN_AFTER, JOINER_TOKENS, TOOLS = 16, 400, 24, 160, 50
#: Hermes-style (its ``<tool_call>`` is what the worker recognises), listing the tools
#: by name only: their 50 schemas in full are ~31k tokens of the tiny model's 384-token
#: vocabulary, past its 2,048-token context. The grammar still holds every schema.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}\n"
    "Answer with a call within <tool_call></tool_call> tags.\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class CorpusSchema:
    name: str
    category: str
    schema: dict


JSON_OBJECT = CorpusSchema("json_object", "json_object", {"type": "object"})


def load_corpus(folder: Path = CORPUS) -> list[CorpusSchema]:
    """Every ``<category>/<name>.json`` under ``folder``, sorted by category and name."""
    return [CorpusSchema(p.stem, p.parent.name, json.loads(p.read_text())) for p in sorted(folder.glob("*/*.json"))]


def validation_errors(schema: dict, instance: object) -> list[str]:
    """What ``instance`` breaks of ``schema`` (its ``$schema``'s draft, 2020-12 when
    none), formats included as far as jsonschema's FormatChecker knows them."""
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for

    cls = validator_for(schema, default=Draft202012Validator)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:160]}" for e in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(instance)]


def classify(schema: dict, finish_reason: str | None, text: str) -> tuple[str, str]:
    """(outcome, detail) of a 200 answer."""
    if finish_reason == "length":
        return "truncated", ""
    try:
        instance = json.loads(text)
    except ValueError as e:
        return "INVALID", f"not JSON ({e}): {text[:80]!r}"
    errors = validation_errors(schema, instance)
    return ("INVALID", f"{errors[0]} (and {len(errors) - 1} more)" if len(errors) > 1 else errors[0]) if errors else ("valid", "")


def response_format(entry: CorpusSchema) -> dict:
    if entry is JSON_OBJECT:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": entry.name, "schema": entry.schema, "strict": True}}


async def validity_run(url: str, corpus: list[CorpusSchema], max_tokens: int, concurrency: int, seed: int) -> list[dict]:
    """Each entry once, ``concurrency`` at a time: its outcome, detail and completion tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(k: int, entry: CorpusSchema) -> dict:
        row = {"name": entry.name, "category": entry.category, "tokens": 0}
        async with gate:
            try:
                answer = await client.chat.completions.create(
                    model=MODEL, messages=MESSAGES, response_format=response_format(entry), max_tokens=max_tokens, temperature=1.0, seed=seed + k,
                )
            except openai.APIStatusError as e:
                body = e.body if isinstance(e.body, dict) else {}
                body = body.get("error", body)
                outcome = "refused" if e.status_code == 400 else "error"
                detail = str(body.get("message") or e.message).splitlines()[0][:240]
                return row | {"outcome": outcome, "code": f"{e.status_code} {body.get('code') or e.code}", "detail": detail}
            except openai.APIError as e:
                return row | {"outcome": "error", "code": type(e).__name__, "detail": str(e)[:200]}
        choice = answer.choices[0]
        outcome, detail = classify(entry.schema, choice.finish_reason, choice.message.content or "")
        return row | {"outcome": outcome, "code": "", "detail": detail, "tokens": answer.usage.completion_tokens if answer.usage else 0}

    try:
        return list(await asyncio.gather(*(one(k, entry) for k, entry in enumerate(corpus))))
    finally:
        await client.close()


class Refused(Exception):
    """A request the hive answered with an error instead of a stream."""

    def __init__(self, status: int | str, body: bytes | dict):
        error = (json.loads(body) if isinstance(body, bytes) else body).get("error", {})
        self.code = f"{status} {error.get('code')}"
        super().__init__(f"{self.code}: {str(error.get('message')).splitlines()[0][:240]}")


@dataclass
class Stream:
    sent_at: float = field(default_factory=time.perf_counter)
    arrivals: list[float] = field(default_factory=list)  # each chunk with text or a tool call
    tokens: int = 0  # usage.completion_tokens
    prompt_tokens: int = 0
    finish_reason: str | None = None
    #: The answer put together from its deltas: its text, and its tool calls by index.
    text: str = ""
    tool_calls: dict[int, dict] = field(default_factory=dict)

    def add(self, delta: dict) -> None:
        self.text += delta.get("content") or ""
        for part in delta.get("tool_calls") or []:
            call = self.tool_calls.setdefault(part.get("index", 0), {"id": part.get("id"), "function": {"name": "", "arguments": ""}})
            for key in ("name", "arguments"):
                call["function"][key] += (part.get("function") or {}).get(key) or ""


async def sse_lines(response: httpx.Response) -> AsyncIterator[bytes]:
    """The response's lines, split at line feeds only: httpx's aiter_lines also splits
    at U+2028, U+0085 and the like, which a random model's text holds unescaped."""
    pending = b""
    async for data in response.aiter_bytes():
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, stream: Stream) -> Stream:
    """One streamed chat completion, the arrival time of each chunk recorded in ``stream``."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    stream.sent_at = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise Refused(response.status_code, await response.aread())
        async for line in sse_lines(response):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            now, data = time.perf_counter(), json.loads(line[6:])
            if "error" in data:
                raise Refused("mid-stream", data)
            if data.get("usage"):
                stream.tokens, stream.prompt_tokens = data["usage"]["completion_tokens"], data["usage"]["prompt_tokens"]
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    stream.arrivals.append(now)
                    stream.add(delta)
                stream.finish_reason = choice.get("finish_reason") or stream.finish_reason
    return stream


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(10, read=600, pool=None), limits=httpx.Limits(max_connections=64))


def no_eos(tokenizer) -> dict:
    """A logit bias that keeps the model from ending early, as both sides of (b) and (c) send."""
    return {str(tokenizer.eos_token_id): -100}


async def cost_wave(url: str, n: int, body: dict) -> dict:
    """N equal streams at once: aggregate tokens/s (all tokens over the wall time),
    the median stream's decode rate (after its first token) and first-token time."""
    async with new_client() as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(stream_chat(client, url, body, Stream()) for _ in range(n)))
        wall = time.perf_counter() - start
    rates = [(s.tokens - 1) / (s.arrivals[-1] - s.arrivals[0]) for s in streams if len(s.arrivals) > 1 and s.arrivals[-1] > s.arrivals[0]]
    return {
        "aggregate": sum(s.tokens for s in streams) / wall, "per_stream": statistics.median(rates) if rates else 0.0,
        "ttft": statistics.median(s.arrivals[0] - s.sent_at for s in streams if s.arrivals),
    }


def cost_bodies(tokenizer) -> dict[str, dict]:
    plain = {"model": MODEL, "messages": MESSAGES, "max_tokens": COST_TOKENS, "temperature": 1.0, "logit_bias": no_eos(tokenizer)}
    constrained = plain | {"response_format": {"type": "json_schema", "json_schema": {"name": "long_list", "schema": COST_SCHEMA, "strict": True}}}
    return {"unconstrained": plain, "constrained": constrained}


async def refused_schemas(url: str, corpus: list[CorpusSchema]) -> set[str]:
    """The names of the schemas the hive refuses as ``response_format`` (one token asked of each)."""
    async with new_client() as client:
        answers = await asyncio.gather(*(
            client.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "response_format": response_format(e)})
            for e in corpus
        ))
    return {e.name for e, answer in zip(corpus, answers) if answer.status_code == 400}


def tool_definitions(corpus: list[CorpusSchema], left_out: set[str], count: int = TOOLS) -> list[dict]:
    """``count`` tools from the corpus's tool-parameter and extraction schemas (those
    ``left_out`` left out): OpenAI function declarations, strict."""
    picked = [e for category in ("tool_parameters", "extraction") for e in corpus if e.category == category and e.name not in left_out][:count]
    return [
        {"type": "function", "function": {
            "name": e.name, "description": e.schema.get("description") or f"Record a {e.name.replace('_', ' ')}.", "parameters": e.schema, "strict": True,
        }}
        for e in picked
    ]


def gaps_around(streams: list[Stream], joined: float, done: float) -> tuple[float, float]:
    """(the median stream's mean gap between chunks before ``joined``, the longest gap
    of any stream that overlaps ``joined``–``done``), each stream's first chunks (its
    prefill) left out. A mean, not a median of gaps: the relay sometimes hands a
    stream's chunks over in bursts, and a burst's near-zero gaps would halve a median."""
    means, longest = [], 0.0
    for stream in streams:
        times = stream.arrivals[4:]
        early = [t for t in times if t <= joined]
        if len(early) > 1:
            means.append((early[-1] - early[0]) / (len(early) - 1))
        longest = max([longest, *(b - a for a, b in zip(times, times[1:]) if b > joined and a < done)])
    return statistics.median(means), longest


def check_tool_calls(stream: Stream, tools: list[dict]) -> str:
    """"valid", or what is wrong with the joiner's tool calls."""
    calls = list(stream.tool_calls.values())
    if not calls:
        return f"no tool call (text {stream.text[:40]!r})"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        name = call["function"]["name"]
        if name not in schemas:
            return f"called {name!r}, not a declared tool"
        try:
            arguments = json.loads(call["function"]["arguments"])
        except ValueError:
            return f"{name}: arguments are not JSON"
        errors = validation_errors(schemas[name], arguments)
        if errors:
            return f"{name}: {errors[0]}"
    return "valid"


def joiners(tools: list[dict]) -> dict[str, dict | None]:
    """(c)'s joiners: nobody (the machine's own noise over a window as long), a plain
    request with the very prompt TOOLS_TEMPLATE gives the tools request, and that request."""
    listing = {"role": "system", "content": "Tools: " + " ".join(t["function"]["name"] for t in tools) + "\nAnswer with a call within <tool_call></tool_call> tags."}
    return {
        f"{len(tools)} tools, tool_choice required": {"messages": MESSAGES, "max_tokens": JOINER_TOKENS, "tools": tools, "tool_choice": "required"},
        "plain request, the same prompt": {"messages": [listing, *MESSAGES], "max_tokens": JOINER_TOKENS},
        "nobody (the noise floor)": None,
    }


async def stall_trial(url: str, tokenizer, joiner: dict | None, tools: list[dict], window_s: float) -> dict:
    """16 plain streams; once each has JOIN_AFTER chunks, ``joiner`` is sent (None:
    nothing, for ``window_s``). The longest gap of the 16 while it is in flight over
    their median gap before it."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": STALL_TOKENS, "temperature": 1.0, "logit_bias": no_eos(tokenizer)}
    streams = [Stream() for _ in range(STALL_STREAMS)]
    joining = Stream()
    async with new_client() as client:
        running = asyncio.gather(*(stream_chat(client, url, body, s) for s in streams))
        while min(len(s.arrivals) for s in streams) < JOIN_AFTER:
            if running.done():
                await running  # raises what ended them
                raise RuntimeError("the streams ended before the join")
            await asyncio.sleep(0.002)
        joined = time.perf_counter()
        refused = None
        try:
            if joiner is None:
                await asyncio.sleep(window_s)
            else:
                await stream_chat(client, url, {"model": MODEL, "temperature": 1.0, **joiner}, joining)
        except Refused as e:
            refused = str(e)
        done = time.perf_counter()
        await running
    median_gap, max_gap = gaps_around(streams, joined, done)
    result = {
        "joined_s": done - joined, "cut": sum(s.arrivals[-1] < done for s in streams), "answer": "–",
        "first_s": joining.arrivals[0] - joined if joining.arrivals else float("nan"),
        "median_gap": median_gap, "max_gap": max_gap,
    }
    result["ratio"] = result["max_gap"] / result["median_gap"]
    if refused:
        result["refused"] = refused
    elif joiner is not None:
        calls = "text" if "tools" not in joiner else "calls cut at max_tokens" if joining.finish_reason == "length" else check_tool_calls(joining, tools)
        result["answer"] = f"{calls}, {joining.finish_reason}, prompt {joining.prompt_tokens} tokens"
    return result


def validity_report(runs: list[list[dict]]) -> tuple[str, list[Figure]]:
    categories = list(dict.fromkeys(row["category"] for row in runs[0]))
    counts = lambda rows, outcome, category=None: sum(r["outcome"] == outcome and category in (None, r["category"]) for r in rows)  # noqa: E731
    lines = ["| category | schemas | " + " | ".join(OUTCOMES) + " |", "| --- | --- |" + " --- |" * len(OUTCOMES)]
    for category in [*categories, None]:
        size = sum(category in (None, r["category"]) for r in runs[0])
        cells = [spread([counts(rows, o, category) for rows in runs], "g") for o in OUTCOMES]
        lines.append(f"| {category or '**all**'} | {size} | " + " | ".join(cells) + " |")
    details = []
    for outcome, title in (("refused", "Refused (400)"), ("INVALID", "INVALID (200, breaks its schema)"), ("error", "Other errors")):
        seen = {(r["category"], r["name"]): f"{r['code']} {r['detail']}".strip() for rows in runs for r in rows if r["outcome"] == outcome}
        if seen:
            details.append(f"{title}, {len(seen)}:\n\n" + "\n".join(f"- {c}/{n}: {d}" for (c, n), d in sorted(seen.items())))
    truncated = sorted({f"{r['category']}/{r['name']}" for rows in runs for r in rows if r["outcome"] == "truncated"})
    if truncated:
        details.append(f"Truncated (finish_reason length) in some run, {len(truncated)}: " + ", ".join(truncated))
    answered = [r["tokens"] for rows in runs for r in rows if r["outcome"] in ("valid", "INVALID")]
    if answered:
        details.append(f"Completion tokens of the finished answers: median {statistics.median(answered):.0f}, max {max(answered)}.")
    invalid = max(counts(rows, "INVALID") for rows in runs)
    refused = spread([counts(rows, "refused") for rows in runs], "g")
    codes = sorted({r["code"].split()[-1] for rows in runs for r in rows if r["outcome"] == "refused"})
    figures = [
        Figure("structured", "200 answers that break their schema (INVALID), worst run", "0", f"{invalid} of {len(runs[0])}", invalid == 0),
        Figure("structured", "schemas refused with a 400", "report", f"{refused} of {len(runs[0])} ({', '.join(codes) or 'none'})", None),
    ]
    return "\n".join(lines) + "\n\n" + "\n\n".join(details), figures


def cost_report(results: dict) -> tuple[str, list[Figure]]:
    lines = ["| mode | N | tokens/s a stream | tokens/s all streams | first token (s) |", "| --- | --- | --- | --- | --- |"]
    for (mode, n), rs in results.items():
        if isinstance(rs, str):
            lines.append(f"| {mode} | {n} | {rs} | | |")
            continue
        lines.append(f"| {mode} | {n} | {spread([r['per_stream'] for r in rs], '.1f')} | {spread([r['aggregate'] for r in rs], '.1f')} | "
                     f"{statistics.median(r['ttft'] for r in rs):.2f} |")
    figures = []
    for n in COST_NS:
        plain, constrained = results.get(("unconstrained", n)), results.get(("constrained", n))
        if isinstance(constrained, str) or isinstance(plain, str) or not plain:
            figures.append(Figure("structured", f"constrained / unconstrained tokens/s, N={n}", "≥ 0.9×" if n == 16 else "report", "refused", False if n == 16 else None))
            continue
        key = "aggregate" if n > 1 else "per_stream"
        ratio = statistics.median(r[key] for r in constrained) / statistics.median(r[key] for r in plain)
        target = n == 16
        figures.append(Figure("structured", f"constrained / unconstrained tokens/s ({key.replace('_', ' ')}), N={n}", "≥ 0.9×" if target else "report",
                              f"{ratio:.2f}×", ratio >= 0.9 if target else None))
    return "\n".join(lines), figures


def stall_report(results: dict) -> tuple[str, list[Figure]]:
    lines = ["| joiner | gap before (ms) | max gap while it runs (ms) | max / before | its first chunk / last (s) | its answer |",
             "| --- | --- | --- | --- | --- | --- |"]
    figures = []
    for joiner, rs in results.items():
        refused = [r["refused"] for r in rs if "refused" in r]
        if refused:
            lines.append(f"| {joiner} | refused: {refused[0]} | | | | |")
            if "tool_choice" in joiner:
                figures.append(Figure("structured", "longest gap between chunks / the gap before, while a 50-tool request joins 16 streams", "≤ 1.5×", "refused", False))
            continue
        cut = sum(r["cut"] for r in rs)
        timing = f"{statistics.median(r['first_s'] for r in rs):.2f} / {statistics.median(r['joined_s'] for r in rs):.2f}".replace("nan", "–")
        lines.append(f"| {joiner} | {spread([r['median_gap'] * 1000 for r in rs], '.1f')} | {spread([r['max_gap'] * 1000 for r in rs], '.1f')} | "
                     f"{spread([r['ratio'] for r in rs], '.2f')} | {timing} | "
                     f"{'; '.join(dict.fromkeys(r['answer'] for r in rs))}{f' ({cut} streams ended first)' if cut else ''} |")
        ratio = statistics.median(r["ratio"] for r in rs)
        if "tool_choice" in joiner:
            figures.append(Figure("structured", "longest gap between chunks / the gap before, while a 50-tool request joins 16 streams", "≤ 1.5×", f"{ratio:.2f}×", ratio <= 1.5))
        else:
            figures.append(Figure("structured", f"the same, {joiner}", "report", f"{ratio:.2f}×", None))
    return "\n".join(lines), figures


def main(argv: list[str] | None = None) -> list[Figure]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=1024, help="(a)'s max_tokens: a random model writes long strings")
    parser.add_argument("--concurrency", type=int, default=16, help="(a)'s requests in flight")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(set(parts) - set(PARTS)))}")
    try:
        import jsonschema  # noqa: F401  (what (a) and (c) check answers with)
    except ImportError:
        raise SystemExit("bench.structured checks answers with jsonschema: pip install 'jsonschema[format-nongpl]'") from None
    from transformers import AutoTokenizer

    corpus = load_corpus()
    validity: list[list[dict]] = []
    cost: dict = {}
    stall: dict = {}
    with tempfile.TemporaryDirectory(prefix="hive-bench-structured-") as tmp:
        root = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(build_model(root / "hub" / MODEL, chat_template=TOOLS_TEMPLATE))
        with one_worker_cluster(root, "--max-batch", "32") as cluster:
            if "validity" in parts:
                for run in range(args.runs):
                    rows = asyncio.run(validity_run(cluster.url, [*corpus, JSON_OBJECT], args.max_tokens, args.concurrency, seed=1000 * run))
                    validity.append(rows)
                    print(f"validity run {run + 1}: " + ", ".join(f"{o} {sum(r['outcome'] == o for r in rows)}" for o in OUTCOMES), flush=True)
            if "cost" in parts:
                bodies = cost_bodies(tokenizer)
                for body in bodies.values():
                    try:
                        asyncio.run(cost_wave(cluster.url, 1, body))  # warm: the path hot, a grammar compiled once
                    except Refused:
                        pass  # reported below, by the measured waves
                for run in range(args.runs):
                    for n in COST_NS:
                        for mode, body in bodies.items():  # alternated, so drift hits both
                            if isinstance(cost.get((mode, n)), str):
                                continue
                            try:
                                cost.setdefault((mode, n), []).append(asyncio.run(cost_wave(cluster.url, n, body)))
                            except Refused as e:
                                cost[(mode, n)] = f"refused: {e}"
                            print(f"cost {mode} N={n}: {cost[(mode, n)] if isinstance(cost[(mode, n)], str) else cost[(mode, n)][-1]}", flush=True)
            if "stall" in parts:
                tools = tool_definitions(corpus, asyncio.run(refused_schemas(cluster.url, corpus)))
                for run in range(args.runs):
                    window = 2.0
                    for name, joiner in joiners(tools).items():
                        result = asyncio.run(stall_trial(cluster.url, tokenizer, joiner, tools, window))
                        window = result["joined_s"] if "refused" not in result else window  # nobody's window: the last joiner's
                        stall.setdefault(name, []).append(result)
                        print(f"stall, {name}: {result}", flush=True)
    sections, figures = [], []
    for title, results, report in (("(a) Validity", validity, validity_report), ("(b) Cost per token", cost, cost_report), ("(c) Step stall", stall, stall_report)):
        if results:
            text, found = report(results)
            sections.append(f"### {title}\n\n{text}")
            figures += found
    verdicts = "\n".join(f"- {f.figure}: {f.measured} — target {f.target} {'met' if f.met else 'MISSED' if f.met is False else '(reported)'}" for f in figures)
    report = "\n\n".join([*sections, verdicts])
    print(report)
    if not args.no_write:
        write_doc(report, args, len(corpus))
    return figures


def write_doc(report: str, args, corpus_size: int) -> None:
    command = f"python -m bench.structured --runs {args.runs} --max-tokens {args.max_tokens} --concurrency {args.concurrency}"
    if args.parts != ",".join(PARTS):
        command += f" --parts {args.parts}"
    replace_section(
        "Structured output and tools",
        f"""## Structured output and tools

`{command}` on this machine ({os.cpu_count()} cores, no GPU; redis-server, the hive, the worker and the
load generator share them), {time.strftime('%Y-%m-%d')}. One worker (`--max-batch 32`) serving the tiny Llama
of tests/tiny_models.py (hidden 64, 4 layers, random weights, a 384-token byte-level vocabulary), temperature 1:
the model is random, so a valid answer comes from the grammar alone. Medians of {args.runs} runs with min–max.

(a) The {corpus_size} schemas of bench/schemas/ (JSONSchemaBench-style: tool parameters, extraction, pydantic
output, recursion, formats, numbers, composition, arrays, additionalProperties, and deliberately hard ones), each
as `response_format` `json_schema` strict, plus one `json_object` request, through the `openai` client,
max_tokens {args.max_tokens}, {args.concurrency} in flight; each answer checked with `jsonschema` against its schema,
formats included. valid; refused: a 400 (its code); INVALID: a 200 that breaks its schema (target: none);
truncated: it ended by `length` (a random model writes long strings and numbers); error: anything else.
(b) N equal streamed requests of {COST_TOKENS} tokens (EOS biased away on both sides), unconstrained and with a schema no
answer can close within them (an object holding at least 64 strings); tokens/s a stream counts from its first token;
all streams: every token over the wave's wall time. A 384-token vocabulary makes each mask cheap, and the tiny model
makes each step cheap, so the figure weighs the engine's own per-row work, not llguidance's mask over a real vocabulary.
(c) {STALL_STREAMS} streams of up to {STALL_TOKENS} tokens; once each has {JOIN_AFTER} chunks, one request joins (streamed,
max_tokens {JOINER_TOKENS}); the longest gap between two chunks of any of the 16 while it is in flight, over the median
stream's mean gap before the join. The tools request declares {TOOLS} corpus schemas (tool parameters, then extraction; those the hive
refuses as `response_format` left out), strict, with `tool_choice: "required"`. The model's template (hermes-style) lists the tools
by name only: in full, 50 schemas are ~31k tokens of this vocabulary, past the model's context; the grammar holds
every schema. The plain request is sent the very prompt the template renders for the tools request; "nobody" measures
a window as long with no request joining: the gaps this machine's scheduling makes by itself.

{report}
""",
    )


if __name__ == "__main__":
    main()
