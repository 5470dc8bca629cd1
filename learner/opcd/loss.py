"""The OPCD objective: token-level reverse KL from the student to the teacher.

For every response token t (sampled by the student, without experience in context)::

    loss_t = sum_{v in topk_s(k)} p_s(v) * (log p_s(v) - log p_t(v))

where ``p_s`` / ``p_t`` are the student's / teacher's next-token distributions, computed from logits
divided by the sampling temperature and normalised over the **full** vocabulary (the top-k set only
restricts the sum; it is not renormalised), and ``topk_s(k)`` are the student's k most likely tokens
at that position. The batch loss is the mean of ``loss_t`` over all response tokens of the batch.
The gradient is the analytic gradient of this expression through the student's log-probs (autograd;
the top-k selection is piecewise constant), not a REINFORCE estimate. ``top_k=None`` gives the exact
full-vocabulary reverse KL.

``forward_weight`` w mixes in the forward KL at the same positions (still on the student's own samples, as
on-policy GKD does)::

    loss_t = (1 - w) * reverse_t + w * sum_{v in topk_t(k)} p_t(v) * (log p_t(v) - log p_s(v))

Reverse KL is mode-seeking: its gradient on a token is proportional to the student's own probability of
it, so a continuation the teacher prefers but the student finds unlikely is barely raised (the student
settles on the teacher's second choice it already likes). The forward term raises the teacher's likely
tokens directly. w = 0 is the paper's loss.

The vocabulary projection is done here, in chunks of response positions, from hidden states: a
``[tokens, vocab]`` logits tensor for the whole batch (for a 150k vocabulary and 4k response
tokens, 2.4 GB in float32, more with its gradient) never exists at once. :func:`chunked_opcd_loss`
runs its own backward per chunk into the student's hidden states, so the caller finishes with
``hidden.backward(grad)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def opcd_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 0.7,
    top_k: int | None = 256,
    forward_weight: float = 0.0,
    scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token OPCD loss and per-token full-vocabulary reverse KL (the latter detached, for logging).

    ``student_logits`` and ``teacher_logits``: ``[..., vocab]`` at the same response positions.
    Returns ``(loss [...], kl [...])``; ``loss`` carries the gradient to ``student_logits``.
    With ``top_k=None`` (or ``top_k >= vocab``) the loss is the full-vocabulary reverse KL.
    ``scratch``: the caller hands the logits over (nothing else reads them afterwards), so they are divided by
    the temperature in place instead of copied; otherwise the caller's tensors are never modified.

    Memory: besides the two float32 copies of the logits (none with ``scratch`` and float32 logits), only a
    few ``[..., vocab]`` temporaries exist at once (the log-softmax is never materialised for the top-k loss).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    s = student_logits.float()
    # divide in place when .float() made a fresh copy or the caller handed the tensor over
    s = s / temperature if (s is student_logits and not scratch) else s.div_(temperature)
    with torch.no_grad():
        t = teacher_logits.float()
        t = t / temperature if (t is teacher_logits and not scratch) else t.div_(temperature)
        lse_t = torch.logsumexp(t, dim=-1, keepdim=True)
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    with torch.no_grad():
        # full reverse KL, in place on one temporary: sum_v p_s(v) * ((s_v - lse_s) - (t_v - lse_t))
        diff = s.detach() - t
        diff.sub_(lse_s.detach() - lse_t)
        p_s = (s.detach() - lse_s.detach()).exp_()
        full_kl = diff.mul_(p_s).sum(-1)
        del diff, p_s
    if top_k is None or top_k >= s.shape[-1]:
        log_ps = s - lse_s
        log_pt = t - lse_t
        reverse = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
        if not forward_weight:
            return reverse, full_kl
        forward = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        return (1.0 - forward_weight) * reverse + forward_weight * forward, full_kl
    idx = torch.topk(s.detach(), top_k, dim=-1, sorted=False).indices
    ls = s.gather(-1, idx) - lse_s
    lt = t.gather(-1, idx) - lse_t
    reverse = (ls.exp() * (ls - lt)).sum(-1)
    if not forward_weight:
        return reverse, full_kl
    idx_t = torch.topk(t, top_k, dim=-1, sorted=False).indices
    ft = t.gather(-1, idx_t) - lse_t
    fs = s.gather(-1, idx_t) - lse_s
    forward = (ft.exp() * (ft - fs)).sum(-1)
    return (1.0 - forward_weight) * reverse + forward_weight * forward, full_kl


@dataclass
class LossStats:
    """Totals over the response tokens of one batch."""

    loss: float
    """Mean OPCD loss per response token (top-k reverse KL, or full if ``top_k`` is None; with a forward weight, the mix)."""
    kl: float
    """Mean full-vocabulary reverse KL per response token (equals ``loss`` when ``top_k`` is None)."""
    tokens: int
    """Response tokens the mean was taken over."""


def chunked_opcd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module,
    *,
    temperature: float = 0.7,
    top_k: int | None = 256,
    chunk_tokens: int = 64,
    backward: bool = True,
    forward_weight: float = 0.0,
    mean_over: int | None = None,
) -> tuple[LossStats, torch.Tensor | None]:
    """OPCD loss from final hidden states at the response positions (``[n_tokens, hidden]`` each).

    Projects ``chunk_tokens`` positions at a time through the heads, computes the per-token loss,
    and (``backward=True``) back-propagates each chunk's share of the mean loss into
    ``student_hidden`` right away, so only one chunk of logits is alive at a time.
    Returns ``(stats, grad)`` where ``grad`` is d(mean loss)/d(student_hidden) (``None`` when
    ``backward=False``); finish with ``student_hidden_graph.backward(grad)``. ``mean_over``: the number of
    tokens of the whole batch when these positions are one micro-batch of it (the gradient is then this part's
    share of the batch's mean; ``stats`` stay this part's own means). Default: these positions.
    """
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"{n} student positions but {teacher_hidden.shape[0]} teacher positions")
    if n == 0:
        return LossStats(0.0, 0.0, 0), (torch.zeros_like(student_hidden) if backward else None)
    leaf = student_hidden.detach().requires_grad_(backward)
    total_loss = 0.0
    total_kl = 0.0
    for start in range(0, n, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        with torch.set_grad_enabled(backward):
            s_logits = student_head(leaf[sl])
        with torch.no_grad():
            t_logits = teacher_head(teacher_hidden[sl])
        with torch.set_grad_enabled(backward):
            # the projections are this chunk's own: divided in place, and not held through the backward pass
            loss_tok, kl_tok = opcd_token_loss(
                s_logits, t_logits, temperature=temperature, top_k=top_k, forward_weight=forward_weight, scratch=True
            )
            del s_logits, t_logits
            chunk_sum = loss_tok.sum()
            if backward:
                (chunk_sum / (mean_over or n)).backward()
        total_loss += float(chunk_sum.detach())
        total_kl += float(kl_tok.sum())
    grad = leaf.grad if backward else None
    return LossStats(loss=total_loss / n, kl=total_kl / n, tokens=n), grad
