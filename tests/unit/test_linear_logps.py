"""The chunked head (losses/linear.py, engine/lm_head.py) against the plain logits -> log_softmax.

Values and gradients: a hand case with vocabulary 7, random cases (chunk sizes, temperature,
Gemma 2's soft-capping, a bias, ignored targets), and whole tiny models of real architectures
through their own forward, where the plain path is the model's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain_cli.engine.lm_head import LogpHead, target_logps
from posttrain_cli.losses import LOSSES
from posttrain_cli.losses.linear import chunk_tokens, linear_logps
from posttrain_cli.losses.sft import IGNORE, token_cross_entropy


def _plain(hidden, weight, targets, bias=None, temperature=1.0, softcap=None):
    z = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lsm = torch.log_softmax(z / temperature, dim=-1)
    valid = targets >= 0
    return lsm.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid, -(lsm.exp() * lsm).sum(-1)


def test_vocab_7_by_hand():
    """H = 1, weight column [0, 1, 2, 3, 4, 5, 6]: logits = h * v. With h = ln 2 the logits are
    v ln 2, so p(v) = 2^v / (2^7 - 1) = 2^v / 127.
    target 6: log(64/127) = 4.158883 - 4.844187 = -0.685304; target 0: log(1/127) = -4.844187.
    d lp / d h = the target's weight minus the mean weight under p:
    E_p[v] = (0 + 2 + 8 + 24 + 64 + 160 + 384) / 127 = 642/127 = 5.055118;
    target 6: 6 - 5.055118 = 0.944882; target 0: -5.055118."""
    weight = torch.arange(7, dtype=torch.float32)[:, None]
    h = torch.full((2, 1), math.log(2.0), requires_grad=True)
    lp, _ = linear_logps(h, weight, torch.tensor([6, 0]), chunk=1)
    assert lp.tolist() == pytest.approx([math.log(64 / 127), math.log(1 / 127)], abs=1e-6)
    assert lp.tolist() == pytest.approx([-0.685304, -4.844187], abs=1e-6)
    lp.sum().backward()
    mean_v = sum(v * 2 ** v for v in range(7)) / 127
    assert mean_v == pytest.approx(642 / 127)
    assert h.grad[:, 0].tolist() == pytest.approx([6 - mean_v, 0 - mean_v], abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature,softcap,use_bias", [(1.0, None, False), (0.7, 30.0, False),
                                                          (1.3, 2.0, True)])
def test_random_matches_plain(chunk, temperature, softcap, use_bias):
    """fp32, N = 37 tokens (one ignored), H = 16, V = 50: values, entropy and the gradients of
    hidden, weight and bias under a random upstream gradient within 1e-5."""
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True) if use_bias else None
    t = torch.randint(0, 50, (37,), generator=g)
    t[3] = IGNORE
    up = torch.randn(37, generator=g)
    params = (h, w) + ((b,) if use_bias else ())

    ref, ref_ent = _plain(h, w, t, b, temperature, softcap)
    ref_grads = torch.autograd.grad((ref * up).sum(), params)
    lp, ent = linear_logps(h, w, t, bias=b, temperature=temperature, softcap=softcap, entropy=True, chunk=chunk)
    grads = torch.autograd.grad((lp * up).sum(), params)

    assert lp[3].item() == 0.0
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=0)
    for a, c in zip(grads, ref_grads):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_sft_loss_equals_cross_entropy():
    """LOSSES["sft"] on the chunked log-probs = cross-entropy on full logits, value and gradient."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(20, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (20,), generator=g)
    t[::4] = IGNORE
    ref, ref_n = token_cross_entropy(h @ w.T, t)
    ref_g = torch.autograd.grad(ref, (h, w))
    lp, _ = linear_logps(h, w, t, chunk=3)
    loss, n = LOSSES["sft"](lp, t)
    grads = torch.autograd.grad(loss, (h, w))
    assert n.item() == ref_n.item() == 15
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    for a, c in zip(grads, ref_g):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_bf16_weights_accumulate_in_float32():
    """A bf16 head (DeepSpeed's bf16): log-probs in float32 from bf16 logits as the plain path
    computes them, the weight's gradient back in bf16."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(33, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 40, (33,), generator=g)
    ref, _ = _plain(h, w, t)
    ref_g = torch.autograd.grad(ref.sum(), (h, w))
    lp, _ = linear_logps(h, w, t, chunk=8)
    grads = torch.autograd.grad(lp.sum(), (h, w))
    assert lp.dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=0)
    for a, c in zip(grads, ref_g):
        torch.testing.assert_close(a.float(), c.float(), atol=2e-2, rtol=2e-2)


def test_chunk_size_bounds_the_logits():
    assert chunk_tokens(4096, 32_000) == 262          # 8M elements / 32k vocabulary
    assert chunk_tokens(4096, 128_256) == 65
    assert chunk_tokens(500, 107) == 500              # a small vocabulary: one chunk
    assert chunk_tokens(10, 10 ** 9) == 1


def _tiny(arch: str):
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = {"llama": lambda: LlamaConfig(**common, tie_word_embeddings=False),
              "qwen3": lambda: Qwen3Config(**common, head_dim=8, tie_word_embeddings=True),
              "gemma2": lambda: Gemma2Config(**common, head_dim=8, final_logit_softcapping=5.0,
                                             attn_logit_softcapping=None)}[arch]()
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_model_forward_matches_plain_logits(arch):
    """Through a whole tiny model of the architecture (tied head for Qwen3, Gemma 2's final
    soft-capping moved into the chunked head): packed positions and padded targets give the
    log-probs and every parameter's gradient of log_softmax(model logits / T)."""
    model = _tiny(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    targets = torch.randint(0, 97, (2, 12), generator=g)
    targets[0, :4] = IGNORE
    inputs = {"input_ids": ids}

    logits = model(**inputs, use_cache=False).logits
    ref = torch.log_softmax(logits.float() / 0.8, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = ref * (targets >= 0)
    ref_g = torch.autograd.grad(ref.sum(), list(model.parameters()))

    lp, ent = target_logps(model, inputs, targets, temperature=0.8, entropy=True)
    grads = torch.autograd.grad(lp.sum(), list(model.parameters()))
    assert isinstance(model.get_output_embeddings(), LogpHead)
    assert getattr(model.config, "final_logit_softcapping", None) == (5.0 if arch == "gemma2" else None)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    assert ent.shape == (2, 12)
    for a, c in zip(grads, ref_g):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)

    # A packed row: only the scored positions reach the head.
    positions = torch.tensor([1, 4, 5, 11])
    lp1, _ = target_logps(model, {"input_ids": ids[:1]}, targets[0, positions].clamp(min=0), positions)
    full = torch.log_softmax(model(input_ids=ids[:1]).logits[0].float(), -1)
    torch.testing.assert_close(lp1, full[positions, targets[0, positions].clamp(min=0)], atol=1e-5, rtol=0)
    # With no request set the head is a plain Linear again: the model's logits are unchanged.
    torch.testing.assert_close(model(**inputs).logits, logits, atol=0, rtol=0)


def test_scaled_logits_take_the_plain_path():
    """An architecture that scales its logits after the head (a config `logit_scale`) is not
    converted; the log-probs still equal the model's own."""
    model = _tiny("llama")
    model.config.logit_scale = 0.5
    ids = torch.randint(0, 97, (1, 9))
    targets = torch.randint(0, 97, (1, 9))
    lp, _ = target_logps(model, {"input_ids": ids}, targets)
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    ref = torch.log_softmax(model(input_ids=ids).logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)


def test_under_cpu_autocast_both_passes_use_bf16_logits():
    """precision bf16 on CPU runs forwards under autocast: the head's matmuls in bf16 as the plain
    autocast path computes them, in the forward and in the backward's recomputation alike (so the
    softmax the backward rebuilds sums to 1 with the forward's log-sum-exp)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(29, 16, generator=g, requires_grad=True)
    w = torch.randn(60, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 60, (29,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = _plain(h, w, t)
        lp, _ = linear_logps(h, w, t, chunk=7)
    ref_g = torch.autograd.grad(ref.sum(), (h, w))
    grads = torch.autograd.grad(lp.sum(), (h, w))
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    for a, c in zip(grads, ref_g):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)
    # The chunk's softmax (bf16 logits, the saved log-sum-exp) sums to one: d(sum lp)/dh is
    # exactly sum_t (w[target] - E_p[w]), computed here in float64 from the same bf16 logits.
    z = (h.detach().bfloat16() @ w.detach().bfloat16().T).double()
    p = torch.softmax(z, -1)
    wb = w.detach().bfloat16().double()
    exact = wb[t] - p @ wb
    torch.testing.assert_close(grads[0].double(), exact, atol=2e-2, rtol=0)
