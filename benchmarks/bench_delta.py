"""Delta size, merge throughput and merge memory on a synthetic multi-shard base.

    python benchmarks/bench_delta.py            # 8 shards x 128 MB bf16 base
    python benchmarks/bench_delta.py --quick    # 4 shards x 16 MB, a few seconds
    python benchmarks/bench_delta.py --json     # also print the numbers as one JSON line

What it reports, and why:
- delta bytes vs B x 8 (int32 index + fp32 value per entry): the format's overhead (header, config).
- merge seconds vs a plain copy of the same base files, in the same run: merge is I/O bound and should
  cost a small multiple of copying; the ratio is machine independent enough to compare across runs.
- peak RSS growth of the merge (in a fresh process, above its RSS after imports) vs the largest shard:
  the streaming claim is "about one tensor, never more than one shard".
The delta touches every tensor of the base (the worst case for merge: nothing is copied byte for byte).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import record_results  # noqa: E402
from id3_ds.algorithm.mask import MaskState, ParamMask  # noqa: E402
from id3_ds.checkpoint import checkpoint_dir, mark_complete, write_id3_shard  # noqa: E402
from id3_ds.delta import export_delta  # noqa: E402

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from id3_ds.delta import merge

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
t = time.perf_counter()
merge({base!r}, {delta!r}, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "rss_before": before, "rss_peak": rss("VmHWM:")}}))
"""


def build_base(root: Path, shards: int, shard_mb: int, per_shard: int = 4) -> list[tuple[str, tuple[int, int]]]:
    """bf16 shards of `per_shard` square-ish matrices each, plus an index (like save_pretrained's)."""
    root.mkdir(parents=True)
    cols = 1024
    rows = shard_mb * 2**20 // (2 * cols * per_shard)
    g = torch.Generator().manual_seed(0)
    weight_map, names = {}, []
    total = 0
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(per_shard):
            name = f"model.layers.{s}.w{i}.weight"
            tensors[name] = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = fn
            names.append((name, (rows, cols)))
            total += rows * cols * 2
        save_file(tensors, str(root / fn), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    return names


def build_checkpoint(run: Path, base: Path, names, budget: int) -> None:
    """A one-rank ID3 checkpoint choosing `budget` entries spread over every tensor."""
    from id3_ds.delta.base import BaseModel

    bm = BaseModel.open(base)
    g = torch.Generator().manual_seed(1)
    per = budget // len(names)
    params = {}
    for name, shape in names:
        n = shape[0] * shape[1]
        idx = torch.sort(torch.randperm(n, generator=g)[:per]).values
        t, _ = bm.read(name)
        b = t.reshape(-1)[idx].to(torch.float32)
        v = b + torch.randn(per, generator=g) * 1e-3
        params[name] = ParamMask(shape, idx, torch.zeros(per, dtype=torch.int32), b, v)
    ckpt = checkpoint_dir(run, 10)
    meta = {"step": 10, "chosen": per * len(names), "budget": per * len(names), "steps": 10, "world_size": 1}
    write_id3_shard(ckpt, 0, 1, MaskState(params), meta)
    mark_complete(ckpt, {"step": 10, "id3": {"eps": 1e-3, "exp": 1.0}, "model": {"name_or_path": "synthetic"}})


def run(quick: bool) -> dict:
    shards, shard_mb = (4, 16) if quick else (8, 128)
    with tempfile.TemporaryDirectory(prefix="id3-bench-") as tmp:
        tmp = Path(tmp)
        names = build_base(tmp / "base", shards, shard_mb)
        numel = sum(r * c for _, (r, c) in names)
        budget = max(len(names), numel // 1000)  # 0.1 %: a typical ID3 budget
        build_checkpoint(tmp / "run", tmp / "base", names, budget)
        t = time.perf_counter()
        export_delta(tmp / "run", tmp / "base", tmp / "delta")
        export_s = time.perf_counter() - t
        cfg = json.loads((tmp / "delta" / "delta_config.json").read_text())
        b = cfg["total_entries"]
        delta_bytes = sum(p.stat().st_size for p in (tmp / "delta").iterdir())
        base_files = sorted((tmp / "base").glob("*.safetensors"))
        (tmp / "copy").mkdir()
        t = time.perf_counter()
        for p in base_files:
            shutil.copyfile(p, tmp / "copy" / p.name)
        copy_s = time.perf_counter() - t
        child = _CHILD.format(root=str(ROOT), base=str(tmp / "base"), delta=str(tmp / "delta"), out=str(tmp / "m"))
        res = json.loads(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True).stdout)
        largest_shard = max(p.stat().st_size for p in base_files)
        largest_tensor = max(r * c * 2 for _, (r, c) in names)
        base_bytes = sum(p.stat().st_size for p in base_files)
    return {
        "base_bytes": base_bytes,
        "shards": shards,
        "budget": b,
        "delta_bytes": delta_bytes,
        "b_x_8": b * 8,
        "delta_ratio": delta_bytes / (b * 8),
        "export_s": export_s,
        "copy_s": copy_s,
        "merge_s": res["seconds"],
        "merge_vs_copy": res["seconds"] / copy_s,
        "merge_mb_s": base_bytes / 1e6 / res["seconds"],
        "copy_mb_s": base_bytes / 1e6 / copy_s,
        "rss_growth": res["rss_peak"] - res["rss_before"],
        "largest_shard": largest_shard,
        "largest_tensor": largest_tensor,
        "rss_vs_shard": (res["rss_peak"] - res["rss_before"]) / largest_shard,
    }


def table(r: dict) -> str:
    mb = 1e6
    rows = [
        ("base", f"{r['base_bytes'] / mb:.1f} MB in {r['shards']} shards (bf16)"),
        ("budget B", f"{r['budget']:,} entries (0.1 %)"),
        ("delta bytes", f"{r['delta_bytes']:,}  vs B x 8 = {r['b_x_8']:,}  (ratio {r['delta_ratio']:.3f})"),
        ("export", f"{r['export_s']:.2f} s"),
        ("plain copy", f"{r['copy_s']:.2f} s  ({r['copy_mb_s']:.0f} MB/s)"),
        ("merge", f"{r['merge_s']:.2f} s  ({r['merge_mb_s']:.0f} MB/s)  = {r['merge_vs_copy']:.2f} x copy time"),
        (
            "merge peak RSS",
            f"+{r['rss_growth'] / mb:.1f} MB  vs largest shard {r['largest_shard'] / mb:.1f} MB "
            f"(ratio {r['rss_vs_shard']:.2f}; largest tensor {r['largest_tensor'] / mb:.1f} MB)",
        ),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small base: a few seconds")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--no-record", action="store_true", help="do not record this run in benchmarks/RESULTS.md")
    args = ap.parse_args()
    r = run(args.quick)
    text = table(r)
    print(text)
    if args.json:
        print(json.dumps(r))
    if not args.no_record:
        flag = " --quick" if args.quick else ""
        record_results("Delta and merge", "synthetic bf16 base", f"python benchmarks/bench_delta.py{flag}", text)


if __name__ == "__main__":
    main()
