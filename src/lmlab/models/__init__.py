"""lmlab's model families, fla-compatible (same config schema, model_type strings and state-dict keys).

Importing this package registers them with AutoConfig / AutoModel / AutoModelForCausalLM. Importing fla
(any part of it, e.g. one of its ops) registers fla's own classes for the same model types: so where
fla's ops can run (CUDA, fla installed) fla is imported here first and lmlab registers after it; on CPU
fla is not imported (keeps `import lmlab` cheap). Code that imports fla itself later must call
`register()` again.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lmlab.kernels import dispatch
from lmlab.models.cache import Cache
from lmlab.models.delta_net import DeltaNetConfig, DeltaNetForCausalLM, DeltaNetModel
from lmlab.models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM, GatedDeltaNetModel
from lmlab.models.gla import GLAConfig, GLAForCausalLM, GLAModel
from lmlab.models.gsa import GSAConfig, GSAForCausalLM, GSAModel
from lmlab.models.hgrn2 import HGRN2Config, HGRN2ForCausalLM, HGRN2Model
from lmlab.models.hybrid_qlt import HybridQLTConfig, HybridQLTForCausalLM, HybridQLTModel
from lmlab.models.mamba import MambaConfig, MambaForCausalLM, MambaModel
from lmlab.models.mamba2 import Mamba2Config, Mamba2ForCausalLM, Mamba2Model
from lmlab.models.samba import SambaConfig, SambaForCausalLM, SambaModel
from lmlab.models.transformer import TransformerConfig, TransformerForCausalLM, TransformerModel

FAMILIES = {
    "transformer": (TransformerConfig, TransformerModel, TransformerForCausalLM),
    "delta_net": (DeltaNetConfig, DeltaNetModel, DeltaNetForCausalLM),
    "gated_deltanet": (GatedDeltaNetConfig, GatedDeltaNetModel, GatedDeltaNetForCausalLM),
    "gla": (GLAConfig, GLAModel, GLAForCausalLM),
    "hgrn2": (HGRN2Config, HGRN2Model, HGRN2ForCausalLM),
    "gsa": (GSAConfig, GSAModel, GSAForCausalLM),
    "hybrid_qlt": (HybridQLTConfig, HybridQLTModel, HybridQLTForCausalLM),
    "mamba": (MambaConfig, MambaModel, MambaForCausalLM),
    "mamba2": (Mamba2Config, Mamba2Model, Mamba2ForCausalLM),
    "samba": (SambaConfig, SambaModel, SambaForCausalLM),
}
MODEL_TYPES = tuple(FAMILIES)


def register() -> None:
    """Make lmlab's classes the Auto classes' choice for its model types (again, after fla's import)."""
    for config, model, lm in FAMILIES.values():
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForCausalLM.register(config, lm, exist_ok=True)


if dispatch.fla_unavailable_reason() is None:
    import fla  # noqa: F401  (before register(): see the module docstring)
register()


__all__ = ["Cache", "FAMILIES", "MODEL_TYPES", "register",
           *(cls.__name__ for classes in FAMILIES.values() for cls in classes)]
