"""How many arena bytes to reserve for a block whose compressed size is unknown.

The scheduler reserves a block's arena range before the GPU has compressed it and
learns the block's size afterwards. Reserving the worst case (every page raw) and
trimming to that size would leave a hole of ``worst - actual`` bytes behind every
stored block;
the next worst-case reservation never fits in such a hole, so the arena would fill
with holes and hold no more blocks than an uncompressed cache. The reservation
therefore follows the largest block recently stored, plus a margin. A block that
turns out larger than its reservation is not stored (the worker writes nothing and
reports the size it needed; counted as ``vllm:kv_offload_stores_oversized``), and
that size raises the next reservations.
"""

from __future__ import annotations

from collections import deque

from vllm_kvcompress.offload.arena_allocator import align_up

# Headroom over the largest recent block: blocks of one model and bound vary by a
# few percent; a too-small reservation costs a skipped store, a too-large one arena
# bytes behind every block.
MARGIN = 1 / 8
# Completed stores (scheduler calls, each covering many blocks) whose largest
# block sets the reservation, so it follows a change of content within a few steps.
WINDOW = 16


class ReservationSize:
    """The reservation for the next blocks: the worst case until a size is known,
    then ``(1 + MARGIN)`` times the largest of the last ``WINDOW`` observations."""

    def __init__(self, worst_case: int):
        self.worst_case = worst_case
        self._recent: deque[int] = deque(maxlen=WINDOW)

    @property
    def nbytes(self) -> int:
        if not self._recent:
            return self.worst_case
        return min(self.worst_case, align_up(int(max(self._recent) * (1 + MARGIN))))

    def observe(self, largest_block: int) -> None:
        """Records the largest block size (stored or needed) of one completed store."""
        if largest_block > 0:
            self._recent.append(largest_block)
