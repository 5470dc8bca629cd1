"""Reference environments: the TextArena adapters against TextArena's own transitions, the house-rules
checks, the agent prompt with experience, and the train/eval seed split. No model, no stack."""

from __future__ import annotations

import copy
import random

import pytest

from oel.envs import eval_seeds, make_env, reference_experience, train_seeds
from oel.envs._textarena import GENERIC_RULES, last_move
from oel.envs.base import EVAL_SEED_BASE, EpisodeStateError
from oel.envs.frozenlake import FrozenLakeEnv
from oel.envs.house_rules import (
    DEFAULT_RULES,
    FORBIDDEN_WORD,
    GREETING,
    MAX_WORDS,
    RULE_NAMES,
    RULES,
    SIGNOFF,
    HouseRulesEnv,
    Ticket,
    count_words,
    make_ticket,
)
from oel.envs.prompts import EXPERIENCE_INTRO, SITUATION_HEADING, agent_prompt, format_experience, with_experience
from oel.envs.sokoban import SokobanEnv
from oel.schemas import ChatMessage

MOVES = ("up", "down", "left", "right")

# --- TextArena reference: the raw game, configured as the adapter documents ------------------------


def raw_env(name: str, seed: int):
    """TextArena's own env for ``seed``, with its turn limit set as the adapter sets it (max_turns - 1 = 4)."""
    if name == "frozenlake":
        from textarena.envs.FrozenLake.env import FrozenLakeEnv as TA

        env = TA(size=3, num_holes=2)
        env.reset(num_players=1, seed=seed)
        env.state.max_turns = 4
    else:
        from textarena.envs.Sokoban.env import SokobanEnv as TA

        env = TA(dim_room=(6, 6), max_turns=4, num_boxes=1)
        env.reset(num_players=1, seed=seed)
    env.get_observation()  # drain the initial observations
    return env


def raw_board(name: str, env) -> str:
    return env._render_board() if name == "frozenlake" else env.create_board_str(env.room_state).rstrip("\n")


def raw_step(env, move: str) -> tuple[bool, bool, float | None]:
    """(done, valid, reward) of one raw TextArena step."""
    before = env.state.turn
    done, _ = env.step(f"[{move}]")
    reward = float(env.state.rewards[0]) if done and env.state.rewards else None
    valid = env.state.turn > before and not (done and env.state.game_info[0].get("invalid_move"))
    return done, valid, reward


def find(name: str, pattern, seeds=range(300)) -> tuple[int, list[str]]:
    """A seed and moves whose raw TextArena outcomes match ``pattern``, one predicate
    ``(done, valid, reward) -> bool`` per move (depth-first over deep copies of the raw env)."""

    def dfs(env, moves):
        if len(moves) == len(pattern):
            return moves
        for m in MOVES:
            nxt = copy.deepcopy(env)
            outcome = raw_step(nxt, m)
            if pattern[len(moves)](*outcome):
                found = dfs(nxt, moves + [m])
                if found:
                    return found
        return None

    for seed in seeds:
        moves = dfs(raw_env(name, seed), [])
        if moves:
            return seed, moves
    raise AssertionError(f"no {name} seed in {seeds} has such a move sequence")


def ongoing(done, valid, reward):
    return valid and not done


def invalid(done, valid, reward):
    return not valid and not done


def won(done, valid, reward):
    return done and reward == 1.0


def assert_same_transitions(name: str, seed: int, moves: list[str], responses: list[str] | None = None) -> list:
    """Step the adapter and raw TextArena with the same moves; after every move the board, done, validity
    and reward must agree. Returns the adapter's step results."""
    raw = raw_env(name, seed)
    env = make_env(name)
    observation = env.reset(seed)
    assert raw_board(name, raw) in observation
    results = []
    for i, m in enumerate(moves):
        done, valid, reward = raw_step(raw, m)
        res = env.step(responses[i] if responses else f"Let me think. I move [{m}]")
        results.append(res)
        assert res.valid == valid, (i, m)
        assert res.done == done, (i, m)
        assert env.board() == raw_board(name, raw)
        if done:
            assert res.reward == reward
            assert res.passed == (reward == 1.0)
            assert env.ta_env.state.game_info[0]["reason"] in res.feedback
            break
    return results


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_goal_reached_matches_textarena(name):
    n = 4 if name == "frozenlake" else 3  # the 3x3 lake needs 4 moves; many 1-box rooms need a few
    seed, moves = find(name, [ongoing] * (n - 1) + [won])
    results = assert_same_transitions(name, seed, moves)
    assert [r.done for r in results] == [False] * (n - 1) + [True]
    assert results[-1].passed and results[-1].reward == 1.0


def test_frozenlake_hole_matches_textarena():
    seed, moves = find("frozenlake", [ongoing, lambda done, valid, reward: done and valid and reward < 1.0])
    results = assert_same_transitions("frozenlake", seed, moves)
    last = results[-1]
    assert last.done and not last.passed and last.reward < 1.0
    assert "hole" in last.feedback.lower()


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_wall_is_invalid_and_second_invalid_move_ends_the_game(name):
    seed, moves = find(name, [invalid, lambda done, valid, reward: done and not valid])
    results = assert_same_transitions(name, seed, moves)
    assert [r.valid for r in results] == [False, False]
    assert not results[0].done and "invalid move" in results[0].feedback.lower()
    assert results[1].done and not results[1].passed and results[1].reward < 1.0


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_a_valid_move_resets_the_invalid_count(name):
    seed, moves = find(name, [invalid, ongoing, invalid, ongoing])
    results = assert_same_transitions(name, seed, moves)
    assert [r.valid for r in results] == [False, True, False, True]
    assert not any(r.done for r in results)


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_turn_limit_matches_textarena(name):
    # Five valid moves that decide nothing: TextArena (its limit set to max_turns - 1 = 4, as the adapter
    # sets it) ends the game on the fifth, and so does the adapter, with TextArena's reason and reward.
    last = lambda done, valid, reward: done and valid and reward < 1.0  # noqa: E731
    seed, moves = find(name, [ongoing] * 4 + [last], seeds=range(2000))
    results = assert_same_transitions(name, seed, moves)
    assert [r.done for r in results] == [False] * 4 + [True]
    assert not results[-1].passed
    assert "turn limit" in results[-1].feedback.lower()


def test_turn_limit_counts_responses_not_only_valid_moves():
    # invalid, then four valid moves: TextArena alone would go on (it counts valid moves only); the
    # adapter ends the episode at its fifth response, with TextArena's completion score as the reward.
    seed, moves = find("frozenlake", [invalid] + [ongoing] * 4)
    raw = raw_env("frozenlake", seed)
    env = FrozenLakeEnv()
    env.reset(seed)
    results = [env.step(f"[{m}]") for m in moves]
    raw_done = [raw_step(raw, m)[0] for m in moves]
    assert raw_done == [False] * 5
    assert [r.done for r in results] == [False] * 4 + [True]
    assert not results[-1].passed and results[-1].reward == raw._get_percentage_completion()
    assert "turn limit of 5 turns" in results[-1].feedback


def test_last_bracketed_move_is_the_action():
    assert last_move("I could go [up] but [down] is better") == "down"
    assert last_move("[W]") == "up" and last_move("[ right ]") == "right"
    assert last_move("no move here") is None and last_move("[jump]") is None
    env = FrozenLakeEnv()
    env.reset(0)
    res = env.step("First [up]... no: [down].")  # TextArena alone would take the first one, a wall
    assert res.action == "[down]" and res.valid


def test_no_bracketed_move_is_an_invalid_format():
    env = SokobanEnv()
    env.reset(0)
    res = env.step("I would go down.")
    assert not res.valid and res.action is None and not res.done
    assert "format" in res.feedback.lower()


def test_generic_rules_replace_textarena_rules():
    for name, words in (("frozenlake", ("hole", "goal", "frozen")), ("sokoban", ("box", "target", "sokoban", "wall"))):
        env = make_env(name)
        obs = env.reset(1)
        assert obs.startswith(GENERIC_RULES.format(max_turns=5))
        for w in words:
            assert w not in obs.lower(), (name, w)
        assert "Available" not in obs


def test_reset_leaves_global_random_alone():
    random.seed(123)
    state = random.getstate()
    env = FrozenLakeEnv()
    env.reset(7)
    env.step("[down]")
    assert random.getstate() == state


def test_same_seed_same_episode_and_misuse_raises():
    a, b = SokobanEnv(), SokobanEnv()
    assert a.reset(42) == b.reset(42)
    env = FrozenLakeEnv()
    with pytest.raises(EpisodeStateError):
        env.step("[down]")
    env.reset(0)
    env.step("[up]")
    env.step("[up]")
    assert env.done
    with pytest.raises(EpisodeStateError):
        env.step("[down]")


def test_legal_actions_are_exactly_textarenas_valid_moves():
    for name in ("frozenlake", "sokoban"):
        for seed in range(20):
            env = make_env(name)
            env.reset(seed)
            raw = raw_env(name, seed)
            valid = [f"[{m}]" for m in MOVES if raw_step(copy.deepcopy(raw), m)[1]]
            assert env.legal_actions() == valid, (name, seed)


def test_frozenlake_3x3_has_19_layouts():
    layouts = set()
    for seed in range(400):
        env = FrozenLakeEnv()
        env.reset(seed)
        layouts.add(env.layout())
    assert len(layouts) == 19


def test_seed_split_is_disjoint():
    ev = eval_seeds()
    assert len(ev) == 128 and ev == eval_seeds(128) and min(ev) == EVAL_SEED_BASE
    tr = train_seeds(1000)
    assert not set(tr) & set(ev)
    with pytest.raises(ValueError):
        train_seeds(10, start=EVAL_SEED_BASE - 5)


# --- house rules --------------------------------------------------------------------------------

TICKET = Ticket(
    customer="Maria",
    order_number="48213",
    product="kettle",
    message="My order #48213 (kettle) arrived damaged. Can I get a replacement?\nMaria",
)

CASES = {
    "signoff": (
        [f"We will send a new one.\n{SIGNOFF}", f"We will send a new one. {SIGNOFF.upper()}.", f"Fine.\n\n  {SIGNOFF}!  "],
        ["We will send a new one.", f"{SIGNOFF}\nWe will send a new one.", "Kind regards, Acme"],
    ),
    "greeting": (
        [f"{GREETING} We will send a new one.", "  hello from acme!\nWe will help.", f"{GREETING}"],
        ["Hello! We will send a new one.", f"Hi Maria, {GREETING}", "Hello from Acme, we will help."],
    ),
    "order-number": (
        ["Your order #48213 will be replaced.", "Order 48213: a new kettle is on its way.", "(48213)"],
        ["Your order will be replaced.", "Order #482130 is on its way.", "Order 4821 is on its way."],
    ),
    "max-words": (
        [" ".join(["word"] * MAX_WORDS), "Short reply.", " ".join(["word"] * MAX_WORDS) + " - !"],
        [" ".join(["word"] * (MAX_WORDS + 1)), " ".join(["a1"] * 100)],
    ),
    "thanks-first": (
        [
            "Thank you for your message. We will help.",
            "Many thanks, Maria! We will help.",
            f"{GREETING} Thank you.",
            "1 2 3 4 5 6 7 (thanks)",
        ],
        ["We will help, Maria, as fast as we can. Thank you.", "1 2 3 4 5 6 7 8 thanks", "No thanksgiving... ", "We help."],
    ),
    "we-not-i": (
        ["We will send a new one. Our team is on it.", "Iris from our team will call.", "Send it to us; it is ours. MEMO: Imagine."],
        ["I will send a new one.", "We are here. I'm on it.", "Please tell me more.", "Our team and my manager.", "It is MINE"],
    ),
    "forbidden-word": (
        ["Hello, we will fix it.", "This is his order; we ship it.", "Thank you! Chihiro and whisk are fine."],
        ["Hi Maria, we will fix it.", "hi!", "Well, HI there.", "(hi) we will fix it", "Hi,\nwe will fix it."],
    ),
}


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_each_house_rule_accepts_and_rejects_as_specified(rule):
    good, bad = CASES[rule]
    for reply in good:
        assert RULES[rule].check(reply, TICKET), (rule, reply)
    for reply in bad:
        assert not RULES[rule].check(reply, TICKET), (rule, reply)


@pytest.mark.parametrize("rule", RULE_NAMES)
def test_rejection_feedback_names_the_rule_and_acceptance_passes(rule):
    env = HouseRulesEnv(rules=(rule,), max_turns=3)
    env.reset(5)
    env.ticket = TICKET
    good, bad = CASES[rule]
    res = env.step(bad[0])
    assert not res.done and not res.passed and res.valid
    assert res.feedback.startswith("Rejected.") and RULES[rule].feedback(bad[0]) in res.feedback
    assert res.info["broken"] == rule
    named = {
        "signoff": SIGNOFF,
        "greeting": GREETING,
        "order-number": "order number",
        "max-words": f"at most {MAX_WORDS} words",
        "forbidden-word": f'"{FORBIDDEN_WORD}"',
        "thanks-first": "thank the customer right at the start",
        "we-not-i": '"I"',
    }[rule]
    assert named in res.feedback
    res = env.step(good[0])
    assert res.done and res.passed and res.reward == 1.0 and "Accepted" in res.feedback


def test_word_count_feedback_gives_the_count():
    env = HouseRulesEnv(rules=("max-words",))
    env.reset(0)
    res = env.step(" ".join(["hello"] * 57))
    assert "(yours had 57)" in res.feedback
    assert count_words("a - b ! c3") == 3


def test_house_rules_all_broken_rules_are_named_and_turns_run_out():
    env = HouseRulesEnv(rules=RULE_NAMES, max_turns=2)
    env.reset(1)
    bad = "Hi, I " + " ".join(["no"] * 50)
    res = env.step(bad)
    assert set(res.info["broken"].split(",")) == set(RULE_NAMES)
    for rule in RULE_NAMES:
        assert RULES[rule].feedback(bad) in res.feedback
    res = env.step("")
    assert res.done and not res.passed and not res.valid and res.reward == 0.0
    assert "empty" in res.feedback.lower() and "No turns left" in res.feedback


def test_house_rules_all_rules_accepted_together():
    assert HouseRulesEnv().rules == DEFAULT_RULES
    env = HouseRulesEnv(rules=RULE_NAMES)
    env.reset(3)
    number = env.ticket.order_number
    res = env.step(f"{GREETING} Thank you, your order #{number} is being replaced today.\n{SIGNOFF}")
    assert res.passed and res.done


def test_tickets_are_deterministic_and_quote_an_order_number():
    a, b = make_ticket(11), make_ticket(11)
    assert a == b and f"#{a.order_number}" in a.message
    assert len({make_ticket(s).message for s in range(50)}) > 40
    env = HouseRulesEnv()
    assert env.reset(11) == HouseRulesEnv().reset(11)
    assert a.message in env.reset(11)
    with pytest.raises(ValueError):
        HouseRulesEnv(rules=("no-such-rule",))


def test_house_rule_checks_are_separate_from_the_instruction_following_checks():
    import inspect

    import oel.envs.house_rules as hr

    source = inspect.getsource(hr)
    assert "import" not in "".join(line for line in source.splitlines() if "ifeval" in line.lower())


def test_reference_experience_mentions_each_rule():
    items = reference_experience("house-rules")
    assert items == [RULES[r].experience for r in DEFAULT_RULES]
    assert any(GREETING in i for i in items)
    assert SIGNOFF in RULES["signoff"].experience
    # every item quotes an accepted reply that indeed follows its own rule
    for name in RULE_NAMES:
        item = RULES[name].experience
        tail = item.split("accepted reply")[1]
        example = tail[tail.index('"') + 1 : tail.rindex('"')]
        assert RULES[name].check(example, Ticket("Maria", "12345", "kettle", "order #12345")), name
    for name in ("frozenlake", "sokoban"):
        assert reference_experience(name)


# --- the agent prompt with experience ---------------------------------------------------------


def test_agent_prompt_without_experience_is_the_situation():
    assert agent_prompt("the board") == "the board"
    assert agent_prompt("the board", []) == "the board"
    assert agent_prompt("the board", "  ") == "the board"


def test_agent_prompt_puts_intro_then_experience_then_situation():
    p = agent_prompt("THE BOARD", ["holes lose", "- goal wins"])
    assert p.index(EXPERIENCE_INTRO) < p.index("- holes lose") < p.index("- goal wins") < p.index(SITUATION_HEADING) < p.index("THE BOARD")
    assert "incomplete or wrong" in p
    assert format_experience("one block\n- as is") == "one block\n- as is"


def test_with_experience_changes_only_the_first_user_message():
    conv = [
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content="board"),
        ChatMessage(role="assistant", content="[up]"),
        ChatMessage(role="user", content="feedback"),
    ]
    out = with_experience(conv, ["x"])
    assert out[0] == conv[0] and out[2:] == conv[2:]
    assert out[1].content == agent_prompt("board", ["x"])
    assert with_experience(conv, None) == conv
    with pytest.raises(ValueError):
        with_experience([ChatMessage(role="assistant", content="a")], ["x"])
