"""The adaptive tri-gram table behind the ADED drafter: context -> a few weighted successor tokens.

A context is either a token pair (a, b) (the tri-gram rows) or a single token b (the bigram rows, the fallback for
pairs never seen). Each row keeps at most `top_k` successors with float weights. One rule updates a row, whether
the evidence comes from a corpus, the prompt or the target's own output during decoding:

    add(context, c, strength):
        if c is in the row:        w[c] += strength
        else if the row is full:   the weakest successor is replaced by c, with weight `strength`
        else:                      c joins the row with weight `strength`
        if sum(w) > cap:           every weight is scaled by cap / sum(w)

So a weight grows by one `strength` per occurrence until its row's total reaches `cap`; past that, new evidence
shrinks the older successors in proportion (exponential forgetting), which is how the table drifts toward the text
being written. Because a row's total never exceeds `cap`, weights fit in float16.

Storage is a fixed-layout open-addressing hash table in numpy, not a dict of dicts, so memory is known and small:
per slot an int64 key, `top_k` int32 successors and `top_k` float16 weights, 8 + 6 * top_k bytes (56 at the default
top_k = 8). The table starts at 4096 slots and doubles while more than half full, up to `max_slots` (default
2**20 = 1,048,576 contexts: 56 MiB at top_k = 8 whatever the vocabulary, as long as token ids stay below 2**21; a
50k-token vocabulary's realistic tables, hundreds of thousands of pairs, fit under this cap). Once at `max_slots`, a new
context that finds no free slot within its 32-slot probe window replaces the lightest row of that window, so the
table keeps learning at a bounded size and forgets the contexts with the least evidence first.

Lookups and single updates run in plain Python over numpy rows (a few microseconds each); building from a corpus
and growing are vectorised.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN_BITS = 21  # token ids must be below 2**21 (2,097,152): a pair key is ((a + 1) << 21) | b
MAX_TOKEN = 1 << TOKEN_BITS
EMPTY = -1  # key of a free slot
PROBES = 32  # a context lives within PROBES slots of its home slot
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing multiplier (2**64 / golden ratio, odd)
_MASK64 = (1 << 64) - 1
FORMAT = 1  # saved-file layout version


def context_key(a: int, b: int) -> int:
    """Key of the tri-gram context (a, b); a = -1 gives the bigram context of b alone."""
    return ((a + 1) << TOKEN_BITS) | b


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class TrigramTable:
    """Context (token pair, or single token) -> up to `top_k` weighted successors; see the module docstring."""

    def __init__(self, top_k: int = 8, cap: float = 16.0, max_slots: int = 1 << 20, initial_slots: int = 1 << 12):
        _check("top_k", isinstance(top_k, int) and 1 <= top_k <= 64, "an integer in [1, 64]", top_k)
        _check("cap", isinstance(cap, (int, float)) and 1.0 <= cap <= 1024.0, "a number in [1, 1024]", cap)
        for name, value in (("max_slots", max_slots), ("initial_slots", initial_slots)):
            _check(name, isinstance(value, int) and value >= 16 and value & (value - 1) == 0,
                   "a power of two >= 16", value)
        _check("initial_slots", initial_slots <= max_slots, f"<= max_slots ({max_slots})", initial_slots)
        self.top_k, self.cap, self.max_slots = top_k, float(cap), max_slots
        self.size = 0  # occupied slots (contexts)
        self.dropped = 0  # contexts left out by the last bulk load for lack of room
        self._allocate(initial_slots)

    # ------------------------------------------------------------------ storage

    def _allocate(self, slots: int) -> None:
        self.keys = np.full(slots, EMPTY, dtype=np.int64)  # [slots] context key, EMPTY when free
        self.succ = np.full((slots, self.top_k), -1, dtype=np.int32)  # [slots, top_k] successor tokens, -1 = none
        self.weights = np.zeros((slots, self.top_k), dtype=np.float16)  # [slots, top_k], 0 = none; row sum <= cap
        self._bits = slots.bit_length() - 1
        self._mask = slots - 1

    @property
    def slots(self) -> int:
        return self.keys.shape[0]

    def copy(self) -> TrigramTable:
        """An independent copy (the arrays are copied; a few ms for a table of tens of MiB)."""
        out = TrigramTable.__new__(TrigramTable)
        out.__dict__.update(self.__dict__)
        out.keys, out.succ, out.weights = self.keys.copy(), self.succ.copy(), self.weights.copy()
        return out

    def state_bytes(self) -> int:
        """Memory held by the table: its three arrays (everything else is a few scalars)."""
        return self.keys.nbytes + self.succ.nbytes + self.weights.nbytes + 256

    def _home(self, key: int) -> int:
        return ((key * _GOLDEN) & _MASK64) >> (64 - self._bits)

    def _find(self, key: int) -> int:
        """Slot holding `key`, or -1."""
        keys, mask, slot = self.keys, self._mask, self._home(key)
        for _ in range(PROBES):
            k = keys[slot]
            if k == key:
                return slot
            if k == EMPTY:
                return -1
            slot = (slot + 1) & mask
        return -1

    def _claim(self, key: int) -> int:
        """Slot for `key`, inserting it (growing, or replacing the lightest row of its window) when absent."""
        slot = self._find(key)
        if slot >= 0:
            return slot
        if self.size + 1 > self.slots // 2 and self.slots < self.max_slots:
            self._resize(self.slots * 2)
        keys, mask, home = self.keys, self._mask, self._home(key)
        for probe in range(PROBES):
            slot = (home + probe) & mask
            if keys[slot] == EMPTY:
                keys[slot] = key
                self.size += 1
                return slot
        # full window (only possible at max_slots): reuse the row with the least evidence
        window = (home + np.arange(PROBES)) & mask  # [PROBES]
        victim = int(window[self.weights[window].astype(np.float32).sum(1).argmin()])
        keys[victim] = key
        self.succ[victim] = -1
        self.weights[victim] = 0.0
        return victim

    def _resize(self, slots: int) -> None:
        used = self.keys != EMPTY
        keys, succ, weights = self.keys[used], self.succ[used], self.weights[used]
        self._allocate(slots)
        self.size = 0
        self._insert_many(keys, succ, weights)

    def _insert_many(self, keys: np.ndarray, succ: np.ndarray, weights: np.ndarray) -> int:
        """Insert distinct new keys [P] with their rows [P, top_k] (vectorised); heavier rows first, so if the
        table is too small the lightest are the ones left out. Returns how many were left out."""
        if keys.size == 0:
            return 0
        totals = weights.astype(np.float32).sum(1)  # [P]
        pending = np.argsort(-totals, kind="stable")  # [P] indices into keys, heaviest first
        home = ((keys.astype(np.uint64) * np.uint64(_GOLDEN)) >> np.uint64(64 - self._bits)).astype(np.int64)
        placed = np.zeros(keys.size, dtype=bool)
        for probe in range(PROBES):
            slot = (home[pending] + probe) & self._mask  # [pending]
            free = self.keys[slot] == EMPTY
            candidates, slot = pending[free], slot[free]
            # one winner per free slot: the first in `pending` order, i.e. the heaviest
            slot, first = np.unique(slot, return_index=True)
            winners = candidates[first]
            self.keys[slot], self.succ[slot], self.weights[slot] = keys[winners], succ[winners], weights[winners]
            placed[winners] = True
            self.size += winners.size
            pending = pending[~placed[pending]]  # a key that lost a slot tries the next one in the next round
            if pending.size == 0:
                break
        return int(pending.size)

    # ------------------------------------------------------------------ the rule and the lookups

    def add(self, a: int, b: int, token: int, strength: float = 1.0) -> None:
        """Evidence that `token` follows the context (a, b) (a = -1: the bigram context b); the module's rule."""
        if not (0 <= token < MAX_TOKEN and -1 <= a < MAX_TOKEN and 0 <= b < MAX_TOKEN):
            raise ValueError(f"token ids must be in [0, {MAX_TOKEN}), got context ({a}, {b}) -> {token}")
        if strength <= 0.0:
            return
        slot = self._claim(context_key(a, b))
        succ, weights = self.succ[slot].tolist(), self.weights[slot].astype(np.float32).tolist()
        if token in succ:
            weights[succ.index(token)] += strength
        else:
            weakest = min(range(self.top_k), key=weights.__getitem__)  # an empty entry (weight 0) when there is one
            succ[weakest], weights[weakest] = token, strength
        total = sum(weights)
        if total > self.cap:
            weights = [w * self.cap / total for w in weights]
        self.succ[slot], self.weights[slot] = succ, weights

    def add_sequence(self, tokens: Sequence[int], strength: float = 1.0, start: int = 1) -> None:
        """Add the tri-gram (and bigram) ending at each position >= `start` of `tokens`."""
        for i in range(max(start, 1), len(tokens)):
            if i >= 2:
                self.add(tokens[i - 2], tokens[i - 1], tokens[i], strength)
            self.add(-1, tokens[i - 1], tokens[i], strength)

    def row(self, a: int, b: int) -> list[tuple[int, float]]:
        """[(successor, weight)] of context (a, b), heaviest first; [] when the context is unknown."""
        slot = self._find(context_key(a, b))
        if slot < 0:
            return []
        pairs = [(s, w) for s, w in zip(self.succ[slot].tolist(), self.weights[slot].tolist()) if w > 0.0]
        pairs.sort(key=lambda sw: -sw[1])
        return pairs

    def successors(self, a: int, b: int, backoff: float = 1.0) -> list[tuple[int, float]]:
        """[(token, probability)] after (a, b), most likely first, at most top_k of them.

        The tri-gram row's weights plus the bigram row of b spread as `backoff` units of weight (its weights
        normalised to sum to `backoff`): a pair seen once (weight 1) leans half on the bigram, a pair at the cap
        (weight 16) hardly at all. An unknown pair gives the bigram row alone. a = -1 asks for the bigram row.
        """
        mass = dict(self.row(a, b)) if a >= 0 else {}
        bigram = self.row(-1, b)
        if bigram and (backoff > 0.0 or not mass):
            scale = (backoff if mass else 1.0) / sum(w for _, w in bigram)
            for t, w in bigram:
                mass[t] = mass.get(t, 0.0) + w * scale
        ranked = sorted(mass.items(), key=lambda tw: -tw[1])[: self.top_k]
        total = sum(w for _, w in ranked)
        return [(t, w / total) for t, w in ranked] if total > 0.0 else []

    # ------------------------------------------------------------------ building, saving, loading

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int] | np.ndarray], top_k: int = 8, cap: float = 16.0,
                       min_count: int = 1, max_slots: int = 1 << 20) -> TrigramTable:
        """Count the tri-grams and bigrams of token sequences (never across sequence boundaries) and keep each
        context's `top_k` most frequent successors seen at least `min_count` times; a row whose kept counts sum to
        more than `cap` is scaled down to sum to `cap` (the same bound the online rule keeps)."""
        _check("min_count", isinstance(min_count, int) and min_count >= 1, "an integer >= 1", min_count)
        table = cls(top_k=top_k, cap=cap, max_slots=max_slots)
        parts = []
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)  # [L]
            if seq.size < 2:
                continue
            if seq.min() < 0 or seq.max() >= MAX_TOKEN:
                raise ValueError(f"token ids must be in [0, {MAX_TOKEN})")
            bigram_ctx = seq[:-1]  # a = -1: key = b
            trigram_ctx = ((seq[:-2] + 1) << TOKEN_BITS) | seq[1:-1]
            parts.append((np.concatenate([bigram_ctx, trigram_ctx]) << TOKEN_BITS)
                         | np.concatenate([seq[1:], seq[2:]]))  # (context key, successor) packed in one int64
        if not parts:
            return table
        packed, counts = np.unique(np.concatenate(parts), return_counts=True)  # sorted by (context, successor)
        keep = counts >= min_count
        packed, counts = packed[keep], counts[keep]
        ctx, token = packed >> TOKEN_BITS, packed & (MAX_TOKEN - 1)
        order = np.lexsort((-counts, ctx))  # by context, most frequent successor first
        ctx, token, counts = ctx[order], token[order], counts[order]
        starts = np.flatnonzero(np.r_[True, ctx[1:] != ctx[:-1]])  # [P] first entry of each context
        rank = np.arange(ctx.size) - np.repeat(starts, np.diff(np.r_[starts, ctx.size]))  # rank within the context
        top = rank < top_k
        row = np.cumsum(np.r_[True, ctx[1:] != ctx[:-1]])[top] - 1  # [kept] row index of each kept entry
        keys = ctx[starts]  # [P]
        succ = np.full((keys.size, top_k), -1, dtype=np.int32)
        weights = np.zeros((keys.size, top_k), dtype=np.float32)
        succ[row, rank[top]] = token[top]
        weights[row, rank[top]] = counts[top]
        weights *= np.minimum(1.0, cap / weights.sum(1, keepdims=True))  # rows sum to at most cap
        table._load_rows(keys, succ, weights.astype(np.float16))
        return table

    def _load_rows(self, keys: np.ndarray, succ: np.ndarray, weights: np.ndarray) -> None:
        slots = self.slots
        while slots < self.max_slots and keys.size > slots // 2:
            slots *= 2
        self._allocate(slots)
        self.size = 0
        self.dropped = self._insert_many(keys, succ, weights)  # contexts left out for lack of room

    def save(self, path: str | os.PathLike) -> None:
        """Write the occupied rows to a .npz file (any capacity can load it back)."""
        used = self.keys != EMPTY
        with open(path, "wb") as f:  # a file object: numpy would otherwise append ".npz" to other suffixes
            np.savez_compressed(f, format=np.int64(FORMAT), top_k=np.int64(self.top_k), cap=np.float64(self.cap),
                                keys=self.keys[used], succ=self.succ[used], weights=self.weights[used])

    @classmethod
    def load(cls, path: str | os.PathLike, max_slots: int = 1 << 20) -> TrigramTable:
        """Read a table written by `save` (raises FileNotFoundError, or ValueError for another kind of file)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tri-gram table {str(path)!r} not found (build one with "
                                    f"`leapdecode build-trigrams`)")
        try:
            with np.load(path) as data:
                fields = {name: data[name] for name in ("format", "top_k", "cap", "keys", "succ", "weights")}
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as exc:
            raise ValueError(f"{str(path)!r} is not a tri-gram table ({type(exc).__name__}: {exc})") from None
        if int(fields["format"]) != FORMAT:
            raise ValueError(f"tri-gram table {str(path)!r} has format {int(fields['format'])}, this version "
                             f"reads format {FORMAT}")
        table = cls(top_k=int(fields["top_k"]), cap=float(fields["cap"]), max_slots=max_slots)
        table._load_rows(fields["keys"].astype(np.int64), fields["succ"].astype(np.int32),
                         fields["weights"].astype(np.float16))
        return table

    def __len__(self) -> int:
        return self.size
