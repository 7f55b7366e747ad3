"""Load a model config, build the model and load the tokenizer from `--model.*` options.

Accepts local paths and hub ids. Without network, a hub id that is not in the local cache fails with one
line naming the local-path alternative. lmlab's own families run everywhere; other fla model types are
built through fla itself, on CUDA only (fla has no CPU path).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lmlab.config import Model
from lmlab.errors import UserError


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
            values = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"--model.config {source}: invalid JSON ({exc})") from None
        model_type = values.pop("model_type", None)
        if model_type is None:
            raise UserError(f"--model.config {source}: missing 'model_type' (one of {', '.join(lmlab_model_types())})")
        _ensure_registered(model_type)
        try:
            return AutoConfig.for_model(model_type, **values)
        except (ValueError, TypeError) as exc:
            raise _config_error("--model.config", source, exc) from None
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError:
        raise UserError(
            f"--model.config {source}: not a local file or folder, and not reachable as a hub id "
            "(offline?); pass a local config JSON such as configs/gated_deltanet_340M.json"
        ) from None
    except ValueError as exc:
        raise _config_error("--model.config", source, exc) from None


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
        "(mamba2, rwkv7, ...) need fla on a CUDA machine"
    )


def import_custom_models(module: str | None) -> None:
    """Import `--experimental.custom_model_path` so that it can register its own model types."""
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"--experimental.custom_model_path {module}: cannot import it ({exc})") from None


def build_model(cfg: Model, *, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """A freshly initialised causal LM in float32 on `device` (FSDP / autocast handle precision)."""
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
    return model.float()


def load_tokenizer(cfg: Model) -> PreTrainedTokenizerBase:
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
