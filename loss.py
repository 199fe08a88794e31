"""The Q-target loss: every SFT variant as a target distribution, computed chunked and exact.

At each response token SFT trains pi_theta toward a target Q_t (paper Eq. 2):

    Q_t = gamma_t * onehot(y_t) + (1 - gamma_t) * res_t,      loss_t = CE(Q_t, pi_theta),

so the gradient with respect to the logits z is p - Q (Section 5.2). A variant is a *rule* that, for a
chunk of tokens, returns the stop-gradient weights of the two CE branches (Eq. 3, Eq. 4) and the residual:

    loss_t = a_t * CE(onehot(y_t), pi) + b_t * CE(res_t, pi),     dloss_t/dz = (a+b) p - a onehot - b res,

which is Q-target training with gamma = a / (a + b) up to the scale a + b (Corollary 2). Token-weighted
variants (DFT, beyond-log, ProFiT, EAFT, iw-SFT/CFT as `weighted`, Proximal SFT) have b = 0: their residual is
sg(pi) and gives no gradient (Corollary 1). The rules below are Table 5 written as code.

Three ways to compute the same loss live here:
- `reference_q_target_loss`: Table 4's formulas on full logits with autograd, written to be read.
- `q_target_loss`: the rules on chunks of rows, never materialising [N, V] logits. The logit gradient is
  built in the forward pass, from which grad_hidden and grad_weight follow (as Liger-Kernel's fused linear
  cross-entropy does for plain CE); backward only scales them. With compile=True (train.py --compile) each
  chunk's element-wise work, `chunk_loss_and_gradient`, runs fused by torch.compile.
- `induced_target`: Eq. 6, Q = p - dloss/dz by autograd, for any loss: the lens itself.
tests/test_loss.py proves the three agree. `python loss.py` prints Table 5 computed on a worked example;
`python loss.py --plot FILE.png` draws Figure 3 for every variant.
"""
import argparse
import inspect
import math
import os
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


class Side(NamedTuple):
    """What a rule reads besides the student: a cache's rows (the teacher's; for kl, asft and psft the
    reference model's) and the data's label weights. Rules name it after what it holds (teacher, ref, data)."""
    ids: Optional[Tensor] = None             # [n, k] the cached model's top-k ids
    logprobs: Optional[Tensor] = None        # [n, k] their log-probabilities over the full vocabulary
    label_logprobs: Optional[Tensor] = None  # [n] its log-probability of the observed label y_t
    weights: Optional[Tensor] = None         # [n] label trust read from the data (weighted)

    def rows(self, index, float_dtype):
        """These rows of every input given, the float ones in the loss's accumulation dtype."""
        def take(t, dtype=None):
            return None if t is None else t[index].to(dtype or t.dtype)
        return Side(take(self.ids), take(self.logprobs, float_dtype), take(self.label_logprobs, float_dtype),
                    take(self.weights, float_dtype))


def logprob_at(z, lse, ids):
    """log pi(ids) from fp32 logits z [n, V] and their logsumexp lse [n]; ids [n] or [n, k]."""
    if ids.dim() == 1:
        return z.gather(1, ids[:, None]).squeeze(1) - lse
    return z.gather(1, ids) - lse[:, None]


def self_residual(a):
    """Token weighting (Corollary 1): gamma = a, residual sg(pi), no residual gradient."""
    return Target(a, torch.zeros_like(a), None, None)


def sft(z, lse, y, side):
    """Standard SFT: gamma = 1, the one-hot target (Eq. 13)."""
    return self_residual(torch.ones_like(lse))


def dft(z, lse, y, side):
    """DFT / p-loss, -sg(p_y) log p_y: gamma = p_y with the self-residual sg(pi) (Eq. 14-16)."""
    return self_residual(logprob_at(z, lse, y).exp())


def beyond_log(z, lse, y, side, alpha=1.0):
    """Beyond-log, (1 - p_y^alpha) / alpha: its gradient p_y^alpha (p - onehot) is gamma = p_y^alpha."""
    p_alpha = logprob_at(z, lse, y).mul(alpha).exp()
    return self_residual(p_alpha)._replace(value=(1 - p_alpha) / alpha)


def profit(z, lse, y, side, tau=0.1):
    """ProFiT: train only on tokens the model already finds plausible, gamma = 1[p_y > tau]."""
    return self_residual((logprob_at(z, lse, y).exp() > tau).to(z.dtype))


def eaft(z, lse, y, side, k=20):
    """EAFT: gamma = the student's top-k entropy normalised by log k."""
    top_logp = z.topk(k, dim=-1).values.log_softmax(-1)
    return self_residual(-(top_logp.exp() * top_logp).sum(-1) / math.log(k))


def weighted(z, lse, y, data):
    """Label trust read from the data, -w_t log p_y: gamma = w_t, self-residual (Corollary 1). iw-SFT's
    trajectory weight w(tau) on every token of a sample, CFT's critical-token mask c_t, or any designed gamma."""
    return self_residual(data.weights.to(lse.dtype))


def proximal(z, lse, y, ref, eps=0.2):
    """Proximal SFT, -min(r, clip(r, 1-eps, 1+eps)) with r = p_y / pi_old(y_t), pi_old the reference cache's
    label probability. Where r <= 1+eps the min is r, whose gradient is r (p - onehot): gamma = r, self-residual.
    Where r > 1+eps the min is the constant 1+eps and the gradient is cut: gamma = 0, the target is sg(pi).
    (The lower bound 1-eps never binds: below it the min is r itself.) The trust region is thus a label trust
    that switches off once p_y has grown 1+eps times past pi_old. Compared in log space: r may overflow."""
    log_r = logprob_at(z, lse, y) - ref.label_logprobs
    inside = log_r <= math.log1p(eps)
    r = log_r.clamp(max=math.log1p(eps)).exp()
    return self_residual(torch.where(inside, r, 0.0))._replace(value=-r)


def label_smoothing(z, lse, y, side, lam=0.1):
    """Label smoothing: gamma = 1 - lambda, res = Unif(V)."""
    a = torch.full_like(lse, 1 - lam)
    return Target(a, torch.full_like(lse, lam), None, z.new_tensor(1 / z.shape[-1]))


def reference_kl(z, lse, y, ref, lam, label_weight):
    """label_weight * CE(onehot, pi) + lambda KL(pi_ref || pi), pi_ref the reference's renormalised top-k."""
    ref_logp = ref.logprobs.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logprob_at(z, lse, ref.ids))).sum(-1)
    value = -label_weight * logprob_at(z, lse, y) + lam * kl
    return Target(label_weight, torch.full_like(lse, lam), ref.ids, ref_logp.exp(), value=value)


def kl_to_reference(z, lse, y, ref, lam=0.1):
    """SFT + lambda KL(pi_ref || pi): gamma = 1 / (1 + lambda), res = pi_ref."""
    return reference_kl(z, lse, y, ref, lam, torch.ones_like(lse))


def asft(z, lse, y, ref, lam=0.1):
    """ASFT, DFT + lambda KL(pi_ref || pi): gamma = p_y / (p_y + lambda), res = pi_ref."""
    return reference_kl(z, lse, y, ref, lam, logprob_at(z, lse, y).exp())


def gem(z, lse, y, side, beta=0.7):
    """GEM (Table 4's form), CE(onehot, pi) - CE(q, pi) with q = sg(pi)^(1/beta) normalised: a signed
    residual, b = -1 (Appendix B.3)."""
    q = (z / beta).softmax(-1)
    one = torch.ones_like(lse)
    return Target(one, -one, None, q)


def distill(z, lse, y, teacher, c=0.8):
    """Distillation (hybrid), c CE(pi_T, pi) + (1 - c) CE(onehot, pi): gamma = 1 - c, res = pi_T."""
    a = torch.full_like(lse, 1 - c)
    return Target(a, torch.full_like(lse, c), teacher.ids, teacher.logprobs.softmax(-1))


def target(z, lse, y, teacher, eta=0.5, c=None):
    """TARGET-SFT (Eq. 7-8): gamma = sg(p_y), res proportional to pi^(1-eta) pi_T^eta on the teacher's
    top-k. With c: the constant-branch ablation (Table 6), p_y CE(onehot, pi) + c CE(res, pi)."""
    p_y = logprob_at(z, lse, y).exp()
    res = ((1 - eta) * logprob_at(z, lse, teacher.ids) + eta * teacher.logprobs).softmax(-1)
    b = 1 - p_y if c is None else torch.full_like(p_y, c)
    return Target(p_y, b, teacher.ids, res)


RULES = {"sft": sft, "dft": dft, "p": dft, "beyond-log": beyond_log, "profit": profit, "eaft": eaft,
         "weighted": weighted, "psft": proximal, "ls": label_smoothing, "kl": kl_to_reference, "asft": asft,
         "gem": gem, "distill": distill, "target": target}
NEEDS_TOPK = {"kl", "asft", "distill", "target"}    # read a cache's top-k ids and log-probabilities
NEEDS_CACHE = NEEDS_TOPK | {"psft"}                  # read a cache at all (psft: its label log-probs, pi_old)
REFERENCE_LOSSES = {"kl", "asft", "psft"}            # whose cache is a reference model's (--ref-cache)
NEEDS_WEIGHTS = {"weighted"}                         # read label weights from the data
# train.py's flag for each hyperparameter of the rules: (the rules' keyword, also the flag's dest there; its type)
FLAGS = {"--eta": ("eta", float), "--c": ("c", float), "--alpha": ("alpha", float), "--tau": ("tau", float),
         "--eaft-k": ("k", int), "--lam": ("lam", float), "--beta": ("beta", float), "--eps": ("eps", float)}


def variant_hyperparameters(loss, eta=0.5, c=None, **variant_kwargs):
    """The rule's keyword arguments, its defaults filled in, checked before any compute."""
    if loss not in RULES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(RULES)}")
    if c is not None and loss not in ("target", "distill"):
        raise ValueError(f"c is a hyperparameter of 'target' and 'distill', not of {loss!r}")
    given = dict(variant_kwargs, **({"eta": eta} if loss == "target" else {}), **({"c": c} if c is not None else {}))
    defaults = {name: param.default for name, param in inspect.signature(RULES[loss]).parameters.items()
                if param.default is not inspect.Parameter.empty}
    if set(given) - set(defaults):
        raise ValueError(f"loss={loss!r} takes {sorted(defaults) or 'no hyperparameters'}, "
                         f"got {sorted(set(given) - set(defaults))}")
    if loss == "target" and not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} is outside [0, 1], the student-to-teacher interpolation of Section 6")
    if loss == "psft" and not 0 < given.get("eps", 0.2) < 1:
        raise ValueError(f"eps={given['eps']} is outside (0, 1), Proximal SFT's clip range 1 +- eps")
    return {**defaults, **given}


def check_side_inputs(loss, side):
    """A loss missing what it reads fails here, naming the train.py flag that provides it."""
    cache_flag = "--ref-cache" if loss in REFERENCE_LOSSES else "--teacher-cache"
    if loss in NEEDS_TOPK and (side.ids is None or side.logprobs is None):
        raise ValueError(f"loss={loss!r} needs a cache's top-k ids and logprobs (train.py: {cache_flag})")
    if loss == "psft" and side.label_logprobs is None:
        raise ValueError("loss='psft' needs the starting model's label_logprobs, log pi_old(y_t) (train.py: "
                         "--ref-cache, built from the starting model by teacher_cache.py)")
    if loss in NEEDS_WEIGHTS and side.weights is None:
        raise ValueError("loss='weighted' needs label weights (train.py: a `weight` or `weight_spans` field in "
                         "every row of the data)")


# ----------------------------------------------------------------------------------------------------
# The chunked, exact loss

def matmul_writes_fp32(hidden, weight):
    """Under bf16 on CUDA the matmul writes fp32 logits itself (torch >= 2.8): no upcast of the inputs."""
    return hidden.is_cuda and hidden.dtype == weight.dtype == torch.bfloat16


def logits_fp32(hidden, weight):
    """fp32 logits h W^T: under bf16 on CUDA written fp32 by the matmul (rounding logits of 12-30 to bf16 would move a
    renormalised top-64 probability by up to 1e-2); elsewhere from inputs upcast (a no-op for fp32 ones)."""
    if matmul_writes_fp32(hidden, weight):
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 when checking in fp64
    return hidden.to(acc_dtype) @ weight.to(acc_dtype).T


def add_weight_gradient_(grad_weight, grad, h, vocab_block=2**15):
    """grad_weight += grad^T h in grad_weight's fp32, no bf16 rounding of the chunk's partial product: one addmm_, or
    on CUDA under bf16 fp32 matmul outputs a vocabulary block at a time ([vocab_block, H], not 0.9 GB of [V, H])."""
    if grad.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad.T, h)
        return
    for start in range(0, grad.shape[1], vocab_block):
        block = slice(start, start + vocab_block)
        grad_weight[block] += torch.mm(grad[:, block].T, h, out_dtype=grad_weight.dtype)


def residual_cross_entropy(z, lse, q: Target):
    """CE(res, pi) = -sum_v res(v) log pi(v), with res on the teacher's ids or on the whole vocabulary."""
    if q.res is None:
        return torch.zeros_like(lse)
    logp = z - lse[:, None] if q.res_ids is None else logprob_at(z, lse, q.res_ids)
    return -(q.res * logp).sum(-1)


def logit_gradient_(exp_z, sum_exp, y, q: Target):
    """Turns exp(z) [n, V] into the logit gradient (a + b) p - a onehot(y) - b res, in place (p = exp(z) / sum)."""
    grad = exp_z.mul_(((q.a + q.b) / sum_exp)[:, None])
    grad.scatter_add_(1, y[:, None], -q.a[:, None])
    if q.res_ids is not None:  # the top-k ids of a row are distinct: no two adds meet, the same bits every run
        grad.scatter_add_(1, q.res_ids, -q.b[:, None] * q.res)
    elif q.res is not None:
        grad.addcmul_(q.b[:, None], q.res, value=-1)  # in place: a dense residual is already [n, V]
    return grad


def chunk_loss_and_gradient(h, head, y, side, rule, hyper, grad_scale, grad_dtype):
    """A chunk's work from its hidden rows h [n, H] and the head, all that torch.compile fuses (--compile): the sum of
    its token losses, its rows' p_y, a and b, and grad_scale (1/normalizer, a 0-dim tensor: as a number it would be
    compiled in) times the logit gradient in grad_dtype (None: none). The logits are made here, not passed in: a
    compiled call's arguments live until it returns."""
    z = logits_fp32(h, head)
    z = z - z.amax(dim=-1, keepdim=True)  # log p_y = z_y - lse keeps its digits when p_y is near 1
    exp_z = z.exp()  # exponentiated once, for both the logsumexp and the gradient
    sum_exp = exp_z.sum(-1)
    lse = sum_exp.log()
    q = rule(z, lse, y, side, **hyper)
    logp_y = logprob_at(z, lse, y)
    value = q.value if q.value is not None else -q.a * logp_y + q.b * residual_cross_entropy(z, lse, q)
    del z  # eagerly, the chunk's peak is two [n, V] tensors (the gradient and its cast), not three
    grad = None if grad_dtype is None else logit_gradient_(
        exp_z, sum_exp, y, q._replace(a=q.a * grad_scale, b=q.b * grad_scale)).to(grad_dtype)
    return value.sum(), logp_y.exp(), q.a, q.b, grad


# inductor fuses the body's passes over [n, V] into a few kernels. dynamic=True: one compilation per rule serves every
# chunk of two rows or more (a one-row chunk, a size PyTorch specialises, compiles once more)
compiled_chunk = torch.compile(chunk_loss_and_gradient, dynamic=True)


def default_chunk_size(num_rows, vocab_size, device=torch.device("cpu")):
    """Rows per chunk at 20 bytes per vocabulary entry (fp32 logits, their exp turned into the gradient, GEM's three
    more [n, V]): a sixteenth of the device's (a CPU's) total memory, at most 2 GiB, ~700 rows at V = 151936: the
    chunks, and so the summation order, are the same at every step and resume (MEASUREMENTS.md)."""
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return max(1, min(num_rows, min(total // 16, 2 * 2**30) // (20 * vocab_size)))


def trust(a, b):
    """Table 5's gamma from a rule's branch weights: a for token weighting (b = 0) and GEM's signed residual, else
    a / (a + b)."""
    return torch.where(b > 0, a / (a + b.clamp(min=0)), a)


QUADRANTS = ("q1_rescue", "q2_filter", "q3_both_high", "q4_student_high")


def quadrant(p_student, p_teacher, threshold):
    """Figure 4's regime of each observed token, an index into QUADRANTS: Q1 rescue (teacher high, student
    low), Q2 filter (both low), Q3 both high, Q4 student high, teacher low."""
    student_high, teacher_high = p_student >= threshold, p_teacher >= threshold
    return torch.where(teacher_high, torch.where(student_high, 2, 0), torch.where(student_high, 3, 1))


class PerRow(NamedTuple):
    """What q_target_loss computed on the way, per labelled row in order, detached: what a run logs."""
    p_label: Tensor                   # [n] p_theta(y_t)
    a: Tensor                         # [n] the rule's label weight
    b: Tensor                         # [n] its residual weight (Table 5's gamma: trust(a, b))
    p_cached_label: Optional[Tensor]  # [n] the cache's p(y_t) where the side holds label_logprobs, else None

    def sums(self, label_ids, cached_ids, threshold, owner):
        """train.py's logged sums of these rows by their metrics.jsonl names (owner: the cache's, teacher or ref)."""
        values = {"p_label": self.p_label, "trust": trust(self.a, self.b), "residual": self.b}
        if owner is not None:
            values["in_topk"] = (cached_ids == label_ids[:, None]).any(-1)
            values[f"p_{owner}_label"] = self.p_cached_label
        if owner == "teacher":
            index = quadrant(self.p_label, self.p_cached_label, threshold)
            values.update({name: index == k for k, name in enumerate(QUADRANTS)})
        return {name: value.double().sum() for name, value in values.items()}  # float64: many steps' tokens add up


class ChunkedQTargetLoss(torch.autograd.Function):
    """Forward walks the labelled rows chunk by chunk and also builds both gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, side, rule, hyper, chunk_size, normalizer, compile):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        # fp32 accumulation across chunks: summing bf16 partial products would lose the small ones
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 when checking in fp64
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        # the head the logits are computed with: upcast once here, unless the matmul itself writes fp32 (CUDA)
        head = weight if matmul_writes_fp32(hidden, weight) else weight.to(acc_dtype)
        p_label, a, b = [], [], []  # each chunk's rows, PerRow's first three
        chunk_body = compiled_chunk if compile else chunk_loss_and_gradient
        grad_dtype = head.dtype if want_hidden or want_weight else None
        grad_scale = torch.full((), 1 / normalizer, dtype=acc_dtype, device=hidden.device)  # a fill: no host copy
        for chunk in rows.split(chunk_size):
            h = hidden[chunk]
            value, p_y, row_a, row_b, grad = chunk_body(h, head, labels[chunk], side.rows(chunk, acc_dtype), rule,
                                                        hyper, grad_scale, grad_dtype)
            total += value
            p_label.append(p_y)
            a.append(row_a)
            b.append(row_b)
            if want_hidden:
                grad_hidden[chunk] = (grad @ head).to(grad_hidden.dtype)
            if want_weight:
                add_weight_gradient_(grad_weight, grad, h.to(head.dtype))
            del grad  # before the next chunk's logits: not two chunks' at once
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        p_label, a, b = (torch.cat(parts) if parts else total.new_zeros(0) for parts in (p_label, a, b))
        ctx.mark_non_differentiable(p_label, a, b)
        return total / normalizer, p_label, a, b

    @staticmethod
    def backward(ctx, grad_output, *per_row_grads):
        if ctx.used:
            raise RuntimeError("q_target_loss builds its gradients in the forward pass: one backward per forward")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors  # scaled in place: a [V, H] copy would double the peak
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, *(None for _ in ctx.needs_input_grad[2:])  # none for labels ... compile


def q_target_loss(hidden, weight, labels, side=Side(), *, loss="target", chunk_size=None, ignore_index=-100,
                  normalizer=None, compile=False, **hyper):
    """Sum over labelled tokens of CE(Q_t, softmax(h_t W^T)), divided by `normalizer`; and the PerRow values.

    hidden [N, H] final hidden states; weight [V, H] the lm_head; labels [N], already shifted (labels[i]
    follows position i), ignore_index where there is no label (None: every row is labelled). side: what the
    rule reads besides the student, rows aligned with labels (Side: a cache's top-k ids and log-probabilities
    [N, k] and its label log-probabilities [N]; the data's label weights [N]). Leading dimensions beyond N are
    flattened. normalizer defaults to the number of labelled tokens; train.py passes the global count of an
    optimiser step. compile: each chunk's element-wise work through compiled_chunk (torch.compile), else eagerly.
    hyper: the rule's hyperparameters (eta, c, lam, ...; variant_hyperparameters).
    """
    hyper = variant_hyperparameters(loss, **hyper)
    check_side_inputs(loss, side)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: no gradients built in the forward
        hidden, weight = hidden.detach(), weight.detach()
    n = labels.numel()
    side = Side(ids=None if side.ids is None else side.ids.reshape(n, -1).long(),
                logprobs=None if side.logprobs is None else side.logprobs.reshape(n, -1),
                label_logprobs=None if side.label_logprobs is None else side.label_logprobs.reshape(n),
                weights=None if side.weights is None else side.weights.reshape(n))
    # ignore_index=None: every row is labelled (train.py selects them on the host), and no nonzero() waits on the GPU
    rows = (torch.arange(n, device=labels.device) if ignore_index is None
            else (labels != ignore_index).nonzero().squeeze(1))
    normalizer = normalizer if normalizer is not None else max(rows.numel(), 1)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), weight.shape[0], hidden.device)
    value, p_label, a, b = ChunkedQTargetLoss.apply(hidden, weight, labels, rows, side, RULES[loss], hyper, chunk_size,
                                                    normalizer, compile)
    cached = None if side.label_logprobs is None else side.label_logprobs[rows].detach().to(p_label.dtype).exp()
    return value, PerRow(p_label, a, b, cached)


# ----------------------------------------------------------------------------------------------------
# The readable reference: Table 4's token-level objectives on full logits, differentiated by autograd

def reference_q_target_loss(logits, labels, side=Side(), *, loss="target", ignore_index=-100, normalizer=None,
                            **hyper):
    """The same loss as q_target_loss, from full logits [N, V], each variant written as Table 4 writes it."""
    hp = variant_hyperparameters(loss, **hyper)
    check_side_inputs(loss, side)
    teacher_ids, teacher_logprobs, teacher_label_logprobs, token_weights = side
    valid = labels != ignore_index
    y = labels.masked_fill(~valid, 0)  # ignored rows are computed, then zeroed: no [N, V] copy of the logits
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    p_y, sg = logp_y.exp(), torch.Tensor.detach
    if loss in NEEDS_TOPK:
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
    elif loss == "weighted":  # iw-SFT -w(tau) log p_t, CFT -c_t log p_t
        per_token = -token_weights.to(logp.dtype) * logp_y
    elif loss == "psft":
        r = p_y / teacher_label_logprobs.to(logp.dtype).exp()  # pi_old is a constant: no gradient
        per_token = -torch.minimum(r, r.clamp(1 - hp["eps"], 1 + hp["eps"]))
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


def dense_residual(q: Target, p):
    """A rule's residual on the whole vocabulary, shaped like p (zeros for the self-residual)."""
    if q.res is None:
        return torch.zeros_like(p)
    return q.res.expand_as(p) if q.res_ids is None else torch.zeros_like(p).scatter_add(1, q.res_ids, q.res)


def rule_target(q: Target, z, y):
    """Eq. 6 read off a rule: Q = p - dloss/dz = a onehot(y) + b res + (1 - a - b) p."""
    p = z.softmax(-1)
    onehot = torch.nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)
    return q.a[:, None] * onehot + q.b[:, None] * dense_residual(q, p) + (1 - q.a - q.b)[:, None] * p


# ----------------------------------------------------------------------------------------------------
# `python loss.py`: Table 5 computed on a worked example; `--plot FILE.png`: Figure 3 for every variant

TOKENS = ["4", "four", "5", "the", "so", "7"]  # one prefix's vocabulary; the observed label is "4"
LABEL, OTHER = 0, 1                              # Figure 3 follows y and one non-observed token k ("four")
STUDENT = [1.0, 0.2, 1.6, 0.5, -0.3, -1.0]      # the student prefers "5": the label is unlikely (p_y = 0.23)
TEACHER = [3.0, 1.5, 0.0, -0.5, -1.0, -2.0]     # the teacher backs "4", then "four": a rescue token
REFERENCE = [0.8, 0.3, 1.2, 0.6, -0.2, -0.8]    # the starting model, for kl, asft and psft
DATA_WEIGHT, CACHE_K = 0.5, 4
# EAFT's top-20 entropy needs 20 tokens (the example has 6); alpha and tau set apart from dft's and sft's rows
EXAMPLE_HYPER = {"eaft": {"k": CACHE_K}, "beyond-log": {"alpha": 0.5}, "profit": {"tau": 0.3}}


def worked_example_side(loss, rows=1):
    """The cache rows and data weight each variant reads, for `rows` copies of the example prefix."""
    source = REFERENCE if loss in REFERENCE_LOSSES else TEACHER
    logp, ids = torch.tensor(source, dtype=torch.float64).log_softmax(-1).topk(CACHE_K)
    return Side(ids.expand(rows, -1), logp.expand(rows, -1), logp[ids == LABEL].expand(rows),
                torch.full((rows,), DATA_WEIGHT, dtype=torch.float64))


def induced_and_rule_targets(loss, z, y):
    """Eq. 6 by autograd through Table 4's form, and the rule's own a onehot + b res + (1 - a - b) p."""
    hyper = variant_hyperparameters(loss, **EXAMPLE_HYPER.get(loss, {}))
    side = worked_example_side(loss, len(z))
    induced = induced_target(lambda logits, labels: reference_q_target_loss(
        logits, labels, side, loss=loss, normalizer=1, **hyper), z, y)
    q = RULES[loss](z, z.logsumexp(-1), y, side, **hyper)
    return induced, rule_target(q, z, y), q


def print_table5():
    z, y = torch.tensor([STUDENT], dtype=torch.float64), torch.tensor([LABEL])
    p = z.softmax(-1)[0]
    show = lambda dist: " ".join(f"{TOKENS[i]}:{float(dist[i]):6.3f}".replace("-0.000", " 0.000")
                                 for i in range(len(TOKENS)))
    pi = lambda logits: torch.tensor(logits, dtype=torch.float64).softmax(-1)
    print(f"Table 5, computed: one prefix, V = {len(TOKENS)} tokens, observed label y = {TOKENS[LABEL]!r}")
    print(f"  student p      {show(p)}")
    print(f"  teacher pi_T   {show(pi(TEACHER))}   (cached: top-{CACHE_K})")
    print(f"  reference      {show(pi(REFERENCE))}   (kl, asft: its top-{CACHE_K}; psft: pi_old(y))")
    print(f"  data weight w = {DATA_WEIGHT} (weighted); "
          + "; ".join(f"{loss} {hyper}" for loss, hyper in EXAMPLE_HYPER.items()) + "\n")
    print(f"{'variant':<11}{'gamma':>6}{'a+b':>6}  {'residual (top 3)':<26}"
          f"{'Q = p - dl/dz (Eq. 6, autograd through Table 4)':<64}rule")
    for loss in [name for name in RULES if name != "p"]:
        induced, rule, q = induced_and_rule_targets(loss, z, y)
        residual = dense_residual(q, induced)
        error = float((induced - rule).abs().max())
        assert error < 1e-9, (loss, error)
        if q.res is None:
            res_text = "sg(pi): no gradient"
        elif q.res_ids is None and q.res.dim() == 0:
            res_text = "Unif(V)"
        else:
            top = residual[0].abs().topk(3)
            res_text = ("-" if float(q.b[0]) < 0 else "") + " ".join(
                f"{TOKENS[i]}:{float(residual[0, i]):.2f}" for i in top.indices)
        print(f"{loss:<11}{float(trust(q.a, q.b)[0]):>6.3f}{float(q.a[0] + q.b[0]):>6.2f}  {res_text:<26}"
              f"{show(induced[0]):<64}ok ({error:.0e})")
    print("\ngamma is Table 5's label trust: a / (a + b), or a where the residual is sg(pi) or signed (GEM). Q always\n"
          "sums to 1 (the gradient sums to 0): Q = p + a (onehot - p) + b (res - p), Eq. 2's target gamma onehot +\n"
          "(1 - gamma) res with the step from p scaled by a + b (Corollary 2); where a + b != 1, or b < 0, Q can\n"
          "leave [0, 1]. 'rule' checks the rule's (a, b, residual) against autograd through the paper's Table 4 form.")


def plot_figure3(path):
    """Figure 3 for every variant: Q(y) and Q(k) for a non-observed k as p_y sweeps (0, 1), the other logits fixed."""
    from common import pyplot
    plt = pyplot()
    z = torch.tensor(STUDENT, dtype=torch.float64).repeat(199, 1)
    others = z[0].clone()
    others[LABEL] = -math.inf
    p_y = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    z[:, LABEL] = others.logsumexp(-1) + torch.log(p_y / (1 - p_y))  # logit that gives each p_y exactly
    y, p = torch.full((len(z),), LABEL), z.softmax(-1)
    example_p_y = float(torch.tensor(STUDENT).softmax(-1)[LABEL])
    losses = [name for name in RULES if name != "p"]
    cols, rows = 4, math.ceil(len(losses) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), sharex=True, sharey=True)
    for ax, loss in zip(axes.flat, losses):
        induced, rule, _ = induced_and_rule_targets(loss, z, y)
        assert float((induced - rule).abs().max()) < 1e-9
        ax.plot(p_y, induced[:, LABEL], color="C0", label=f"Q(y = {TOKENS[LABEL]!r})")
        ax.plot(p_y, induced[:, OTHER], color="C1", label=f"Q(k = {TOKENS[OTHER]!r})")
        ax.plot(p_y, p[:, OTHER], color="C1", ls=":", lw=1, label="p(k)")
        ax.plot(p_y, p_y, color="grey", ls=":", lw=1, label="p(y)")
        ax.set_title(loss, fontsize=10)
        ax.axhline(0, color="black", lw=0.5)
        ax.axhline(1, color="black", lw=0.5, ls="--")
        ax.axvline(example_p_y, color="green", lw=0.8, alpha=0.6)  # the worked example of `python loss.py`
        if loss == "psft":  # the clip cuts the gradient once p_y > (1 + eps) pi_old(y)
            switch = 1.2 * math.exp(float(worked_example_side(loss).label_logprobs[0]))
            ax.annotate("p(y) = 1.2 pi_old(y)", (switch, 0.5), fontsize=7, xytext=(switch + 0.05, 0.5))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(losses):]:
        ax.axis("off")
    axes.flat[len(losses)].legend(*axes.flat[0].get_legend_handles_labels(), loc="center")
    for ax in axes[-1]:
        ax.set_xlabel("student p(y)")
    for ax in axes[:, 0]:
        ax.set_ylabel("induced target Q")
    fig.suptitle("Figure 3 for every variant: the target Q = p - dl/dz (Eq. 6) on the observed token y and on a "
                 f"non-observed token k, the other logits fixed\n(teacher backs y then k; weighted w = {DATA_WEIGHT}; "
                 "green: the worked example of `python loss.py`; EAFT's kink: its top-4 set changes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    from common import path
    cli = argparse.ArgumentParser(description="Table 5 computed on a worked example, or Figure 3 for every variant")
    cli.add_argument("--plot", metavar="FILE.png", type=path,
                     help="draw Figure 3 for every variant instead of printing the table")
    cli_args = cli.parse_args()
    plot_figure3(cli_args.plot) if cli_args.plot else print_table5()
