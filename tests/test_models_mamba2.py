"""The mamba2 family: fla 0.6.0's schema and the seed's config files, initialisation, numerical agreement with
fla's own Mamba2 classes (checkpoints move both ways), FLOPs, and GPU runs of the 340M config.

The behaviour every family shares (packing, left padding, cached generation, compile, backends) is tested
for mamba2 by tests/test_models.py's MODELS-parametrized tests; its kernel by tests/test_kernels_recurrent.py
(op simple_gla).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmlab  # noqa: F401  (registers the model types)
from lmlab.models import Cache
from test_models import (
    MODELS,
    ROOT,
    assert_bf16_close,
    check_compiled_blocks_match_eager,
    make_config,
    make_model,
    max_err,
    random_ids,
)


def seed_config(name: str = "mamba2_340M", **overrides):
    return AutoConfig.from_pretrained(ROOT / f"configs/{name}.json", **overrides)


def test_seed_config_reads_flas_schema():
    """The seed's file (fla's keys plus the fork's time_step_* / rms_norm spellings, which agree with fla's
    defaults) loads as lmlab's Mamba2Config with fla 0.6.0's derived head count, and saves back every key."""
    config = seed_config()
    assert type(config).__module__ == "lmlab.models.mamba2"
    assert (config.num_heads, config.head_dim, config.state_size, config.n_groups) == (32, 64, 128, 1)
    assert config.rmsnorm and not config.norm_before_gate and config.dt_limit == (0.0, math.inf)
    assert config.A_init == "arange" and config.backend == "auto" and config.prenorm_residual_strategy == "rescale"
    seed = json.loads((ROOT / "configs/mamba2_340M.json").read_text())
    saved = config.to_dict()
    assert all(saved[key] == value for key, value in seed.items() if key != "transformers_version")
    assert AutoConfig.for_model("mamba2", **{k: v for k, v in saved.items() if k != "model_type"}).to_dict() == saved


def test_exported_config_file_loads_as_model_config(tmp_path):
    """A config.json written by save_pretrained (dt_limit's inf tagged as {"__float__": "Infinity"}) is a valid
    --model.config file."""
    from lmlab.modeling import load_model_config

    seed_config().save_pretrained(tmp_path)
    assert load_model_config(str(tmp_path / "config.json")).dt_limit == [0.0, math.inf]


@pytest.mark.parametrize("overrides, message", [
    ({"num_heads": 4}, r"num_heads \(4\) disagrees with expand \* hidden_size / head_dim \(8\)"),
    ({"head_dim": 24}, r"expand \* hidden_size \(128\) must be a multiple of head_dim \(24\)"),
    ({"n_groups": 3}, r"num_heads \(8\) must be a multiple of n_groups \(3\)"),
    ({"state_size": 0}, "state_size must be a positive integer"),
    ({"chunk_size": True}, "chunk_size must be a positive integer"),
    ({"expand": 0}, "expand must be a positive number"),
    ({"hidden_act": "gelu"}, "hidden_act 'silu'"),
    ({"A_init": "zeros"}, "A_init must be 'arange'"),
    ({"A_init_range": [0, 16]}, "A_init_range must be a positive"),
    ({"dt_min": 0.2}, r"dt_min \(0.2\) must not exceed dt_max"),
    ({"dt_limit": [0.1, 0.01]}, "dt_limit must be a"),
    ({"time_step_min": 0.01}, r"time_step_min \(0.01\) is the seed fork's name for fla's dt_min"),
    ({"rms_norm": False}, "rms_norm .* rmsnorm"),
    ({"prenorm_residual_strategy": None}, "rescale_prenorm_residual"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_mamba2_configs_are_rejected_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config(MODELS["mamba2"], **overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [{}, {"A_init": "uniform"},
                                       {"rescale_prenorm_residual": False, "conv_init": 0.1}])
def test_init_is_the_seed_forks_by_default(overrides):
    """The fork's A_h = h (fla 0.6.0's U(A_init_range) with A_init "uniform"); D = 1; dt in [dt_min, dt_max];
    out_proj kaiming-uniform(a=√5) / √L when rescale_prenorm_residual (one residual branch per block), else
    N(0, initializer_range) like the other weights; the conv ~ U(±conv_init) when given."""
    model = AutoModelForCausalLM.from_config(make_config(MODELS["mamba2"], hidden_size=256, vocab_size=512,
                                                         **overrides))
    config, std = model.config, model.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            if config.A_init == "arange":
                assert torch.equal(p, torch.arange(1.0, config.num_heads + 1).log()), name
            else:
                assert 1 <= p.exp().min() and p.exp().max() <= 16 and len(p.unique()) == len(p), name
        elif name.endswith(".D") or name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("dt_bias"):
            dt = torch.nn.functional.softplus(p)
            assert dt.min() >= config.dt_min - 1e-7 and dt.max() <= config.dt_max + 1e-6, name
        elif name.endswith("conv1d.weight") and config.conv_init is not None:
            assert p.abs().max() <= config.conv_init and p.std() > config.conv_init / 3, name
        elif name.endswith("out_proj.weight") and config.rescale_prenorm_residual:
            bound = p.shape[1] ** -0.5 / math.sqrt(config.num_hidden_layers)
            assert p.abs().max() <= bound and abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        elif p.numel() > 2000:
            assert abs(p.std().item() - std) < 0.15 * std and abs(p.mean().item()) < 0.1 * std, name


@pytest.fixture
def fla_mamba2_on_cpu(monkeypatch):
    """fla's Mamba2 classes with its Triton norms replaced by fla's own PyTorch references (its Mamba2 layer
    runs its PyTorch SSD path on CPU). Importing fla makes its classes the Auto classes' choice: lmlab's are
    registered again."""
    pytest.importorskip("fla")
    import fla.models.mamba2.modeling_mamba2 as fla_mamba2
    import fla.modules.norm.layernorm as fla_layernorm
    import fla.modules.norm.layernorm_gated as fla_gated

    lmlab.models.register()

    def rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
        return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    monkeypatch.setattr(fla_layernorm, "rms_norm", rms_norm)
    monkeypatch.setattr(fla_gated, "rmsnorm_fn", fla_gated.rms_norm_ref)
    return fla_mamba2


@pytest.mark.parametrize("overrides", [{"n_groups": 1}, {"n_groups": 1, "D_has_hdim": True, "use_bias": True,
                                                      "norm_before_gate": True, "use_conv_bias": False}])
def test_checkpoints_compute_what_flas_model_computes(fla_mamba2_on_cpu, overrides):
    """fla's Mamba2ForCausalLM loaded with lmlab's weights gives lmlab's logits, lmlab's model loads fla's state
    dict (strictly, both ways), and fla's layer after a prompt holds lmlab's cached states (the same conv-state
    layout; the SSM state transposed, [P, N] in fla). One group of B and C: see the next test."""
    ours, theirs = _with_flas_twin(fla_mamba2_on_cpu, **overrides)
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    ids = random_ids(2, 21)
    x = torch.randn(2, 8, ours.config.hidden_size, generator=torch.Generator().manual_seed(4))
    ours_layer, theirs_layer = ours.backbone.layers[1].mixer, theirs.backbone.layers[1].mixer
    with torch.no_grad():
        assert max_err(ours(ids).logits, theirs(ids, use_cache=False).logits) < 1e-5
        cache = Cache()
        ours_layer(x, rotary={}, cache=cache)
        _, conv_state, ssm_state = theirs_layer.torch_forward(x, None, True)
    assert max_err(cache[1]["conv_state"], conv_state) < 1e-6
    assert max_err(cache[1]["recurrent_state"], ssm_state.transpose(-1, -2)) < 1e-5


def test_decoding_step_computes_what_flas_layer_computes(fla_mamba2_on_cpu):
    """One cached decoding step of lmlab's layer and of fla's (its PyTorch decode path) from the same states,
    with two groups of B and C: head h reads group h // (heads per group), as in mamba-ssm's kernels, fla's
    decoding path and transformers (fla 0.6.0's PyTorch prefill path tiles them instead, h % n_groups)."""
    ours, theirs = _with_flas_twin(fla_mamba2_on_cpu)
    ours_layer, theirs_layer = ours.backbone.layers[1].mixer, theirs.backbone.layers[1].mixer
    x = torch.randn(2, 9, ours.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = Cache()
        ours_layer(x[:, :8], rotary={}, cache=cache)
        states = {"conv_state": cache[1]["conv_state"].clone(),
                  "recurrent_state": cache[1]["recurrent_state"].transpose(-1, -2)}
        step = ours_layer(x[:, 8:], rotary={}, cache=cache)
        theirs_step, _, _ = theirs_layer.torch_forward(x[:, 8:], states, True)
    assert ours.config.n_groups == 2 and max_err(step, theirs_step) < 1e-5


def _with_flas_twin(fla_mamba2, **overrides):
    """lmlab's tiny mamba2 (weights moved away from their initial values, so that norms, D and biases count)
    and fla's Mamba2ForCausalLM with the same weights, on CPU."""
    ours = make_model("mamba2", chunk_size=32, **overrides)  # fla's PyTorch SSD forms [chunk, chunk, ...] products
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    config = {k: v for k, v in ours.config.to_dict().items() if k != "model_type"}
    theirs = fla_mamba2.Mamba2ForCausalLM(fla_mamba2.Mamba2Config(**config)).eval()
    for block in theirs.backbone.layers:
        block.mixer.act = torch.nn.functional.silu  # fla's activation module is a Triton kernel
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_flops_count_the_ssd():
    """3 × (2 × matmul weights + per layer and head the simple-GLA recurrence with dk = state_size 128,
    dv = head_dim 64, chunks of 64: 2·64·(128 + 64) + 4·128·64)."""
    from lmlab.flops import flops_per_token

    config = seed_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    recurrence = 48 * 32 * (2 * 64 * (128 + 64) + 4 * 128 * 64)
    assert flops_per_token(config, 2048) == pytest.approx(3 * (2 * weights + recurrence))


# ---------------------------------------------------------------------------------------------------
# GPU: fla's simple-GLA kernels (the fast path) against the PyTorch ones on the 340M config

PACKED = [0, 300, 1024, 1500, 2048]


def _cuda_model(layers: int | None = None):
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    config = seed_config(**({} if layers is None else {"num_hidden_layers": layers}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).cuda().train()
    ids = torch.randint(0, config.vocab_size, (2, 1024), device="cuda")
    return model, ids, torch.tensor(PACKED, dtype=torch.int32, device="cuda")


@pytest.mark.gpu
def test_mamba2_340m_bf16_auto_backend_matches_torch():
    """bf16 forward + backward of mamba2_340M with backend auto (fla's chunk_simple_gla through lmlab's custom
    op, fla's gated norm) vs torch, packed documents; the criterion of test_models' 340M tests."""
    model, ids, cu_seqlens = _cuda_model()
    watched = ["backbone.embeddings.weight", "backbone.layers.0.mixer.in_proj.weight",
               "backbone.layers.0.mixer.A_log", "backbone.layers.47.mixer.out_proj.weight", "lm_head.weight"]

    def run(backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.set_kernel_backend(backend)
        model.zero_grad()
        loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
        loss.backward()
        params = dict(model.named_parameters())
        return loss.float(), {k: params[k].grad.float() for k in watched}

    _, grads_ref = run("torch")
    model.to(torch.bfloat16)
    loss_torch, grads_torch = run("torch")
    loss_auto, grads_auto = run("auto")
    assert_bf16_close("mamba2_340M", loss_auto, grads_auto, loss_torch, grads_torch, grads_ref)


@pytest.mark.gpu
def test_mamba2_gpu_block_compiles_to_one_graph():
    """A mamba2 block as training compiles it (bf16 autocast, backend auto), fullgraph=True: fla's simple-GLA
    kernels are lmlab custom ops, so a graph break fails, forward or backward."""
    model, ids, cu_seqlens = _cuda_model(layers=1)
    torch._dynamo.reset()
    model.backbone.layers[0].compile(fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.layers[0].mixer.out_proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_mamba2_340m_compiled_blocks_match_eager(packed):
    """Four mamba2_340M blocks as training runs them (torch.compile per block, bf16 autocast, backend auto)
    against eager torch in bf16 and float32."""
    model, ids, cu_seqlens = _cuda_model(layers=4)
    varlen = {"cu_seqlens": cu_seqlens} if packed else {}
    watched = ["backbone.layers.0.mixer.in_proj.weight", "backbone.layers.3.mixer.out_proj.weight",
               "backbone.layers.3.mixer.dt_bias"]

    check_compiled_blocks_match_eager("mamba2_340M", model, ids, varlen, watched)


@pytest.mark.gpu
def test_mamba2_gpu_generation_matches_recompute():
    """Greedy generation with the cache (fla's fused recurrent kernel for the steps, fla's conv update) equals
    greedy recomputation without it, on the 340M config in float32."""
    model, ids, _ = _cuda_model(layers=4)
    model.eval()
    prompt = ids[:, :37]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for _ in range(8):
            prompt = torch.cat([prompt, model(prompt, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, prompt)
