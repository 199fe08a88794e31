"""loss.py against independent references: autograd through Table 4 in float64, torch's own cross-entropy,
the paper's closed forms (Eq. 13, 16) and Table 5's (gamma, residual) read back through Eq. 6."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import loss as L

N, H, V, K = 41, 24, 96, 8
VARIANTS = sorted(L.RULES)


def make_batch(seed=0, dtype=torch.float32, label_in_topk=None):
    """Rows with ignored labels, and labels inside and outside the teacher's top-k."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) / math.sqrt(H)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::6] = -100
    teacher_logits = torch.randn(N, V, generator=g) * 2
    if label_in_topk is not None:  # force the label to the teacher's top (True) or bottom (False)
        teacher_logits[torch.arange(N), labels.clamp(min=0)] = 50.0 if label_in_topk else -50.0
    teacher_logprobs, teacher_ids = teacher_logits.log_softmax(-1).topk(K, dim=-1)
    label_logprobs = teacher_logits.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    token_weights = torch.rand(N, generator=g) * 2 * (torch.rand(N, generator=g) > 0.2)  # iw-SFT > 1, CFT zeros
    return hidden, weight, labels, teacher_ids, teacher_logprobs, label_logprobs, token_weights


def grads(value, *inputs):
    return torch.autograd.grad(value, inputs)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def reference_in_float64(hidden, weight, labels, *side, **kw):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    side = [t.double() if t is not None and t.is_floating_point() else t for t in side]
    value = L.reference_q_target_loss(h @ w.T, labels, L.Side(*side), **kw)
    return (value.detach(), *grads(value, h, w))


def chunked(hidden, weight, labels, *side, **kw):
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    value, _ = L.q_target_loss(h, w, labels, L.Side(*side), **kw)
    return (value.detach(), *grads(value, h, w))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, None, 1000])
def test_chunked_matches_float64_autograd_of_table4(variant, chunk_size):
    batch = make_batch(seed=chunk_size or 3)
    ref = reference_in_float64(*batch, loss=variant)
    got = chunked(*batch, loss=variant, chunk_size=chunk_size)
    for name, a, b in zip(["value", "grad_hidden", "grad_weight"], got, ref):
        assert rel_err(a, b) <= 1e-5, (variant, name, rel_err(a, b))


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"p"}))  # p is dft's rule: the same compilation
def test_compiled_matches_float64_autograd_of_table4_with_one_compilation(variant):
    """--compile: the chunk body through inductor meets eager's tolerance, and one compilation serves chunks of
    every size of two rows or more (dynamic=True); a one-row chunk, which PyTorch specialises, adds one more."""
    from torch._dynamo.utils import counters
    # this rule's compilations alone: more than 8 rules in one process would hit dynamo's recompile limit
    torch._dynamo.reset()
    counters.clear()
    for chunk_size in [7, 16, 5, 1000, 33]:  # 34 labelled rows: last chunks of 6, 2, 4 and 34 rows, then 1
        batch = make_batch(seed=chunk_size)
        ref = reference_in_float64(*batch, loss=variant)
        got = chunked(*batch, loss=variant, chunk_size=chunk_size, compile=True)
        for name, a, b in zip(["value", "grad_hidden", "grad_weight"], got, ref):
            assert rel_err(a, b) <= 1e-5, (variant, chunk_size, name, rel_err(a, b))
        assert counters["stats"]["unique_graphs"] == (1 if chunk_size != 33 else 2), (chunk_size, counters["stats"])


@pytest.mark.parametrize("variant", ["target", "distill", "kl", "asft"])
@pytest.mark.parametrize("label_in_topk", [True, False])
def test_teacher_variants_with_label_inside_and_outside_topk(variant, label_in_topk):
    batch = make_batch(seed=5, label_in_topk=label_in_topk)
    got = chunked(*batch, loss=variant, chunk_size=5)
    ref = reference_in_float64(*batch, loss=variant)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("c", [None, 0.5])
def test_target_eta_and_constant_branch(eta, c):
    batch = make_batch(seed=11)
    got = chunked(*batch, loss="target", eta=eta, c=c, chunk_size=9)
    ref = reference_in_float64(*batch, loss="target", eta=eta, c=c)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))


def test_target_residual_endpoints_are_student_and_teacher():
    """Section 6: eta -> 0 gives the student on the teacher's top-k, eta -> 1 the renormalised teacher."""
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=2)
    rows = labels != -100
    logits = (hidden @ weight.T)[rows].double()
    lse = logits.logsumexp(-1)
    y, ids, tl = labels[rows], t_ids[rows], t_logp[rows].double()
    student = L.target(logits, lse, y, L.Side(ids, tl), eta=0.0)
    teacher = L.target(logits, lse, y, L.Side(ids, tl), eta=1.0)
    p_on_ids = logits.softmax(-1).gather(1, ids)
    torch.testing.assert_close(student.res, p_on_ids / p_on_ids.sum(-1, keepdim=True))
    torch.testing.assert_close(teacher.res, tl.exp() / tl.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(student.a, logits.softmax(-1).gather(1, y[:, None]).squeeze(1))


def test_p_y_near_one():
    """Eq. 7: when the model is sure of y_t, TARGET-SFT's target is nearly SFT's one-hot. There 1 - p_y sits
    at fp32's resolution, so fp32 inputs are held to the naive fp32 autograd's own error, fp64 to 1e-9."""
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=4)
    distinct = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:N]  # one weight row per label
    labels = torch.where(labels == -100, labels, distinct)
    valid = labels != -100
    weight = weight.clone()
    weight[labels[valid]] = 40 * hidden[valid] / hidden[valid].norm(dim=-1, keepdim=True) ** 2
    got = chunked(hidden, weight, labels, t_ids, t_logp, loss="target", chunk_size=8)
    assert float(L.q_target_loss(hidden, weight, labels, L.Side(t_ids, t_logp))[1].p_label.mean()) > 0.99999
    ref = reference_in_float64(hidden, weight, labels, t_ids, t_logp, loss="target")
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    naive_value = L.reference_q_target_loss(h @ w.T, labels, L.Side(t_ids, t_logp), loss="target")
    naive = (naive_value, *grads(naive_value, h, w))
    assert all(rel_err(a, r) <= 1.5 * rel_err(n, r) for a, n, r in zip(got, naive, ref))
    got64 = chunked(hidden.double(), weight.double(), labels, t_ids, t_logp, loss="target", chunk_size=8)
    assert all(rel_err(a, r) <= 1e-9 for a, r in zip(got64, ref))
    sft = chunked(hidden, weight, labels, t_ids, t_logp, loss="sft")
    assert abs(float(got[0]) - float(sft[0])) < 1e-4


def test_sft_and_label_smoothing_equal_torch_cross_entropy():
    hidden, weight, labels, _, _, *_ = make_batch(seed=8, dtype=torch.float64)
    logits = hidden @ weight.T
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, loss="sft")[0], F.cross_entropy(logits, labels))
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, loss="ls", lam=0.2)[0],
                          F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_distill_with_c_one_is_cross_entropy_to_renormalised_teacher():
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=9, dtype=torch.float64)
    valid = labels != -100
    logp = (hidden @ weight.T).log_softmax(-1)[valid]
    pi_t = t_logp[valid].double().exp()
    pi_t = pi_t / pi_t.sum(-1, keepdim=True)
    expected = -(pi_t * logp.gather(1, t_ids[valid])).sum(-1).mean()
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, L.Side(t_ids, t_logp), loss="distill", c=1.0)[0],
                          expected)


# --- The lens: Eq. 6 applied to each Table 4 loss gives back the rule's (gamma, residual) of Table 5 ----

def token_losses(variant, *side, **kw):
    """The summed Table 4 loss as a function of logits, for induced_target."""
    return lambda z, y: L.reference_q_target_loss(z, y, L.Side(*side), loss=variant, normalizer=1, **kw)


def lens_inputs(seed):
    """Float64 logits and the side inputs of the labelled rows, for the Eq. 6 checks."""
    _, _, labels, t_ids, t_logp, t_label, weights = make_batch(seed=seed)
    valid = labels != -100
    z = torch.randn(int(valid.sum()), V, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 3
    side = L.Side(t_ids[valid], t_logp[valid].double(), t_label[valid].double(), weights[valid].double())
    return z, labels[valid], side


@pytest.mark.parametrize("variant", VARIANTS)
def test_induced_target_equals_the_rule(variant):
    z, y, side = lens_inputs(seed=13)
    induced = L.induced_target(token_losses(variant, *side), z, y)
    q = L.RULES[variant](z, z.logsumexp(-1), y, side, **L.variant_hyperparameters(variant))
    # Q = p - g with g = (a + b) p - a onehot - b res
    torch.testing.assert_close(induced, L.rule_target(q, z, y), rtol=1e-9, atol=1e-12)


def test_eq13_sft_induces_the_one_hot():
    z = torch.randn(5, 11, dtype=torch.float64)
    y = torch.tensor([0, 3, 10, 4, 4])
    induced = L.induced_target(token_losses("sft", None, None), z, y)
    torch.testing.assert_close(induced, F.one_hot(y, 11).double())


def test_eq16_p_loss_closed_form():
    z = torch.randn(6, 13, dtype=torch.float64) * 2
    y = torch.tensor([1, 2, 3, 12, 0, 7])
    induced = L.induced_target(token_losses("p", None, None), z, y)
    p = z.softmax(-1)
    p_y = p.gather(1, y[:, None])
    expected = (1 - p_y) * p  # j != y
    expected.scatter_(1, y[:, None], 2 * p_y - p_y ** 2)
    torch.testing.assert_close(induced, expected)


@pytest.mark.parametrize("variant, gamma", [
    ("dft", lambda p_y, side: p_y),
    ("beyond-log", lambda p_y, side: p_y),  # alpha = 1: gamma = p_y^alpha
    ("weighted", lambda p_y, side: side.weights),  # iw-SFT / CFT: gamma = w_t
    ("psft", lambda p_y, side: (p_y / side.label_logprobs.exp()) * (p_y / side.label_logprobs.exp() <= 1.2)),
    ("ls", lambda p_y, side: torch.full_like(p_y, 1 - 0.1)),
    ("kl", lambda p_y, side: torch.full_like(p_y, 1 / (1 + 0.1))),
    ("asft", lambda p_y, side: p_y / (p_y + 0.1)),
    ("distill", lambda p_y, side: torch.full_like(p_y, 1 - 0.8)),
    ("target", lambda p_y, side: p_y),
])
def test_table5_trust_after_removing_the_scale(variant, gamma):
    """Table 5's gamma. Token weighting (b = 0, Corollary 1): the induced target is gamma onehot +
    (1 - gamma) sg(pi). Distributional variants (Corollary 2): that of loss / (a + b) is gamma onehot +
    (1 - gamma) res."""
    z, y, side = lens_inputs(seed=21)
    q = L.RULES[variant](z, z.logsumexp(-1), y, side, **L.variant_hyperparameters(variant))
    induced = L.induced_target(token_losses(variant, *side), z, y)
    p = z.softmax(-1)
    scale = torch.ones_like(q.a) if q.res is None else q.a + q.b
    normalised = p + (induced - p) / scale[:, None]  # the target of loss_t / s_t is p - g_t / s_t
    p_y = p.gather(1, y[:, None]).squeeze(1)
    expected_gamma = gamma(p_y, side)
    residual = p if q.res is None else L.dense_residual(q, p)
    expected = expected_gamma[:, None] * F.one_hot(y, V).double() + (1 - expected_gamma)[:, None] * residual
    torch.testing.assert_close(normalised, expected, rtol=1e-9, atol=1e-12)


def test_proximal_sft_by_hand():
    """Table 4's PSFT on three hand-set tokens with pi_old(y) = 0.5, eps = 0.2: r = 0.4 (below the range:
    the min is r), r = 1.0 (inside) and r = 1.6 (above: the min is the constant 1.2, no gradient)."""
    p_y = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    z = torch.stack([torch.log(p_y), torch.log(1 - p_y)], dim=1)  # two tokens: y = 0 has probability p_y
    y = torch.zeros(3, dtype=torch.long)
    pi_old = torch.full((3,), math.log(0.5), dtype=torch.float64)
    value = L.reference_q_target_loss(z.requires_grad_(True), y, L.Side(label_logprobs=pi_old), loss="psft",
                                      normalizer=1)
    assert math.isclose(value.item(), -(0.4 + 1.0 + 1.2), rel_tol=1e-12)
    (grad,) = torch.autograd.grad(value, z)
    r = torch.tensor([0.4, 1.0, 0.0], dtype=torch.float64)  # d(-r)/dz = r (p - onehot); clipped: 0
    torch.testing.assert_close(grad, r[:, None] * (z.detach().softmax(-1) - F.one_hot(y, 2)))
    q = L.proximal(z.detach(), z.detach().logsumexp(-1), y, L.Side(label_logprobs=pi_old))
    torch.testing.assert_close(q.a, r)


def test_proximal_sft_lens_in_all_three_regimes():
    """Eq. 6 through Table 4's PSFT on rows with r below 1-eps, inside the range and above 1+eps."""
    z = torch.randn(30, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    y = torch.randint(0, V, (30,), generator=torch.Generator().manual_seed(6))
    r = torch.linspace(0.3, 2.0, 30, dtype=torch.float64)
    pi_old = z.log_softmax(-1).gather(1, y[:, None]).squeeze(1) - r.log()  # pi_old(y) = p_y / r
    side = L.Side(label_logprobs=pi_old)
    induced = L.induced_target(token_losses("psft", None, None, pi_old), z, y)
    q = L.proximal(z, z.logsumexp(-1), y, side)
    p = z.softmax(-1)
    gamma = r * (r <= 1.2)
    assert (r < 0.8).any() and ((r >= 0.8) & (r <= 1.2)).any() and (r > 1.2).any()
    torch.testing.assert_close(q.a, gamma)
    expected = gamma[:, None] * F.one_hot(y, V).double() + (1 - gamma)[:, None] * p
    torch.testing.assert_close(induced, expected, rtol=1e-9, atol=1e-12)


def test_proximal_sft_survives_a_ratio_beyond_fp32():
    """p_y / pi_old(y) = e^95 overflows fp32: the clip still holds, the gradient is exactly 0, nothing is NaN."""
    hidden, weight, labels, *_ = make_batch(seed=2)
    t_label = torch.full((N,), -95.0)
    value, grad_h, grad_w = chunked(hidden, weight * 0, labels, None, None, t_label, loss="psft")
    assert math.isclose(float(value), -1.2, rel_tol=1e-6)  # every token clipped at 1 + eps
    _, per_row = L.q_target_loss(hidden, weight * 0, labels, L.Side(label_logprobs=t_label), loss="psft")
    assert not grad_h.any() and not grad_w.any() and not L.trust(per_row.a, per_row.b).any()


@pytest.mark.parametrize("seed", [1, 3, 7, 16, 1000])
@pytest.mark.parametrize("variant", ["psft", "weighted"])
def test_new_rules_reach_both_sides_of_their_switch(variant, seed):
    """The batches the chunked tests use hold clipped and unclipped psft tokens, and zero and > 1 weights."""
    hidden, weight, labels, _, _, t_label, weights = make_batch(seed=seed)
    valid = labels != -100
    if variant == "psft":
        p_y = (hidden @ weight.T).softmax(-1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
        r = p_y / t_label[valid].exp()
        assert (r > 1.2).any() and (r < 0.8).any() and ((r >= 0.8) & (r <= 1.2)).any()
    else:
        assert (weights[valid] == 0).any() and (weights[valid] > 1).any()


# --- Precision, edge cases, errors --------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sft", "dft", "target", "distill", "gem"])
def test_bf16_within_stated_tolerance(variant):
    """bf16 hidden/weight: matmuls in bf16, softmax and accumulation in fp32. Tolerances: value 1e-2 and
    gradients 2e-2 relative (bf16 keeps 8 bits of mantissa, ~4e-3 per rounding)."""
    batch = make_batch(seed=17)
    h16, w16 = batch[0].bfloat16(), batch[1].bfloat16()
    ref = reference_in_float64(h16, w16, *batch[2:], loss=variant)
    got = chunked(h16, w16, *batch[2:], loss=variant, chunk_size=10)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    assert rel_err(got[0], ref[0]) <= 1e-2
    assert rel_err(got[1], ref[1]) <= 2e-2 and rel_err(got[2], ref[2]) <= 2e-2


def bf16_ulps(got, exact):
    """|got - exact| in units of the last place of bf16 at exact's magnitude (8 bits of mantissa)."""
    spacing = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    return ((got.double() - exact) / spacing).abs()


@pytest.mark.parametrize("variant", ["sft", "target"])
def test_bf16_weight_gradient_is_rounded_once_not_per_chunk(variant):
    """Under bf16 the chunks' weight-gradient products add up in fp32, and only the sum is rounded to bf16:
    every entry is within one bf16 ulp of the float64 gradient of the same bf16 inputs. Summing bf16-rounded
    partial products, one per chunk (loss.py before), lands several ulps away where the partials cancel."""
    batch = make_batch(seed=5)
    h16, w16 = batch[0].bfloat16(), batch[1].bfloat16()
    exact = reference_in_float64(h16, w16, *batch[2:], loss=variant)[2]
    got = chunked(h16, w16, *batch[2:], loss=variant, chunk_size=3)[2]  # 12 chunks of labelled rows
    assert got.dtype == torch.bfloat16
    assert float(bf16_ulps(got, exact).max()) <= 1.0
    per_chunk = sum(g.T.bfloat16() @ h for g, h in zip(  # the old summation, on the exact logit gradient
        logit_gradients_in_float64(h16, w16, *batch[2:], loss=variant).split(3), h16[batch[2] != -100].split(3)))
    assert float(bf16_ulps(per_chunk.float().bfloat16(), exact).max()) > 1.0  # the check can tell them apart


def logit_gradients_in_float64(hidden, weight, labels, *side, **kw):
    """dloss/dz of the labelled rows, by autograd in float64 (Eq. 6's p - Q, scaled by the normaliser)."""
    z = (hidden.double() @ weight.double().T).requires_grad_(True)
    side = [t.double() if t is not None and t.is_floating_point() else t for t in side]
    (grad,) = grads(L.reference_q_target_loss(z, labels, L.Side(*side), **kw), z)
    return grad[labels != -100]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype is CUDA only")
def test_weight_gradient_blocks_on_cuda_write_fp32():
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(40, 1000, generator=g, device="cuda").bfloat16()
    h = torch.randn(40, 24, generator=g, device="cuda").bfloat16()
    grad_weight = torch.zeros(1000, 24, device="cuda")
    L.add_weight_gradient_(grad_weight, grad, h, vocab_block=300)  # blocks of 300, 300, 300, 100 rows
    exact = grad.double().T @ h.double()
    assert float((grad_weight.double() - exact).abs().max() / exact.abs().max()) < 1e-5


def test_no_valid_label_gives_zero_loss_and_zero_gradients():
    hidden, weight, _, t_ids, t_logp, *_ = make_batch()
    labels = torch.full((N,), -100)
    value, gh, gw = chunked(hidden, weight, labels, t_ids, t_logp, loss="target")
    assert float(value) == 0.0 and not gh.any() and not gw.any()
    assert torch.isfinite(value)


def test_ignored_rows_contribute_nothing():
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=6)
    hidden2 = hidden.clone()
    hidden2[labels == -100] = 1e6  # garbage on ignored rows must not leak into loss or gradients
    a = chunked(hidden, weight, labels, t_ids, t_logp, loss="target", chunk_size=4)
    b = chunked(hidden2, weight, labels, t_ids, t_logp, loss="target", chunk_size=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not b[1][labels == -100].any()


def test_backward_scales_by_grad_output_and_normalizer():
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=7)
    h = hidden.requires_grad_(True)
    (g1,) = torch.autograd.grad(L.q_target_loss(h, weight, labels, L.Side(t_ids, t_logp))[0], h)
    (g2,) = torch.autograd.grad(3 * L.q_target_loss(h, weight, labels, L.Side(t_ids, t_logp), normalizer=500)[0], h)
    count = int((labels != -100).sum())
    torch.testing.assert_close(g2, g1 * 3 * count / 500)


def test_per_row_values_are_the_paper_quantities():
    """TARGET-SFT's a = p_y and b = 1 - p_y (Eq. 7), for every labelled row in order, and the cache's p(y)."""
    hidden, weight, labels, t_ids, t_logp, t_label, _ = make_batch(seed=10)
    value, per_row = L.q_target_loss(hidden.requires_grad_(True), weight, labels, L.Side(t_ids, t_logp, t_label),
                                     loss="target", chunk_size=6)
    valid = labels != -100
    p_y = (hidden.detach() @ weight.T).softmax(-1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    for got, expected in ((per_row.p_label, p_y), (per_row.a, p_y), (per_row.b, 1 - p_y),
                          (L.trust(per_row.a, per_row.b), p_y), (per_row.p_cached_label, t_label[valid].exp())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert value.requires_grad and not any(t.requires_grad for t in per_row)


@pytest.mark.parametrize("variant, gamma", [("kl", lambda p_y: 1 / 1.1 + 0 * p_y), ("gem", lambda p_y: 1 + 0 * p_y),
                                            ("asft", lambda p_y: p_y / (p_y + 0.1)), ("dft", lambda p_y: p_y)])
def test_logged_trust_is_table5_gamma(variant, gamma):
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch(seed=12)
    _, per_row = L.q_target_loss(hidden, weight, labels, L.Side(t_ids, t_logp), loss=variant, chunk_size=6)
    valid = labels != -100
    p_y = (hidden @ weight.T).softmax(-1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    torch.testing.assert_close(L.trust(per_row.a, per_row.b), gamma(p_y), rtol=1e-5, atol=1e-7)


def test_no_gradients_are_built_without_grad_mode_and_one_backward_only():
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with torch.no_grad():
        assert not L.q_target_loss(h, w, labels, L.Side(t_ids, t_logp))[0].requires_grad
    value, _ = L.q_target_loss(h, w, labels, L.Side(t_ids, t_logp))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        value.backward()


@pytest.mark.parametrize("ram, budget", [(24 * 2**30, 24 * 2**30 // 16), (256 * 2**30, 2 * 2**30)])
def test_default_chunk_size_on_a_cpu_is_a_sixteenth_of_its_ram_at_most_2_gib(monkeypatch, ram, budget):
    """This machine's 24 GiB gives 1.5 GiB of chunk, a 256 GiB node the 2 GiB cap; no floor on the number of
    chunks."""
    monkeypatch.setattr(L.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": ram // 4096}[name])
    rows = L.default_chunk_size(16384, 151936)
    assert rows == budget // (20 * 151936)
    assert rows * 151936 * 20 <= budget < (rows + 1) * 151936 * 20
    assert L.default_chunk_size(100, 1000) == 100  # everything fits: one chunk
    assert L.default_chunk_size(0, 100) == 1


@pytest.mark.parametrize("gpu_bytes, budget", [(143_771 * 2**20, 2 * 2**30), (24 * 2**30, 24 * 2**30 // 16)])
def test_default_chunk_size_on_a_gpu_is_a_sixteenth_of_its_memory_at_most_2_gib(monkeypatch, gpu_bytes, budget):
    """An H200 (143,771 MiB) gets the 2 GiB cap, ~700 rows at Qwen2.5's vocabulary; a 24 GiB card its sixteenth."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=gpu_bytes))
    rows = L.default_chunk_size(16384, 151936, torch.device("cuda", 0))
    assert rows == budget // (20 * 151936)
    assert rows * 151936 * 20 <= budget < (rows + 1) * 151936 * 20


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="nope"), "unknown loss"),
    (dict(loss="sft", c=0.5), "c is a hyperparameter"),
    (dict(loss="dft", tau=0.5), "takes"),
    (dict(loss="target", eta=1.5), "eta=1.5"),
])
def test_bad_arguments_fail_before_compute(kwargs, message):
    hidden, weight, labels, t_ids, t_logp, *_ = make_batch()
    with pytest.raises(ValueError, match=message):
        L.q_target_loss(hidden, weight, labels, L.Side(t_ids, t_logp), **kwargs)


@pytest.mark.parametrize("variant", sorted(L.NEEDS_CACHE | L.NEEDS_WEIGHTS))
def test_variants_without_their_inputs_name_the_flag(variant):
    hidden, weight, labels, *_ = make_batch()
    flag = ("weight_spans" if variant in L.NEEDS_WEIGHTS else
            "--ref-cache" if variant in L.REFERENCE_LOSSES else "--teacher-cache")
    for fn, first in ((L.q_target_loss, (hidden, weight)), (L.reference_q_target_loss, (hidden @ weight.T,))):
        with pytest.raises(ValueError, match=flag):
            fn(*first, labels, loss=variant)



def test_teaching_table_and_figure3(capsys, tmp_path):
    """`python loss.py` checks each printed row against the rule's own (a, b, residual); --plot draws Figure 3."""
    L.print_table5()
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line.split() and line.split()[0] in L.RULES}
    assert set(rows) == set(L.RULES) - {"p"}
    assert all(" ok (" in line for line in rows.values())
    assert rows["sft"].split()[1] == "1.000" and rows["distill"].split()[1] == "0.200"
    L.plot_figure3(tmp_path / "figure3.png")
    assert (tmp_path / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
