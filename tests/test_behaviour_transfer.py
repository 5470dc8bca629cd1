"""Behaviour-transfer probe on the default model (SmolLM2-135M-Instruct): OPCD moves a behaviour that the
experience asks for from the context into the weights.

The experience: "Always reply in French, never in English." Measured on this model before choosing it
(24 samples of 12 tokens at T=0.7 on held-out questions): the base model answers in French 0% of the
time, with the experience in context about 45%; other behaviours the 135M model was tried on were
picked up far less in context (a fixed opening word 8-17%, a fixed closing phrase 12%, a single
answer word 4-21%, all capitals 0%), and OPCD cannot transfer more than the teacher shows.

The probe: a short LoRA OPCD run on 16 training questions, then the student is sampled on 12
*held-out* questions **without** the experience; the share of French answers must rise clearly
over the base model's (same questions, same sampling seed, adapter disabled). Measured here
(2-core machine shared with other jobs, one thread): base 0%, in context 50%, after 12 steps 42%,
in about 80 s (seed 7 instead of 0: 50%).
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from learner.opcd import OPCDConfig, OPCDTrainer

pytestmark = [pytest.mark.model, pytest.mark.slow]

EXPERIENCE = ["Always reply in French, never in English."]

TRAIN = [
    "Name a fruit that is red.",
    "How many legs does a dog have?",
    "What color is the sky?",
    "Give me a word that rhymes with cat.",
    "What is 2 plus 3?",
    "Which animal says moo?",
    "What do bees make?",
    "Name a planet in our solar system.",
    "What is frozen water called?",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What do cows drink?",
    "Where do fish live?",
    "What is the color of grass?",
    "Name a musical instrument.",
    "What do you use to write?",
]
HELD_OUT = [
    "What is the biggest animal?",
    "Name a vegetable.",
    "What colour is snow?",
    "How many wheels does a bike have?",
    "What do birds use to fly?",
    "Name a day of the week.",
    "What is the sun?",
    "What do you drink in the morning?",
    "Name a country in Europe.",
    "What sound does a cat make?",
    "What is ice cream made of?",
    "Which season is the coldest?",
]

_FRENCH_WORDS = {
    "le",
    "la",
    "les",
    "est",
    "une",
    "un",
    "des",
    "du",
    "et",
    "je",
    "vous",
    "il",
    "elle",
    "c'est",
    "pour",
    "avec",
    "sont",
    "dans",
    "pas",
    "qui",
    "que",
    "mais",
    "ou",
    "au",
    "aux",
    "oui",
    "non",
    "bonjour",
    "merci",
    "très",
}


def is_french(text: str) -> bool:
    """At least two French function words, or at least two French accented letters."""
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    return sum(w in _FRENCH_WORDS for w in words) >= 2 or sum(c in "àâçéèêëîïôûùœ" for c in text.lower()) >= 2


def test_is_french() -> None:
    assert is_french("Le ciel est bleu.") and is_french("Je ne sais pas.") and is_french("Ça été très bien")
    assert not is_french("The sky is blue.") and not is_french("A dog has four legs, and a cat has four too.")


def _frequency(trainer: OPCDTrainer, adapter: bool, with_experience: bool, repeats: int, max_new_tokens: int) -> tuple[float, list[str]]:
    from oel.model.chat import encode_chat

    convs = [[{"role": "user", "content": q}] for q in HELD_OUT] * repeats
    if with_experience:
        convs = [trainer.template.apply(c, EXPERIENCE) for c in convs]
    else:
        convs = [trainer.template.apply(c, None) for c in convs]
    prompts = [encode_chat(trainer.tokenizer, c) for c in convs]
    saved_gen, saved_len = trainer.generator, trainer.config.max_new_tokens
    trainer.generator = torch.Generator().manual_seed(1234)  # the same sampling noise for every measurement
    trainer.config.max_new_tokens = max_new_tokens
    try:
        if adapter:
            out = trainer.generate(prompts)
        else:
            with trainer.model.disable_adapter():
                out = trainer.generate(prompts)
    finally:
        trainer.generator, trainer.config.max_new_tokens = saved_gen, saved_len
    texts = [trainer.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in out]
    return sum(map(is_french, texts)) / len(texts), texts


@pytest.fixture(scope="module")
def threads():
    """One thread: on a shared 2-core machine two OpenMP threads can be many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_opcd_transfers_a_behaviour_from_context_into_the_weights(threads) -> None:
    t0 = time.monotonic()
    config = OPCDConfig(steps=12, batch_size=8, learning_rate=2e-3, max_new_tokens=10, lora_rank=16, seed=0)
    trainer = OPCDTrainer(config, [[{"role": "user", "content": q}] for q in TRAIN], [EXPERIENCE])
    repeats, eval_tokens = 2, 12
    base, _ = _frequency(trainer, adapter=False, with_experience=False, repeats=repeats, max_new_tokens=eval_tokens)
    in_context, _ = _frequency(trainer, adapter=False, with_experience=True, repeats=repeats, max_new_tokens=eval_tokens)
    result = trainer.train()
    after, texts = _frequency(trainer, adapter=True, with_experience=False, repeats=repeats, max_new_tokens=eval_tokens)
    n = len(HELD_OUT) * repeats
    print(
        f"\nFrench answers on {n} held-out samples: base model {base:.0%}, base with the experience in context "
        f"{in_context:.0%}, student after {len(result.steps)} OPCD steps without the experience {after:.0%}  "
        f"(loss {result.steps[0].loss:.3f} -> {result.steps[-1].loss:.3f}, {time.monotonic() - t0:.0f} s)"
    )
    for text in texts[:6]:
        print("   ", repr(text))
    assert in_context >= base + 0.2, "the experience no longer changes the base model's behaviour in context"
    assert after >= base + 0.15 and after >= 2 * base, f"no clear rise: base {base:.0%}, after OPCD {after:.0%}"
