"""The running sequences of one model as one batch: one KV cache (worker/engine/kv_cache.py)
and one forward pass per step for all of them, decodes and prefills together
(worker/engine/packed_attention.py).

A sequence holds a ``Row``: its index in the cache, the tokens it has there, and
the token it feeds next. A newcomer's row prefills its prompt in chunks, as many
tokens a step as the scheduler gives it, in the same pass as the running rows'
decode; with its prompt's last chunk it gets its logits, and from the next step
it decodes. A row that ends leaves at once (the last row takes its index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.kv_cache import KVCache, kv_bytes_per_token
from worker.engine.packed_attention import ATTENTION, Segment, StepLayout, UnsupportedModel, use_packed_attention

#: The self-check's bar: the cosine of the packed step's logits and the model's own,
#: at every position checked. Measured on tiny random models: 0.99999+ for Llama,
#: Nemotron and PhiMoE in float32 and bfloat16 alike; 0.23 for MiniMax, whose
#: linear-attention layers keep a state the packed step does not carry.
SAME_LOGITS_COSINE = 0.99
#: The self-check's prompts (prefilled together) and decode steps.
PROBE_LENGTHS = (14, 34)
PROBE_STEPS = 8


@dataclass(eq=False)
class Row:
    owner: object  # the engine's RunningJob
    prompt_ids: list[int]
    #: The most tokens it can hold: its prompt and max_tokens (its reservation).
    max_length: int
    index: int
    #: Order of arrival in the batch (rows move when others leave).
    joined: int
    #: Tokens in the cache: prompt tokens prefilled so far, then every fed token.
    length: int = 0
    #: The token the next step feeds (the last one sampled); None while prefilling.
    next_id: int | None = None
    #: Steps in a row that gave this prefilling row no chunk (the scheduler's).
    passed_over: int = 0

    @property
    def prompt_left(self) -> int:
        return len(self.prompt_ids) - self.length if self.next_id is None else 0


class Batch:
    def __init__(self, model, verify: bool = True):
        """``verify``: check once per model that the packed step answers as the model's
        own forward does (``verify_packed``)."""
        use_packed_attention(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = KVCache(kv_bytes_per_token(model))
        #: ``rows[i].index == i``.
        self.rows: list[Row] = []
        self._joined = 0
        if verify and not getattr(model, "_hive_verified", False):
            verify_packed(model)
            model._hive_verified = True

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def owners(self) -> list:
        return [row.owner for row in self.rows]

    @property
    def prefilling(self) -> list[Row]:
        """Rows still prefilling their prompts, oldest first."""
        return sorted((row for row in self.rows if row.next_id is None), key=lambda row: row.joined)

    @property
    def decoding(self) -> int:
        return sum(row.next_id is not None for row in self.rows)

    def reserve(self, count: int, columns: int) -> None:
        """The cache's reservation: ``count`` sequences of up to ``columns`` tokens."""
        used_columns = max((row.length for row in self.rows), default=0)
        self.cache.reserve(count, columns, len(self.rows), used_columns)

    def add(self, owner, prompt_ids: list[int], max_length: int) -> Row:
        """A row for a newcomer (within the reservation); its prompt is prefilled by
        the next steps' ``forward``."""
        assert len(self.rows) < self.cache.rows and max_length <= self.cache.columns
        self._joined += 1
        row = Row(owner, prompt_ids, max_length, len(self.rows), self._joined)
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        last = self.rows.pop()
        if last is not row:
            self.cache.move(last.index, row.index, last.length)
            last.index = row.index
            self.rows[row.index] = last

    def clear(self) -> None:
        """Every row leaves (the batch failed, or its model is unloaded)."""
        self.rows.clear()

    def feed(self, row: Row, token_id: int) -> None:
        """The token sampled from ``row``'s logits: the next step feeds it."""
        row.next_id = token_id

    @torch.inference_mode()
    def forward(self, chunks: dict[Row, int]) -> tuple[list[Row], torch.Tensor]:
        """One pass: every decoding row's next token, and ``chunks[row]`` more prompt
        tokens of prefilling rows. Returns the rows that have a next-token
        distribution now (the decoding ones, then those whose prompt is complete)
        and their logits [rows, vocab]."""
        decoding = [row for row in self.rows if row.next_id is not None]
        ids = [row.next_id for row in decoding]
        positions = [row.length for row in decoding]
        keep = list(range(len(decoding)))
        ready = list(decoding)
        segments = []
        # Prompts that start now first: packed_attention attends them together.
        for row, n in sorted(chunks.items(), key=lambda item: item[0].length > 0):
            segments.append(Segment(row.index, row.length, n, len(ids)))
            ids.extend(row.prompt_ids[row.length : row.length + n])
            positions.extend(range(row.length, row.length + n))
            if row.length + n == len(row.prompt_ids):
                keep.append(len(ids) - 1)
                ready.append(row)
        layout = StepLayout(self.cache, len(self.rows), [s.index for s in decoding], [s.length for s in decoding],
                            segments, self.device)
        with layout.active():
            out = self.model(
                input_ids=torch.tensor([ids], device=self.device),
                position_ids=torch.tensor([positions], device=self.device),
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
                use_cache=False,
            )
        for row in decoding:
            row.length += 1
        for row, n in chunks.items():
            row.length += n
        return ready, out.logits[0]


@torch.inference_mode()
def verify_packed(model) -> None:
    """Raises UnsupportedModel unless the packed step gives the model's own logits:
    two prompts (14 and 34 tokens) prefilled together, then eight decode steps, each position
    against the model's plain forward (eager attention) over the whole sequence. A
    refusal beats a wrong answer: an architecture whose layers keep state outside
    attention (linear attention, state-space, short convolutions) or bypass
    transformers' attention hook would otherwise answer with other text than
    ``generate``."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    prompts = [[(3 + 7 * k) % config.vocab_size for k in range(n)] for n in PROBE_LENGTHS]
    steps = PROBE_STEPS
    for implementation in ("eager", "sdpa"):  # eager is the plainest; some models' eager path is broken
        try:
            own_logits, sequences = own_greedy(model, prompts, steps, implementation)
            break
        except Exception as e:  # noqa: BLE001 - tried with the next implementation, or refused below
            failure = e
        finally:
            model.set_attn_implementation(ATTENTION)
    else:
        raise UnsupportedModel(f"{type(model).__name__}: its own forward fails in Hive's self-check ({type(failure).__name__}: {failure})") from failure
    try:
        worst = _packed_cosine(model, prompts, sequences, own_logits, steps)
    except Exception as e:  # the packed step itself fails on this architecture: refused, not an error per job
        raise UnsupportedModel(f"{type(model).__name__}: Hive's batched forward fails on it ({type(e).__name__}: {e})") from e
    if worst < SAME_LOGITS_COSINE:
        raise UnsupportedModel(
            f"{type(model).__name__}: Hive's batched forward does not give the model's own logits (cosine {worst:.2f}); "
            "its layers keep state outside attention (linear attention, state-space), which Hive does not batch yet"
        )


def _packed_cosine(model, prompts, sequences, own_logits, steps) -> float:
    """The lowest cosine of the packed step's logits and the model's own, feeding both
    the same (the model's own greedy) tokens."""
    batch = Batch(model, verify=False)
    batch.reserve(len(prompts), max(PROBE_LENGTHS) + PROBE_STEPS)
    chunks = {batch.add(k, prompt, len(prompt) + steps): len(prompt) for k, prompt in enumerate(prompts)}
    worst = 1.0
    for step in range(steps):
        ready, logits = batch.forward(chunks)
        chunks = {}
        for row, packed in zip(ready, logits):
            own = own_logits[row.owner][step]
            worst = min(worst, float(torch.nn.functional.cosine_similarity(packed.float(), own, dim=0)))
            batch.feed(row, sequences[row.owner][len(prompts[row.owner]) + step])
    return worst


def own_greedy(model, prompts, steps, implementation: str) -> tuple[list[list[torch.Tensor]], list[list[int]]]:
    """The reference: the model's own logits at each position (its plain forward over the
    whole sequence, with ``implementation``), greedy, and the sequences it makes."""
    model.set_attn_implementation(implementation)
    device = next(model.parameters()).device
    own_logits, sequences = [], []
    for prompt in prompts:
        sequence, logits = list(prompt), []
        for _ in range(steps):
            logits.append(model(input_ids=torch.tensor([sequence], device=device), use_cache=False).logits[0, -1].float())
            sequence.append(int(logits[-1].argmax()))
        own_logits.append(logits)
        sequences.append(sequence)
    return own_logits, sequences
