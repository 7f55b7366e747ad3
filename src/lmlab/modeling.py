"""Load a model config, build the model and load the tokenizer from `--model.*` options.

Accepts local paths and hub ids. Without network, a hub id that is not in the local cache fails with one
line naming the local-path alternative. lmlab's own families run everywhere; other fla model types are
built through fla itself, on CUDA only (fla has no CPU path).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import safetensors
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lmlab.config import Domain, Flag, Float, Int, Model, nearest, show
from lmlab.errors import UserError


class TokenIds(Domain):
    """A token id (an integer >= 0, below the config's vocab_size where it sets one), none, or (eos_token_id)
    a list of ids. `cfg`: the model config's keys."""

    @property
    def expected(self) -> str:
        return "none, an integer in [0, vocab_size) or a list of them"

    def problem(self, value: Any, cfg: dict[str, Any] | None = None) -> str | None:
        if value is None:
            return None
        ids = value if isinstance(value, list) and value else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            return "not a token id"
        vocab_size = (cfg or {}).get("vocab_size")  # checked before the token ids (MODEL_KEYS' order)
        if vocab_size is not None and max(ids) >= vocab_size:
            return f"not below vocab_size {vocab_size}"
        return None


# The model config keys lmlab's families read, with their valid values (the domains of lmlab.config): a
# config is checked against them before transformers or the model classes see it, which would otherwise
# fail later without naming the key (a ZeroDivisionError for 0 heads, a TypeError deep in torch for a size
# that is a string) or quietly build something else (no layers for -1, True for the string "false").
# Keys a config leaves out keep the family's defaults; other keys are the families' own to check. Other model
# types (fla's, transformers') get only the sizes every causal LM has (CORE_KEYS): their other keys may
# differ (per-layer lists of heads, say).
MODEL_KEYS: dict[str, Domain] = {
    **{key: Int(ge=1) for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "conv_size",
                                  "chunk_size", "state_size", "conv_kernel")},
    **{key: Int(ge=1, none=True) for key in ("num_kv_heads", "num_v_heads", "head_dim", "intermediate_size",
                                             "window_size", "max_position_embeddings", "expand_ratio", "num_slots")},
    "hidden_ratio": Float(gt=0, none=True),
    "expand_k": Float(gt=0),
    "expand_v": Float(gt=0),
    "norm_eps": Float(gt=0),
    "gate_logit_normalizer": Float(gt=0),
    "initializer_range": Float(ge=0),
    "rope_theta": Float(gt=0, none=True),
    **{key: TokenIds() for key in ("pad_token_id", "bos_token_id", "eos_token_id")},
    **{key: Flag() for key in (
        "tie_word_embeddings", "use_cache", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
        "fuse_linear_cross_entropy", "use_l2warp", "use_gate", "use_short_conv", "use_beta", "allow_neg_eigval",
        "use_output_norm", "use_output_gate", "use_gk", "use_gv", "qkv_bias", "use_forgetting_gate",
        "use_local_pos_encoding", "use_memory_gate", "use_memory_scaler", "use_memory_gate_separate",
        "use_memory_dynamic_scaler", "use_lower_bound", "use_norm", "use_bias", "use_conv_bias", "residual_in_fp32",
        "rescale_prenorm_residual")},
}


CORE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")
# (model_type, key) -> the key's valid values where one family's differ from MODEL_KEYS'
FAMILY_KEYS: dict[tuple[str, str], Domain] = {
    ("hgrn2", "num_heads"): Int(ge=1, none=True),  # null: hidden_size // expand_ratio
}


def check_model_keys(values: dict[str, Any], source: str, model_type: str) -> None:
    """UserError naming the first key of `values` (a config's keys) outside its valid values (MODEL_KEYS)."""
    for key, domain in MODEL_KEYS.items():
        domain = FAMILY_KEYS.get((model_type, key), domain)
        if key in values and (key in CORE_KEYS or model_type in lmlab_model_types()):
            problem = domain.problem(values[key], values)  # the config's keys: token ids are below vocab_size
            if problem:
                raise UserError(f"--model.config {source}: {key}: {show(values[key])} is {problem} "
                                f"(expected {domain.expected})")


@functools.cache
def family_keys(model_type: str) -> frozenset[str]:
    """The keys a config of lmlab's family `model_type` knows: its config class's parameters (its bases'
    included), the other keys it takes (`extra_keys`) and those every transformers config may hold (what
    save_pretrained writes, `torch_dtype` for older files)."""
    from lmlab.models import FAMILIES

    cls = FAMILIES[model_type][0]
    keys = {*cls.extra_keys, *PretrainedConfig().to_dict(), "torch_dtype"}
    for base in cls.__mro__[:cls.__mro__.index(PretrainedConfig)]:
        keys.update(name for name, p in inspect.signature(base.__init__).parameters.items()
                    if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return frozenset(keys)


def check_known_keys(values: dict[str, Any], source: str, model_type: str) -> None:
    """UserError naming the first key of a config JSON of an lmlab family that the family does not know, and the
    nearest known one: transformers would store it unused and the model would be built with the default."""
    if model_type not in lmlab_model_types():
        return  # other types' keys are theirs to know
    known = family_keys(model_type)
    for key in values:
        if key not in known:
            raise UserError(f"--model.config {source}: unknown key {key!r} for model_type {model_type}"
                            f"{nearest(key, sorted(known))}")


def lmlab_model_types() -> list[str]:
    from lmlab.models import MODEL_TYPES

    return list(MODEL_TYPES)


def load_model_config(source: str, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """A config from a JSON file, a model directory or a hub id."""
    path = Path(source)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"--model.config {source}: no such file")
        try:
            # inf and nan as transformers writes them into config.json ({"__float__": "Infinity"}), read back as
            # its from_pretrained reads them
            values = PretrainedConfig._decode_special_floats(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"--model.config {source}: invalid JSON ({exc})") from None
        except UnicodeDecodeError:
            raise UserError(f"--model.config {source}: not a text file (JSON must be UTF-8)") from None
        if not isinstance(values, dict):
            raise UserError(f"--model.config {source}: the JSON is {_json_kind(values)}, expected an object "
                            '({"model_type": ..., "hidden_size": ..., ...})')
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise UserError(f"--model.config {source}: missing 'model_type' (one of {', '.join(lmlab_model_types())})")
        if not isinstance(model_type, str):
            raise UserError(f"--model.config {source}: model_type: {show(model_type)} is not a string "
                            f"(expected one of {', '.join(lmlab_model_types())})")
        check_known_keys(values, source, model_type)
        check_model_keys(values, source, model_type)
        _ensure_registered(model_type)
        try:
            return AutoConfig.for_model(model_type, **values)
        except (ValueError, TypeError, StrictDataclassError) as exc:
            raise _config_error("--model.config", source, exc) from None
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError:
        raise UserError(
            f"--model.config {source}: not a local file or folder, and not reachable as a hub id "
            "(offline?); pass a local config JSON such as configs/gated_deltanet_340M.json"
        ) from None
    except (ValueError, StrictDataclassError) as exc:
        raise _config_error("--model.config", source, exc) from None
    check_model_keys(config.to_dict(), source, config.model_type)
    return config


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", type(None): "null", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _config_error(option: str, source: str, exc: Exception) -> UserError:
    """transformers' (often multi-line) message as one line; for custom code, lmlab's own flag."""
    if "trust_remote_code" in str(exc):
        return UserError(f"{option} {source} holds custom code; lmlab runs it only with --model.trust_remote_code "
                         "(read that code first)")
    text = " ".join(str(exc).split())
    return UserError(f"{option} {source}: {text if len(text) <= 300 else text[:300] + '...'}")


def _ensure_registered(model_type: str) -> None:
    """lmlab's families are registered on import; fla's other types need fla, which needs CUDA."""
    if model_type in CONFIG_MAPPING:
        return
    supported = ", ".join(lmlab_model_types())
    if torch.cuda.is_available():
        try:
            importlib.import_module("fla")
        except ImportError:
            pass
        if model_type in CONFIG_MAPPING:
            return
    raise UserError(
        f"unknown model_type {model_type!r}: lmlab runs {supported} on any device; other fla types "
        "(rwkv7, ...) need fla on a CUDA machine"
    )


def import_custom_models(module: str | None) -> None:
    """Import `--experimental.custom_model_path` so that it can register its own model types."""
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"--experimental.custom_model_path {module}: cannot import it ({exc})") from None


def token_id_bound(tokenizer: PreTrainedTokenizerBase) -> int:
    """One more than the largest id the tokenizer can produce (vocabulary, added and special tokens): the
    embedding rows a model needs. `len(tokenizer)` counts the tokens, which is less when the ids are sparse."""
    ids = [*tokenizer.get_vocab().values(), *getattr(tokenizer, "added_tokens_decoder", {}),
           *tokenizer.all_special_ids]
    return max((i for i in ids if isinstance(i, int)), default=-1) + 1


def check_vocab(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, model: str,
                fix: str | None = None) -> None:
    """UserError unless every token id fits the model's embedding (`vocab_size` rows). `model`: where the config
    came from, as the user named it (`--model.config x.json`); `fix`: what to do (default: a larger vocab_size)."""
    bound = token_id_bound(tokenizer)
    if bound > config.vocab_size:
        fix = fix or f"raise vocab_size to at least {bound} in the model config or use a matching tokenizer"
        raise UserError(f"the tokenizer's token ids go up to {bound - 1} ({len(tokenizer)} tokens) but the model's "
                        f"vocab_size is {config.vocab_size} ({model}); {fix}")


def build_model(cfg: Model, *, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialised causal LM in float32 on `device` (FSDP / autocast handle precision).
    `vocab_size`: the embedding rows the tokenizer needs at least (`load_tokenizer` checked its largest id)."""
    if cfg.config is None:
        raise UserError("--model.config is required (a config JSON such as configs/tiny_gated_deltanet.json)")
    config = load_model_config(cfg.config, trust_remote_code=cfg.trust_remote_code)
    if vocab_size > config.vocab_size:
        raise UserError(
            f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {config.vocab_size}; "
            "raise vocab_size in the model config or use a matching tokenizer"
        )
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:  # a config the layers reject, e.g. head dims that do not divide
        raise _config_error("--model.config", cfg.config, exc) from None
    backend = kernel_backend(cfg, config)
    if hasattr(model, "set_kernel_backend"):
        model.set_kernel_backend(backend)
    elif backend != "auto":
        raise UserError(f"--model.backend {backend}: {config.model_type} models do not run lmlab's kernels; "
                        "use --model.backend auto")
    return model.float()


def kernel_backend(cfg: Model, config: PretrainedConfig) -> str:
    """The kernel backend a run gives its model: `--model.backend`, or the config's `backend` key when
    the flag is auto (the export keeps the config's key: the flag is the run's choice, not the model's)."""
    return cfg.backend if cfg.backend != "auto" else getattr(config, "backend", "auto")


def load_tokenizer(cfg: Model) -> PreTrainedTokenizerBase:
    """The tokenizer of `--model.tokenizer_path`; with `--model.config` set, checked to fit that model:
    its largest token id, not its token count, must be below the config's vocab_size."""
    tokenizer = _load_tokenizer(cfg)
    if cfg.config is not None:
        check_vocab(tokenizer, load_model_config(cfg.config, trust_remote_code=cfg.trust_remote_code),
                    f"--model.config {cfg.config}")
    return tokenizer


def _load_tokenizer(cfg: Model) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer_path
    if source is None:
        raise UserError("--model.tokenizer_path is required (a local tokenizer folder or a hub id)")
    if not Path(source).exists() and source.startswith((".", "/")):
        raise UserError(f"--model.tokenizer_path {source}: no such folder")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise _config_error("--model.tokenizer_path", source, exc) from None
        # transformers found no tokenizer files to build one from
        raise UserError(f"--model.tokenizer_path {source}: no tokenizer there (tokenizer.json or a slow tokenizer's "
                        "files, as tokenizer.save_pretrained() writes them)") from None
    except OSError:
        raise UserError(
            f"--model.tokenizer_path {source}: cannot load it (not a local folder, and the hub is unreachable "
            "or has no such repo); pass a local folder holding tokenizer.json, e.g. one saved by "
            "tokenizer.save_pretrained()"
        ) from None


# A Hugging Face model folder: its weights (one of these) and the files a tokenizer loads from.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def is_local_path(name: str) -> bool:
    """A path, not a hub id: it exists, or is written as a path (a hub id is `name` or `org/name`)."""
    return Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_folder(folder: Path, label: str, *, tokenizer: bool) -> None:
    """UserError (starting with `label`, the option and folder as the user wrote them) unless `folder` holds a loadable HF
    model: a config.json object with a model_type, weights whose safetensors headers and sizes are intact,
    and, with `tokenizer`, tokenizer files. Cheap: no tensor is read."""
    import safetensors

    if not folder.is_dir():
        raise UserError(f"{label}: {'not a folder' if folder.exists() else 'no such folder'}")
    if (folder / ".metadata").is_file():  # a training checkpoint (DUMP/checkpoint/step-N): weights in DCP's format
        step = re.fullmatch(r"step-(\d+)", folder.name)
        where = (f"--path {folder.parent.parent} --step {step[1]}" if step and folder.parent.name == "checkpoint"
                 else "--path DUMP --step N")
        raise UserError(f"{label}: a DCP training checkpoint, not a Hugging Face model folder; "
                        f"`lmlab convert dcp-to-hf {where} --output DIR` writes one from it to evaluate")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"{label}: no config.json, so not a Hugging Face model folder (a dump has one once "
                        "its run has finished; `lmlab convert dcp-to-hf --path DUMP` writes one from a checkpoint)")
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{label}: {config.name} is not valid JSON ({exc})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise UserError(f"{label}: {config.name} has no model_type (expected an object with one)")
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise UserError(f"{label}: no weights ({' or '.join(WEIGHT_FILES)})")
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safetensors.safe_open(str(weights), "pt"):
                pass  # opening checks the header and that the file holds every tensor it lists
        except (safetensors.SafetensorError, OSError) as exc:
            raise UserError(f"{label}: {weights.name} is corrupt or truncated ({exc})") from None
    if tokenizer and not any((folder / files).is_file() for files in TOKENIZER_FILES):
        raise UserError(f"{label}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                        "there or name one")
