"""Packing: documents, each `[bos] + tokens + [eos]`, joined into rows of exactly `seq_len` tokens.

Conventions of a packed batch (B = micro_batch_size, T = seq_len):
- `input_ids` [B, T] int64.
- `position_ids` [B, T] int64: 0, 1, 2, ... within each segment, restarting at 0 where a document
  starts and at the start of every row (a document cut at a row end continues in the next row as a
  new segment: rows are independent samples, so it has no context there). Models use these to keep
  attention and recurrent state inside a segment (the DeltaProduct model derives its kernel's packed
  offsets from them), so the batch carries no separate segment-offset tensor.
- `labels` [B, T] int64: equal to `input_ids` (HF convention: the model shifts), except -100 at every
  position where `position_ids == 0`. Under the shift, the label at position t is predicted from
  position t-1, so the -100 at a segment start means "do not predict the first token of a segment
  from the previous document". (At t = 0 of a row it is never used.) Padding is -100 too.
Padding appears only at the end of a finite stream (validation), in each lane's last row (below): pad
tokens form their own segment with labels -100.

Lanes. One Packer fills consecutive rows from the same document until it ends, so a batch of B rows cut
from a long document (a 25k-token source file is 100 rows of 256) is B pieces of one file, and the next
batches too: the gradient then follows one file at a time. `LanePacker` keeps L Packers ("lanes") fed
from one document stream and takes rows from them in turn, so the rows of L / B batches in a row come from
L different documents (`data.packing_lanes`, default max(64, B)). Every token is still packed once, in the
stream's order per lane.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class Packer:
    """Fills rows from a document stream; its state is (the stream state before the pending document, offset).

    `pull()` returns `(tokens, state_before)` for the next document (tokens without bos/eos, an int
    array; `state_before` an opaque snapshot of the stream taken before the document was drawn), or
    None at the end of a finite stream. To resume, the caller restores its stream to `state_before`,
    draws that document again and calls `restore(tokens, offset)`.
    """

    def __init__(self, seq_len: int, bos_id: int | None, eos_id: int, pad_id: int):
        self.seq_len, self.bos_id, self.eos_id, self.pad_id = seq_len, bos_id, eos_id, pad_id
        self.pending: np.ndarray | None = None  # [n] the document being packed, with bos/eos
        self.pending_state: Any = None
        self.offset = 0  # tokens of `pending` already placed in rows

    def _frame(self, tokens: np.ndarray) -> np.ndarray:
        head = [self.bos_id] if self.bos_id is not None else []
        return np.concatenate([np.asarray(head, np.int64), np.asarray(tokens, np.int64), [self.eos_id]])

    def restore(self, tokens: np.ndarray, offset: int, state_before: Any) -> None:
        pending = self._frame(tokens)
        if not 0 <= offset < len(pending):  # the saved offset must lie inside the document drawn again
            raise ValueError(f"offset {offset} is outside the pending document ({len(pending)} tokens with bos/eos)")
        self.pending, self.offset, self.pending_state = pending, offset, state_before

    def state_dict(self) -> dict[str, Any] | None:
        """None when no document is pending (the stream's own state is then the whole state)."""
        if self.pending is None:
            return None
        return {"stream_before": self.pending_state, "offset": self.offset}

    def next_row(self, pull: Callable[[], tuple[np.ndarray, Any] | None]) -> tuple[np.ndarray, np.ndarray, int] | None:
        """One row: (input_ids [T], position_ids [T], tokens before padding); None if nothing is left."""
        T = self.seq_len
        ids = np.full(T, self.pad_id, np.int64)  # [T]
        pos = np.zeros(T, np.int64)  # [T]
        fill = 0
        while fill < T:
            if self.pending is None:
                item = pull()
                if item is None:
                    break
                tokens, state_before = item
                self.restore(tokens, 0, state_before)
            take = min(T - fill, len(self.pending) - self.offset)
            ids[fill : fill + take] = self.pending[self.offset : self.offset + take]
            pos[fill : fill + take] = np.arange(take)  # a new segment starts here
            fill += take
            self.offset += take
            if self.offset == len(self.pending):
                self.pending, self.pending_state, self.offset = None, None, 0
        if fill == 0:
            return None
        if fill < T:
            pos[fill:] = np.arange(T - fill)  # padding is its own segment
        return ids, pos, fill


class LanePacker:
    """`lanes` Packers drawing from one document stream, a row from each in turn (see the module docstring).

    Its state is each lane's Packer state (None for a lane with no pending document) and the next lane; to
    resume, the caller restores each lane as for a Packer (`restore_lane`), then its stream to the saved state.
    """

    def __init__(self, lanes: int, seq_len: int, bos_id: int | None, eos_id: int, pad_id: int):
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self.lanes = [Packer(seq_len, bos_id, eos_id, pad_id) for _ in range(lanes)]
        self.next_lane = 0

    def state_dict(self) -> dict[str, Any]:
        return {"lanes": [lane.state_dict() for lane in self.lanes], "next_lane": self.next_lane}

    @staticmethod
    def lane_states(state: dict[str, Any] | None) -> tuple[list[dict[str, Any] | None], int]:
        """(each lane's Packer state, next lane) of a saved state; a single Packer's state (saved before lanes
        existed) is one lane."""
        if state is None or "lanes" not in state:
            return [state], 0
        return state["lanes"], state["next_lane"]

    def restore_lane(self, lane: int, tokens: np.ndarray, offset: int, state_before: Any) -> None:
        self.lanes[lane].restore(tokens, offset, state_before)

    def next_row(self, pull: Callable[[], tuple[np.ndarray, Any] | None]) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The next lane's row (a lane with nothing left is passed over); None once every lane is empty."""
        for _ in range(len(self.lanes)):
            lane = self.lanes[self.next_lane]
            self.next_lane = (self.next_lane + 1) % len(self.lanes)
            row = lane.next_row(pull)
            if row is not None:
                return row
        return None


def make_batch(rows: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """Stack rows from `Packer.next_row` into the batch dict described in the module docstring."""
    input_ids = torch.from_numpy(np.stack([r[0] for r in rows]))  # [B, T]
    position_ids = torch.from_numpy(np.stack([r[1] for r in rows]))  # [B, T]
    labels = input_ids.clone()
    labels[position_ids == 0] = -100
    for i, (_, _, num_real) in enumerate(rows):
        labels[i, num_real:] = -100  # padding
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def split_segments(input_ids: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
    """The segments of one packed row ([T] each), cut where position_ids restarts at 0."""
    starts = torch.nonzero(position_ids == 0).reshape(-1).tolist() + [len(position_ids)]
    return [input_ids[a:b] for a, b in zip(starts[:-1], starts[1:])]
