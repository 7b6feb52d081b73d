"""`ShownText`: what `text_stream()` yields across restarts, for any cut of the text."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from holysheep import ChatChunk, ContentDelta, Reset
from holysheep._call import ShownText


def chunk(text: str) -> ChatChunk:
    return ChatChunk(text, (ContentDelta(text),) if text else (), {}, None)


RESET = ChatChunk.for_reset(Reset("a drop", 2))


def pieces(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at `cuts` (positions in any order; repeats ignored)."""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def shown_through(chunks: list[ChatChunk]) -> tuple[str, bool]:
    """What a caller of `text_stream()` printed, and whether it stopped on a divergence (other
    words, or an answer that ended shorter than what was shown)."""
    shown = ShownText()
    printed = []
    for item in chunks:
        text = shown.take(item)
        if text is None:
            return "".join(printed), True
        printed.append(text)
    return "".join(printed), shown.repeating()


@given(
    answer=st.text(min_size=1, max_size=40),
    cut_at=st.integers(min_value=0, max_value=40),
    first_cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
    second_cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_a_restart_that_repeats_the_answer_prints_it_once(
    answer: str, cut_at: int, first_cuts: list[int], second_cuts: list[int]
) -> None:
    """The first attempt breaks anywhere, the second streams the same answer cut differently:
    the caller prints the answer exactly once."""
    before = answer[: cut_at % (len(answer) + 1)]
    chunks = [chunk(p) for p in pieces(before, first_cuts)]
    chunks += [RESET, *(chunk(p) for p in pieces(answer, second_cuts))]
    assert (answer, False) == shown_through(chunks)


@st.composite
def shown_and_restarted(draw: st.DrawFn) -> tuple[str, str]:
    """A first answer and a restarted one: unrelated, or sharing a beginning with it (shorter,
    equal, longer, or diverging part-way), the cases that matter."""
    before = draw(st.text(min_size=1, max_size=20))
    shared = before[: draw(st.integers(min_value=0, max_value=len(before)))]
    after = shared + draw(st.text(max_size=20))
    return before, after or before


@given(texts=shown_and_restarted(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_a_restarted_answer_that_differs_stops_at_the_text_shown(
    texts: tuple[str, str], cuts: list[int]
) -> None:
    """A new answer that is not a continuation of what was printed is refused: what was
    printed stays the first attempt's text, with nothing from the second spliced on."""
    before, after = texts
    chunks = [chunk(before), RESET, *(chunk(p) for p in pieces(after, cuts))]
    printed, diverged = shown_through(chunks)
    # An answer that stops while still repeating (shorter than what was shown) differs too.
    assert diverged == (not after.startswith(before))
    assert (before if diverged else after) == printed


def test_without_a_reset_every_text_is_yielded_as_it_comes() -> None:
    """No restart: each chunk's text, chunks without text give nothing."""
    shown = ShownText()
    assert ["Hel", "", "lo"] == [shown.take(c) for c in (chunk("Hel"), chunk(""), chunk("lo"))]


def test_two_restarts_each_skip_what_was_shown() -> None:
    """A second restart, even in the middle of repeating, is matched against all shown."""
    texts = [chunk("ab"), chunk("cd"), RESET, chunk("a"), RESET, chunk("abc"), chunk("def")]
    assert ("abcdef", False) == shown_through(texts)
