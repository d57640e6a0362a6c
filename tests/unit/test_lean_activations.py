"""engine/lean_activations.py: MLPs and RMSNorms whose forward is Llama's recompute their elementwise
results in the backward instead of saving them — the same logits and gradients, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain_cli.engine import lean_activations

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=97, max_position_embeddings=64)


def _model(arch: str):
    import transformers

    torch.manual_seed(0)
    cfg_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    }[arch]
    extra = {"head_dim": 8} if arch in ("qwen3", "gemma2") else {}
    cfg = getattr(transformers, cfg_cls)(**SMALL, **extra)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # norms' gains away from their initial ones, so their gradients mean something
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _run(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.float().sin() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# (architecture, modules patched: per layer an MLP and two norms, plus the final norm; Gemma 2's
# norm is its own (1 + weight, cast after), so only its MLPs)
CASES = [("llama", 2 * 3 + 1), ("qwen3", 2 * 3 + 1 + 2 * 2), ("mistral", 2 * 3 + 1), ("gemma2", 2)]


@pytest.mark.parametrize("arch,patched", CASES)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_same_logits_and_gradients_bit_for_bit(arch, patched, autocast):
    base = _model(arch)
    lean = copy.deepcopy(base)
    assert lean_activations.apply(lean) == patched  # Qwen3: its q/k norms are Llama's RMSNorm too
    ids = torch.randint(3, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    l0, g0 = _run(base, ids, autocast)
    l1, g1 = _run(lean, ids, autocast)
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(base.parameters()))
    for n in g0:
        assert torch.equal(g0[n], g1[n]), n


def test_recipes_replace_saved_tensors_and_run_in_the_backward(monkeypatch):
    """Per layer, the MLP stores act(gate) and the product as recipes and each norm its normalised
    input: 2 x 2 + 5 = 9 for two layers; each is rebuilt once in the backward."""
    made, ran = [], []
    init, call = lean_activations._Recipe.__init__, lean_activations._Recipe.__call__
    monkeypatch.setattr(lean_activations._Recipe, "__init__", lambda self, *a: (made.append(1), init(self, *a))[1])
    monkeypatch.setattr(lean_activations._Recipe, "__call__", lambda self: (ran.append(1), call(self))[1])
    model = _model("llama")
    lean_activations.apply(model)
    ids = torch.randint(3, 97, (1, 9))
    logits = model(input_ids=ids, use_cache=False).logits
    assert len(made) == 9 and not ran
    logits.sum().backward()
    assert len(ran) == 9
    with torch.no_grad():  # no graph, no recipes
        model(input_ids=ids, use_cache=False)
    assert len(made) == 9


def test_lora_model_same_gradients():
    from posttrain_cli.engine import lora

    base = _model("llama")
    settings = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": None,
                "use_rslora": False, "init": "default", "quantize": None}
    a = lora.wrap(copy.deepcopy(base), settings, where="lora")
    with torch.no_grad():  # B = 0 at init: make the adapter matter
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    b = copy.deepcopy(a)
    assert lean_activations.apply(b) == 7
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    la, ga = _run(a, ids)
    lb, gb = _run(b, ids)
    assert torch.equal(la, lb) and ga.keys() == gb.keys() and any("lora_A" in n for n in ga)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_other_forwards_left_alone():
    class MLP(torch.nn.Module):  # same attribute names, another computation
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert lean_activations.apply(torch.nn.Sequential(MLP())) == 0


def test_a_recomputed_tensor_is_freed_after_the_forward():
    """The hooks hold no reference to the tensor they replace (torch keeps every saved tensor's pack
    hook alive as long as the graph): once the forward is done, only the recipe is left."""
    import gc
    import weakref

    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)

    def forward():
        a = x.sin()
        xd = x.detach()
        with lean_activations._recompute([(a, lambda: xd.sin())]):
            y = a * w  # saves a (as its recipe) and w
        return y, weakref.ref(a)

    y, a_ref = forward()
    gc.collect()
    assert a_ref() is None
    y.sum().backward()
    assert torch.equal(w.grad, x.detach().sin()) and torch.equal(x.grad, w.detach() * x.detach().cos())
