"""Several deltas of one base as one: sum, per-entry mean, or TIES sign election on the entries they share.

Sparse deltas of one base mostly touch different entries; where supports overlap (an entry chosen by more
than one run) the combine rule decides:

- `sum`: base + d1 + d2 + ... (task arithmetic; every entry summed in fp64, rounded once at merge/apply).
- `mean`: per entry, the mean over the deltas that touch it: an entry only one delta chose keeps its full
  update (a mean over all n deltas would shrink every run's own entries n-fold).
- `ties`: TIES-merging's sign election (Yadav et al. 2023) without its trim step (an ID3 delta already is
  its top entries): per entry, the sign of the summed updates wins, and the mean of the updates of that
  sign is kept; updates of the other sign are dropped.

Deltas must come from one base: every tensor that two of them touch must have the same fingerprint, and the
bases the same size; otherwise one `ID3Error` line. LoRA deltas are refused (merge them one after another),
as is more than one fresh head. The result is an in-memory `Delta` (values in fp64) that `merge` and
`apply_delta` take as they take one delta; its config records where it came from and the overlap.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from id3_ds.delta.base import combine as combine_digest
from id3_ds.delta.format import Delta, ParamDelta, named
from id3_ds.errors import ID3Error

COMBINE = ("sum", "mean", "ties")


def check_same_base(deltas: list[Delta]) -> None:
    """One line naming the first tensor (or size) where two deltas' bases disagree."""
    first = deltas[0]
    seen: dict[str, tuple[dict, Delta]] = {}
    for d in deltas:
        n0, n1 = first.config["base"].get("numel"), d.config["base"].get("numel")
        if isinstance(n0, int) and isinstance(n1, int) and n0 != n1:
            raise ID3Error(
                f"{named(d.root)} was exported against a base of {n1:,} entries, {named(first.root)} against one "
                f"of {n0:,}: they come from different base models; compose only deltas of one base"
            )
        for name, fp in d.fingerprint["tensors"].items():
            if name in seen and seen[name][0] != fp:
                other = seen[name][1]
                raise ID3Error(
                    f"{named(d.root)} and {named(other.root)} were exported against different bases (their base "
                    f"tensor {name} differs: sha256 {fp.get('sha256', '')[:12]} vs "
                    f"{seen[name][0].get('sha256', '')[:12]}): compose only deltas of one base"
                )
            seen.setdefault(name, (fp, d))


def _support(p: ParamDelta) -> tuple[torch.Tensor, torch.Tensor]:
    idx, vals = p.flat()
    return (torch.arange(p.numel) if idx is None else idx), vals


def combine_param(parts: list[ParamDelta], how: str) -> tuple[ParamDelta, int]:
    """One tensor's updates combined; returns it and how many of its entries more than one delta touches."""
    first = parts[0]
    if len(parts) == 1:
        return first, 0
    sup = [_support(p) for p in parts]
    idx = torch.cat([i for i, _ in sup])
    vals = torch.cat([v for _, v in sup])
    union, inv = torch.unique(idx, sorted=True, return_inverse=True)
    count = torch.bincount(inv, minlength=union.numel())
    total = torch.zeros(union.numel(), dtype=torch.float64).index_add_(0, inv, vals)
    if how == "sum":
        out = total
    elif how == "mean":
        out = total / count
    else:  # ties: the sign of the sum wins; the mean of the agreeing updates is kept
        elected = torch.sign(total)
        agree = (torch.sign(vals) == elected[inv]) & (vals != 0)
        kept = torch.zeros_like(total).index_add_(0, inv, torch.where(agree, vals, 0.0))
        n = torch.zeros_like(total).index_add_(0, inv, agree.to(torch.float64))
        out = torch.where(n > 0, kept / n.clamp(min=1), 0.0)
    overlap = int((count > 1).sum())
    if union.numel() == first.numel:
        return ParamDelta(first.shape, first.base_dtype, out.reshape(first.shape)), overlap
    return ParamDelta(first.shape, first.base_dtype, out, union), overlap


def combine_deltas(deltas: list[Delta], how: str = "sum") -> Delta:
    """The deltas as one (see the module docstring); its config's `overlap` reports the shared support."""
    if how not in COMBINE:
        raise ID3Error(f"--combine {how!r} is not a combine rule; use one of {', '.join(COMBINE)}")
    if not deltas:
        raise ID3Error("no delta to combine: pass at least one delta directory")
    for d in deltas:
        if d.lora is not None:
            raise ID3Error(
                f"{named(d.root)} is a LoRA run's delta, which cannot be combined entry by entry: merge it on its "
                "own, then merge the next delta into that output (with --force)"
            )
    heads = [d for d in deltas if d.new]
    if len(heads) > 1:
        raise ID3Error(
            f"{named(heads[0].root)} and {named(heads[1].root)} both carry a fresh classification head: one model "
            "has one head; compose at most one classification delta"
        )
    check_same_base(deltas)
    names = sorted(set().union(*(d.params for d in deltas)))
    params: dict[str, ParamDelta] = {}
    per_tensor: dict[str, int] = {}
    for name in names:
        parts = [d.params[name] for d in deltas if name in d.params]
        params[name], shared = combine_param(parts, how)
        if shared:
            per_tensor[name] = shared
    prints: dict[str, dict] = {}
    for d in deltas:
        prints.update(d.fingerprint["tensors"])
    prints = {n: prints[n] for n in names}
    pairs = {}
    for (i, a), (j, b) in itertools.combinations(enumerate(deltas), 2):
        shared = 0
        for name in a.params.keys() & b.params.keys():
            ia, ib = _support(a.params[name])[0], _support(b.params[name])[0]
            shared += int(torch.isin(ia, ib).sum())
        pairs[f"{i}-{j}"] = shared
    first = deltas[0]
    total = sum(p.entries for p in params.values())
    config = {
        **first.config,
        "base": {
            **first.config["base"],
            "fingerprint": {"algorithm": "sha256", "digest": combine_digest(prints), "tensors": prints},
        },
        "params": {n: {"shape": list(p.shape), "entries": p.entries} for n, p in params.items()},
        "total_entries": total,
        "combine": how,
        "combined_from": [str(Path(d.root).resolve()) for d in deltas],
        "overlap": {
            "entries": sum(per_tensor.values()),
            "inputs_total": sum(d.total_entries for d in deltas),
            "union": total,
            "pairs": pairs,
            "tensors": per_tensor,
        },
    }
    config.pop("lora", None)
    head = heads[0] if heads else None
    root = Path("+".join(str(d.root).rstrip("/") for d in deltas))
    return Delta(root, config, params, None, dict(head.new) if head else {}, head.config_updates if head else None)


def overlap_line(delta: Delta) -> str:
    """'2 deltas, 3,000 entries, 120 chosen by more than one (4.0 %), combined by sum' for a combined delta."""
    ov = delta.config.get("overlap")
    if not ov:
        return ""
    share = ov["entries"] / ov["union"] if ov["union"] else 0.0
    return (
        f"{len(delta.config['combined_from'])} deltas, {ov['inputs_total']:,} entries in, {ov['union']:,} after "
        f"combining; {ov['entries']:,} entries chosen by more than one ({100 * share:.1f} % of the union), "
        f"combined by {delta.config['combine']}"
    )
