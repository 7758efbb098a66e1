"""Redis Cluster hash slots, and shard tags that spread evenly over a cluster's masters. Pure.

Redis Cluster maps a key to one of 16384 slots by CRC16 of its hash tag (the part between the first `{` and
the next `}`, when not empty), and each master owns ranges of slots. Every key of one publish carries its
shard's tag, so the publish script stays atomic on a cluster. Short tags like `{0}`..`{15}` land on slots
that CRC16 scatters unevenly, so some masters get more shards than others (one public report: 128 bare tags
gave 6 masters `[27, 15, 22, 23, 16, 25]`). :func:`balanced_tags` picks, for shard k of n, the first tag of a
fixed sequence whose slot lies in the k-th of n equal slot ranges: on a cluster whose masters own equal
contiguous ranges (what CLUSTER ADDSLOTS of an even split, and redis-cli --cluster create, give), each master
then owns n/M shards, give or take one.
"""

from __future__ import annotations

from functools import cache

SLOTS = 16384


def _crc16_table() -> list[int]:
    # CRC-16/XMODEM (polynomial 0x1021, initial 0), the variant Redis Cluster specifies.
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes: the first non-empty `{...}`, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """The slot of `key`, as CLUSTER KEYSLOT computes it."""
    return crc16(hash_tag(key).encode()) % SLOTS


def slot_range(shard: int, shards: int) -> range:
    """The k-th of `shards` equal, contiguous slot ranges."""
    return range(shard * SLOTS // shards, (shard + 1) * SLOTS // shards)


@cache
def balanced_tags(shards: int) -> tuple[str, ...]:
    """One tag per shard (`<k>` or `<k>.<j>`) whose slot lies in :func:`slot_range` of that shard: stable
    (a fixed search), short, and evenly spread over slots. Needs `shards` <= 16384."""
    if not 1 <= shards <= SLOTS:
        raise ValueError(f"shards must be 1..{SLOTS}")
    tags = []
    for shard in range(shards):
        wanted = slot_range(shard, shards)
        tag, j = str(shard), 0
        while key_slot(tag) not in wanted:
            tag, j = f"{shard}.{j}", j + 1
        tags.append(tag)
    return tuple(tags)


def owners(slots: list[int], ranges: list[tuple[int, int, str]]) -> list[str]:
    """The node owning each slot, given (first, last, node) ranges as CLUSTER SLOTS lists them."""
    found = []
    for slot in slots:
        node = next((n for first, last, n in ranges if first <= slot <= last), None)
        if node is None:
            raise ValueError(f"slot {slot} is not covered")
        found.append(node)
    return found
