"""On-policy distillation (losses/distill.py, stages/distill.py): the advantage and the losses against
hand-worked numbers, their gradients against the reverse KL's, and routing prompts to teachers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain_cli.data.routing import check_routes, teacher_key
from posttrain_cli.data.schemas import open_prompt_row
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.losses import LOSS_AGGREGATIONS
from posttrain_cli.losses.distill import DISTILL_LOSSES, mixture_logprobs
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout import onpolicy
from posttrain_cli.stages import distill

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
OPTS = dict(adv_clip=2.0, is_cap=2.0, alpha=0.0)


def logits_of(*probs) -> torch.Tensor:
    """Leaf logits whose softmax rows are `probs`."""
    return torch.tensor(probs, dtype=torch.float64).log().requires_grad_(True)


def test_registry_matches_the_schema_choices():
    assert set(DISTILL_LOSSES) == set(KINDS["distill"].schema["kl"][0])


def test_token_advantage_is_the_clipped_log_ratio_by_hand():
    # Position 0: p_S = (.5, .5), p_T = (.8, .2), sampled 0: log(.8 / .5) = log 1.6 = 0.4700.
    # Position 1: p_S = (.9, .1), p_T = (.99, .01), sampled 1: log(.01 / .1) = -2.3026, clipped to -2.
    student = logits_of([0.5, 0.5], [0.9, 0.1])
    lsm = torch.log_softmax(student, -1)
    teacher = t([0.8, 0.2], [0.99, 0.01]).log()
    targets = torch.tensor([0, 1])
    sampler = lsm.detach().gather(1, targets[:, None]).squeeze(1)  # on policy: rho = 1
    loss, stats = DISTILL_LOSSES["token"](lsm, teacher, targets, sampler, t(0, 0), **OPTS)
    assert stats["adv_mean"].tolist() == pytest.approx([math.log(1.6), -2.0])
    assert stats["adv_clip_fraction"].tolist() == [0.0, 1.0]
    assert stats["is_truncation_fraction"].tolist() == [0.0, 0.0]
    # The value is the sampled reverse KL log p_S - log p_T: -0.4700 and +2.3026.
    assert loss.tolist() == pytest.approx([-math.log(1.6), math.log(10)])
    assert stats["reverse_kl"].tolist() == pytest.approx([-math.log(1.6), math.log(10)])
    # Gradient -A_t grad log p_S(y_t); d log p(y) / d logits = onehot(y) - p:
    # position 0: -0.4700 x (.5, -.5); position 1: +2 x (-.9, .9).
    loss.sum().backward()
    a = math.log(1.6)
    assert student.grad.tolist()[0] == pytest.approx([-0.5 * a, 0.5 * a])
    assert student.grad.tolist()[1] == pytest.approx([-1.8, 1.8])


def test_outcome_advantage_adds_alpha_times_the_group_centred_reward():
    lsm = torch.log_softmax(logits_of([0.5, 0.5]), -1)
    teacher = t([0.8, 0.2]).log().view(1, 2)
    targets = torch.tensor([0])
    _, stats = DISTILL_LOSSES["token"](lsm, teacher, targets, lsm.detach()[:, 0], t(1.0),
                                       adv_clip=2.0, is_cap=2.0, alpha=0.5)
    assert stats["adv_mean"].tolist() == pytest.approx([math.log(1.6) + 0.5])
    # The clip is on the teacher term only: a log-ratio of 3 clips to 2, then + 0.5 x 1.
    teacher = torch.tensor([[math.log(0.5) + 3.0, -50.0]], dtype=torch.float64)
    _, stats = DISTILL_LOSSES["token"](lsm, teacher, targets, lsm.detach()[:, 0], t(1.0),
                                       adv_clip=2.0, is_cap=2.0, alpha=0.5)
    assert stats["adv_mean"].tolist() == pytest.approx([2.5])


@pytest.mark.parametrize("cap, weight", [(2.0, 2.0), (None, 3.0), (5.0, 3.0)])
def test_importance_weight_is_truncated_at_is_cap(cap, weight):
    # rho = p_S / p_sampler = .5 / (.5 / 3) = 3; the gradient is scaled by min(rho, cap).
    student = logits_of([0.5, 0.5])
    lsm = torch.log_softmax(student, -1)
    teacher = t([0.8, 0.2]).log().view(1, 2)
    loss, stats = DISTILL_LOSSES["token"](lsm, teacher, torch.tensor([0]), t(math.log(0.5 / 3)), t(0.0),
                                          adv_clip=2.0, is_cap=cap, alpha=0.0)
    assert stats["is_truncation_fraction"].tolist() == [1.0 if cap == 2.0 else 0.0]
    loss.sum().backward()
    a = math.log(1.6)
    assert student.grad.tolist()[0] == pytest.approx([-0.5 * a * weight, 0.5 * a * weight])


def test_token_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Sum over every token y of p_S(y) x (the token loss's gradient at y) = grad KL(p_S || p_T)."""
    p_s, p_t = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]
    student = logits_of(p_s)
    for y in range(3):
        lsm = torch.log_softmax(student, -1)
        loss, _ = DISTILL_LOSSES["token"](lsm, t(p_t).log().view(1, 3), torch.tensor([y]), lsm.detach()[:, y],
                                          t(0.0), adv_clip=100.0, is_cap=None, alpha=0.0)
        (p_s[y] * loss.sum()).backward()
    ref = logits_of(p_s)
    q = torch.softmax(ref, -1)
    (q * (q.log() - t(p_t).log())).sum().backward()
    assert student.grad[0].tolist() == pytest.approx(ref.grad[0].tolist())


def test_full_reverse_kl_by_hand():
    # p_S = (.5, .5), p_T = (.8, .2): KL = .5 log(.5/.8) + .5 log(.5/.2) = 0.2231.
    # d KL / d logits_j = p_j (log p_j / q_j - KL) = .5 x (-0.4700 - 0.2231, 0.9163 - 0.2231) = (-ln 2 / 2, ln 2 / 2).
    student = logits_of([0.5, 0.5], [0.8, 0.2])
    lsm = torch.log_softmax(student, -1)
    teacher = t([0.8, 0.2], [0.8, 0.2]).log()
    loss, stats = DISTILL_LOSSES["full"](lsm, teacher, torch.tensor([0, 1]), lsm.detach()[:, 0], t(0, 0), **OPTS)
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert loss.tolist() == pytest.approx([kl, 0.0], abs=1e-12)
    assert stats["full_reverse_kl"].tolist() == pytest.approx([kl, 0.0], abs=1e-12)
    # The sampled estimate at position 0 (token 0): log .5 - log .8.
    assert stats["reverse_kl"].tolist()[0] == pytest.approx(math.log(0.5 / 0.8))
    loss.sum().backward()
    assert student.grad.tolist()[0] == pytest.approx([-math.log(2) / 2, math.log(2) / 2])
    assert student.grad.tolist()[1] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_full_adds_the_outcome_term_as_a_policy_gradient():
    # p_S = p_T: no KL gradient; alpha 0.5 x outcome 1 on token 0: -0.5 x (.5, -.5).
    student = logits_of([0.5, 0.5])
    lsm = torch.log_softmax(student, -1)
    loss, stats = DISTILL_LOSSES["full"](lsm, t([0.5, 0.5]).log().view(1, 2), torch.tensor([0]), lsm.detach()[:, 0],
                                         t(1.0), adv_clip=2.0, is_cap=2.0, alpha=0.5)
    assert stats["adv_mean"].tolist() == [0.5]
    assert loss.tolist() == pytest.approx([0.0], abs=1e-12)
    loss.sum().backward()
    assert student.grad.tolist()[0] == pytest.approx([-0.25, 0.25])


def test_mixture_is_the_weighted_sum_of_teacher_probabilities():
    # weights 1 : 3 -> .25 x (.8, .2) + .75 x (.2, .8) = (.35, .65)
    mix = mixture_logprobs([t([0.8, 0.2]).log().view(1, 2), t([0.2, 0.8]).log().view(1, 2)], [1.0, 3.0])
    assert mix.exp().tolist()[0] == pytest.approx([0.35, 0.65])
    with pytest.raises(ValueError):
        mixture_logprobs([t([0.8, 0.2]).log().view(1, 2)], [0.0])


def test_token_mean_weighs_every_completion_token_alike():
    s, w = LOSS_AGGREGATIONS[distill.AGGREGATION](t(1, 3, 2), torch.tensor([0, 0, 1]), 2, 8)
    assert (float(s), w) == (6.0, 3.0)


# ---------------------------------------------------------------- routing


def _row(n: int, **fields) -> dict:
    return open_prompt_row({"messages": [{"role": "user", "content": "1+1"}], **fields}, "p.jsonl", n)


def test_routing_by_dataset_or_domain():
    teachers = {"add": "teacher_add", "sub": "teacher_sub"}
    assert teacher_key(_row(1, dataset="add"), teachers, "stages.student") == "add"
    assert teacher_key(_row(2, domain="sub"), teachers, "stages.student") == "sub"
    assert check_routes([_row(1, dataset="add"), _row(2, domain="sub"), _row(3, dataset="sub")],
                        teachers, "stages.student") == {"add": 1, "sub": 2}
    with pytest.raises(UserError, match=r"p.jsonl: row 4: dataset 'mul' has no teacher in stages.student.teachers"):
        teacher_key(_row(4, dataset="mul"), teachers, "stages.student")
    with pytest.raises(UserError, match=r"p.jsonl: row 5: no 'dataset' \(or 'domain'\) field"):
        teacher_key(_row(5), teachers, "stages.student")


V = 16  # token ids 1..9 in sequences; teacher k marks its logits at V - 1 - k


class StubTeacher:
    """A teacher whose logits say which teacher it is (id V-1-k) and put the next token first, so a
    test sees both who scored a token and that its rows lined up; records each call's sequences."""

    def __init__(self, k: int):
        self.k, self.calls = k, []

    def __call__(self, *, input_ids, logits_to_keep, **_):
        ids = input_ids[0]
        self.calls.append(ids.tolist())
        logits = torch.full((1, len(logits_to_keep), V), -10.0)
        logits[0, torch.arange(len(logits_to_keep)), ids[logits_to_keep + 1]] = 10.0
        logits[0, :, V - 1 - self.k] = 5.0
        return SimpleNamespace(logits=logits)


def _teachers(n: int, synced: bool = False) -> distill.Teachers:
    pack = dict(boundaries="mask", mask_dtype=torch.float32, device=torch.device("cpu"))
    tt = object.__new__(distill.Teachers)
    tt.keys, tt.route, tt.temperature, tt.pack, tt.synced = [f"t{k}" for k in range(n)], True, 1.0, pack, synced
    tt.modules, tt.weights, tt.width = [StubTeacher(k) for k in range(n)], [1.0] * n, None
    tt.dummy = distill.pack_answers([([2, 2], [False, True])], **pack)
    return tt


def _micro(episodes, pack):
    return onpolicy.micro_batch(episodes, LOSS_AGGREGATIONS["token_mean"], 8, **pack)


def _episode(prompt: int, prompt_ids: list[int], ids: list[int]) -> ep.Episode:
    return ep.Episode(prompt, prompt_ids, ids, [0.0] * len(ids), "", "eos")


def test_each_episode_is_scored_by_its_own_teacher_alone():
    tt = _teachers(3)
    eps = [_episode(0, [1, 2], [3, 4, 5]), _episode(1, [6], [7]), _episode(2, [8, 9, 1], [2, 3]),
           _episode(3, [4], [5, 6])]
    route = [1, 0, 1, 1]  # teacher 2 has no rows
    micro = _micro(eps, tt.pack)
    out = tt.log_probs(micro, route)
    assert out.shape == (len(micro["targets"]), V)
    for i, k in enumerate(route):
        rows = out[micro["seq"] == i]
        assert (rows.argmax(-1) == micro["targets"][micro["seq"] == i]).all(), "tokens lined up with their rows"
        others = [j for j in range(3) if j != k]
        assert (rows[:, V - 1 - k] > rows[:, [V - 1 - j for j in others]].max(-1).values).all(), (i, k)
    # Teacher 0 saw episode 1 only, teacher 1 the other three, teacher 2 nothing (no dummy without ZeRO-3).
    assert tt.modules[0].calls == [[6, 7]]
    assert tt.modules[1].calls == [[1, 2, 3, 4, 5, 8, 9, 1, 2, 3, 4, 5, 6]]
    assert tt.modules[2].calls == []


def test_zero3_calls_every_teacher_once_per_micro_batch():
    tt = _teachers(2, synced=True)
    micro = _micro([_episode(0, [1], [2, 3])], tt.pack)
    tt.log_probs(micro, [0])
    assert tt.modules[0].calls == [[1, 2, 3]]
    assert tt.modules[1].calls == [[2, 2]], "a dummy forward keeps ZeRO-3's collectives in step"
    tt.dummy_calls()
    assert [len(m.calls) for m in tt.modules] == [2, 2]


def test_mixture_scores_every_episode_with_every_teacher():
    tt = _teachers(2)
    tt.route, tt.weights = False, [1.0, 1.0]
    micro = _micro([_episode(0, [1], [2, 3]), _episode(1, [4], [5])], tt.pack)
    out = tt.log_probs(micro, [0, 0])
    assert [len(m.calls) for m in tt.modules] == [1, 1]
    # Both signatures carry the same mass in an equal mixture.
    assert torch.allclose(out[:, V - 1], out[:, V - 2])


def test_log_probs_over_the_tokenizer_ids_when_embeddings_are_padded():
    """A teacher padded to more rows than the student (same tokenizer): both distributions are
    taken over the first `width` ids, each normalised there; the padded rows take no mass."""

    class Fixed(torch.nn.Module):
        def forward(self, input_ids=None, logits_to_keep=None, **kw):
            logits = torch.tensor([[[0.0, 0.0, 0.0, 5.0, 5.0]]]).expand(1, input_ids.shape[1], 5)
            return type("Out", (), {"logits": logits[:, logits_to_keep] if logits_to_keep is not None else logits})

    micro = {"inputs": {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, "positions": torch.tensor([1])}
    full = distill.log_softmax(Fixed(), micro, 1.0)
    cut = distill.log_softmax(Fixed(), micro, 1.0, width=3)
    assert full.shape == (1, 5) and cut.shape == (1, 3)
    # Three equal logits over 3 ids: log(1/3) each, whatever the two padded rows held.
    assert torch.allclose(cut, torch.full((1, 3), -math.log(3.0)))


def test_token_loss_reads_the_same_from_sampled_log_probs_as_from_distributions():
    """kl: token takes [N] log-probs at the sampled tokens (the chunked head's) or [N, V]: the same
    loss, statistics and student gradient."""
    from posttrain_cli.losses.distill import at_targets

    student = logits_of([0.5, 0.3, 0.2], [0.1, 0.6, 0.3])
    teacher = t([0.7, 0.2, 0.1], [0.2, 0.2, 0.6]).log()
    targets, outcome = torch.tensor([0, 2]), t(1.0, -1.0)
    sampler = t(-0.6, -1.4)  # off policy: rho != 1, truncated at 2 for position 1
    opts = dict(adv_clip=0.3, is_cap=2.0, alpha=0.5)
    full_loss, full_stats = DISTILL_LOSSES["token"](torch.log_softmax(student, -1), teacher, targets, sampler, outcome, **opts)
    full_loss.sum().backward()
    g_full = student.grad.clone()
    student.grad = None
    lsm = torch.log_softmax(student, -1)
    tok_loss, tok_stats = DISTILL_LOSSES["token"](at_targets(lsm, targets), at_targets(teacher, targets), targets,
                                                  sampler, outcome, **opts)
    tok_loss.sum().backward()
    assert torch.equal(tok_loss, full_loss) and torch.equal(student.grad, g_full)
    assert all(torch.equal(tok_stats[k], full_stats[k]) for k in full_stats)
    assert DISTILL_LOSSES["token"].needs_distribution is False
    assert getattr(DISTILL_LOSSES["full"], "needs_distribution", True)


def test_mixture_at_the_sampled_tokens_is_the_mixture_gathered():
    a, b = t([0.8, 0.2], [0.5, 0.5]).log(), t([0.2, 0.8], [0.1, 0.9]).log()
    targets = torch.tensor([1, 0])
    whole = mixture_logprobs([a, b], [1.0, 3.0]).gather(1, targets[:, None]).squeeze(1)
    at = mixture_logprobs([x.gather(1, targets[:, None]).squeeze(1) for x in (a, b)], [1.0, 3.0])
    assert at.shape == (2,) and torch.allclose(at, whole)
    assert at.exp().tolist() == pytest.approx([0.25 * 0.2 + 0.75 * 0.8, 0.25 * 0.5 + 0.75 * 0.1])


@pytest.mark.parametrize("route", [True, False])
def test_teachers_at_the_sampled_tokens_equal_their_distributions_gathered(route, tmp_path):
    """Real tiny Llama teachers through the chunked head (at_tokens) against their full log-softmax,
    routed (each episode its own teacher, some teacher on a subset) and mixed."""
    from transformers import AutoModelForCausalLM

    from posttrain_cli.losses.distill import at_targets
    from posttrain_cli.models.tiny import build_tiny

    tt = _teachers(2)
    tt.route, tt.temperature = route, 0.7
    tt.modules = []
    for k in range(2):
        path = build_tiny(tmp_path / f"t{k}", {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "max_position_embeddings": 64, "seed": k})
        tt.modules.append(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval())
    eps = [_episode(0, [1, 20, 21], [30, 31, 2]), _episode(1, [1, 40], [41, 42, 43, 2]), _episode(2, [1, 9], [10, 2])]
    micro = _micro(eps, tt.pack)
    routes = [1, 0, 1]
    whole = tt.log_probs(micro, routes)
    tt.at_tokens = True
    at = tt.log_probs(micro, routes)
    assert whole.ndim == 2 and at.shape == micro["targets"].shape
    torch.testing.assert_close(at, at_targets(whole, micro["targets"]), atol=1e-5, rtol=1e-5)
