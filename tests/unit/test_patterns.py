"""Channel patterns: the same answers as a regex of `.*`s, at a cost bounded by channel x pattern length."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sidecar.auth import grant_from_claims
from sidecar.core.patterns import glob_match
from sidecar.core.throttle import ChannelPolicy, Policy


class CountingChannel(str):
    """A channel that counts the character comparisons glob_match can make on it: a search for a piece in a
    window compares at most window x piece characters, a prefix or suffix check at most the piece's length."""

    comparisons = 0

    def find(self, piece: str, start: int = 0, end: int | None = None) -> int:  # type: ignore[override]
        window = (len(self) if end is None else end) - start
        CountingChannel.comparisons += max(0, window) * max(1, len(piece))
        return super().find(piece, start, end)

    def startswith(self, piece: str) -> bool:  # type: ignore[override]
        CountingChannel.comparisons += len(piece)
        return super().startswith(piece)

    def endswith(self, piece: str) -> bool:  # type: ignore[override]
        CountingChannel.comparisons += len(piece)
        return super().endswith(piece)


def regex_of(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(piece) for piece in pattern.split("*")), re.DOTALL)


@given(st.text("ab*", max_size=8), st.text("ab", max_size=10))
def test_a_glob_matches_exactly_what_a_regex_of_dot_stars_matches(pattern: str, channel: str) -> None:
    assert glob_match(pattern, channel) == bool(regex_of(pattern).fullmatch(channel))


def test_stars_match_any_run_and_the_rest_is_literal() -> None:
    assert glob_match("sprint:*", "sprint:42") and glob_match("sprint:*", "sprint:")
    assert glob_match("*:board", "sprint:42:board") and glob_match("*", "")
    assert glob_match("a*b*a", "aba") and not glob_match("a*b*a", "ab")
    assert not glob_match("ab*ba", "aba")  # head and tail may not share a character
    assert not glob_match("task:42", "task:420") and not glob_match("task:.", "task:1")


def test_the_worst_patterns_on_the_longest_channel_cost_at_most_channel_times_pattern_comparisons() -> None:
    # A regex of `.*`s tries every way to split the channel among the stars (C(200, 99) for the first one).
    cases = [
        ("*" + ":*" * 99 + "x*", ":" * 200, False),  # every `:` found at once, then `x` nowhere
        ("*:*:*:*:*:x", ":" * 120, False),  # the pattern of the report
        ("*" + "::::::::::x*" * 18, ":" * 199 + "x", False),  # long pieces, each nearly matching everywhere
        ("*:" * 99 + "*x", ":" * 199 + "x", True),
    ]
    for pattern, text, matches in cases:
        channel = CountingChannel(text)
        CountingChannel.comparisons = 0
        assert glob_match(pattern, channel) is matches, pattern
        assert 0 < CountingChannel.comparisons <= len(channel) * len(pattern), pattern


def test_a_throttle_policy_and_a_token_grant_with_many_stars_answer_for_a_200_character_channel() -> None:
    # Each of these took seconds (5 stars) to ages (20 stars) as a regex: the relay and the door froze.
    stars = "*:" * 20 + "x"
    policy = Policy(channels={"*": ChannelPolicy(), stars: ChannelPolicy(window=1)})
    assert policy.match(":" * 200) == ("*", ChannelPolicy())
    assert policy.match(":" * 199 + "x")[0] == stars
    grant = grant_from_claims({"channels": [stars]})
    assert not grant.allows(":" * 200) and grant.allows(":" * 199 + "x")
