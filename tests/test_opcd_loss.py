"""The OPCD loss against a brute-force computation on a tiny randomly initialised model.

Brute force = each sample scored on its own (no padding, no batching), full logits of the whole
model, a Python sort of the full vocabulary to find the student's top-k, and the sum written out.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.tiny_model import EXPERIENCE, PREFIXES, tiny_model, tiny_tokenizer

from learner.opcd import OPCDConfig, OPCDTrainer, chunked_opcd_loss, opcd_token_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb_lora(trainer: OPCDTrainer, scale: float = 0.05) -> None:
    """Give the fresh adapter non-zero B matrices, so the student differs from the teacher in its weights too."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _full_logits(lm, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits predicting each response token, from one unpadded forward of the full model."""
    ids = torch.tensor([prompt + response])
    logits = lm(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def _brute_force(trainer: OPCDTrainer, batch, top_k: int | None, temperature: float) -> float:
    total, count = 0.0, 0
    for r in batch:
        with torch.no_grad():
            s = _full_logits(trainer.model, r.student_prompt_ids, r.response_ids).double() / temperature
            with trainer.model.disable_adapter():
                t = _full_logits(trainer.model, r.teacher_prompt_ids, r.response_ids).double() / temperature
        for j in range(len(r.response_ids)):
            log_ps = s[j] - torch.logsumexp(s[j], 0)
            log_pt = t[j] - torch.logsumexp(t[j], 0)
            lp = log_ps.tolist()
            order = sorted(range(len(lp)), key=lambda v: -lp[v])
            support = order if top_k is None else order[:top_k]
            total += sum(math.exp(lp[v]) * (lp[v] - float(log_pt[v])) for v in support)
            count += 1
    return total / count


@pytest.fixture(scope="module")
def trainer() -> OPCDTrainer:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    t = OPCDTrainer(
        OPCDConfig(batch_size=3, max_new_tokens=12, top_k=5, dtype="float32", loss_chunk_tokens=7, seed=3),
        PREFIXES,
        EXPERIENCE,
        model=tiny_model(tok, dtype=torch.float32),
        tokenizer=tok,
    )
    _perturb_lora(t)
    return t


@pytest.mark.parametrize("top_k", [5, 256, None])
def test_topk_loss_equals_brute_force(trainer: OPCDTrainer, top_k: int | None) -> None:
    trainer.config.top_k = top_k
    try:
        batch = trainer.rollout([0, 1, 2])
        assert sum(len(r.response_ids) for r in batch) > 10
        assert any(r.teacher_prompt_ids != r.student_prompt_ids for r in batch)
        got = trainer.loss(batch).loss
        want = _brute_force(trainer, batch, top_k, trainer.config.temperature)
        print(f"top_k={top_k}: batched {got:.8f} brute force {want:.8f}")
        assert want > 0
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)
    finally:
        trainer.config.top_k = 5


@pytest.mark.parametrize("backward_chunk_tokens", [64, 1, 26])
def test_gradient_equals_autograd_of_brute_force(trainer: OPCDTrainer, backward_chunk_tokens: int) -> None:
    """The chunked, hidden-state backward gives the same gradient as autograd through the plain formula, also
    through the prompts' keys and values that sampling computed (with their graph) and the loss reuses; also when
    the rows run forward and backward in micro-batches (64: the whole batch at once; 1: every row alone; 26: the
    four rows of 13 positions (12 answer tokens + the last prompt token) as two pairs)."""
    batch = trainer.rollout([3, 4, 0, 1])
    assert trainer._sampled_groups is not None and all(g.with_grad for g in trainer._sampled_groups)
    assert len(trainer._sampled_groups) == 2, "two micro-batches of different prompt lengths"
    assert all(len(r.response_ids) == 12 for r in batch), "the parts below assume full-length answers"
    trainer.config.backward_chunk_tokens = backward_chunk_tokens
    pieces: list[list[int]] = []
    split = trainer._student_micro_batches

    def spy(*args, **kwargs):
        for rows, hidden in split(*args, **kwargs):
            pieces.append(rows)
            yield rows, hidden

    trainer._student_micro_batches = spy
    try:
        trainer.model.zero_grad(set_to_none=True)
        stats = trainer.loss(batch, backward=True)
    finally:
        trainer.config.backward_chunk_tokens = 64
        del trainer._student_micro_batches
    assert sorted(i for rows in pieces for i in rows) == [0, 1, 2, 3]
    assert max(len(rows) for rows in pieces) == {64: 3, 1: 1, 26: 2}[backward_chunk_tokens]
    assert trainer._sampled_groups is None, "a graph is backpropagated once"
    assert stats.tokens == 48 and stats.loss == pytest.approx(trainer.loss(batch).loss, rel=1e-5)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)

    losses, n_tok = [], 0
    for r in batch:
        s = _full_logits(trainer.model, r.student_prompt_ids, r.response_ids)
        with torch.no_grad(), trainer.model.disable_adapter():
            t = _full_logits(trainer.model, r.teacher_prompt_ids, r.response_ids)
        log_ps = F.log_softmax(s / trainer.config.temperature, -1)
        log_pt = F.log_softmax(t / trainer.config.temperature, -1)
        idx = log_ps.detach().argsort(-1, descending=True)[:, : trainer.config.top_k]
        ls, lt = log_ps.gather(-1, idx), log_pt.gather(-1, idx)
        losses.append((ls.exp() * (ls - lt)).sum())
        n_tok += len(r.response_ids)
    (torch.stack(losses).sum() / n_tok).backward()
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            # float32 rounding: elements far below the tensor's scale differ by ~1e-6 of that scale
            scale = float(p.grad.abs().max())
            assert torch.allclose(got[name], p.grad, rtol=1e-3, atol=1e-5 * scale), name
    trainer.model.zero_grad(set_to_none=True)


def test_loss_is_zero_when_contexts_are_equal() -> None:
    """Equal contexts, equal weights: 0 up to float rounding (the student's prompt keys and values come from
    sampling's left-padded micro-batches, the teacher's from a right-padded forward)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    t = OPCDTrainer(
        OPCDConfig(batch_size=4, max_new_tokens=10, seed=5),
        PREFIXES,
        [[]],
        model=tiny_model(tok),
        tokenizer=tok,
    )
    batch = t.rollout()
    assert all(r.teacher_prompt_ids == r.student_prompt_ids for r in batch)
    stats = t.loss(batch)
    assert stats.tokens > 0
    assert abs(stats.loss) < 1e-6 and abs(stats.kl) < 1e-6
    full = t.config.top_k
    t.config.top_k = None
    assert abs(t.loss(batch).loss) < 1e-6
    t.config.top_k = full


def test_token_loss_full_vocab_and_topk_limits() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 50, generator=g, requires_grad=True)
    t = torch.randn(6, 50, generator=g)
    full, kl = opcd_token_loss(s, t, temperature=0.7, top_k=None)
    all_k, _ = opcd_token_loss(s, t, temperature=0.7, top_k=50)
    assert torch.allclose(full, kl) and torch.allclose(full, all_k)
    top1, _ = opcd_token_loss(s, t, temperature=0.7, top_k=1)
    log_ps, log_pt = F.log_softmax(s.detach() / 0.7, -1), F.log_softmax(t / 0.7, -1)
    best = log_ps.argmax(-1, keepdim=True)
    want = (log_ps.gather(-1, best).exp() * (log_ps.gather(-1, best) - log_pt.gather(-1, best)))[:, 0]
    assert torch.allclose(top1.detach(), want, atol=1e-6), "top-1: the student's most likely token's term alone"
    # The gradient of the top-k loss w.r.t. the student's logits is analytic (through log p_s), not REINFORCE:
    # it is non-zero for logits of tokens outside the support too (they enter through the normaliser).
    loss, _ = opcd_token_loss(s, t, temperature=0.7, top_k=3)
    loss.sum().backward()
    assert (s.grad.abs() > 0).all()


def test_forward_weight_mixes_in_the_forward_kl_over_the_teachers_top_k() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 40, generator=g, requires_grad=True)
    t = torch.randn(5, 40, generator=g)
    log_ps, log_pt = F.log_softmax(s / 0.7, -1), F.log_softmax(t / 0.7, -1)
    reverse = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    forward = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    mixed, kl = opcd_token_loss(s, t, temperature=0.7, top_k=None, forward_weight=0.25)
    assert torch.allclose(mixed, 0.75 * reverse + 0.25 * forward, atol=1e-6) and torch.allclose(kl, reverse.detach(), atol=1e-6)
    only_forward, _ = opcd_token_loss(s, t, temperature=0.7, top_k=3, forward_weight=1.0)
    idx = log_pt.topk(3, -1).indices
    want = (log_pt.gather(-1, idx).exp() * (log_pt.gather(-1, idx) - log_ps.gather(-1, idx))).sum(-1)
    assert torch.allclose(only_forward, want, atol=1e-6), "forward term: the teacher's top-k tokens"
    # the forward term raises a token the teacher likes and the student does not; reverse KL barely moves it
    s2 = torch.zeros(1, 10, requires_grad=True)
    t2 = torch.zeros(1, 10)
    with torch.no_grad():
        s2[0, 0], t2[0, 1] = 8.0, 8.0  # the student is sure of token 0, the teacher of token 1
    grads = {}
    for w in (0.0, 0.5):
        s2.grad = None
        opcd_token_loss(s2, t2, temperature=1.0, top_k=None, forward_weight=w)[0].sum().backward()
        grads[w] = float(-s2.grad[0, 1])  # how strongly a descent step raises token 1
    assert grads[0.5] > 50 * grads[0.0] > 0


def test_chunked_matches_unchunked() -> None:
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 40, bias=False)
    hs = torch.randn(13, 8, generator=g)
    ht = torch.randn(13, 8, generator=g)
    a, ga = chunked_opcd_loss(hs, ht, head, head, top_k=7, chunk_tokens=4)
    head.zero_grad()
    b, gb = chunked_opcd_loss(hs, ht, head, head, top_k=7, chunk_tokens=100)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.tokens == b.tokens == 13
    assert torch.allclose(ga, gb, atol=1e-7)


def test_teacher_prefix_cache_matches_full_forward(trainer: OPCDTrainer) -> None:
    """The frozen teacher's shared prompt part (template opening + experience block) is computed once and
    reused; the loss is the same as scoring every full teacher prompt."""
    batch = trainer.rollout([0, 2, 3, 5])
    trainer._kv_cache.clear()
    cached = trainer.loss(batch).loss
    assert trainer._kv_cache, "the cache was not used"
    shared = [trainer.shared_teacher_prefix(r.prefix_index, r.experience_index) for r in batch]
    assert all(n >= 32 for n in shared)
    again = trainer.loss(batch).loss  # now served from the cache
    budget = trainer.config.teacher_cache_tokens
    trainer.config.teacher_cache_tokens = 0
    try:
        full = trainer.loss(batch).loss
    finally:
        trainer.config.teacher_cache_tokens = budget
    assert cached == again
    assert cached == pytest.approx(full, rel=1e-5)


def test_without_prompt_gradient_the_loss_is_the_same_and_only_its_gradient_is_cut(trainer: OPCDTrainer) -> None:
    """``prompt_gradient=False`` computes the prompt's keys and values without gradient: the forward value (the
    loss) is the one of the full graph; the gradient differs, and is the full one without the prompt's paths."""
    trainer.config.prompt_gradient = False
    try:
        batch = trainer.rollout([3, 3])  # one micro-batch: sampling keeps the prompts' keys and values ...
        assert trainer._sampled_groups is not None and not trainer._sampled_groups[0].with_grad
        trainer.model.zero_grad(set_to_none=True)
        cut = trainer.loss(batch, backward=True)  # ... and the loss reuses them
        grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
        assert trainer._sampled_groups is None
        fresh = trainer.loss(batch).loss  # computed again, without gradient
        mixed = trainer.rollout([0, 3, 5])
        mixed_cut = trainer.loss(mixed).loss
    finally:
        trainer.config.prompt_gradient = True
    full = trainer.loss(batch).loss
    assert cut.loss == pytest.approx(full, rel=1e-5) and fresh == pytest.approx(full, rel=1e-5)
    assert mixed_cut == pytest.approx(trainer.loss(mixed).loss, rel=1e-5)
    assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
    trainer.model.zero_grad(set_to_none=True)


def test_plain_lora_forwards_compute_what_peft_computes(trainer: OPCDTrainer, monkeypatch) -> None:
    """Decoding runs the LoRA layers without peft's per-call bookkeeping: the same numbers (exactly), the same
    samples, peft's forward back afterwards, and nothing switched where the adapter is disabled."""
    from contextlib import contextmanager

    from peft.tuners.lora import Linear as LoraLinear

    import learner.opcd.trainer as trainer_module
    from learner.opcd.trainer import plain_lora_forwards

    lm = trainer.model
    lora_layers = [m for m in lm.modules() if isinstance(m, LoraLinear)]
    assert lora_layers and any(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for m in lora_layers)
    ids = torch.tensor([trainer.prompt_ids[0], trainer.prompt_ids[0][::-1]])
    lm.eval()
    try:
        with torch.no_grad():
            expected = lm(input_ids=ids).logits
            with plain_lora_forwards(lm) as switched:
                assert switched == len(lora_layers)
                got = lm(input_ids=ids).logits
            with lm.disable_adapter(), plain_lora_forwards(lm) as switched_disabled:
                assert switched_disabled == 0
    finally:
        lm.train()
    assert torch.equal(got, expected)
    assert not any("forward" in vars(m) for m in lora_layers), "peft's forward is back"

    prompts = [trainer.prompt_ids[i] for i in (0, 2, 5)]
    trainer.generator.manual_seed(7)
    plain = trainer.generate(prompts)

    @contextmanager
    def peft_only(model):
        yield 0

    monkeypatch.setattr(trainer_module, "plain_lora_forwards", peft_only)
    trainer.generator.manual_seed(7)
    assert trainer.generate(prompts) == plain


def test_scratch_logits_give_the_same_loss_and_gradient() -> None:
    """``scratch=True`` divides the handed-over logits in place (no copies); the loss and gradient are the same,
    and without it the caller's logits are left as they were."""
    g = torch.Generator().manual_seed(5)
    s0 = torch.randn(6, 50, generator=g)
    t0 = torch.randn(6, 50, generator=g)
    results = {}
    for scratch in (False, True):
        leaf = s0.clone().requires_grad_(True)
        s, t = leaf * 1.0, t0.clone()  # a non-leaf, as a head's output is
        loss, kl = opcd_token_loss(s, t, temperature=0.7, top_k=7, scratch=scratch)
        loss.sum().backward()
        results[scratch] = (loss.detach(), kl, leaf.grad)
        assert torch.equal(t, t0) != scratch and torch.equal(s.detach(), s0) != scratch
    for a, b in zip(results[False], results[True]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
