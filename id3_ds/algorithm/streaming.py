"""The sparse step's gradient, streamed: score each slice while its gradient exists, keep O(k + B).

Why: sparse state (`id3.state: sparse`) exists so that no per-entry state of the size of the model outlives
backward. Buffering every slice's reduced gradient until the step would hold 4 B per held entry at the
step (a full fp32 gradient partition) only to score it once. Instead, once the last micro-batch's backward
has produced a held slice's reduced gradient, `GradStream.absorb` does everything the step needs from it
at once, and the caller drops it:

- its top-k unchosen candidates, with `ID3.slice_candidates` (the exact code, scorer, eps/exp and key
  tie-break `ID3.select` uses), each carrying its fp32 gradient as payload, merged into the running
  candidates (at most k kept, as `ID3._local_candidates` reduces its parts; the set is fixed by the total
  (score desc, key asc) order, so the slices' arrival order does not matter);
- the fp32 gradient of the entries already chosen (all entries of a fully trainable slice).

At the step, `ID3.select(candidates=...)` picks the winners from those candidates (reducer unchanged), and
`chosen_grads` assembles each slice's gradient over its grown mask: old entries from what was kept, new
ones from the winners' payload (a winner this holder owns is always among its local candidates). What
stays alive is O(k + chosen + fully trainable entries) per holder; the dense gradient is transient.

With gradient accumulation the score needs the accumulated gradient: earlier micro-batches still add into
the caller's fp32 buffer, and the last one streams buffer + its share (then the buffer is freed).
"""

from __future__ import annotations

import torch

from id3_ds.algorithm.id3 import ID3
from id3_ds.algorithm.selection import CandidatePool, Candidates


class GradStream:
    """What one optimizer step keeps of each held slice's gradient (open it before the last backward).

    Everything it keeps lives on the gradient's device and every shape is host-known: absorbing a slice
    and assembling the chosen gradients read nothing back from the device.
    """

    def __init__(self, id3: ID3) -> None:
        self.id3 = id3
        self.k = id3.pending()  # entries this step's select() chooses, fixed before any slice is absorbed
        self.step = id3.step
        self._pool = CandidatePool(self.k)
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slice -> (sorted positions, fp32 grads)
        self._local: Candidates | None = None
        self._device: torch.device | None = None

    def absorb(self, i: int, grad: torch.Tensor | None) -> None:
        """Take held slice i's reduced (averaged, accumulated) 1-D gradient; None: the loss did not reach it.

        Keeps nothing that aliases a full-size `grad` but a fully trainable slice's own gradient, so the
        caller can drop `grad` right after.
        """
        if i in self._kept:
            raise RuntimeError(f"the gradient of {self.id3.held[i].info.name} was streamed twice in one step")
        h = self.id3.held[i]
        device = h.access.value().device if grad is None else grad.device
        self._device = device
        if h.info.fully_trainable:
            positions = torch.arange(h.info.numel, device=device)
            values = torch.zeros(h.info.numel, device=device) if grad is None else grad.to(torch.float32)
        else:
            positions = h.mask.positions
            if grad is None:
                values = torch.zeros(positions.numel(), device=device)
            else:
                values = grad[positions.to(device)].to(torch.float32)
            if self.k > 0:
                self._pool.add(self.id3.slice_candidates(i, grad, self.k))
        self._kept[i] = (positions, values)

    @property
    def entries(self) -> int:
        """fp32 gradient values held now: kept chosen/fully trainable entries plus candidates (<= 5k)."""
        cands = self._pool.held + (len(self._local) if self._local is not None else 0)
        return sum(v.numel() for _, v in self._kept.values()) + cands

    def missing(self) -> list[int]:
        """Held slices not absorbed yet: the last micro-batch's loss did not reach them."""
        return [i for i in range(len(self.id3.held)) if i not in self._kept]

    def candidates(self) -> Candidates:
        """This holder's local top-k candidates (keys ascending, payload = fp32 gradient), for ID3.select."""
        if self.step != self.id3.step or self.k != self.id3.pending():
            raise RuntimeError("a gradient stream must be used by the step it was opened for")
        if self.missing():
            raise RuntimeError(f"slices {self.missing()} were never absorbed: absorb them (grad None) first")
        if self._local is None:
            self._local = self._pool.result(self._device or "cpu")
            self._pool = CandidatePool(self.k)
        return self._local

    def chosen_grads(self, i: int) -> torch.Tensor:
        """Slice i's fp32 gradient over its mask's positions (call after select grew the mask).

        Entries chosen before this step come from what absorb kept; this step's winners from the local
        candidates' payload (a winner this holder owns is always among them; earlier entries never are).
        """
        positions, values = self._kept[i]
        new = self.id3.held[i].mask.positions
        if new.numel() == positions.numel():  # masks only grow: equal size means the same positions
            return values
        local = self._local if self._local is not None else Candidates.empty(new.device)
        if len(local) == 0 or local.payload is None:
            raise RuntimeError("a winner of this holder is missing from its local candidates")
        out = torch.zeros(new.numel(), dtype=torch.float32, device=new.device)
        out.index_copy_(0, torch.searchsorted(new, positions.to(new.device)), values.to(new.device))
        keys = new + self.id3.held[i].info.first_key
        at = torch.searchsorted(local.keys, keys).clamp_(max=len(local) - 1)
        won = local.keys[at] == keys
        return torch.where(won, local.payload[at].to(new.device), out)
