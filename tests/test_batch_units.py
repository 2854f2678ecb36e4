"""The batch's packed forward pass against the model's own: the same logits for every
sequence whatever else shares its step (prefill chunks beside decodes, rows that
join, rows that leave and move), on the architectures whose attention differs in
ways the packed path must honour: grouped KV heads (Llama), absolute positions
(GPT-2), sliding windows (Qwen2), softcapped logits with alternating windows
(Gemma 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from worker.engine.self_check import batch_for

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

VOCAB = 200


def _model(arch: str):
    import transformers as t

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    config = {
        "llama": lambda: t.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=512),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=512),
        "qwen2-window": lambda: t.Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=512,
                                              use_sliding_window=True, sliding_window=24, max_window_layers=1,
                                              layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
        "gemma2": lambda: t.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                                         sliding_window=24, attn_logit_softcapping=20.0, final_logit_softcapping=30.0),
    }[arch]()
    config._attn_implementation = "eager"
    reference = t.AutoModelForCausalLM.from_config(config).eval()
    return reference, copy.deepcopy(reference)


@pytest.mark.parametrize("pool", ["roomy", "tight", "gathered"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-window", "gemma2"])
def test_packed_steps_give_each_sequence_the_logits_it_has_alone(arch, pool, monkeypatch):
    """Rows join, grow, leave and are packed in a pool of token slots; the decode
    attends per row (the CPU's way) or gathered into one call (CUDA's, here on the CPU)."""
    from worker.engine import packed_attention
    from worker.kv.cache import KVCache

    if pool == "gathered":
        monkeypatch.setattr(packed_attention, "GATHER_DEVICES", {"cpu", "cuda"})
    packs = []
    pack = KVCache._pack
    monkeypatch.setattr(KVCache, "_pack", lambda self, *args: packs.append(args) or pack(self, *args))
    reference, model = _model(arch)
    batch = batch_for(model)
    g = torch.Generator().manual_seed(1)
    lengths = {"a": 37, "b": 5, "c": 70, "d": 12, "e": 9, "f": 9}
    # Each sequence's whole text: its prompt, then the tokens it is fed (chosen, not
    # sampled, so that a near-tie cannot send two runs down different paths).
    texts = {k: torch.randint(1, VOCAB, (n + 40,), generator=g).tolist() for k, n in lengths.items()}
    with torch.inference_mode():
        expected = {k: reference(input_ids=torch.tensor([t])).logits[0] for k, t in texts.items()}
    # Tight: two blocks beyond the rows' rooms at their most, so rows move and are packed.
    batch.reserve(5, 5 * 128 if pool != "tight" else 304)
    packs.clear()
    rows, fed = {}, {}

    def join(name):
        rows[name] = batch.add(name, texts[name][: lengths[name]], lengths[name] + 40)
        fed[name] = 0

    def step(chunks: dict[str, int]):
        ready, logits = batch.forward({rows[k]: n for k, n in chunks.items()})
        for row, logits_row in zip(ready, logits):
            name = row.owner
            position = lengths[name] - 1 + fed[name]
            torch.testing.assert_close(logits_row, expected[name][position], atol=2e-4, rtol=1e-4, msg=f"{name} at {position}")
            fed[name] += 1
            batch.feed(row, texts[name][position + 1])
        return sorted(row.owner for row in ready)

    join("a")
    assert step({"a": 16}) == []  # a chunk that does not end the prompt gives no logits
    join("b")
    assert step({"a": 21, "b": 5}) == ["a", "b"]
    join("c")
    join("d")
    assert step({"c": 30, "d": 6}) == ["a", "b"]  # decodes beside two starting prompts
    assert step({"c": 40, "d": 6}) == ["a", "b", "c", "d"]  # beside later chunks
    for _ in range(8):
        step({})
    batch.remove(rows["a"])  # the last row (d) moves into a's
    assert rows["d"].index == 0
    join("e")
    join("f")
    assert step({"e": 9, "f": 9}) == ["b", "c", "d", "e", "f"]  # equal starting prompts: one write
    for _ in range(20):  # past the sliding windows
        step({})
    assert fed == {"a": 11, "b": 32, "c": 30, "d": 30, "e": 21, "f": 21}
    assert packs or pool != "tight"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_equal_rows_decode_as_one_view_of_the_pool(arch, monkeypatch):
    """A burst of equal prompts: their rooms are kept one size at a regular stride as
    they grow, and every decode step reads all four as one strided view, with the
    logits each has alone (a longer row beside them still gets its own)."""
    from worker.engine import packed_attention

    groups = []
    layout = packed_attention.StepLayout.__init__

    def record(self, *args, **kwargs):
        layout(self, *args, **kwargs)
        groups.append(sorted(len(group.rows) for group in self._groups))

    monkeypatch.setattr(packed_attention.StepLayout, "__init__", record)
    reference, model = _model(arch)
    batch = batch_for(model)
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(1, VOCAB, (60,), generator=g).tolist() for _ in range(4)]
    with torch.inference_mode():
        expected = [reference(input_ids=torch.tensor([t])).logits[0] for t in texts]
    batch.reserve(4, 4 * 64)
    rows = [batch.add(k, text[:20], 60) for k, text in enumerate(texts)]
    groups.clear()
    chunks = {row: 20 for row in rows}
    for position in range(19, 59):
        ready, logits = batch.forward(chunks)
        chunks = {}
        for row, row_logits in zip(ready, logits):
            torch.testing.assert_close(row_logits, expected[row.owner][position], atol=2e-4, rtol=1e-4)
            batch.feed(row, texts[row.owner][position + 1])
    assert groups[1:] == [[4]] * 39  # past the prompts' step, every decode is one group
    starts = sorted(row.start for row in rows)
    assert len({row.room for row in rows}) == 1 and {b - a for a, b in zip(starts, starts[1:])} == {rows[0].room}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2-window", "gemma2"])
def test_prompts_found_in_the_prefix_cache_give_the_logits_computed_from_scratch(arch):
    """Rows that copy cached blocks (a shared system prompt, a conversation's earlier
    turn with its reply, a whole prompt) continue with the logits of the model alone;
    another salt (API key) finds nothing; blocks outlive the row that left them."""
    from worker.engine.batch import Batch
    from worker.engine.self_check import batch_path
    from worker.kv.prefix import BLOCK_TOKENS

    reference, model = _model(arch)
    batch = Batch(model, batch_path(model), prefix_seed="test-model")
    g = torch.Generator().manual_seed(2)
    system = torch.randint(1, VOCAB, (40,), generator=g).tolist()  # two full blocks and a half
    own = {k: torch.randint(1, VOCAB, (n,), generator=g).tolist() for k, n in {"a": 10, "b": 5, "other": 7}.items()}
    extra = torch.randint(1, VOCAB, (100,), generator=g).tolist()  # what each row is fed after its prompt
    a_prompt = system + own["a"]
    prompts = {
        "a": a_prompt,
        "b": system + own["b"],  # shares the system prompt: 32 tokens cached
        "a2": a_prompt + extra[:30] + [7, 8, 9],  # a's next turn: its prompt, its reply (decoded), more
        "same": a_prompt[:48],  # three full blocks, all cached: the last token is still computed
        "other": system + own["other"],  # another key: nothing cached
    }
    salts = {"a": "k1", "b": "k1", "a2": "k1", "same": "k1", "other": "k2"}
    with torch.inference_mode():
        expected = {k: reference(input_ids=torch.tensor([p + extra])).logits[0] for k, p in prompts.items()}
    batch.reserve(4, 4 * 256)
    rows, fed = {}, {}

    def join(name):
        rows[name] = batch.add(name, prompts[name], len(prompts[name]) + 60, salts[name])
        fed[name] = 0
        batch.reuse(rows[name])
        return rows[name].cached

    def step(chunks):
        ready, logits = batch.forward({rows[k]: n for k, n in chunks.items()})
        for row, logits_row in zip(ready, logits):
            name = row.owner
            position = len(prompts[name]) - 1 + fed[name]
            torch.testing.assert_close(logits_row, expected[name][position], atol=2e-4, rtol=1e-4, msg=f"{name} at {position}")
            batch.feed(row, extra[fed[name]])
            fed[name] += 1

    assert join("a") == 0
    step({"a": len(prompts["a"])})
    for _ in range(31):  # a holds 81 tokens: its reply fills blocks 4 and 5
        step({})
    assert join("b") == 2 * BLOCK_TOKENS
    assert rows["b"].prompt_left == len(prompts["b"]) - 2 * BLOCK_TOKENS
    assert join("other") == 0
    step({"b": rows["b"].prompt_left, "other": 20})
    step({"other": rows["other"].prompt_left})
    batch.remove(rows["a"])  # a leaves: its blocks stay; the last row moves into its place
    assert join("a2") == 5 * BLOCK_TOKENS  # the system prompt, a's question and 30 tokens of its reply
    assert join("same") == 47  # never the last prompt token
    step({"a2": rows["a2"].prompt_left, "same": 1})
    for _ in range(12):
        step({})
    assert fed == {"a": 34, "b": 15, "other": 14, "a2": 13, "same": 13}
    assert batch.prefix.hits == 32 + 80 + 47 and batch.prefix.queries == sum(len(p) for p in prompts.values())


def _run_to_end(model, prompts: dict[str, list[int]], max_tokens: int, kv_budget: int, salt: str | None = "k") -> tuple[dict, int]:
    """Every prompt through a real Scheduler and Batch, greedy, until each has
    ``max_tokens`` tokens: (name → tokens, rows preempted)."""
    from types import SimpleNamespace

    from worker.engine.batch import Batch
    from worker.engine.scheduler import Scheduler
    from worker.engine.self_check import batch_path

    batch = Batch(model, batch_path(model), prefix_seed="test-model")
    scheduler = Scheduler(8, 32, lambda: kv_budget)
    out: dict[str, list[int]] = {name: [] for name in prompts}
    for name, prompt in prompts.items():
        sequence = SimpleNamespace(prompt_ids=prompt, max_length=len(prompt) + max_tokens, max_tokens=max_tokens)
        scheduler.waiting.append(SimpleNamespace(name=name, sequence=sequence, cache_salt=salt, row=None, resume=None))
    for _ in range(2000):
        if not (scheduler.waiting or batch.rows):
            break
        _, chunks = scheduler.plan(batch)
        ready, logits = batch.forward(chunks)
        for row, token in zip(ready, logits.argmax(-1).tolist()):
            job = row.owner
            out[job.name].append(token)
            if len(out[job.name]) == max_tokens:
                batch.remove(row)
            else:
                batch.feed(row, token)
        scheduler.shrink(batch)
    return out, scheduler.preempted


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_batch_at_its_memory_budget_preempts_and_answers_as_with_room(arch):
    """Rows take columns as their tokens arrive; when the next tokens do not fit the
    newest row is preempted, recomputed later from its tokens, and every sequence
    still gets the tokens it gets with all the room it needs (with the prefix
    cache, and without it)."""
    _, model = _model(arch)
    g = torch.Generator().manual_seed(3)
    prompts = {f"p{k}": torch.randint(1, VOCAB, (n,), generator=g).tolist() for k, n in enumerate((20, 37, 9, 50, 28, 15))}
    roomy, preempted = _run_to_end(model, prompts, 60, 1 << 40)
    assert preempted == 0
    per_token = model.config.num_hidden_layers * 2 * 2 * 16 * 4  # layers × (keys, values) × KV heads × head dim × fp32
    tight = 320 * per_token  # two and a half rows of 128 columns, for six sequences of up to 110 tokens
    for salt in ("k", None):
        answers, preempted = _run_to_end(model, prompts, 60, tight, salt)
        assert preempted > 0 and answers == roomy, salt


def test_a_full_prefix_cache_reuses_its_least_recently_used_slots_and_gives_memory_back():
    from worker.engine.batch import Batch
    from worker.engine.self_check import batch_path
    from worker.kv.prefix import BLOCK_TOKENS

    reference, model = _model("llama")
    batch = Batch(model, batch_path(model), prefix_seed="test-model")
    block_bytes = model.config.num_hidden_layers * 2 * 2 * 16 * 4 * BLOCK_TOKENS
    batch.prefix_room = lambda: 4 * block_bytes  # four blocks
    g = torch.Generator().manual_seed(4)
    prompts = {k: torch.randint(1, VOCAB, (50,), generator=g).tolist() for k in "abc"}
    batch.reserve(2, 2 * 128)

    def prefill(name: str) -> int:
        row = batch.add(name, prompts[name], 60, "k")
        found = batch.reuse(row)
        ready, logits = batch.forward({row: row.prompt_left})
        with torch.inference_mode():
            expected = reference(input_ids=torch.tensor([prompts[name]])).logits[0, -1]
        torch.testing.assert_close(logits[0], expected, atol=2e-4, rtol=1e-4)
        batch.remove(row)
        return found

    assert prefill("a") == 0  # three full blocks kept of a's 50 tokens
    assert prefill("a") == 48 and batch.prefix.bytes == 4 * block_bytes
    assert prefill("b") == 0  # b's three blocks: a free slot, then a's tail's two (a keeps its head)
    assert prefill("a") == 16  # a's head; its tail takes b's tail's slots in turn
    assert prefill("b") == 16
    assert batch.prefix.evict(1) == 4 * block_bytes and batch.prefix.bytes == 0  # the arena goes back whole
    assert prefill("b") == 0
