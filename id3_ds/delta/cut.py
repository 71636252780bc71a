"""Cut a delta file to its K earliest-chosen entries, without the checkpoint.

A delta exported with `keep_steps` (`export-delta --keep-steps`) records the step each entry was chosen
(`NAME.steps`, format version 3). ID3's mask only grows, so the K entries chosen first are the run's mask
at budget K: `cut_delta` keeps them, with their trained values, in the same order `export-delta --entries`
uses (step, then tensor name, then position), so cutting a delta equals exporting the cut. A fresh
classification head stays whole; a LoRA delta cannot be cut.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from id3_ds.delta.export import earliest
from id3_ds.delta.format import ParamDelta, load_delta, named, write_delta
from id3_ds.errors import ID3Error


def _keep(p: ParamDelta, m: torch.Tensor) -> ParamDelta:
    """The entries of `p` where `m` holds (sparse form), with their fix-ups renumbered."""
    positions = torch.arange(p.numel) if p.dense else p.indices.to(torch.int64)
    values = p.values.reshape(-1)[m]
    out = ParamDelta(p.shape, p.base_dtype, values, positions[m], steps=p.steps[m])
    if p.fixes:
        new_at = torch.cumsum(m.to(torch.int64), 0) - 1
        kept = m[p.fix_at.to(torch.int64)]
        out.fix_at, out.fix = new_at[p.fix_at.to(torch.int64)[kept]], p.fix[kept]
    if out.entries == p.numel:  # nothing dropped from a dense tensor: keep it dense
        out = ParamDelta(p.shape, p.base_dtype, values.reshape(p.shape), None, out.fix_at, out.fix, p.steps)
    return out


def cut_delta(
    delta_dir: str | os.PathLike, out: str | os.PathLike, entries: int | float, *, overwrite: bool = False
) -> Path:
    """Write the K earliest-chosen entries of a delta (K a count, or a fraction in (0, 1]) to `out`."""
    d = load_delta(delta_dir)
    if d.lora is not None:
        raise ID3Error(f"{named(d.root)} is a LoRA run's delta: it cannot be cut entry by entry")
    missing = sorted(n for n, p in d.params.items() if p.steps is None)
    if missing:
        raise ID3Error(
            f"{named(d.root)} records no step per entry ({missing[0]}): export it with --keep-steps, or cut at "
            "export time from the checkpoint (export-delta --entries)"
        )
    names = sorted(d.params)
    masks, info = earliest([d.params[n].steps for n in names], entries)
    params = {n: _keep(d.params[n], m) for n, m in zip(names, masks, strict=True) if bool(m.any())}
    cfg = d.config
    prints = {n: cfg["base"]["fingerprint"]["tensors"][n] for n in params}
    base = {k: v for k, v in cfg["base"].items() if k != "fingerprint"}
    id3 = dict(cfg.get("id3") or {})
    id3["export"] = {**(id3.get("export") or {}), "truncated": info}
    return write_delta(
        out,
        params,
        base=base,
        id3=id3,
        dtype=cfg["dtype"],
        fingerprint_tensors=prints,
        overwrite=overwrite,
        protect=[d.root],
        new=d.new or None,
        config_updates=d.config_updates,
    )
