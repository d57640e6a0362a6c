"""The float32 ZeRO-0 step pre-hook (engine/deepspeed_engine.py): DeepSpeed ZeRO-1/2's clip, norm
and overflow rules, by hand."""

from __future__ import annotations

import math

import torch

from posttrain_cli.engine.deepspeed_engine import _clip_and_record_norm


def _opt(*grads):
    ps = [torch.nn.Parameter(torch.ones(len(g))) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = torch.tensor(g)
    return torch.optim.AdamW(ps, lr=0.1, weight_decay=0.0), ps


def test_clips_to_max_norm_and_records_the_norm_before():
    opt, (a, b) = _opt([3.0, 0.0], [0.0, 4.0])  # norm 5
    _clip_and_record_norm(opt, (), {}, max_norm=1.0)
    assert float(opt._global_grad_norm) == 5.0 and opt.overflow is False
    coef = 1.0 / (5.0 + 1e-6)  # DeepSpeed's and torch's epsilon
    assert torch.allclose(a.grad, torch.tensor([3.0 * coef, 0.0])) and torch.allclose(b.grad, torch.tensor([0.0, 4.0 * coef]))


def test_under_max_norm_or_without_clipping_the_gradients_stay():
    opt, (a,) = _opt([0.3, 0.4])
    _clip_and_record_norm(opt, (), {}, max_norm=1.0)
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4])) and math.isclose(float(opt._global_grad_norm), 0.5, rel_tol=1e-6)
    opt, (a,) = _opt([30.0, 40.0])
    _clip_and_record_norm(opt, (), {}, max_norm=0.0)
    assert torch.equal(a.grad, torch.tensor([30.0, 40.0])) and float(opt._global_grad_norm) == 50.0


def test_a_non_finite_gradient_is_an_overflow_and_nothing_moves():
    opt, (a, b) = _opt([math.inf, 1.0], [math.nan, 2.0])
    opt.register_step_pre_hook(lambda o, args, kw: _clip_and_record_norm(o, args, kw, max_norm=1.0))
    opt.step()
    assert opt.overflow is True and float(opt._global_grad_norm) == math.inf
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.ones(2))
    assert not opt.state  # no moment, no step count: as if the step never ran
    a.grad = torch.tensor([1.0, 1.0])
    opt.step()  # the next finite step updates again
    assert opt.overflow is False and not torch.equal(a.detach(), torch.ones(2))
