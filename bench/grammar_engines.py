"""Grammar engines, side by side in one run, on the CPU: llguidance (what Hive uses)
and xgrammar, on a realistic 32k byte-level BPE vocabulary.

- tokenizer info: each engine's view of the vocabulary (llguidance.hf.from_tokenizer;
  xgrammar's TokenizerInfo.from_huggingface and a GrammarCompiler over it);
- JSON schema compile: every schema of bench/schemas/ as a strict ``response_format``
  (llguidance: the grammar Hive builds, worker/grammar/grammar.py; xgrammar:
  compile_json_schema with Hive's layout), a new schema each time (every property
  renamed per run: agents send different tool lists on almost every call, so a
  compile cache rarely hits); median, p99, max, and what each engine refuses;
- 50 tools, ``tool_choice: "required"``, hermes format (llguidance: Hive's Lark
  grammar; xgrammar: the equivalent structural tag, one tag per tool);
- mask per token along random walks through accepted answers: each step draws a
  token both engines allow, so both walk the very same answer.

xgrammar is installed for the run only (``pip install --target`` a temporary folder,
``--no-deps``): it needs torch, triton and apache-tvm-ffi, and Hive's environment
stays without it. No install, no import: llguidance is measured alone.

    python -m bench.grammar_engines              # the whole run (~1.5 min here)
    python -m bench.grammar_engines --runs 1 --walks 2 --no-write
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

from bench.doc import replace_section
from bench.structured import load_corpus, tool_definitions
from shared.spec import InferenceRequest
from worker.grammar.grammar import grammar_for
from worker.grammar.tool_formats import FORMATS

TITLE = "Grammar engines: llguidance and xgrammar"
VOCAB = 32_000
#: The training text's cap: about 10 s of BPE training on 2 cores.
CORPUS_BYTES = 8_000_000
EOS = "<|endoftext|>"
HERMES = next(f for f in FORMATS if f.name == "hermes")
TOOLS = 50
#: The schemas the random walks go through, and the 50-tool request.
WALK_SCHEMAS = ("tool_parameters/get_weather", "extraction/invoice", "composition/action_union", "recursive/comment_thread")
WALK_TOKENS = 200
TOOLS_WALK = f"{TOOLS} tools, required"


class Refused(Exception):
    """The engine cannot compile the grammar; the message says why."""


def why(error: Exception) -> str:
    """An engine's refusal in a line, without llguidance's grammar position and preamble."""
    line = str(error).strip().splitlines()[0]
    return re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", line)[:120]


def p99(values: list[float]) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def train_tokenizer():
    """A byte-level BPE of VOCAB tokens trained on this Python's standard library
    sources (no hub here), as a transformers tokenizer with an EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    files, size = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "test", "idlelib") or "tests" in parts:
            continue
        files.append(path)
        size += path.stat().st_size
        if size >= CORPUS_BYTES:
            break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator((p.read_text(errors="replace") for p in files), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS), size


def install_xgrammar(target: Path) -> tuple[object | None, str]:
    """xgrammar imported from ``target`` (pip-installed there now), and its version;
    or None and why not."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "--no-deps", "xgrammar", "apache-tvm-ffi"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"pip install failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    sys.path.insert(0, str(target))
    try:
        module = importlib.import_module("xgrammar")
    except (ImportError, OSError) as e:
        return None, f"import failed: {e}"
    return module, importlib.metadata.version("xgrammar")


def import_time(module: str, path: str | None) -> tuple[float, bool]:
    """Seconds ``import module`` takes in a fresh interpreter, and whether it imported torch."""
    env = dict(os.environ, PYTHONPATH=path) if path else None
    code = f"import time, sys; t = time.perf_counter(); import {module}; print(time.perf_counter() - t, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    return float(out[0]), out[1] == "True"


def renamed(schema, suffix: str):
    """``schema`` with every property name given ``suffix`` (and ``required`` to match):
    a schema no compile cache has seen, of the same shape."""
    if isinstance(schema, list):
        return [renamed(s, suffix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {f"{name}{suffix}": renamed(v, suffix) for name, v in value.items()}
        elif key == "required" and isinstance(value, list) and isinstance(schema.get("properties"), dict):
            out[key] = [f"{name}{suffix}" if name in schema["properties"] else name for name in value]
        else:
            out[key] = renamed(value, suffix)
    return out


def request_for(schema: dict | None = None, tools: list[dict] | None = None) -> InferenceRequest:
    body = {"model": "bench/grammar", "messages": [{"role": "user", "content": "Fill in the form."}]}
    if tools is not None:
        body.update(tools=tools, tool_choice="required")
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    return InferenceRequest.model_validate(body)


class Llguidance:
    """Hive's path: grammar_for's Lark grammar, an LLMatcher over Hive's tokenizer view."""

    name = "llguidance"

    def __init__(self, tokenizer):
        import llguidance
        import torch

        from worker.grammar.constraint import ll_tokenizer

        self._llguidance = llguidance
        self.version = importlib.metadata.version("llguidance")
        self.tokenizer = ll_tokenizer(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
        self.bitmask = torch.zeros((1, (len(tokenizer) + 31) // 32), dtype=torch.int32)

    @staticmethod
    def build_info(tokenizer) -> None:
        import llguidance.hf

        llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=[tokenizer.eos_token_id])

    def _matcher(self, grammar: str):
        matcher = self._llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise Refused(matcher.get_error())
        return matcher

    def compile_schema(self, schema: dict):
        return self._matcher(grammar_for(request_for(schema), None, ""))

    def compile_tools(self, tools: list[dict]):
        return self._matcher(grammar_for(request_for(tools=tools), HERMES, ""))

    def mask(self, matcher):
        matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        return self.bitmask

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.consume_token(token)

    @staticmethod
    def done(matcher) -> bool:
        return matcher.is_stopped()


class Xgrammar:
    """compile_json_schema with Hive's layout (no free whitespace, ", " and ": "), and
    for tools the structural tag equivalent to Hive's hermes grammar; ``cache``: the
    compiler's cache (on in a server: a long-lived compiler)."""

    def __init__(self, xgr, tokenizer, cache: bool):
        self._xgr = xgr
        self.name = f"xgrammar, cache {'on' if cache else 'off'}"
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=cache)
        self.bitmask = xgr.allocate_token_bitmask(1, len(tokenizer))

    @staticmethod
    def build_info(xgr, tokenizer) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])
        xgr.GrammarCompiler(info)

    def compile_schema(self, schema: dict):
        try:
            compiled = self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "), strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as e:
            raise Refused(str(e)) from e
        return self._xgr.GrammarMatcher(compiled)

    def tools_tag(self, tools: list[dict]):
        """``<tool_call>\\n{"name": "NAME", "arguments": ARGS}\\n</tool_call>``, one or more,
        "\\n" between: the language of Hive's hermes grammar for ``required``."""
        from xgrammar.structural_tag import JSONSchemaFormat, StructuralTag, TagFormat, TagsWithSeparatorFormat

        head, closer = HERMES.opener + HERMES.head, HERMES.closer
        tags = [
            TagFormat(begin=head.replace("{name}", t["function"]["name"]), content=JSONSchemaFormat(json_schema=t["function"]["parameters"]), end=closer)
            for t in tools
        ]
        return StructuralTag(format=TagsWithSeparatorFormat(tags=tags, separator=HERMES.separator, at_least_one=True))

    def compile_tools(self, tools: list[dict]):
        try:
            compiled = self.compiler.compile_structural_tag(self.tools_tag(tools))
        except (RuntimeError, ValueError, TypeError) as e:
            raise Refused(str(e)) from e
        return self._xgr.GrammarMatcher(compiled)

    def mask(self, matcher):
        matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    @staticmethod
    def accept(matcher, token: int) -> bool:
        return matcher.accept_token(token)

    @staticmethod
    def done(matcher) -> bool:
        return matcher.is_terminated()


def timed(call, *args):
    start = time.perf_counter()
    result = call(*args)
    return time.perf_counter() - start, result


@contextmanager
def native_stderr(lines: list[str]):
    """What native code writes to stderr meanwhile (xgrammar's C++ warnings), into ``lines``."""
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines.extend(captured.read().splitlines())


def measure_compiles(engines: list, corpus, runs: int) -> dict:
    """Per engine: compile seconds, compile + first mask seconds, seconds by schema,
    refusals {schema: why} and warnings {schema: {warning}}."""
    results = {e.name: {"compile": [], "first_mask": [], "by_schema": {}, "refused": {}, "warned": {}} for e in engines}
    for run in range(runs):
        for entry in corpus:
            schema = renamed(entry.schema, f"_{run}")
            for engine in engines:  # the same schema on each engine in turn, so drift hits all
                result = results[engine.name]
                key = f"{entry.category}/{entry.name}"
                if key in result["refused"]:
                    continue
                warnings: list[str] = []
                try:
                    with native_stderr(warnings):
                        seconds, matcher = timed(engine.compile_schema, schema)
                except Refused as e:
                    result["refused"][key] = why(e)
                    continue
                if warnings:
                    result["warned"].setdefault(key, set()).update(w.split("Warning: ", 1)[-1] for w in warnings)
                result["compile"].append(seconds)
                result["by_schema"].setdefault(key, []).append(seconds)
                result["first_mask"].append(seconds + timed(engine.mask, matcher)[0])
    return results


def measure_tools(engines: list, tools: list[dict], runs: int) -> dict:
    results = {e.name: {"compile": [], "first_mask": [], "refused": {}} for e in engines}
    for run in range(runs):
        variant = [{**t, "function": {**t["function"], "parameters": renamed(t["function"]["parameters"], f"_t{run}")}} for t in tools]
        for engine in engines:
            try:
                with native_stderr([]):
                    seconds, matcher = timed(engine.compile_tools, variant)
            except Refused as e:
                results[engine.name]["refused"][TOOLS_WALK] = why(e)
                continue
            results[engine.name]["compile"].append(seconds)
            results[engine.name]["first_mask"].append(seconds + timed(engine.mask, matcher)[0])
    return results


def allowed_ids(bitmask, vocab: int):
    import numpy as np

    bits = np.unpackbits(bitmask.numpy().view(np.uint8).reshape(-1), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def random_walk(engines: list, matchers: list, vocab: int, eos: int, rng: random.Random) -> tuple[list[list[float]], str]:
    """Mask seconds per token (the first mask left out: compile's), each engine; how the walk ended."""
    times: list[list[float]] = [[] for _ in engines]
    for step in range(WALK_TOKENS):
        common = None
        for k, (engine, matcher) in enumerate(zip(engines, matchers)):
            seconds, bitmask = timed(engine.mask, matcher)
            if step:
                times[k].append(seconds)
            common = bitmask.clone() if common is None else common & bitmask
        ids = allowed_ids(common, vocab)
        if not len(ids):
            return times, "diverged"
        token = int(ids[rng.randrange(len(ids))])
        if not all(engine.accept(m, token) for engine, m in zip(engines, matchers)):
            return times, "diverged"
        finished = [engine.done(m) for engine, m in zip(engines, matchers)]
        if any(finished):
            # llguidance stops once nothing but EOS may follow; xgrammar once it took EOS.
            others = [(engine, m) for engine, m, done in zip(engines, matchers, finished) if not done]
            complete = all(engine.accept(m, eos) and engine.done(m) for engine, m in others)
            return times, "complete" if complete else "diverged"
    return times, f"{WALK_TOKENS} tokens"


def measure_walks(engines: list, corpus, tools: list[dict], walks: int, vocab: int, eos: int) -> dict:
    """{case: {engine: [seconds per token]}, "ends": {case: [how each walk ended]}}."""
    by_name = {f"{e.category}/{e.name}": e.schema for e in corpus}
    cases = {name: (lambda engine, s=by_name[name]: engine.compile_schema(s)) for name in WALK_SCHEMAS}
    cases[TOOLS_WALK] = lambda engine: engine.compile_tools(tools)
    results: dict = {"ends": {}, "engines": [e.name for e in engines]}
    for case, compile_case in cases.items():
        for seed in range(walks):
            with native_stderr([]):
                matchers = [compile_case(engine) for engine in engines]
            times, end = random_walk(engines, matchers, vocab, eos, random.Random(seed))
            for engine, seconds in zip(engines, times):
                results.setdefault(case, {}).setdefault(engine.name, []).extend(seconds)
            results["ends"].setdefault(case, []).append(end)
    return results


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def compile_rows(results: dict, count: int | None = None) -> list[str]:
    rows = []
    for name, result in results.items():
        c, f = result["compile"], result["first_mask"]
        refused = f"{len(result['refused'])}" + (f" of {count}" if count else "")
        if not c:
            rows.append(f"| {name} | – | – | – | – | {refused} |")
            continue
        rows.append(f"| {name} | {ms(statistics.median(c))} | {ms(p99(c))} | {ms(max(c))} | {ms(statistics.median(f))} (p99 {ms(p99(f))}) | {refused} |")
    return rows


def report(facts: dict, compiles: dict, tools: dict, walks: dict, corpus_size: int) -> str:
    lines = ["| engine | tokenizer info (ms) | import (s) | imports torch |", "| --- | --- | --- | --- |"]
    for name, info in facts["info"].items():
        seconds, torch_too = facts["imports"][name]
        lines.append(f"| {name} | {ms(statistics.median(info))} ({ms(min(info))}–{ms(max(info))}) | {seconds:.2f} | {'yes' if torch_too else 'no'} |")
    head = ["| engine | compile median (ms) | p99 (ms) | max (ms) | compile + first mask, median (ms) | refused |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["", f"JSON schema compile, {corpus_size} schemas × {facts['runs']} runs (a new schema each time):", "", *head]
    lines += compile_rows(compiles, corpus_size)
    lines += ["", f"{TOOLS} tools, `tool_choice: \"required\"`, hermes format, {facts['tool_runs']} runs:", "", *head]
    lines += compile_rows(tools)
    lines += ["", f"Mask per token along {facts['walks']} random walks per case (≤ {WALK_TOKENS} tokens; the first mask left out):", ""]
    names = walks["engines"]
    lines += ["| case | tokens | walks ended | " + " | ".join(f"{n} median / p99 (µs)" for n in names) + " |", "| --- " * (3 + len(names)) + "|"]
    for case, per_engine in walks.items():
        if case in ("ends", "engines"):
            continue
        ends = walks["ends"][case]
        summary = ", ".join(f"{ends.count(e)} {e}" for e in sorted(set(ends)))
        cells = [f"{statistics.median(per_engine[n]) * 1e6:.0f} / {p99(per_engine[n]) * 1e6:.0f}" if per_engine.get(n) else "–" for n in names]
        lines.append(f"| {case} | {len(per_engine[names[0]])} | {summary} | " + " | ".join(cells) + " |")
    notes = [""]
    for name, result in compiles.items():
        slowest = sorted(result["by_schema"].items(), key=lambda item: -statistics.median(item[1]))[:3]
        notes.append(f"- {name}, slowest compiles (median): " + ", ".join(f"{k} {ms(statistics.median(v))} ms" for k, v in slowest))
    for name, result in [*compiles.items(), *tools.items()]:
        for schema, why in sorted(result["refused"].items()):
            notes.append(f"- {name} refuses {schema}: {why}")
    warned: dict[str, set[str]] = {}
    for name, result in compiles.items():
        for schema, warnings in result["warned"].items():
            for warning in warnings:
                warned.setdefault(f"{name.split(',')[0]} warns (and compiles): {warning}", set()).add(schema)
    notes += [f"- {warning}: {len(schemas)} schemas ({', '.join(sorted(schemas)[:4])}{', …' if len(schemas) > 4 else ''})" for warning, schemas in sorted(warned.items())]
    if len(compiles) > 1:
        llg, xgr = list(compiles.values())[:2]
        compiled = [k for k in llg["refused"] if k not in xgr["refused"]]
        silent = [k for k in compiled if k not in xgr["warned"]]
        notes.append(
            f"- of the {len(llg['refused'])} schemas llguidance refuses, xgrammar compiles {len(compiled)}: "
            f"{len(compiled) - len(silent)} with a warning, {len(silent)} without a word ({', '.join(sorted(silent))})"
        )
    return "\n".join(lines + sorted(set(notes), key=notes.index))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="compiles of each corpus schema, a new variant each run")
    parser.add_argument("--tool-runs", type=int, default=10, help="compiles of the 50-tool request")
    parser.add_argument("--walks", type=int, default=10, help="random walks per case")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tokenizer, corpus_bytes = train_tokenizer()
    vocab = len(tokenizer)
    print(f"tokenizer: byte-level BPE, {vocab} tokens, trained on {corpus_bytes / 1e6:.1f} MB of the standard library "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    corpus = load_corpus()
    with tempfile.TemporaryDirectory(prefix="hive-bench-xgrammar-") as target:
        xgr, xgr_version = install_xgrammar(Path(target))
        print(f"xgrammar: {xgr_version if xgr else 'not measured: ' + xgr_version}", flush=True)
        facts = {"runs": args.runs, "tool_runs": args.tool_runs, "walks": args.walks, "xgrammar": xgr_version if xgr else None}
        facts["imports"] = {"llguidance": import_time("llguidance", None)}
        facts["info"] = {"llguidance": [timed(Llguidance.build_info, tokenizer)[0] for _ in range(3)]}
        engines: list = [Llguidance(tokenizer)]
        facts["llguidance"] = engines[0].version
        if xgr is not None:
            facts["imports"]["xgrammar"] = import_time("xgrammar", target)
            facts["info"]["xgrammar"] = [timed(Xgrammar.build_info, xgr, tokenizer)[0] for _ in range(3)]
            facts["tvm_ffi"] = importlib.metadata.version("apache-tvm-ffi")
            engines += [Xgrammar(xgr, tokenizer, cache=True), Xgrammar(xgr, tokenizer, cache=False)]
        compiles = measure_compiles(engines, corpus, args.runs)
        print("schema compiles done", flush=True)
        # The 50 tools: corpus schemas no engine refuses (as bench.structured picks them).
        refused = {key.split("/", 1)[1] for result in compiles.values() for key in result["refused"]}
        tools = tool_definitions(corpus, refused, TOOLS)
        tool_compiles = measure_tools(engines, tools, args.tool_runs)
        print("tool compiles done", flush=True)
        walkers = engines[:2]  # xgrammar's cache does not touch its masks: one xgrammar walks
        walks = measure_walks(walkers, corpus, tools, args.walks, vocab, tokenizer.eos_token_id)
    facts["seconds"] = time.perf_counter() - start
    facts["vocab"], facts["corpus_bytes"] = vocab, corpus_bytes
    text = report(facts, compiles, tool_compiles, walks, len(corpus))
    print(text)
    print(conclusion(facts, compiles, tool_compiles, walks))
    print(f"total {facts['seconds']:.0f} s")
    if not args.no_write:
        write_doc(text, facts, args, compiles, tool_compiles, walks)
    return text


def paragraph(text: str, prefix: str = "") -> str:
    """``text`` wrapped for the doc (a bullet when ``prefix`` is "- ")."""
    return textwrap.fill(text, width=118, initial_indent=prefix, subsequent_indent=" " * len(prefix), break_on_hyphens=False, break_long_words=False)


def conclusion(facts: dict, compiles: dict, tools: dict, walks: dict) -> str:
    """Which engine, and why, from this run's figures."""
    light = (
        f"llguidance is one wheel with no dependencies: `import llguidance` takes {facts['imports']['llguidance'][0]:.2f} s and loads no "
        "torch, so the hive, which never imports torch, checks each schema at submit with the very engine the worker enforces it "
        "with (shared/json_grammar.py)"
    )
    if "xgrammar" not in facts["imports"]:
        return f"**Conclusion: llguidance** (xgrammar not measured here). {light}."
    med = statistics.median
    llg, warm, cold = (compiles[name] for name in list(compiles)[:3])
    tools_llg, tools_warm, tools_cold = (tools[name] for name in list(tools)[:3])
    cases = [c for c in walks if c not in ("ends", "engines")]
    llg_name, xgr_name = walks["engines"][:2]
    xgr_faster = [c for c in cases if med(walks[c][xgr_name]) < med(walks[c][llg_name])]
    llg_medians = [med(walks[c][llg_name]) * 1e6 for c in cases]
    xgr_medians = [med(walks[c][xgr_name]) * 1e6 for c in cases]
    dropped = sorted(k for k in warm["warned"] if k not in llg["refused"])
    silent = [k for k in llg["refused"] if k not in warm["refused"] and k not in warm["warned"]]
    bullets = [
        f"Compile, which a job waits for on its own thread before it joins the batch: a corpus schema takes "
        f"{ms(med(llg['first_mask']))} ms with llguidance, first mask included (p99 {ms(p99(llg['first_mask']))} ms), against "
        f"{ms(med(warm['first_mask']))} ms with xgrammar's warm compiler (p99 {ms(p99(warm['first_mask']))} ms, max {ms(max(warm['compile']))} ms) "
        f"and {ms(med(cold['first_mask']))} ms cold (p99 {ms(p99(cold['first_mask']))} ms); {TOOLS} tools take {ms(med(tools_llg['first_mask']))} ms "
        f"against {ms(med(tools_warm['first_mask']))} ms warm and {ms(med(tools_cold['first_mask']))} ms cold. xgrammar front-loads the work "
        "(it precomputes each grammar state's token masks over the vocabulary), which its cache repays only for what it has "
        "seen; agents send new tool lists, and on a small machine that work competes with the engine's steps for the cores.",
        f"Masks, which run on the engine's step and so weigh on every stream: xgrammar's are lighter at the median in "
        f"{len(xgr_faster)} of {len(cases)} cases (that precomputation; {min(xgr_medians):.0f}–{max(xgr_medians):.0f} µs a row against "
        f"{min(llg_medians):.0f}–{max(llg_medians):.0f} µs), and for {TOOLS} tools its p99 is {p99(walks[TOOLS_WALK][xgr_name]) * 1e6:.0f} µs "
        f"against llguidance's {p99(walks[TOOLS_WALK][llg_name]) * 1e6:.0f} µs (llguidance builds its lexer states as the answer "
        f"reaches them). At llguidance's largest median here, 16 constrained rows add {16 * max(llg_medians) / 1000:.1f} ms to a step. "
        "This is xgrammar's real advantage, and llguidance's p99 on many-tool grammars the figure to watch as constrained "
        "batches grow. The tokenizer view is built once per tokenizer and kept "
        f"({ms(med(facts['info']['llguidance']))} ms against {ms(med(facts['info']['xgrammar']))} ms).",
        f"What cannot be enforced: llguidance refuses {len(llg['refused'])} schemas of the corpus, each with its reason (Hive's 400 "
        f"`UNSUPPORTED_SCHEMA`); xgrammar refuses {len(warm['refused'])}. It compiles {len(silent)} of those {len(llg['refused'])} without a word "
        "(`not`, `uniqueItems`, `if`/`then`/`else`, `dependentRequired`, … left unenforced) and, with a log line only, drops keywords "
        f"on {len(dropped)} schemas llguidance enforces (minLength/maxLength beside a pattern or format, multipleOf, allOf, oneOf "
        "read as anyOf): a strict request would get answers that break its schema.",
        f"Dependencies: {light}. xgrammar requires torch, transformers, triton and apache-tvm-ffi; `import xgrammar` takes "
        f"{facts['imports']['xgrammar'][0]:.2f} s and loads torch: the hive could not check schemas with it.",
    ]
    balance = (
        f"On balance, the compile every request pays ({med(warm['first_mask']) / med(llg['first_mask']):.1f}× a schema and "
        f"{med(tools_warm['first_mask']) / med(tools_llg['first_mask']):.1f}× for {TOOLS} tools with xgrammar's warm compiler), a refusal "
        "with its reason instead of a schema silently unenforced, and a hive without torch outweigh xgrammar's lighter masks."
    )
    return "**Conclusion: llguidance stays.**\n\n" + "\n".join(paragraph(b, "- ") for b in bullets) + "\n\n" + paragraph(balance)


def write_doc(text: str, facts: dict, args, compiles: dict, tools: dict, walks: dict) -> None:
    command = f"python -m bench.grammar_engines --runs {args.runs} --tool-runs {args.tool_runs} --walks {args.walks}"
    versions = f"llguidance {facts['llguidance']}"
    if facts["xgrammar"]:
        versions += f", xgrammar {facts['xgrammar']} (apache-tvm-ffi {facts['tvm_ffi']}, installed for the run)"
    else:
        versions += "; xgrammar could not be installed or imported here, so it is not measured"
    intro = (
        f"`{command}` on this machine ({os.cpu_count()} CPU cores, no GPU), {time.strftime('%Y-%m-%d')}, {versions}; the whole run "
        f"took {facts['seconds']:.0f} s. The vocabulary: a byte-level BPE of {facts['vocab']:,} tokens trained for the run on "
        f"{facts['corpus_bytes'] / 1e6:.1f} MB of Python's standard library sources (no hub here), EOS `{EOS}`. llguidance runs Hive's "
        "own path (worker/grammar/grammar.py's grammar, an `LLMatcher` over worker/grammar/constraint.py's tokenizer view); "
        "xgrammar gets Hive's layout (`any_whitespace=False`, separators `\", \"` and `\": \"`, `strict_mode`) and its default 8 "
        "compile threads, with its compiler's cache on (a long-lived compiler, as a server keeps) and off. Each schema of "
        "bench/schemas/ is compiled as a new one each run (every property name given a suffix): agents send a different "
        "tool list on almost every call. Compile: from the request's schema to a matcher (llguidance: the Lark text and the "
        "`LLMatcher`; xgrammar: `compile_json_schema` and the `GrammarMatcher`); llguidance builds its lexer lazily, so "
        f"compile + first mask is what a job waits for. The {TOOLS} tools: corpus tool-parameter then extraction schemas (as "
        "bench.structured picks them; those either engine refuses left out), renamed each run; llguidance: Hive's hermes "
        "grammar; xgrammar: the structural tag of the same language, one `TagFormat` per tool (begin "
        "`<tool_call>\\n{\"name\": \"NAME\", \"arguments\": `, the parameters' `JSONSchemaFormat`, end `}\\n</tool_call>`) in a "
        "`TagsWithSeparatorFormat` (separator `\\n`, at least one), whose JSON keeps xgrammar's free whitespace. Masks: a "
        "bitmask of the whole vocabulary per token, along random walks: each step draws a token both engines allow, "
        "uniformly, so both walk the same answer. Import: in a fresh interpreter."
    )
    replace_section(TITLE, f"## {TITLE}\n\n{paragraph(intro)}\n\n{text}\n\n{conclusion(facts, compiles, tools, walks)}\n")


if __name__ == "__main__":
    main()
