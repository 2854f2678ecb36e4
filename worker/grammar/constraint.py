"""One job's grammar at work: an llguidance matcher that says, before each token,
which tokens the answer may take next, and follows the tokens sampled.

The grammar is compiled on the job's own thread (``compile_constraint``), before
the job joins the batch, so a request with fifty tools never stalls the streams
already running; the engine's step only computes each row's mask (tens of
microseconds a row, measured in docs/benchmarks.md) and applies it.
"""

from __future__ import annotations

import threading
import weakref

import torch

from shared.json_grammar import UnsupportedSchema

#: One llguidance tokenizer per loaded tokenizer: building one walks the whole vocabulary.
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()
_BITS = None


def ll_tokenizer(tokenizer, vocab_size: int, stop_ids: frozenset[int] = frozenset()):
    """llguidance's view of ``tokenizer``, its masks ``vocab_size`` wide (the model's
    logits, which may hold more ids than the tokenizer has); ``stop_ids``: the
    tokens that end the answer (the generation config's, beside the tokenizer's EOS),
    which the grammar allows once it accepts."""
    import llguidance.hf

    key = (vocab_size, stop_ids)
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None or cached[0] != key:
            eos = sorted(stop_ids) or None
            cached = (key, llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos))
            _tokenizers[tokenizer] = cached
        return cached[1]


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for (what a logprob's ``bytes`` lists); llguidance
    marks a special token's with a leading 0xFF."""
    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
    if cached is None or token_id >= cached[0][0]:
        return tokenizer.decode([token_id]).encode()
    data = cached[1].decode_bytes([token_id])
    return data[1:] if data[:1] == b"\xff" else data


class Constraint:
    """The matcher of one sequence; ``allowed`` before each token, ``accept`` after."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._mask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def allowed(self, logits: torch.Tensor) -> None:
        """Sets the logits of every token the grammar forbids now to -inf, in place."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
        apply_mask(logits, self._mask[0])

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            # Only a bug can get here: the token was sampled under this very mask.
            raise RuntimeError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing more may follow (the answer ends)."""
        return self._matcher.is_stopped()


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """-inf where ``mask`` (llguidance's bitmask, 32 tokens an int32) has a 0 bit.
    By hand: llguidance.torch's version runs through torch.compile, which compiles
    on its first call (seconds, and a C compiler on a CPU worker)."""
    global _BITS
    if _BITS is None:
        _BITS = torch.arange(32, dtype=torch.int32)
    bits = ((mask.unsqueeze(-1) >> _BITS) & 1).reshape(-1)[: logits.shape[-1]].to(logits.device, non_blocking=True)
    if logits.shape[-1] > bits.numel():
        logits[bits.numel() :] = float("-inf")
        logits = logits[: bits.numel()]
    logits.masked_fill_(bits == 0, float("-inf"))


def compile_constraint(grammar: str, tokenizer, vocab_size: int, stop_ids: frozenset[int]) -> Constraint:
    """The matcher for ``grammar``; UnsupportedSchema names what cannot be enforced."""
    from llguidance import LLMatcher

    matcher = LLMatcher(ll_tokenizer(tokenizer, vocab_size, stop_ids), grammar, log_level=0)
    if matcher.is_error():
        raise UnsupportedSchema(matcher.get_error())
    return Constraint(matcher, vocab_size)
