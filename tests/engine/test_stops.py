"""StopMatcher alone: stops matched across piece boundaries, held-back text, cut output."""
from hypothesis import given, strategies as st

from woolly.engine.stops import StopMatcher


def run(pieces, stops):
    m = StopMatcher(tuple(stops))
    out = [m.feed(p) for p in pieces]
    return out, "".join(out) + m.flush(), m.stopped


def test_no_stops_passes_pieces_through_unchanged():
    out, text, stopped = run(["Hel", "lo", " world"], [])
    assert out == ["Hel", "lo", " world"] and text == "Hello world" and not stopped


def test_stop_spanning_pieces_is_cut_and_nothing_after_it_is_emitted():
    out, text, stopped = run(["The end", "ing is ", "EN", "D here", " more"], ["END"])
    assert text == "The ending is " and stopped
    assert out[-1] == ""          # after the stop, pieces are dropped


def test_possible_stop_prefix_is_held_back_then_released():
    m = StopMatcher(("</s>",))
    assert m.feed("a <") == "a "          # "<" may begin the stop: held
    assert m.feed("/x") == "</x"          # it did not: released
    assert m.feed("</") == ""
    assert m.flush() == "</"              # generation ended without the stop: held text comes out
    assert not m.stopped


def test_earliest_of_several_stops_wins():
    _, text, stopped = run(["alpha beta gamma"], ["gamma", "beta"])
    assert text == "alpha " and stopped


def test_stop_at_the_very_start_gives_empty_text():
    _, text, stopped = run(["\n\n", "rest"], ["\n\n"])
    assert text == "" and stopped


def test_after_stop_flush_gives_nothing():
    m = StopMatcher(("x",))
    assert m.feed("abxcd") == "ab"
    assert m.feed("more") == "" and m.flush() == ""


@given(text=st.text(alphabet="ab\n.", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="ab\n.", min_size=1, max_size=4), min_size=1, max_size=3))
def test_any_split_cuts_just_before_a_stop_and_emits_no_stop(text, cuts, stops):
    """Whatever the piece boundaries: the output is the text up to where some stop begins, and it
    contains no stop. (Which stop wins may depend on the pieces: generation halts at the first
    one completed, as a token-by-token generator must.)"""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    _, out, stopped = run(pieces, stops)
    assert not any(s in out for s in stops)
    if stopped:
        assert text.startswith(out) and any(text[len(out):].startswith(s) for s in stops)
    else:
        assert out == text and not any(s in text for s in stops)


def test_single_piece_cuts_at_the_earliest_occurrence():
    _, text, _ = run(["xx.ab.b"], ["b.", "ab"])
    assert text == "xx."
