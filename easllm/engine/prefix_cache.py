"""Automatic prefix caching: a sequence's KV cells outlive it, and the next sequence that starts
with the same tokens reuses them instead of computing them again.

The index is a radix trie over token ids (SGLang's RadixAttention), not vLLM's block hashes:
llama.cpp shares KV cells between sequence ids over a position range, to the token
(`llama_memory_seq_cp(src, dst, 0, n)`), with no blocks. A path from the root is exactly the
cells one sequence id holds, so a node is a run of cells held by every sequence id below it, and
the sum of the nodes' lengths is the cells in use, shared ones counted once. A lookup walks the
prompt once: one dict lookup per node and a list comparison per run, so its cost grows with
the matched length, not with the number of cached tokens or entries.

Sequence ids (llama.cpp's `n_seq_max` is small): every leaf is held by exactly one id, the slot
of the running sequence that is growing it or an idle id that keeps a finished sequence's cells;
inner nodes need none, the leaves below hold their cells. The runner has more ids than running
slots; when the ids or the cells run out, the least recently used leaf no running sequence goes
through is dropped (its parent, left childless, inherits the id). Nodes on a running sequence's
path are locked: a cached prefix never costs a running sequence its cells.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class KVOps(Protocol):
    """What the cache asks of the backend's KV cache."""

    num_seq_ids: int  # sequence ids 0 .. num_seq_ids - 1

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Let `dst` share `src`'s cells at positions start .. end - 1 (dst holds none there)."""
        ...

    def drop(self, seq_id: int, start: int = 0, end: int | None = None) -> None:
        """Drop `seq_id` from its cells at positions start .. end - 1 (None: to its end); cells
        nobody holds become free."""
        ...

    def can_continue(self, seq_id: int, n: int) -> bool:
        """Whether a sequence sharing `seq_id`'s first n cells can be computed on from position n
        (sliding-window layers may have overwritten the cells it needs)."""
        ...


def common_prefix_len(a: Sequence[int], b: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """How many leading tokens of `a` equal b[start:end]."""
    end = len(b) if end is None else min(end, len(b))
    n = min(len(a), end - start)
    if list(a[:n]) == list(b[start : start + n]):
        return n
    lo, hi = 0, n  # a[:lo] matches, a[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if list(a[lo:mid]) == list(b[start + lo : start + mid]):
            lo = mid
        else:
            hi = mid
    return lo


class Node:
    __slots__ = ("children", "last_used", "locks", "others", "parent", "seq_id", "start", "tokens")

    def __init__(self, start: int, parent: Node | None, tokens: list[int] | None = None) -> None:
        self.tokens: list[int] = tokens or []
        self.start = start  # position of tokens[0]
        self.parent = parent
        self.children: dict[int, Node] = {}  # by first token: what lookups follow
        self.others: list[Node] = []  # children no lookup finds: still empty, or a duplicate start
        self.seq_id: int | None = None  # the id holding this leaf's path; None for inner nodes
        self.locks = 0  # running sequences whose path goes through here
        self.last_used = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def is_leaf(self) -> bool:
        return not self.children and not self.others

    def __repr__(self) -> str:
        return f"Node({self.start}..{self.end}, seq {self.seq_id}, locks {self.locks})"


@dataclass(frozen=True)
class Match:
    node: Node  # where the match ends
    offset: int  # tokens of `node` matched (the node is split there on admission)
    length: int  # tokens matched in all: positions 0 .. length - 1
    holder: int | None  # a sequence id holding those cells; None when nothing matched


class PrefixCache:
    def __init__(self, kv: KVOps, kv_cells: int, max_running: int, enabled: bool = True) -> None:
        self.kv = kv
        self.kv_cells = kv_cells
        self.enabled = enabled
        self.root = Node(0, None)
        self.cells_used = 0  # distinct cells: the sum of all nodes' lengths
        self.cells_locked = 0  # cells on a running sequence's path
        self.evicted_cells_total = 0
        self._free_ids = list(range(kv.num_seq_ids - 1, -1, -1))
        self._leaf: dict[int, Node] = {}  # seq id -> the leaf it holds
        self._running: set[int] = set()
        self._clock = itertools.count(1)
        if kv.num_seq_ids <= max_running and enabled:
            raise ValueError("the prefix cache needs more sequence ids than running sequences")

    @property
    def cells_cached(self) -> int:
        """Cells only cached prefixes hold: what eviction could free."""
        return self.cells_used - self.cells_locked

    # -- lookup --
    def match(self, tokens: Sequence[int], limit: int) -> Match:
        """The longest cached prefix of tokens[:limit] a new sequence can continue from."""
        if not self.enabled:
            return Match(self.root, 0, 0, None)
        node, offset, depth = self._walk(self.root, tokens, limit)
        if depth == 0:
            return Match(self.root, 0, 0, None)
        for holder in self._holders(node):
            if self.kv.can_continue(holder, depth):
                return Match(node, offset, depth, holder)
        return Match(self.root, 0, 0, None)

    def cells_to_lock(self, match: Match) -> int:
        """Cells that admitting a sequence on this match takes out of the evictable ones."""
        return sum(len(n.tokens) for n in self._path(match.node) if n.locks == 0) - (
            len(match.node.tokens) - match.offset if match.node.locks == 0 else 0
        )

    # -- a sequence's life --
    def admit(self, match: Match) -> int:
        """Start a sequence on the matched prefix: lock it, give the sequence a free id that
        shares those cells, and hang its (empty) own leaf below. Returns the sequence id."""
        parent = self._split(match.node, match.offset)
        tail = Node(parent.end, parent)
        parent.others.append(tail)
        self._lock(tail, +1)
        seq_id = self._take_id(keep=match.holder)
        if match.holder is not None:
            self.kv.copy(match.holder, seq_id, 0, match.length)
        tail.seq_id = seq_id
        self._leaf[seq_id] = tail
        self._running.add(seq_id)
        self._touch(tail)
        if parent.seq_id is not None:  # it held the path alone; the new leaf below holds it now
            self._free_id(parent)
        return seq_id

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        """The forward pass computed these tokens of a running sequence, at the end of its leaf."""
        tail = self._leaf[seq_id]
        if not tail.tokens and tokens and tail.parent is not None:
            parent = tail.parent
            if tokens[0] not in parent.children:  # else it stays unindexed: a duplicate start
                parent.others.remove(tail)
                parent.children[tokens[0]] = tail
        tail.tokens.extend(tokens)
        self.cells_used += len(tokens)
        self.cells_locked += len(tokens)

    def release(self, seq_id: int) -> None:
        """A running sequence ended (finished, aborted, preempted): its cells stay as a cached
        prefix, unless caching is off or nobody could find them."""
        tail = self._leaf[seq_id]
        self._running.discard(seq_id)
        self._lock(tail, -1)
        self._touch(tail)
        assert tail.parent is not None
        if not self.enabled or not tail.tokens:
            self._evict(tail)
        elif tail.parent.children.get(tail.tokens[0]) is not tail:
            self._rebase(tail)

    def _rebase(self, tail: Node) -> None:
        """A leaf that began with the same tokens as a sibling (two sequences computed the same
        prefix at once) gives up its copy of them and shares the sibling's cells, so lookups
        find the rest of it; without a usable holder it is dropped."""
        parent, seq_id = tail.parent, tail.seq_id
        assert parent is not None and seq_id is not None
        node, offset, n = self._walk(parent, tail.tokens, len(tail.tokens))
        if n == 0:  # the sibling it collided with is gone
            parent.others.remove(tail)
            parent.children[tail.tokens[0]] = tail
            return
        end = tail.start + n
        holder = next((h for h in self._holders(node) if self.kv.can_continue(h, end)), None)
        if n == len(tail.tokens) or holder is None:
            self._evict(tail)
            return
        self.kv.drop(seq_id, tail.start, end)
        self.kv.copy(holder, seq_id, tail.start, end)
        parent.others.remove(tail)
        self.cells_used -= n
        tail.tokens = tail.tokens[n:]
        tail.start = end
        branch = self._split(node, offset)
        tail.parent = branch
        branch.children[tail.tokens[0]] = tail
        if branch.seq_id is not None:
            self._free_id(branch)

    # -- eviction --
    def make_room(self, cells: int) -> bool:
        """Evict cached prefixes, least recently used first, until `cells` cells are free."""
        while self.kv_cells - self.cells_used < cells:
            if not self._evict_lru():
                return False
        return True

    def evict_all(self) -> int:
        """Drop every cached prefix; returns the cells freed."""
        before = self.cells_used
        while self._evict_lru():
            pass
        return before - self.cells_used

    def _evict_lru(self, keep: int | None = None) -> bool:
        candidates = [
            n for s, n in self._leaf.items() if s not in self._running and s != keep and n.is_leaf()
        ]
        if not candidates:
            return False
        self._evict(min(candidates, key=lambda n: n.last_used))
        return True

    def _evict(self, leaf: Node) -> None:
        assert leaf.locks == 0 and leaf.is_leaf() and leaf.seq_id is not None, leaf
        parent = leaf.parent
        assert parent is not None
        seq_id = leaf.seq_id
        if parent.children.get(leaf.tokens[0] if leaf.tokens else -1) is leaf:
            del parent.children[leaf.tokens[0]]
        else:
            parent.others.remove(leaf)
        self.cells_used -= len(leaf.tokens)
        self.evicted_cells_total += len(leaf.tokens)
        del self._leaf[seq_id]
        if parent is not self.root and parent.is_leaf():
            self.kv.drop(seq_id, leaf.start)  # the parent's path stays, held by the same id
            parent.seq_id = seq_id
            self._leaf[seq_id] = parent
        else:
            self.kv.drop(seq_id)  # other leaves hold the parent's path
            self._free_ids.append(seq_id)
            if parent is not self.root and parent.locks == 0:
                self._merge(parent)

    def _merge(self, node: Node) -> None:
        """An inner node left with one child becomes one node with it (lookups stay short)."""
        if node.others or len(node.children) != 1 or node.seq_id is not None:
            return
        (child,) = node.children.values()
        node.tokens.extend(child.tokens)
        node.children, node.others = child.children, child.others
        for grandchild in itertools.chain(node.children.values(), node.others):
            grandchild.parent = node
        node.seq_id, node.last_used = child.seq_id, max(node.last_used, child.last_used)
        if node.seq_id is not None:
            self._leaf[node.seq_id] = node

    # -- helpers --
    def _take_id(self, keep: int | None) -> int:
        while not self._free_ids:
            if not self._evict_lru(keep):
                raise RuntimeError("no free sequence id and no cached prefix to evict")
        return self._free_ids.pop()

    def _free_id(self, node: Node) -> None:
        assert node.seq_id is not None
        seq_id, node.seq_id = node.seq_id, None
        del self._leaf[seq_id]
        self.kv.drop(seq_id)
        self._free_ids.append(seq_id)

    def _walk(self, node: Node, tokens: Sequence[int], limit: int) -> tuple[Node, int, int]:
        """Follow tokens[:limit] down from `node`: where the match ends (node, tokens of it
        matched) and how many tokens matched."""
        offset, depth = len(node.tokens), 0
        while depth < limit:
            child = node.children.get(tokens[depth])
            if child is None:
                break
            n = common_prefix_len(child.tokens, tokens, depth, limit)
            node, offset, depth = child, n, depth + n
            if n < len(child.tokens):
                break
        return node, offset, depth

    def _split(self, node: Node, offset: int) -> Node:
        """Cut `node` after `offset` tokens; returns the first part (the whole node when it ends there)."""
        if node is self.root or (offset == len(node.tokens) and node.seq_id not in self._running):
            return node  # a cached leaf matched to its end: `admit` frees its id
        rest = Node(node.start + offset, node, node.tokens[offset:])
        node.tokens = node.tokens[:offset]
        rest.children, rest.others = node.children, node.others
        for child in itertools.chain(rest.children.values(), rest.others):
            child.parent = rest
        rest.seq_id, rest.locks, rest.last_used = node.seq_id, node.locks, node.last_used
        node.children, node.others, node.seq_id = {}, [], None
        if rest.tokens:
            node.children[rest.tokens[0]] = rest
        else:  # a running sequence's leaf cut at its end: it keeps growing in `rest`
            node.others.append(rest)
        if rest.seq_id is not None:
            self._leaf[rest.seq_id] = rest
        return node

    def _lock(self, node: Node, delta: int) -> None:
        for n in self._path(node):
            if n.locks == 0 and delta > 0:
                self.cells_locked += len(n.tokens)
            n.locks += delta
            if n.locks == 0:
                self.cells_locked -= len(n.tokens)

    def _touch(self, node: Node) -> None:
        now = next(self._clock)
        for n in self._path(node):
            n.last_used = now

    def _path(self, node: Node) -> Iterator[Node]:
        while node is not self.root:
            yield node
            assert node.parent is not None
            node = node.parent

    def _holders(self, node: Node) -> Iterator[int]:
        stack = [node]
        while stack:
            n = stack.pop()
            if n.seq_id is not None:
                yield n.seq_id
            stack.extend(n.children.values())
            stack.extend(n.others)
