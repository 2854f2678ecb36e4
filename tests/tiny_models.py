"""Build tiny causal language models for tests and the built-in demo.

Random weights, but a real architecture (Llama by default), a real byte-level BPE
tokenizer trained on a small corpus, a chat template, and safetensors weights split
into several shards, so the download, layer loading and generation code paths are
exactly those a real hub model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = """\
Hive streams tokens from GPU workers to every follower of a job.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Models are downloaded from the hub, loaded layer by layer, then generate text one token at a time.
Bonjour, ça va? Très bien, merci. Grüße aus München. ¿Qué tal? Ελληνικά. 日本語のテキスト。 🙂
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

#: Qwen 2.5's tool-calling template, shortened: tools listed in the system turn,
#: calls written as <tool_call>{"name": …, "arguments": …}</tool_call>, and the
#: tools' answers sent back in <tool_response> blocks.
TOOL_CHAT_TEMPLATE = """{%- if tools %}<|system|>{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags.
{% elif messages[0]['role'] == 'system' %}<|system|>{{ messages[0]['content'] }}
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}<|{{ m.role }}|>{{ m.content }}
{% elif m.role == 'assistant' %}<|assistant|>{{ m.content }}
{%- for call in m.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}
{% elif m.role == 'tool' %}<|tool|><tool_response>
{{ m.content }}
</tool_response>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer: any text encodes, and characters outside the
    corpus split into several byte tokens (the multi-byte streaming case)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    shards: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    train_steps: int = 0,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write a Llama checkpoint (config, tokenizer, sharded safetensors): random
    weights, or with ``train_steps`` a few seconds of training on CORPUS so that
    the built-in demo model answers with recognisable text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if train_steps:
        _train(model, tokenizer, train_steps)
    model.eval()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # Shard size in bytes, so the checkpoint really has `shards` files.
    model.save_pretrained(out, max_shard_size=max(total // shards + 1, 1024), safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _train(model, tokenizer, steps: int) -> None:
    import torch

    ids = torch.tensor(tokenizer(CORPUS)["input_ids"])
    window = 48
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (16,))
        batch = torch.stack([ids[s : s + window] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


if __name__ == "__main__":
    import sys

    # python -m tests.tiny_models hive/demo_models/hive-demo/tiny-llama --train
    path = build_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model", train_steps=400 if "--train" in sys.argv else 0)
    print(path, sorted(p.name for p in path.iterdir()))
    print(json.dumps(json.loads((path / "config.json").read_text()), indent=1)[:400])
