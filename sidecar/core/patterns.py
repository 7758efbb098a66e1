"""Channel patterns (throttle policies, token grants): ``*`` matches any run of characters, all else itself. Pure.

Matched without backtracking. The pieces between the stars are found left to right, each at its first place
after the piece before: with ``*`` the only wildcard, a piece that fits anywhere also fits at its leftmost
place, so the first place found is never wrong and no choice is ever undone. A match is one bounded scan of
the channel per piece, O(len(channel) * pieces) at worst, whatever the pattern. (A regex of ``.*`` groups
tries every way to split the channel instead: ``*:*:*:*:*:x`` took seconds on one 120-character channel.)

Example::

    glob_match("sprint:*:board", "sprint:42:board")   # True
"""

from __future__ import annotations


def glob_match(pattern: str, channel: str) -> bool:
    """Whether ``channel`` matches ``pattern`` whole."""
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return pattern == channel
    head, tail = pieces[0], pieces[-1]
    end = len(channel) - len(tail)
    if end < len(head) or not channel.startswith(head) or not channel.endswith(tail):
        return False
    at = len(head)
    for piece in pieces[1:-1]:
        found = channel.find(piece, at, end)  # the whole piece within [at, end): it cannot eat into the tail
        if found < 0:
            return False
        at = found + len(piece)
    return True
