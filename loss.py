"""The Q-target loss: every SFT variant as a target distribution, computed chunked and exact.

At each response token SFT trains pi_theta toward a target Q_t (paper Eq. 2):

    Q_t = gamma_t * onehot(y_t) + (1 - gamma_t) * res_t,      loss_t = CE(Q_t, pi_theta),

so the gradient with respect to the logits z is p - Q (Section 5.2). A variant is a *rule* that, for a
chunk of tokens, returns the stop-gradient weights of the two CE branches (Eq. 3, Eq. 4) and the residual:

    loss_t = a_t * CE(onehot(y_t), pi) + b_t * CE(res_t, pi),     dloss_t/dz = (a+b) p - a onehot - b res,

which is Q-target training with gamma = a / (a + b) up to the scale a + b (Corollary 2). Token-weighted
variants (DFT, beyond-log, ProFiT, EAFT) have b = 0: their residual is sg(pi) and gives no gradient
(Corollary 1). The rules below are Table 5 written as code.

Three ways to compute the same loss live here:
- `reference_q_target_loss`: Table 4's formulas on full logits with autograd, written to be read.
- `q_target_loss`: the rules on chunks of rows, never materialising [N, V] logits. The logit gradient is
  built in the forward pass, from which grad_hidden and grad_weight follow (as Liger-Kernel's fused linear
  cross-entropy does for plain CE); backward only scales them.
- `induced_target`: Eq. 6, Q = p - dloss/dz by autograd, for any loss: the lens itself.
tests/test_loss.py proves the three agree.
"""
import inspect
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------------
# The rules: one (trust, residual) choice per variant (Table 5)

class Target(NamedTuple):
    """A chunk's Q-target in gradient form: dloss/dz = (a + b) p - a onehot(y) - b res."""
    a: Tensor                      # [n] weight of CE(onehot(y), pi), the label-imitation branch
    b: Tensor                      # [n] weight of CE(res, pi), the residual branch (0: self-residual)
    res_ids: Optional[Tensor]      # [n, k] vocabulary ids the residual lives on; None: the whole vocabulary
    res: Optional[Tensor]          # [n, k] or [n, V] (or a broadcastable scalar) probabilities
    value: Optional[Tensor] = None  # [n] the paper's token loss, where it is not a*NLL + b*CE(res, pi)


def logprob_at(z, lse, ids):
    """log pi(ids) from fp32 logits z [n, V] and their logsumexp lse [n]; ids [n] or [n, k]."""
    if ids.dim() == 1:
        return z.gather(1, ids[:, None]).squeeze(1) - lse
    return z.gather(1, ids) - lse[:, None]


def sft(z, lse, y, teacher):
    """Standard SFT: gamma = 1, the one-hot target (Eq. 13)."""
    one = torch.ones_like(lse)
    return Target(one, torch.zeros_like(one), None, None)


def dft(z, lse, y, teacher):
    """DFT / p-loss, -sg(p_y) log p_y: gamma = p_y with the self-residual sg(pi) (Eq. 14-16)."""
    p_y = logprob_at(z, lse, y).exp()
    return Target(p_y, torch.zeros_like(p_y), None, None)


def beyond_log(z, lse, y, teacher, alpha=1.0):
    """Beyond-log, (1 - p_y^alpha) / alpha: its gradient p_y^alpha (p - onehot) is gamma = p_y^alpha."""
    p_alpha = logprob_at(z, lse, y).mul(alpha).exp()
    return Target(p_alpha, torch.zeros_like(p_alpha), None, None, value=(1 - p_alpha) / alpha)


def profit(z, lse, y, teacher, tau=0.1):
    """ProFiT: train only on tokens the model already finds plausible, gamma = 1[p_y > tau]."""
    keep = (logprob_at(z, lse, y).exp() > tau).to(z.dtype)
    return Target(keep, torch.zeros_like(keep), None, None)


def eaft(z, lse, y, teacher, k=20):
    """EAFT: gamma = the student's top-k entropy normalised by log k."""
    top_logp = z.topk(k, dim=-1).values.log_softmax(-1)
    entropy = -(top_logp.exp() * top_logp).sum(-1) / math.log(k)
    return Target(entropy, torch.zeros_like(entropy), None, None)


def label_smoothing(z, lse, y, teacher, lam=0.1):
    """Label smoothing: gamma = 1 - lambda, res = Unif(V)."""
    a = torch.full_like(lse, 1 - lam)
    return Target(a, torch.full_like(lse, lam), None, z.new_tensor(1 / z.shape[-1]))


def reference_kl(z, lse, y, ref, lam, label_weight):
    """label_weight * CE(onehot, pi) + lambda KL(pi_ref || pi), pi_ref the reference's renormalised top-k."""
    ref_ids, ref_logp = ref[0], ref[1].log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logprob_at(z, lse, ref_ids))).sum(-1)
    value = -label_weight * logprob_at(z, lse, y) + lam * kl
    return Target(label_weight, torch.full_like(lse, lam), ref_ids, ref_logp.exp(), value=value)


def kl_to_reference(z, lse, y, ref, lam=0.1):
    """SFT + lambda KL(pi_ref || pi): gamma = 1 / (1 + lambda), res = pi_ref."""
    return reference_kl(z, lse, y, ref, lam, torch.ones_like(lse))


def asft(z, lse, y, ref, lam=0.1):
    """ASFT, DFT + lambda KL(pi_ref || pi): gamma = p_y / (p_y + lambda), res = pi_ref."""
    return reference_kl(z, lse, y, ref, lam, logprob_at(z, lse, y).exp())


def gem(z, lse, y, teacher, beta=0.7):
    """GEM (Table 4's form), CE(onehot, pi) - CE(q, pi) with q = sg(pi)^(1/beta) normalised: a signed
    residual, b = -1 (Appendix B.3)."""
    q = (z / beta).softmax(-1)
    one = torch.ones_like(lse)
    return Target(one, -one, None, q)


def distill(z, lse, y, teacher, c=0.8):
    """Distillation (hybrid), c CE(pi_T, pi) + (1 - c) CE(onehot, pi): gamma = 1 - c, res = pi_T."""
    a = torch.full_like(lse, 1 - c)
    return Target(a, torch.full_like(lse, c), teacher[0], teacher[1].softmax(-1))


def target(z, lse, y, teacher, eta=0.5, c=None):
    """TARGET-SFT (Eq. 7-8): gamma = sg(p_y), res proportional to pi^(1-eta) pi_T^eta on the teacher's
    top-k. With c: the constant-branch ablation (Table 6), p_y CE(onehot, pi) + c CE(res, pi)."""
    teacher_ids, teacher_logp = teacher
    p_y = logprob_at(z, lse, y).exp()
    res = ((1 - eta) * logprob_at(z, lse, teacher_ids) + eta * teacher_logp).softmax(-1)
    b = 1 - p_y if c is None else torch.full_like(p_y, c)
    return Target(p_y, b, teacher_ids, res)


RULES = {"sft": sft, "dft": dft, "p": dft, "beyond-log": beyond_log, "profit": profit, "eaft": eaft,
         "ls": label_smoothing, "kl": kl_to_reference, "asft": asft, "gem": gem, "distill": distill,
         "target": target}
NEEDS_TEACHER = {"kl", "asft", "distill", "target"}  # kl and asft read a reference model's top-k cache


def variant_hyperparameters(loss, eta=0.5, c=None, **variant_kwargs):
    """The rule's keyword arguments, its defaults filled in, checked before any compute."""
    if loss not in RULES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(RULES)}")
    if c is not None and loss not in ("target", "distill"):
        raise ValueError(f"c is a hyperparameter of 'target' and 'distill', not of {loss!r}")
    given = dict(variant_kwargs, **({"eta": eta} if loss == "target" else {}),
                 **({"c": c} if c is not None else {}))
    defaults = {name: param.default for name, param in inspect.signature(RULES[loss]).parameters.items()
                if param.default is not inspect.Parameter.empty}
    if set(given) - set(defaults):
        raise ValueError(f"loss={loss!r} takes {sorted(defaults) or 'no hyperparameters'}, "
                         f"got {sorted(set(given) - set(defaults))}")
    if loss == "target" and not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} is outside [0, 1], the student-to-teacher interpolation of Section 6")
    return {**defaults, **given}


# ----------------------------------------------------------------------------------------------------
# The chunked, exact loss

def residual_cross_entropy(z, lse, q: Target):
    """CE(res, pi) = -sum_v res(v) log pi(v), with res on the teacher's ids or on the whole vocabulary."""
    if q.res is None:
        return torch.zeros_like(lse)
    logp = z - lse[:, None] if q.res_ids is None else logprob_at(z, lse, q.res_ids)
    return -(q.res * logp).sum(-1)


def logit_gradient_(z, lse, y, q: Target):
    """Turns the fp32 logits z into the logit gradient (a + b) p - a onehot(y) - b res, in place."""
    grad = z.sub_(lse[:, None]).exp_().mul_((q.a + q.b)[:, None])
    grad.scatter_add_(1, y[:, None], -q.a[:, None])
    if q.res_ids is not None:
        grad.scatter_add_(1, q.res_ids, -q.b[:, None] * q.res)
    elif q.res is not None:
        grad.addcmul_(q.b[:, None], q.res, value=-1)  # in place: a dense residual is already [n, V]
    return grad


def default_chunk_size(num_rows, vocab_size, budget_bytes=2 * 2**30):
    """Rows per chunk: at most 16 bytes per vocabulary entry (fp32 logits turned in place into the gradient,
    a softmax temporary, and GEM's dense residual, the largest rule) within the budget, and at least 8 chunks
    so a chunk stays a small share of the full [N, V] logits."""
    return max(1, min(budget_bytes // (16 * vocab_size), math.ceil(num_rows / 8)))


def trust(q: Target):
    """Table 5's gamma: a for token weighting (b = 0) and GEM's signed residual, else a / (a + b)."""
    return torch.where(q.b > 0, q.a / (q.a + q.b.clamp(min=0)), q.a)


def accumulate(stats, **sums):
    """Adds tensor sums (no .item(): a host sync per chunk would stall the GPU)."""
    for key, value in sums.items():
        stats[key] = stats.get(key, 0) + value.detach().double().sum()


class ChunkedQTargetLoss(torch.autograd.Function):
    """Forward walks the labelled rows chunk by chunk and also builds both gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, teacher_ids, teacher_logprobs, rule, hyper, chunk_size,
                normalizer, stats):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        # fp32 accumulation across chunks: summing bf16 partial products would lose the small ones
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 when checking in fp64
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        for chunk in rows.split(chunk_size):
            h, y = hidden[chunk], labels[chunk]
            teacher = None if teacher_ids is None else (teacher_ids[chunk].long(),
                                                        teacher_logprobs[chunk].to(acc_dtype))
            z = (h @ weight.T).to(acc_dtype)  # under bf16 the logits carry bf16 rounding, as HF's lm_head's do
            z -= z.amax(dim=-1, keepdim=True)  # log p_y = z_y - lse keeps its digits when p_y is near 1
            lse = torch.logsumexp(z, dim=-1)
            q = rule(z, lse, y, teacher, **hyper)
            logp_y = logprob_at(z, lse, y)
            value = q.value if q.value is not None else -q.a * logp_y + q.b * residual_cross_entropy(z, lse, q)
            total += value.sum()
            if stats is not None:
                in_topk = {} if teacher is None else {"in_topk": (teacher[0] == y[:, None]).any(-1)}
                accumulate(stats, tokens=torch.ones_like(lse), p_label=logp_y.exp(), trust=trust(q),
                           residual=q.b, **in_topk)
            if want_hidden or want_weight:
                grad = logit_gradient_(z, lse, y, q).div_(normalizer).to(weight.dtype)  # z is consumed here
                if want_hidden:
                    grad_hidden[chunk] = grad @ weight
                if want_weight and grad.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad.T, h)  # in place: no [V, H] temporary per chunk
                elif want_weight:
                    grad_weight += grad.T @ h  # a [V, H] bf16 product per chunk, summed over chunks in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("q_target_loss builds its gradients in the forward pass: one backward per forward")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: a [V, H] copy would double the peak
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, *[None] * 9


def q_target_loss(hidden, weight, labels, teacher_ids=None, teacher_logprobs=None, *, loss="target", eta=0.5,
                  c=None, chunk_size=None, ignore_index=-100, normalizer=None, stats=None, **variant_kwargs):
    """Sum over labelled tokens of CE(Q_t, softmax(h_t W^T)), divided by `normalizer`.

    hidden [N, H] final hidden states; weight [V, H] the lm_head; labels [N], already shifted (labels[i]
    follows position i), ignore_index where there is no label; teacher_ids and teacher_logprobs [N, k]: the
    teacher's (for kl/asft the reference model's) top-k ids and log-probabilities over the full vocabulary.
    Leading dimensions beyond N are flattened. normalizer defaults to the number of labelled tokens;
    train.py passes the global count of an optimiser step. stats, if a dict, gains this call's sums of
    tokens, p_label, trust (gamma of Table 5), residual (b) and in_topk: a step's means need no second pass.
    """
    hyper = variant_hyperparameters(loss, eta=eta, c=c, **variant_kwargs)
    if loss in NEEDS_TEACHER and (teacher_ids is None or teacher_logprobs is None):
        raise ValueError(f"loss={loss!r} needs teacher_ids and teacher_logprobs (train.py: --teacher-cache, "
                         "or --ref-cache for kl and asft)")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: no gradients built in the forward
        hidden, weight = hidden.detach(), weight.detach()
    if teacher_ids is not None:
        teacher_ids = teacher_ids.reshape(labels.numel(), -1)
        teacher_logprobs = teacher_logprobs.reshape(labels.numel(), -1)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    normalizer = normalizer if normalizer is not None else max(rows.numel(), 1)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), weight.shape[0])
    return ChunkedQTargetLoss.apply(hidden, weight, labels, rows, teacher_ids, teacher_logprobs, RULES[loss],
                                    hyper, chunk_size, normalizer, stats)


# ----------------------------------------------------------------------------------------------------
# The readable reference: Table 4's token-level objectives on full logits, differentiated by autograd

def reference_q_target_loss(logits, labels, teacher_ids=None, teacher_logprobs=None, *, loss="target", eta=0.5,
                            c=None, ignore_index=-100, normalizer=None, **variant_kwargs):
    """The same loss as q_target_loss, from full logits [N, V], each variant written as Table 4 writes it."""
    hp = variant_hyperparameters(loss, eta=eta, c=c, **variant_kwargs)
    valid = labels != ignore_index
    y = labels.masked_fill(~valid, 0)  # ignored rows are computed, then zeroed: no [N, V] copy of the logits
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    p_y, sg = logp_y.exp(), torch.Tensor.detach
    if loss in NEEDS_TEACHER:
        pi_t = teacher_logprobs.to(logp.dtype).softmax(-1)  # the teacher renormalised on its top-k
        logp_t = logp.gather(1, teacher_ids.long())          # log pi_theta on those ids

    if loss == "sft":
        per_token = -logp_y
    elif loss in ("dft", "p"):
        per_token = -sg(p_y) * logp_y
    elif loss == "beyond-log":
        per_token = (1 - p_y ** hp["alpha"]) / hp["alpha"]
    elif loss == "profit":
        per_token = -logp_y * (sg(p_y) > hp["tau"])
    elif loss == "eaft":
        top = sg(logp).topk(hp["k"], dim=-1).values.softmax(-1)
        per_token = (top * top.log()).sum(-1) / math.log(hp["k"]) * logp_y
    elif loss == "ls":
        per_token = -((1 - hp["lam"]) * logp_y + hp["lam"] / logp.shape[-1] * logp.sum(-1))
    elif loss in ("kl", "asft"):
        label_term = -logp_y if loss == "kl" else -sg(p_y) * logp_y
        per_token = label_term + hp["lam"] * (pi_t * (pi_t.log() - logp_t)).sum(-1)
    elif loss == "gem":
        q = sg(logp / hp["beta"]).softmax(-1)
        per_token = -logp_y + (q * logp).sum(-1)
    elif loss == "distill":
        per_token = -hp["c"] * (pi_t * logp_t).sum(-1) - (1 - hp["c"]) * logp_y
    elif loss == "target":
        res = sg((1 - hp["eta"]) * logp_t + hp["eta"] * pi_t.log()).softmax(-1)  # pi^(1-eta) pi_T^eta
        residual_weight = 1 - sg(p_y) if hp["c"] is None else hp["c"]
        per_token = -sg(p_y) * logp_y - residual_weight * (res * logp_t).sum(-1)  # Eq. 8
    normalizer = normalizer if normalizer is not None else max(int(valid.sum()), 1)
    return (per_token * valid).sum() / normalizer


def induced_target(loss_fn, logits, labels):
    """Eq. 6: the target Q = p - dloss/dz that a token-level loss drives pi toward.

    loss_fn(logits, labels) must return the *sum* of the token losses, so that dloss/dz is per token."""
    z = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(z, labels), z)
    return z.detach().softmax(-1) - grad
