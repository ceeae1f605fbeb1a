"""The context budget as the README states it: whole turns dropped from the oldest end, the newest
message always kept; when it has to drop, it drops down to ¾ of the budget and keeps that start for
the next turns. Observed through `Chat.context` on a real session (tiny model's tokenizer), without
reading the code's constant: the cost of a message is measured from where truncation begins."""

import pytest

N_TURNS = 10  # user + assistant pairs, then one more user message
NEW_TOKENS = 16  # max_new_tokens: the reply's share of the context


@pytest.fixture
def history(tiny_assistant, tmp_path):
    """A session of 21 messages of equal length (so of equal cost): u0 a0 u1 a1 … u9 a9 u10."""
    from memory import Memory

    memory = Memory.open(data_dir=tmp_path / "data")
    session = memory.create_session("budget", "tiny")
    for i in range(N_TURNS):
        memory.add_turn(session.id, "user", f"question {i:03d} " + "q" * 40)
        memory.add_turn(session.id, "assistant", f"answer   {i:03d} " + "a" * 40)
    memory.add_turn(session.id, "user", f"question {N_TURNS:03d} " + "q" * 40)
    yield memory, session
    memory.close()


def kept(tiny_assistant, memory, session, context_tokens, chat=None):
    """(the chat, the texts of the messages its context keeps) at this context size."""
    from assistant.session import Chat

    chat = chat or Chat(tiny_assistant, memory, session, context_tokens=context_tokens)
    chat.context_tokens = context_tokens
    chat.settings.max_new_tokens = NEW_TOKENS
    return chat, [m.text for m in chat.context(memory.turns(session.id))]


def test_truncation_drops_to_three_quarters_of_the_budget_and_keeps_its_start(tiny_assistant, history):
    memory, session = history
    n = 2 * N_TURNS + 1
    # the smallest context that keeps everything = the whole history's cost (+ the reply's share)
    lo, hi = NEW_TOKENS, 100_000
    while lo < hi:
        mid = (lo + hi) // 2
        if len(kept(tiny_assistant, memory, session, mid)[1]) == n:
            hi = mid
        else:
            lo = mid + 1
    whole = lo - NEW_TOKENS
    assert whole % n == 0  # equal messages, equal costs
    cost = whole // n

    budget = whole - cost // 2  # just over the budget: something must go
    chat, texts = kept(tiny_assistant, memory, session, budget + NEW_TOKENS)
    assert texts[-1].startswith(f"question {N_TURNS:03d}")  # the newest message stays
    assert texts[0].startswith("question ")  # whole turns: the window starts at a user message
    # down to ¾ of the budget: what is kept fits in ¾ of it, and one more turn (2 messages) would not
    assert len(texts) * cost <= 0.75 * budget < (len(texts) + 2) * cost, (len(texts), cost, budget)

    # the next exchange fits the budget again: the start is kept (the cached prefix stays valid)
    memory.add_turn(session.id, "assistant", f"answer   {N_TURNS:03d} " + "a" * 40)
    memory.add_turn(session.id, "user", f"question {N_TURNS + 1:03d} " + "q" * 40)
    _, after = kept(tiny_assistant, memory, session, budget + NEW_TOKENS, chat)
    assert after[0] == texts[0] and len(after) == len(texts) + 2
    # a fresh chat over the same history (no remembered start) cuts down to ¾ again
    _, fresh = kept(tiny_assistant, memory, session, budget + NEW_TOKENS)
    assert len(fresh) * cost <= 0.75 * budget < (len(fresh) + 2) * cost

    # a budget smaller than the newest message alone still keeps it
    _, tiny = kept(tiny_assistant, memory, session, NEW_TOKENS + 1)
    assert len(tiny) == 1 and tiny[0].startswith(f"question {N_TURNS + 1:03d}")
