"""deepspeed.kernels=liger: liger-kernel's Triton cross-entropy behind the LM head's log-probs
(losses/linear.py _LigerLogps) equals the plain logits -> log_softmax and the torch chunks, values
and gradients, fp32, 1e-5.

Liger's kernels are Triton's: on a CUDA machine they run on the GPU; without one in Triton's
interpreter, which is on for a whole process. liger-kernel is in the vLLM environment, which has
Triton: TRITON_INTERPRET=1 scripts/vllm_env.sh python -m pytest -m liger. The hand case of the chunked head (vocab 7)
is tests/unit/test_linear_logps.py; its plain reference is reused here.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from posttrain_cli.engine.lm_head import LogpHead, target_logps, use_kernels
from posttrain_cli.errors import UserError
from posttrain_cli.losses.linear import linear_logps
from tests.unit.test_linear_logps import _plain

pytestmark = [pytest.mark.liger,
              pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel is not installed (the vLLM environment has it)")]


@pytest.fixture(scope="module")
def device():
    """The device Liger's kernels run on here: a CUDA GPU, else Triton's interpreter on CPU, which
    must be on for the whole process (Triton defines kernels of its own as it launches one)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA: run with TRITON_INTERPRET=1 (Triton's interpreter)")
    return "cpu"


def _pair(device, n=37, h=16, v=50, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[3, 11]] = -100  # ignored positions: log-prob 0, no gradient
    upstream = torch.randn(n, generator=g)  # a different incoming gradient for every token
    return [t.to(device) if t is not None else None for t in (hidden, weight, b, targets, upstream)]


def _grads(fn, hidden, weight, bias, targets, upstream):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    lp = fn(*leaves, targets)
    (lp * upstream).sum().backward()
    return lp.detach(), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("bias, temperature, softcap", [
    (False, 1.0, None), (True, 0.7, None), (False, 1.3, None), (True, 1.0, 3.0)])
def test_liger_equals_the_plain_loss_and_the_torch_chunks(device, bias, temperature, softcap):
    if softcap is not None and device == "cpu":
        pytest.skip("Triton's interpreter cannot run Liger's soft-capping (a float argument's .to, CUDA "
                    "libdevice's tanh); a GPU runs it")
    args = _pair(device, bias=bias)
    plain = _grads(lambda h, w, b, t: _plain(h, w, t, b, temperature, softcap)[0], *args)
    kw = dict(temperature=temperature, softcap=softcap)
    chunks = _grads(lambda h, w, b, t: linear_logps(h, w, t, bias=b, chunk=8, **kw)[0], *args)
    liger = _grads(lambda h, w, b, t: linear_logps(h, w, t, bias=b, kernels="liger", **kw)[0], *args)
    for other in (plain, chunks):
        torch.testing.assert_close(liger[0], other[0], atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(liger[1], other[1]):
            if theirs is None:
                assert mine is None
            else:
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    assert liger[0][3] == 0 and liger[0][11] == 0
    assert (liger[1][0][[3, 11]] == 0).all()  # ignored tokens pass no gradient to their hidden states


def test_liger_is_really_used_and_what_it_cannot_compute_takes_the_torch_path(device, monkeypatch):
    from posttrain_cli.losses import linear

    calls = []
    real = linear._liger
    monkeypatch.setattr(linear, "_liger", lambda *a, **k: calls.append(k.get("grad") is not None) or real(*a, **k))
    hidden, weight, _, targets, upstream = _pair(device)
    h = hidden.clone().requires_grad_()
    lp, ent = linear_logps(h, weight, targets, kernels="liger")
    (lp * upstream).sum().backward()
    assert ent is None and calls == [False, True]  # forward, then the backward's recomputation
    calls.clear()
    # The entropy (grpo's and ppo's policy pass), a temperature after a soft-cap, float64: torch chunks.
    _, ent = linear_logps(hidden, weight, targets, kernels="liger", entropy=True)
    linear_logps(hidden, weight, targets, kernels="liger", softcap=3.0, temperature=0.7)
    linear_logps(hidden.double(), weight.double(), targets, kernels="liger")
    assert calls == [] and ent is not None
    torch.testing.assert_close(ent, _plain(hidden, weight, targets)[1])


def test_a_models_head_computes_with_liger(device, monkeypatch):
    """Through a tiny Llama's own forward (engine/lm_head.target_logps): the same log-probs and
    gradients as the torch head, with the head switched by use_kernels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    weights = LlamaForCausalLM(cfg).state_dict()
    out = []
    for kernels in ("torch", "liger"):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(weights)
        model.to(device)
        use_kernels(model, kernels)
        assert isinstance(model.lm_head, LogpHead) and model.lm_head.kernels == kernels
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
        targets = ids.roll(-1, 1).masked_fill(torch.arange(12, device=device) == 11, -100)
        lp, _ = target_logps(model, {"input_ids": ids}, targets, temperature=0.8)
        lp.sum().backward()
        out.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_liger_without_cuda_or_the_interpreter_is_refused_in_one_line(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs Liger's kernels")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UserError) as e:
        use_kernels(model, "liger", where="stages.sft.deepspeed.kernels")
    assert str(e.value).startswith("stages.sft.deepspeed.kernels=liger: Liger's kernels are Triton's and need a "
                                   "CUDA GPU; there is none here")
    assert str(e.value).endswith("; or set stages.sft.deepspeed.kernels=torch")


def test_bf16_weights_as_deepspeed_trains_them_on_a_gpu(device):
    """DeepSpeed's bf16 on GPUs: bf16 hidden states and head. Liger and the torch chunks agree to
    bf16 rounding (their float32 log-probs; the gradients in bf16)."""
    if device != "cuda":
        pytest.skip("bf16 Triton kernels: a CUDA GPU (the interpreter computes in numpy)")
    hidden, weight, _, targets, upstream = _pair(device, n=300, h=64, v=1000)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    chunks = _grads(lambda h, w, b, t: linear_logps(h, w, t, chunk=64)[0], hidden, weight, None, targets, upstream)
    liger = _grads(lambda h, w, b, t: linear_logps(h, w, t, kernels="liger")[0], hidden, weight, None, targets,
                   upstream)
    assert liger[0].dtype == torch.float32
    torch.testing.assert_close(liger[0], chunks[0], atol=2e-2, rtol=2e-2)
    for mine, theirs in zip(liger[1][:2], chunks[1][:2]):
        assert mine.dtype == torch.bfloat16
        torch.testing.assert_close(mine.float(), theirs.float(), atol=5e-2, rtol=5e-2)
