"""Worker pieces on their own: layer loading, incremental decoding, stop sequences,
download progress. CPU only, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.events import Download
from tests.tiny_models import build_tokenizer
from worker.engine.sequence import PromptTooLong, SamplingParams, Sequence, eos_ids
from worker.engine.textstream import IncrementalDecoder, StopMatcher
from worker.model.download import DownloadProgress, RemoteFile
from worker.model.loader import load_layer_by_layer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("llama") / "m", shards=3)


def _gpt2_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=3, n_head=4, n_positions=128))
    model.save_pretrained(tmp_path, max_shard_size=200_000)
    return tmp_path


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "gpt2"])
def test_layer_loading_matches_from_pretrained(arch, llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_model

    folder = {
        "llama": lambda: llama_dir,
        "llama-untied": lambda: build_model(tmp_path / "untied", tie_word_embeddings=False, num_layers=2),
        "gpt2": lambda: _gpt2_dir(tmp_path),
    }[arch]()
    assert len(list(folder.glob("*.safetensors"))) >= 2
    progress = []
    model = load_layer_by_layer(folder, torch.device("cpu"), on_layer=progress.append)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    total = model.config.num_hidden_layers
    assert [p.layers_loaded for p in progress] == list(range(1, total + 1))
    assert all(p.layers_total == total for p in progress)
    assert [p.vram_mb for p in progress] == sorted(p.vram_mb for p in progress)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_incremental_decoder_never_breaks_a_character(tokenizer):
    text = "Grüße, 日本語 and 🙂!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer, [])
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces, "expected at least one character split over several tokens"


class ConfigOnly(torch.nn.Module):
    """What a Sequence reads of its model: the config (EOS, context) and a device."""

    def __init__(self, eos: int, context: int = 1024):
        super().__init__()
        from types import SimpleNamespace

        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(eos_token_id=eos, max_position_embeddings=context, get_text_config=lambda: self.config)
        self.generation_config = None


def run_script(tokenizer, script: list[int], prompt: list[int], params: SamplingParams) -> list:
    """Feeds chosen token ids to a job's Sequence, as the engine does with each sampled id."""
    model = ConfigOnly(tokenizer.eos_token_id)
    sequence = Sequence(model, tokenizer, prompt, params, eos_ids(model, tokenizer))
    steps = []
    for token_id in script:
        steps.append(sequence.accept(token_id))
        if steps[-1].stop_reason:
            break
    return steps


def test_a_sequence_streams_multibyte_text_and_stops_on_eos(tokenizer):
    text = "Très bien 🙂 日本"
    script = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = run_script(tokenizer, script, [1, 2], SamplingParams(max_tokens=100, temperature=0))
    assert [t.i for t in out] == list(range(len(script)))
    assert "".join(t.text for t in out) == text
    assert not any("\ufffd" in t.text for t in out)
    assert out[-1].stop_reason == "eos" and all(t.stop_reason is None for t in out[:-1])


def test_a_sequence_holds_back_a_possible_stop_sequence(tokenizer):
    script = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    out = run_script(tokenizer, script, [1], SamplingParams(max_tokens=100, temperature=0, stop=("three",)))
    assert "".join(t.text for t in out) == "one two "
    assert out[-1].stop_reason == "stop_sequence"


def test_a_sequence_stops_at_max_tokens_and_at_the_context(tokenizer):
    script = tokenizer("one two three four five six", add_special_tokens=False)["input_ids"]
    assert len(run_script(tokenizer, script, [1], SamplingParams(max_tokens=3, temperature=0))) == 3
    model = ConfigOnly(tokenizer.eos_token_id, context=4)
    assert Sequence(model, tokenizer, [1, 2], SamplingParams(max_tokens=100), frozenset()).max_tokens == 2
    with pytest.raises(PromptTooLong):
        Sequence(model, tokenizer, [1, 2, 3, 4], SamplingParams(max_tokens=1), frozenset())


def test_stop_matcher_cuts_across_pieces_and_flushes_at_the_end():
    stops = StopMatcher(["END", "\n\n"])
    assert stops.feed("abc E", final=False) == ("abc ", False)
    assert stops.feed("N", final=False) == ("", False)
    assert stops.feed("Dxyz", final=False) == ("", True)
    stops = StopMatcher(["END"])
    assert stops.feed("abc E", final=False) == ("abc ", False)
    assert stops.feed("x", final=True) == ("Ex", False)


def test_download_progress_is_throttled_and_ends_at_full_size():
    now = [0.0]
    sent: list[Download] = []
    files = [RemoteFile("config.json", 100), RemoteFile("model.safetensors", 10_000)]
    progress = DownloadProgress(files, sent.append, clock=lambda: now[0])
    progress.start_file("config.json")
    progress.add_bytes(100)
    progress.finish_file()
    progress.start_file("model.safetensors")
    for _ in range(100):  # 100 chunks within 0.5 s: about 5 events, not 100
        now[0] += 0.005
        progress.add_bytes(100)
    progress.finish_file()
    assert 3 <= len(sent) <= 8
    assert sent[-1].bytes_downloaded == sent[-1].bytes_total == 10_100
    assert sent[-1].files_done == sent[-1].files_total == 2
    assert [e.bytes_downloaded for e in sent] == sorted(e.bytes_downloaded for e in sent)


def test_models_loaded_at_once_on_several_threads_all_load_whole(llama_dir, tmp_path):
    """A worker's slots load different models at once. Building a model and tying its
    weights touch process-wide state (worker/model/loader.py BUILDING): without the lock,
    most of these loads, and every later one, failed with the tied head missing."""
    import shutil
    import threading

    from worker.model.loader import load_model

    folders = [llama_dir] + [shutil.copytree(llama_dir, tmp_path / f"copy-{k}") for k in range(5)]
    loaded, errors = [], []

    def load(folder):
        try:
            loaded.append(load_model(folder, torch.device("cpu")))
        except Exception as e:  # collected: the assertion below shows every one
            errors.append(f"{folder.name}: {e}")

    for _ in range(2):
        threads = [threading.Thread(target=load, args=(folder,)) for folder in folders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert len(loaded) == 12
    assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in loaded)  # tied, as the checkpoint says
