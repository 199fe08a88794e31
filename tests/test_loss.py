"""loss.py against independent references: autograd through Table 4 in float64, torch's own cross-entropy,
the paper's closed forms (Eq. 13, 16) and Table 5's (gamma, residual) read back through Eq. 6."""
import math

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
    return hidden, weight, labels, teacher_ids, teacher_logprobs


def grads(value, *inputs):
    return torch.autograd.grad(value, inputs)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def reference_in_float64(hidden, weight, labels, t_ids, t_logp, **kw):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    value = L.reference_q_target_loss(h @ w.T, labels, t_ids, t_logp.double(), **kw)
    return (value.detach(), *grads(value, h, w))


def chunked(hidden, weight, labels, t_ids, t_logp, **kw):
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    value = L.q_target_loss(h, w, labels, t_ids, t_logp, **kw)
    return (value.detach(), *grads(value, h, w))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16, None, 1000])
def test_chunked_matches_float64_autograd_of_table4(variant, chunk_size):
    batch = make_batch(seed=chunk_size or 3)
    ref = reference_in_float64(*batch, loss=variant)
    got = chunked(*batch, loss=variant, chunk_size=chunk_size)
    for name, a, b in zip(["value", "grad_hidden", "grad_weight"], got, ref):
        assert rel_err(a, b) <= 1e-5, (variant, name, rel_err(a, b))


@pytest.mark.parametrize("variant", ["target", "distill", "kl", "asft"])
@pytest.mark.parametrize("label_in_topk", [True, False])
def test_teacher_variants_with_label_inside_and_outside_topk(variant, label_in_topk):
    batch = make_batch(seed=5, label_in_topk=label_in_topk)
    stats = {}
    got = chunked(*batch, loss=variant, chunk_size=5, stats=stats)
    ref = reference_in_float64(*batch, loss=variant)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))
    assert float(stats["in_topk"]) == (float(stats["tokens"]) if label_in_topk else 0.0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("c", [None, 0.5])
def test_target_eta_and_constant_branch(eta, c):
    batch = make_batch(seed=11)
    got = chunked(*batch, loss="target", eta=eta, c=c, chunk_size=9)
    ref = reference_in_float64(*batch, loss="target", eta=eta, c=c)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))


def test_target_residual_endpoints_are_student_and_teacher():
    """Section 6: eta -> 0 gives the student on the teacher's top-k, eta -> 1 the renormalised teacher."""
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=2)
    rows = labels != -100
    logits = (hidden @ weight.T)[rows].double()
    lse = logits.logsumexp(-1)
    y, ids, tl = labels[rows], t_ids[rows], t_logp[rows].double()
    student = L.target(logits, lse, y, (ids, tl), eta=0.0)
    teacher = L.target(logits, lse, y, (ids, tl), eta=1.0)
    p_on_ids = logits.softmax(-1).gather(1, ids)
    torch.testing.assert_close(student.res, p_on_ids / p_on_ids.sum(-1, keepdim=True))
    torch.testing.assert_close(teacher.res, tl.exp() / tl.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(student.a, logits.softmax(-1).gather(1, y[:, None]).squeeze(1))


def test_p_y_near_one():
    """Eq. 7: when the model is sure of y_t, TARGET-SFT's target is nearly SFT's one-hot. There 1 - p_y sits
    at fp32's resolution, so fp32 inputs are held to the naive fp32 autograd's own error, fp64 to 1e-9."""
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=4)
    distinct = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:N]  # one weight row per label
    labels = torch.where(labels == -100, labels, distinct)
    valid = labels != -100
    weight = weight.clone()
    weight[labels[valid]] = 40 * hidden[valid] / hidden[valid].norm(dim=-1, keepdim=True) ** 2
    stats = {}
    got = chunked(hidden, weight, labels, t_ids, t_logp, loss="target", chunk_size=8, stats=stats)
    assert float(stats["p_label"] / stats["tokens"]) > 0.99999
    ref = reference_in_float64(hidden, weight, labels, t_ids, t_logp, loss="target")
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    naive_value = L.reference_q_target_loss(h @ w.T, labels, t_ids, t_logp, loss="target")
    naive = (naive_value, *grads(naive_value, h, w))
    assert all(rel_err(a, r) <= 1.5 * rel_err(n, r) for a, n, r in zip(got, naive, ref))
    got64 = chunked(hidden.double(), weight.double(), labels, t_ids, t_logp, loss="target", chunk_size=8)
    assert all(rel_err(a, r) <= 1e-9 for a, r in zip(got64, ref))
    sft = chunked(hidden, weight, labels, t_ids, t_logp, loss="sft")
    assert abs(float(got[0]) - float(sft[0])) < 1e-4


def test_sft_and_label_smoothing_equal_torch_cross_entropy():
    hidden, weight, labels, _, _ = make_batch(seed=8, dtype=torch.float64)
    logits = hidden @ weight.T
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, loss="sft"), F.cross_entropy(logits, labels))
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, loss="ls", lam=0.2),
                          F.cross_entropy(logits, labels, label_smoothing=0.2))


def test_distill_with_c_one_is_cross_entropy_to_renormalised_teacher():
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=9, dtype=torch.float64)
    valid = labels != -100
    logp = (hidden @ weight.T).log_softmax(-1)[valid]
    pi_t = t_logp[valid].double().exp()
    pi_t = pi_t / pi_t.sum(-1, keepdim=True)
    expected = -(pi_t * logp.gather(1, t_ids[valid])).sum(-1).mean()
    assert torch.allclose(L.q_target_loss(hidden, weight, labels, t_ids, t_logp, loss="distill", c=1.0), expected)


# --- The lens: Eq. 6 applied to each Table 4 loss gives back the rule's (gamma, residual) of Table 5 ----

def token_losses(variant, t_ids, t_logp, **kw):
    """The summed Table 4 loss as a function of logits, for induced_target."""
    return lambda z, y: L.reference_q_target_loss(z, y, t_ids, t_logp, loss=variant, normalizer=1, **kw)


def dense_residual(q, shape):
    if q.res is None:
        return torch.zeros(shape, dtype=torch.float64)
    if q.res_ids is None:
        return q.res.expand(shape)
    return torch.zeros(shape, dtype=q.res.dtype).scatter_add(1, q.res_ids, q.res)


@pytest.mark.parametrize("variant", VARIANTS)
def test_induced_target_equals_the_rule(variant):
    _, _, labels, t_ids, t_logp = make_batch(seed=13)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    valid = labels != -100
    z, y, ids, tl = logits[valid], labels[valid], t_ids[valid], t_logp[valid].double()
    induced = L.induced_target(token_losses(variant, ids, tl), z, y)
    q = L.RULES[variant](z, z.logsumexp(-1), y, (ids, tl), **L.variant_hyperparameters(variant))
    p = z.softmax(-1)
    onehot = F.one_hot(y, V).double()
    # Q = p - g with g = (a + b) p - a onehot - b res
    rule_target = q.a[:, None] * onehot + q.b[:, None] * dense_residual(q, p.shape) + (1 - q.a - q.b)[:, None] * p
    torch.testing.assert_close(induced, rule_target, rtol=1e-9, atol=1e-12)


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
    ("dft", lambda p_y, lam: p_y),
    ("beyond-log", lambda p_y, lam: p_y),  # alpha = 1: gamma = p_y^alpha
    ("ls", lambda p_y, lam: torch.full_like(p_y, 1 - lam)),
    ("kl", lambda p_y, lam: torch.full_like(p_y, 1 / (1 + lam))),
    ("asft", lambda p_y, lam: p_y / (p_y + lam)),
    ("distill", lambda p_y, lam: torch.full_like(p_y, 1 - 0.8)),
    ("target", lambda p_y, lam: p_y),
])
def test_table5_trust_after_removing_the_scale(variant, gamma):
    """Table 5's gamma. Token weighting (b = 0, Corollary 1): the induced target is gamma onehot +
    (1 - gamma) sg(pi). Distributional variants (Corollary 2): that of loss / (a + b) is gamma onehot +
    (1 - gamma) res."""
    _, _, labels, t_ids, t_logp = make_batch(seed=21)
    valid = labels != -100
    z = torch.randn(int(valid.sum()), V, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y, ids, tl = labels[valid], t_ids[valid], t_logp[valid].double()
    hp = L.variant_hyperparameters(variant)
    q = L.RULES[variant](z, z.logsumexp(-1), y, (ids, tl), **hp)
    induced = L.induced_target(token_losses(variant, ids, tl), z, y)
    p = z.softmax(-1)
    scale = torch.ones_like(q.a) if q.res is None else q.a + q.b
    normalised = p + (induced - p) / scale[:, None]  # the target of loss_t / s_t is p - g_t / s_t
    p_y = p.gather(1, y[:, None]).squeeze(1)
    expected_gamma = gamma(p_y, hp.get("lam", 0.0))
    residual = p if q.res is None else dense_residual(q, p.shape)
    expected = expected_gamma[:, None] * F.one_hot(y, V).double() + (1 - expected_gamma)[:, None] * residual
    torch.testing.assert_close(normalised, expected, rtol=1e-9, atol=1e-12)


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


def test_no_valid_label_gives_zero_loss_and_zero_gradients():
    hidden, weight, _, t_ids, t_logp = make_batch()
    labels = torch.full((N,), -100)
    value, gh, gw = chunked(hidden, weight, labels, t_ids, t_logp, loss="target")
    assert float(value) == 0.0 and not gh.any() and not gw.any()
    assert torch.isfinite(value)


def test_ignored_rows_contribute_nothing():
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=6)
    hidden2 = hidden.clone()
    hidden2[labels == -100] = 1e6  # garbage on ignored rows must not leak into loss or gradients
    a = chunked(hidden, weight, labels, t_ids, t_logp, loss="target", chunk_size=4)
    b = chunked(hidden2, weight, labels, t_ids, t_logp, loss="target", chunk_size=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not b[1][labels == -100].any()


def test_backward_scales_by_grad_output_and_normalizer():
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=7)
    h = hidden.requires_grad_(True)
    (g1,) = torch.autograd.grad(L.q_target_loss(h, weight, labels, t_ids, t_logp), h)
    (g2,) = torch.autograd.grad(3 * L.q_target_loss(h, weight, labels, t_ids, t_logp, normalizer=500), h)
    count = int((labels != -100).sum())
    torch.testing.assert_close(g2, g1 * 3 * count / 500)


def test_stats_are_means_of_the_paper_quantities():
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=10)
    stats = {}
    L.q_target_loss(hidden, weight, labels, t_ids, t_logp, loss="target", chunk_size=6, stats=stats)
    valid = labels != -100
    p_y = (hidden @ weight.T).softmax(-1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    assert float(stats["tokens"]) == int(valid.sum())
    assert math.isclose(float(stats["p_label"]), float(p_y.sum()), rel_tol=1e-5)
    assert math.isclose(float(stats["trust"]), float(p_y.sum()), rel_tol=1e-5)
    assert math.isclose(float(stats["residual"]), float((1 - p_y).sum()), rel_tol=1e-5)
    in_topk = (t_ids[valid] == labels[valid][:, None]).any(-1).sum()
    assert float(stats["in_topk"]) == int(in_topk)


@pytest.mark.parametrize("variant, gamma", [("kl", lambda p_y: 1 / 1.1 + 0 * p_y), ("gem", lambda p_y: 1 + 0 * p_y),
                                            ("asft", lambda p_y: p_y / (p_y + 0.1)), ("dft", lambda p_y: p_y)])
def test_logged_trust_is_table5_gamma(variant, gamma):
    hidden, weight, labels, t_ids, t_logp = make_batch(seed=12)
    stats = {}
    L.q_target_loss(hidden, weight, labels, t_ids, t_logp, loss=variant, chunk_size=6, stats=stats)
    valid = labels != -100
    p_y = (hidden @ weight.T).softmax(-1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    assert math.isclose(float(stats["trust"]), float(gamma(p_y).sum()), rel_tol=1e-5)


def test_no_gradients_are_built_without_grad_mode_and_one_backward_only():
    hidden, weight, labels, t_ids, t_logp = make_batch()
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with torch.no_grad():
        assert not L.q_target_loss(h, w, labels, t_ids, t_logp).requires_grad
    value = L.q_target_loss(h, w, labels, t_ids, t_logp)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        value.backward()


def test_default_chunk_size_bounds_memory():
    assert L.default_chunk_size(16384, 151936) * 151936 * 16 <= 2 * 2**30
    assert math.ceil(2048 / L.default_chunk_size(2048, 65536)) >= 8
    assert L.default_chunk_size(0, 100) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="nope"), "unknown loss"),
    (dict(loss="sft", c=0.5), "c is a hyperparameter"),
    (dict(loss="dft", tau=0.5), "takes"),
    (dict(loss="target", eta=1.5), "eta=1.5"),
])
def test_bad_arguments_fail_before_compute(kwargs, message):
    hidden, weight, labels, t_ids, t_logp = make_batch()
    with pytest.raises(ValueError, match=message):
        L.q_target_loss(hidden, weight, labels, t_ids, t_logp, **kwargs)


@pytest.mark.parametrize("variant", sorted(L.NEEDS_TEACHER))
def test_teacher_variants_without_a_cache_name_the_flag(variant):
    hidden, weight, labels, _, _ = make_batch()
    with pytest.raises(ValueError, match="--teacher-cache"):
        L.q_target_loss(hidden, weight, labels, loss=variant)
