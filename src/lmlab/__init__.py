"""lmlab: pre-train, evaluate and compare efficient-architecture language models.

Importing lmlab registers its model families (transformer, delta_net, gated_deltanet, gla) with
transformers' AutoConfig / AutoModel / AutoModelForCausalLM.
"""
__version__ = "0.1.0"

from lmlab import models as _models  # noqa: F401  (registers the model families)
