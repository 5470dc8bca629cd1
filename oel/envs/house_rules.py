"""House rules: customer-support replies under hidden rules that are learned only from text feedback.

Each episode is one customer message (drawn from the seed) that the agent answers. The company
("Acme") has house rules the agent is never told; a reply that breaks one is rejected with a feedback
message that names the broken rule (and, as a reviewer would, says what was expected), and the agent
tries again in the same conversation. The episode passes when a reply is accepted within
``max_turns`` turns. This is the product's own use case in miniature: text feedback, no reward design.

The rules (:data:`RULES`, fixed per house so that they can be learned across episodes):

==================  ========================================================================
``greeting``        the reply starts with the greeting ``Hello from Acme!``
``thanks-first``    the reply thanks the customer within its first 8 words
``order-number``    the reply quotes the order number given in the customer's message
``forbidden-word``  the reply never uses the word ``hi`` (too casual)
``we-not-i``        the reply speaks for the team: no ``I``, ``me``, ``my``
``signoff``         the reply ends with the sign-off ``Kind regards, Acme Support``
``max-words``       the reply has at most 30 words
==================  ========================================================================

A house uses any subset (``HouseRulesEnv(rules=...)``, default :data:`DEFAULT_RULES`); a reply must satisfy all of
the house's rules, and the feedback on a rejected reply names every rule it broke. The checks are
plain string functions (:meth:`HouseRule.check`), spelled out in each check's docstring. They are
deliberately independent of the instruction-following (IFEval-style) checks that the learner uses as
its out-of-distribution guard: nothing here is imported there or from there.

Designed for a 135M model. The default model (SmolLM2-135M-Instruct) almost never stops within the
48-token reply budget and barely follows abstract instructions, but it imitates the *start* of a
short example reply. So every hand-written experience item (:data:`REFERENCE_EXPERIENCE`, one per
rule) states the rule *and* quotes an accepted reply. On the default model a correct experience in
context at least doubles the pass rate, and adds at least 10 points, for the rules of
:data:`DEFAULT_RULES`; ``forbidden-word`` gains less (naming the word primes the model to write it), and
``signoff`` and ``max-words`` need the reply to end early, which this model does not do, so they are kept
for larger models (figures and the command: ``bench/README.md``). With two turns per episode the rejected first reply is followed
by one retry that sees the feedback, so the no-experience condition can also pass by copying from the
feedback (it does, for ``greeting``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oel.envs.base import Environment, StepResult

COMPANY = "Acme"
SIGNOFF = "Kind regards, Acme Support"
GREETING = "Hello from Acme!"
MAX_WORDS = 30
FORBIDDEN_WORD = "hi"


@dataclass(frozen=True)
class Ticket:
    """One customer message and the facts a reply may need."""

    customer: str
    order_number: str
    product: str
    message: str


def _norm(text: str) -> str:
    """Lower case, runs of whitespace as one space, no surrounding whitespace."""
    return " ".join(text.lower().split())


def _strip_end(text: str) -> str:
    return _norm(text).rstrip(" .!")


def count_words(text: str) -> int:
    """Words = whitespace-separated tokens that contain at least one letter or digit."""
    return sum(1 for tok in text.split() if re.search(r"[A-Za-z0-9]", tok))


@dataclass(frozen=True)
class HouseRule:
    """One hidden rule: its name, the check, and the feedback sentence given when it is broken."""

    name: str
    violation: str
    """Feedback when the rule is broken (may use ``{words}``: the reply's word count)."""
    experience: str
    """A correct, hand-written experience item for this rule."""
    _check: Callable[[str, Ticket], bool]

    def check(self, reply: str, ticket: Ticket) -> bool:
        """True if ``reply`` follows the rule."""
        return bool(self._check(reply, ticket))

    def feedback(self, reply: str) -> str:
        return self.violation.format(words=count_words(reply))


def _ends_with_signoff(reply: str, ticket: Ticket) -> bool:
    """The reply, lower-cased with whitespace runs collapsed and trailing ``.``/``!``/spaces removed,
    ends with the sign-off normalised the same way."""
    return _strip_end(reply).endswith(_strip_end(SIGNOFF))


def _starts_with_greeting(reply: str, ticket: Ticket) -> bool:
    """The reply, lower-cased with whitespace collapsed, starts with the greeting (``hello from acme!``)."""
    return _norm(reply).startswith(_norm(GREETING))


def _quotes_order_number(reply: str, ticket: Ticket) -> bool:
    """The order number's digits appear in the reply as a whole number (``#48213`` and ``48213`` both count)."""
    return re.search(rf"(?<![0-9]){re.escape(ticket.order_number)}(?![0-9])", reply) is not None


def _within_word_limit(reply: str, ticket: Ticket) -> bool:
    """At most :data:`MAX_WORDS` words (:func:`count_words`)."""
    return count_words(reply) <= MAX_WORDS


def _avoids_forbidden_word(reply: str, ticket: Ticket) -> bool:
    """The forbidden word does not occur as a whole word, in any case (``Hi``, ``HI,`` and ``(hi)`` break
    it; ``his`` and ``this`` do not)."""
    return re.search(rf"\b{re.escape(FORBIDDEN_WORD)}\b", reply, re.IGNORECASE) is None


THANKS_WITHIN = 8
_THANK_WORDS = {"thank", "thanks", "thankyou", "thankful", "thanked", "thanking"}


def _thanks_first(reply: str, ticket: Ticket) -> bool:
    """One of the reply's first :data:`THANKS_WITHIN` words (:func:`count_words`' words; punctuation
    around them ignored, any case) is ``thank``, ``thanks``, ``thankyou``, ``thankful``, ``thanked`` or
    ``thanking``. Counting words rather than sentences lets it go together with the greeting rule."""
    words = [tok for tok in reply.split() if re.search(r"[A-Za-z0-9]", tok)][:THANKS_WITHIN]
    return any(re.sub(r"[^a-z]", "", w.lower()) in _THANK_WORDS for w in words)


def _no_first_person(reply: str, ticket: Ticket) -> bool:
    """No first-person singular: the words ``I`` (also in ``I'm``, ``I'll``...), ``me``, ``my``, ``mine``, ``myself``."""
    return re.search(r"\b(i|me|my|mine|myself)\b", reply, re.IGNORECASE) is None


EXAMPLE_REPLY = "Thank you for your message. We will send you a new one today."
"""The accepted reply quoted by the hand-written experience items (it breaks none of the rules, except
that it has no greeting, sign-off or order number, which the items for those rules add)."""

RULES: dict[str, HouseRule] = {
    r.name: r
    for r in (
        HouseRule(
            "greeting",
            f'House rule broken: every reply must start with the greeting "{GREETING}".',
            f'Every reply must start with "{GREETING}". An accepted reply: "{GREETING} We will send you a new one today."',
            _starts_with_greeting,
        ),
        HouseRule(
            "thanks-first",
            f"House rule broken: every reply must thank the customer right at the start (within its first {THANKS_WITHIN} words).",
            f'Every reply must thank the customer right at the start. An accepted reply: "{EXAMPLE_REPLY}"',
            _thanks_first,
        ),
        HouseRule(
            "order-number",
            "House rule broken: every reply must quote the customer's order number.",
            "Every reply must quote the customer's order number: start it with \"Thank you for your message about "
            'order #" and their number. An accepted reply to order #12345: "Thank you for your message about order '
            '#12345. We will send you a new one today."',
            _quotes_order_number,
        ),
        HouseRule(
            "forbidden-word",
            f'House rule broken: replies must never use the word "{FORBIDDEN_WORD}" (too casual for us).',
            f'Start every reply with "Thank you for your message." (never with the casual "{FORBIDDEN_WORD}", which is '
            f'forbidden). An accepted reply: "{EXAMPLE_REPLY}"',
            _avoids_forbidden_word,
        ),
        HouseRule(
            "we-not-i",
            'House rule broken: replies speak for the whole team, so they must never say "I", "me" or "my" (use "we", "us", "our").',
            f'Replies speak for the team: never write "I", "me" or "my", write "we", "us" and "our". An accepted reply: "{EXAMPLE_REPLY}"',
            _no_first_person,
        ),
        HouseRule(
            "signoff",
            f'House rule broken: every reply must end with the sign-off "{SIGNOFF}".',
            f'Every reply must end with the sign-off "{SIGNOFF}". An accepted reply: "We will send you a new one today. {SIGNOFF}"',
            _ends_with_signoff,
        ),
        HouseRule(
            "max-words",
            f"House rule broken: a reply may have at most {MAX_WORDS} words (yours had {{words}}).",
            f'Replies must have at most {MAX_WORDS} words: one or two short sentences. An accepted reply: "{EXAMPLE_REPLY}"',
            _within_word_limit,
        ),
    )
}
RULE_NAMES: tuple[str, ...] = tuple(RULES)
DEFAULT_RULES: tuple[str, ...] = ("greeting", "thanks-first", "order-number", "we-not-i")
"""The rules the default model is measured to learn from a correct experience in context (pass rate at
least doubled and up by at least 10 points; see the report in ``oel agents compare --env house-rules
--per-rule``). ``forbidden-word``, ``signoff`` and ``max-words`` are kept for larger models."""
REFERENCE_EXPERIENCE: dict[str, str] = {name: rule.experience for name, rule in RULES.items()}


def reference_experience(rules: Sequence[str] = DEFAULT_RULES) -> list[str]:
    """The hand-written correct experience items for ``rules``."""
    return [RULES[r].experience for r in rules]


# --- tickets --------------------------------------------------------------------------------

_CUSTOMERS = ["Maria", "James", "Aisha", "Tom", "Elena", "Kenji", "Sofia", "David", "Priya", "Lucas", "Emma", "Omar"]
_PRODUCTS = [
    "blue kettle",
    "desk lamp",
    "pair of running shoes",
    "coffee grinder",
    "wool blanket",
    "phone case",
    "set of kitchen knives",
    "backpack",
    "wireless mouse",
    "yoga mat",
    "table fan",
    "water bottle",
]
_ISSUES = [
    "My order #{order} ({product}) arrived damaged. Can I get a replacement?",
    "I ordered a {product} (order #{order}) two weeks ago and it still has not arrived. Where is it?",
    "The {product} from order #{order} is the wrong colour. How do I exchange it?",
    "I was charged twice for order #{order} ({product}). Please refund the extra charge.",
    "Can I cancel order #{order}? I no longer need the {product}.",
    "The {product} in order #{order} stopped working after one day. What should I do?",
    "I want to return the {product} from order #{order}. How does the return work?",
    "My order #{order} was supposed to include a {product}, but it was missing from the box.",
]

TASK_INTRO = f"You are a customer support assistant at {COMPANY}. A customer sent this message:"
TASK_OUTRO = "Write your reply to the customer."


def make_ticket(seed: int) -> Ticket:
    """The customer message of episode ``seed`` (deterministic)."""
    rng = random.Random(f"house-rules:{seed}")
    customer = rng.choice(_CUSTOMERS)
    product = rng.choice(_PRODUCTS)
    order = str(rng.randint(10000, 99999))
    issue = rng.choice(_ISSUES).format(order=order, product=product)
    return Ticket(customer=customer, order_number=order, product=product, message=f"{issue}\n{customer}")


class HouseRulesEnv(Environment):
    """Customer-support replies checked against the house's hidden ``rules`` (names from :data:`RULES`).

    ``max_turns`` replies per episode; each rejected reply gets feedback naming every broken rule.
    """

    name = "house-rules"

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, max_turns: int = 2) -> None:
        super().__init__()
        unknown = [r for r in rules if r not in RULES]
        if unknown or not rules:
            raise ValueError(f"unknown house rule(s) {unknown or rules!r}; known: {', '.join(RULE_NAMES)}")
        if max_turns < 1:
            raise ValueError("max_turns must be >= 1")
        self.rules = tuple(dict.fromkeys(rules))
        self.max_turns = int(max_turns)
        self.ticket: Ticket | None = None

    def reset(self, seed: int) -> str:
        self._begin(seed)
        self.ticket = make_ticket(seed)
        return f'{TASK_INTRO}\n\n"{self.ticket.message}"\n\n{TASK_OUTRO}'

    def broken_rules(self, reply: str) -> list[HouseRule]:
        """The house's rules that ``reply`` breaks, in the house's order."""
        assert self.ticket is not None
        return [RULES[r] for r in self.rules if not RULES[r].check(reply, self.ticket)]

    def step(self, response: str) -> StepResult:
        self._check_can_step()
        self.turns += 1
        reply = (response or "").strip()
        if not reply:
            broken_names = ["empty"]
            problems = ["The reply was empty."]
        else:
            broken = self.broken_rules(reply)
            broken_names = [r.name for r in broken]
            problems = [r.feedback(reply) for r in broken]
        if not problems:
            return self._finish(
                StepResult(
                    feedback="Accepted: the reply follows every house rule.",
                    done=True,
                    passed=True,
                    valid=True,
                    action=reply,
                    reward=1.0,
                    info={"broken": ""},
                )
            )
        done = self.turns >= self.max_turns
        tail = (
            f"No turns left ({self.max_turns} used): the reply was not accepted."
            if done
            else "Write the whole reply again, following the house rules."
        )
        feedback = "Rejected. " + " ".join(problems) + "\n" + tail
        return self._finish(
            StepResult(
                feedback=feedback,
                done=done,
                passed=False,
                valid=bool(reply),
                action=reply or None,
                reward=0.0 if done else None,
                info={"broken": ",".join(broken_names)},
            )
        )

    def metadata(self) -> dict[str, str]:
        return {"env": self.name, "seed": str(self.seed), "rules": ",".join(self.rules), "max_turns": str(self.max_turns)}
