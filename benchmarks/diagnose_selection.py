"""Where ID3's budget goes, how noisy one step's choice is, and what the paper's ε/exp would choose.

    python benchmarks/diagnose_selection.py static --json static.json          # scoring only, no training
    python benchmarks/diagnose_selection.py masks id3=RUN_DIR random=RUN_DIR --json masks.json
    python benchmarks/diagnose_selection.py plot static.json masks.json --out docs/img/quality-budget.png

`static` scores the pretrained model (with the fresh head a run starts from, same seed) on the training
batches a run's first steps would see, one process, no optimizer: for each ε and exp of the paper's sweep
it reports where the top-B entries go (module type, embeddings, the top 10 tensors, the top 1 % of rows)
and how many of one mini-batch's top-k a second, independent mini-batch would also choose (k = B/T, one
step's pick, and k = B), then the same overlap for scores from gradients averaged over several batches.

`masks` reads finished runs (launch/train.py with train.export_delta=true; RUN_DIR/delta and
RUN_DIR/log.jsonl): where each method's B entries are, how far they moved relative to their pretrained
|θ|, which word-embedding rows they are against token frequency, and accuracy/loss on the training
examples the run saw against the validation split (the train/eval gap).

MiniLM on Rotten Tomatoes (bench_quality's config, data and first budget) by default, `--model smollm2`
for SmolLM2-135M on the alpaca prompts; `--set KEY=VALUE` overrides the config. One torch thread unless
OMP_NUM_THREADS says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

EPS = (1e-3, 1e-2, 0.1, 1.0)  # the paper's sweep
EXPS = (-2.0, -1.0, 1.0, 2.0)


def model_args(model: str) -> tuple[str, list[str]]:
    """bench_quality's config and data overrides of a model, with its validation split as the eval set."""
    from benchmarks.bench_quality import MODELS, source, variant

    m = MODELS[model]
    group = next(iter(m.budgets))
    return m.config, [*m.overrides, f"data.eval_path={source(model, 'validation')}", *variant(m, "id3", group)]


def group_of(name: str) -> str:
    """A module type for a parameter name (BERT and LLaMA names), weights and biases together."""
    rules = (
        ("word_embeddings", "emb.word"),
        ("embed_tokens", "emb.word"),
        ("position_embeddings", "emb.position"),
        ("token_type_embeddings", "emb.type"),
        ("embeddings.LayerNorm", "emb.norm"),
        ("attention.self.query", "attn.q"),
        ("attention.self.key", "attn.k"),
        ("attention.self.value", "attn.v"),
        ("attention.output.dense", "attn.out"),
        ("attention.output.LayerNorm", "attn.norm"),
        ("intermediate.dense", "ffn.in"),
        ("output.dense", "ffn.out"),
        ("output.LayerNorm", "ffn.norm"),
        ("pooler", "pooler"),
        ("classifier", "head"),
        ("q_proj", "attn.q"),
        ("k_proj", "attn.k"),
        ("v_proj", "attn.v"),
        ("o_proj", "attn.out"),
        ("gate_proj", "ffn.gate"),
        ("up_proj", "ffn.in"),
        ("down_proj", "ffn.out"),
        ("input_layernorm", "attn.norm"),
        ("post_attention_layernorm", "ffn.norm"),
        ("norm", "final.norm"),
    )
    for pat, g in rules:
        if pat in name:
            return g
    return "other"


def layer_of(name: str) -> str:
    m = re.search(r"layers?\.(\d+)\.", name)
    return f"L{m.group(1)}" if m else ("emb" if "embed" in name else "top")


class Flat:
    """The selectable parameters of a model as one flat index space (model order), with per-tensor offsets."""

    def __init__(self, named: list[tuple[str, tuple[int, ...]]]):
        self.names = [n for n, _ in named]
        self.shapes = dict(named)
        self.sizes = torch.tensor([math.prod(s) for _, s in named], dtype=torch.int64)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.total = int(self.sizes.sum())
        # rows: every 2-D tensor's first-dim rows, 1-D tensors one "row" each
        row_len = [s[-1] if len(s) == 2 else math.prod(s) for _, s in named]
        self.row_len = torch.tensor(row_len, dtype=torch.int64)

    def tensor_of(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.offsets, keys, right=True) - 1

    def row_of(self, keys: torch.Tensor) -> torch.Tensor:
        """A global row id per key: tensor index * 2^32 + row within the tensor."""
        t = self.tensor_of(keys)
        local = keys - self.offsets[t]
        return t * (1 << 32) + local // self.row_len[t]

    def n_rows(self) -> int:
        return int((self.sizes // self.row_len).sum())


def where(flat: Flat, keys: torch.Tensor, extra: dict[str, int] | None = None) -> dict:
    """Where a set of chosen entries lies: by module type, by layer, the top 10 tensors, the top 1 % of rows."""
    t = flat.tensor_of(keys)
    per_tensor = torch.bincount(t, minlength=len(flat.names)).tolist()
    counts = {n: c for n, c in zip(flat.names, per_tensor) if c}
    for n, c in (extra or {}).items():
        counts[n] = counts.get(n, 0) + c
    total = sum(counts.values())
    by_group: dict[str, int] = {}
    by_layer: dict[str, int] = {}
    for n, c in counts.items():
        by_group[group_of(n)] = by_group.get(group_of(n), 0) + c
        by_layer[layer_of(n)] = by_layer.get(layer_of(n), 0) + c
    top10 = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
    rows = torch.unique(flat.row_of(keys), return_counts=True)[1].sort(descending=True).values
    top_rows = max(1, flat.n_rows() // 100)
    return {
        "entries": total,
        "group_share": {g: round(c / total, 4) for g, c in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "layer_share": {g: round(c / total, 4) for g, c in sorted(by_layer.items())},
        "top10_tensors": [(n, c) for n, c in top10],
        "top10_share": round(sum(c for _, c in top10) / total, 4),
        "rows_touched": int(rows.numel()),
        "rows_total": flat.n_rows(),
        "top1pct_rows_share": round(float(rows[:top_rows].sum()) / max(1, keys.numel()), 4),
    }


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A ∩ B| / |A| of two equally sized index sets."""
    return round(float(torch.isin(a, b).sum()) / max(1, a.numel()), 4)


def topk(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k, sorted=False).indices


def score(g: torch.Tensor, theta_abs: torch.Tensor, eps: float, exp: float) -> torch.Tensor:
    return g.abs() / (theta_abs + eps).pow(exp)


# -- loading -------------------------------------------------------------------------------------------------


def load(model_name: str, sets: list[str], seed: int):
    """(cfg, model in train mode with the run's fresh head, dataset, eval set, pad id, label names)."""
    from transformers import AutoTokenizer

    from id3_ds.config import load_config
    from id3_ds.data import cached_dataset
    from id3_ds.models import load_model, resolve_model
    from id3_ds.resources import cache_dir

    config, overrides = model_args(model_name)
    cfg = load_config(str(ROOT / config), [*overrides, *sets, f"train.seed={seed}"])
    model_dir = resolve_model(cfg.model.name_or_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    d = cfg.data
    data, labels = cached_dataset(d.spec(), tok, model_dir, d.cache_dir or cache_dir())
    classification = d.format == "classification"
    eval_set = None
    if classification:
        eval_spec = d.spec(path=d.eval_path, packing=False, labels=tuple(labels) if labels else None)
        eval_set, _ = cached_dataset(eval_spec, tok, model_dir, d.cache_dir or cache_dir())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)  # as launch/train.py: the fresh head's init
    model = load_model(model_dir, classification, torch.float32, labels, pad)
    model.train()
    return cfg, model, data, eval_set, pad, labels, model_dir


def batch_at(data, seed: int, step: int, mbs: int, pad: int) -> dict:
    from id3_ds.data import collate
    from id3_ds.training.batches import micro_batch_indices

    idx = micro_batch_indices(len(data), seed, step, 0, 0, 1, mbs, 1)
    return collate([data[i] for i in idx], pad)


def selectable(model, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    from id3_ds.algorithm.id3 import param_kinds

    named = list(model.named_parameters())
    kinds = param_kinds([n for n, _ in named], cfg.id3)
    return [(n, p) for n, p in named if kinds[n] == "select"]


# -- static: scoring at the pretrained weights ---------------------------------------------------------------


def static(a: argparse.Namespace) -> dict:
    cfg, model, data, _, pad, _, _ = load(a.model, a.set, a.seed)
    if a.delta:  # score at a finished run's weights (head included) instead of the pretrained ones
        from id3_ds.delta.apply import apply_delta

        apply_delta(model, Path(a.delta) / "delta")
    sel = selectable(model, cfg)
    flat = Flat([(n, tuple(p.shape)) for n, p in sel])
    theta = torch.cat([p.detach().reshape(-1) for _, p in sel]).abs()
    full = sum(p.numel() for n, p in model.named_parameters() if not any(n == s for s, _ in sel))
    budget = cfg.id3.budget - full if isinstance(cfg.id3.budget, int) else int(cfg.id3.budget * flat.total)
    mbs = cfg.train.micro_batch_size

    def grad_at(step: int) -> torch.Tensor:
        torch.manual_seed(a.seed * 1_000_003 + step)  # dropout as the trainer seeds it
        model.zero_grad(set_to_none=True)
        out = model(**batch_at(data, a.seed, step, mbs, pad))
        out.loss.backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in sel])

    n = a.batches
    f = a.first_step
    singles = [grad_at(f + s) for s in (0, 1)]
    sum_a = torch.zeros(flat.total)
    sum_b = torch.zeros(flat.total)
    abs_a = torch.zeros(flat.total)
    abs_b = torch.zeros(flat.total)
    for s in range(n):
        g = singles[s] if s < 2 else grad_at(f + s)
        sum_a += g
        abs_a += g.abs()
    for s in range(n, 2 * n):
        g = grad_at(f + s)
        sum_b += g
        abs_b += g.abs()
    ks = {f"k=B/{t}": max(1, budget // t) for t in a.horizons} | {"k=B": budget}
    out: dict = {
        "model": a.model,
        "budget_selectable": budget,
        "selectable": flat.total,
        "batches_per_average": n,
        "theta_abs_quantiles": {
            q: float(torch.quantile(theta[:: max(1, flat.total // 1_000_000)], q)) for q in (0.01, 0.1, 0.5, 0.9)
        },
        "settings": [],
    }
    # sign consistency |sum g| / sum |g| over all 2n batches: 1 = every batch pushes the entry the same way
    consistency = (sum_a + sum_b).abs() / (abs_a + abs_b).clamp_min(1e-30)
    reached = (abs_a + abs_b) > 0
    gen = torch.Generator().manual_seed(a.seed)
    uniform = torch.randint(flat.total, (budget,), generator=gen)  # (a few repeats change nothing here)
    out["sign_consistency"] = {
        "all_entries": float(consistency[reached].mean()),
        "random_B": float(consistency[uniform].mean()),
        "top_B_of_mean_gradient": float(consistency[topk((sum_a + sum_b).abs(), budget)].mean()),
    }
    signal = (sum_a + sum_b).abs()  # the 2n-batch mean gradient's magnitude: the direction that persists
    sums: dict[str, list[float]] = {}
    for nm, lo, size in zip(flat.names, flat.offsets.tolist(), flat.sizes.tolist()):
        acc = sums.setdefault(group_of(nm), [0.0, 0])
        acc[0] += float(abs_a[lo : lo + size].sum() + abs_b[lo : lo + size].sum())
        acc[1] += size
    out["mean_abs_grad_by_group"] = {g: total / count / (2 * n) for g, (total, count) in sorted(sums.items())}
    for eps in EPS:
        for exp in a.exps:
            h0 = score(singles[0], theta, eps, exp)
            h1 = score(singles[1], theta, eps, exp)
            row: dict = {"eps": eps, "exp": exp}
            top0 = topk(h0, budget)
            row["where_top_B"] = where(flat, top0)
            row["chosen_theta_abs_median"] = float(theta[top0].median())
            row["overlap_single_batch"] = {name: overlap(topk(h0, k), topk(h1, k)) for name, k in ks.items()}
            row["sign_consistency_top_B"] = float(consistency[top0].mean())
            hs = score(signal, theta, eps, exp)
            row["overlap_with_mean_gradient_pick"] = {name: overlap(topk(h0, k), topk(hs, k)) for name, k in ks.items()}
            if exp == 1.0 or eps == 1e-3:
                ha = score(sum_a, theta, eps, exp)
                hb = score(sum_b, theta, eps, exp)
                row[f"overlap_mean_of_{n}"] = {name: overlap(topk(ha, k), topk(hb, k)) for name, k in ks.items()}
                ha = score(abs_a, theta, eps, exp)
                hb = score(abs_b, theta, eps, exp)
                row[f"overlap_sum_abs_of_{n}"] = {name: overlap(topk(ha, k), topk(hb, k)) for name, k in ks.items()}
            out["settings"].append(row)
            print(
                f"eps={eps:g} exp={exp:g}: top10 {row['where_top_B']['top10_share']:.2f} "
                f"overlap {row['overlap_single_batch']} groups {list(row['where_top_B']['group_share'].items())[:4]}",
                flush=True,
            )
    # id3.score_norm=tensor at the shipped eps/exp: each tensor's scores over their mean
    sizes = flat.sizes.tolist()

    def normed(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([p / p.mean().clamp_min(1e-30) for p in torch.split(h, sizes)])

    e, x = cfg.id3.eps, cfg.id3.exp
    n0, n1 = normed(score(singles[0], theta, e, x)), normed(score(singles[1], theta, e, x))
    top_n = topk(n0, budget)
    out["score_norm_tensor"] = {
        "where_top_B": where(flat, top_n),
        "chosen_theta_abs_median": float(theta[top_n].median()),
        "sign_consistency_top_B": float(consistency[top_n].mean()),
        "overlap_single_batch": {name: overlap(topk(n0, k), topk(n1, k)) for name, k in ks.items()},
    }
    # plain |g| (exp 0) as the gradient-only reference
    h0, h1 = singles[0].abs(), singles[1].abs()
    out["grad_only"] = {
        "where_top_B": where(flat, topk(h0, budget)),
        "overlap_single_batch": {name: overlap(topk(h0, k), topk(h1, k)) for name, k in ks.items()},
        f"overlap_mean_of_{n}": {name: overlap(topk(sum_a.abs(), k), topk(sum_b.abs(), k)) for name, k in ks.items()},
    }
    # how much of the score's top comes from |θ| alone: the share of top-B entries among the 1 % smallest |θ|
    small = theta <= torch.quantile(theta[:: max(1, flat.total // 1_000_000)], 0.01)
    out["top_B_in_smallest_1pct_theta"] = {
        f"eps={eps:g}": float(small[topk(score(singles[0], theta, eps, 1.0), budget)].float().mean()) for eps in EPS
    }
    return out


# -- masks: finished runs -------------------------------------------------------------------------------------


def read_delta(run: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(run / "delta" / "delta.safetensors"))
    out = {}
    for k in t:
        if k.endswith(".indices"):
            name = k[: -len(".indices")]
            out[name] = (t[k].to(torch.int64), t[f"{name}.values"].float())
    return out


@torch.no_grad()
def accuracy(model, examples, pad: int, mbs: int = 64) -> tuple[float, float]:
    from id3_ds.data import collate

    model.eval()
    right, loss, n = 0, 0.0, 0
    for i in range(0, len(examples), mbs):
        b = collate(examples[i : i + mbs], pad)
        out = model(**b)
        right += int((out.logits.argmax(-1) == b["labels"]).sum())
        loss += float(out.loss) * len(b["labels"])
        n += len(b["labels"])
    model.train()
    return right / n, loss / n


def masks(a: argparse.Namespace) -> dict:
    from id3_ds.delta.apply import apply_delta
    from id3_ds.training.batches import micro_batch_indices

    cfg, model, data, eval_set, pad, _, _ = load(a.model, a.set, a.seed)
    sel = selectable(model, cfg)
    prefix = model.base_model_prefix
    params = dict(model.named_parameters())
    flat = Flat([(n, tuple(p.shape)) for n, p in sel])
    word = next(n for n, _ in sel if "word_embeddings" in n or "embed_tokens" in n)
    vocab = params[word].shape[0]
    freq_all = torch.zeros(vocab, dtype=torch.int64)
    for i in range(len(data)):
        freq_all += torch.bincount(torch.tensor(data[i].input_ids), minlength=vocab)
    out: dict = {"runs": {}}
    for spec in a.runs:
        label, path = spec.split("=", 1)
        run = Path(path)
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        steps = next(r for r in log if r.get("event") == "start")["steps"]
        seen = sorted({i for s in range(steps) for i in micro_batch_indices(len(data), a.seed, s, 0, 0, 1, 16, 1)})
        freq_seen = torch.zeros(vocab, dtype=torch.int64)
        for i in seen:
            freq_seen += torch.bincount(torch.tensor(data[i].input_ids), minlength=vocab)
        delta = read_delta(run)
        keys, moved, extra = [], [], {}
        for name, (idx, val) in delta.items():
            full = name if name in params else f"{prefix}.{name}"
            if full not in flat.shapes:
                extra[full] = idx.numel()
                continue
            t = flat.names.index(full)
            keys.append(idx + int(flat.offsets[t]))
            base = params[full].detach().reshape(-1)[idx].abs()
            moved.append(val.abs() / base.clamp_min(1e-12))
        k = torch.cat(keys)
        rel = torch.cat(moved)
        r: dict = {"where": where(flat, k, extra)}
        theta = torch.cat(
            [
                params[n].detach().reshape(-1)[delta[n.removeprefix(prefix + ".")][0]].abs()
                for n in flat.names
                if n.removeprefix(prefix + ".") in delta
            ]
        )
        r["chosen_theta_abs_median"] = float(theta.median())
        r["moved_rel"] = {f"q{int(q * 100)}": float(torch.quantile(rel, q)) for q in (0.1, 0.5, 0.9)}
        r["moved_rel"]["share_over_1"] = float((rel > 1).float().mean())  # moved further than |θ| itself
        r["moved_abs_median"] = float(torch.cat([v.abs() for _, v in delta.values()]).median())
        wname = word.removeprefix(prefix + ".")
        if wname in delta:
            rows = delta[wname][0] // params[word].shape[1]
            r["word_embedding_entries"] = int(rows.numel())
            r["word_embedding_rows"] = int(rows.unique().numel())
            r["word_entries_in_seen_tokens"] = float((freq_seen[rows] > 0).float().mean())
            r["word_entries_in_train_tokens"] = float((freq_all[rows] > 0).float().mean())
            r["word_entry_token_freq_median"] = float(freq_all[rows].float().median())
            # by frequency band of the row's token over train_fit
            bands = {"0": (0, 0), "1-9": (1, 9), "10-99": (10, 99), "100-999": (100, 999), ">=1000": (1000, 1 << 40)}
            r["word_entries_by_token_freq"] = {
                b: float(((freq_all[rows] >= lo) & (freq_all[rows] <= hi)).float().mean())
                for b, (lo, hi) in bands.items()
            }
        evals = [x for x in log if "eval_accuracy" in x]
        trains = [x for x in log if "loss" in x and "eval_loss" not in x]
        r["final_train_window_loss"] = trains[-1]["loss"] if trains else None
        r["eval_curve"] = [(x["step"], x["eval_accuracy"], x["eval_loss"]) for x in evals]
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        apply_delta(model, run / "delta")
        seen_acc, seen_loss = accuracy(model, [data[i] for i in seen], pad)
        val_acc, val_loss = accuracy(model, [eval_set[i] for i in range(len(eval_set))], pad)
        model.load_state_dict(pristine)  # a fresh head cannot be subtracted again
        r["seen_train"] = {"examples": len(seen), "accuracy": seen_acc, "loss": seen_loss}
        r["validation"] = {"examples": len(eval_set), "accuracy": val_acc, "loss": val_loss}
        out["runs"][label] = r
        print(f"{label}: {json.dumps(r)[:1500]}", flush=True)
    frac_vocab_seen = float((freq_all > 0).float().mean())
    out["vocab"] = vocab
    out["vocab_share_in_train"] = frac_vocab_seen
    return out


# -- plot ------------------------------------------------------------------------------------------------------


def plot(a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [json.loads(Path(f).read_text()) for f in a.files]
    st = next((d for d in data if "settings" in d), None)
    mk = next((d for d in data if "runs" in d), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    groups = [
        "emb.word",
        "emb.position",
        "emb.type",
        "emb.norm",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.out",
        "attn.norm",
        "ffn.in",
        "ffn.out",
        "ffn.norm",
        "pooler",
        "head",
    ]
    bars = {}
    if mk:
        for label, r in mk["runs"].items():
            bars[f"{label}, trained (100 steps)"] = r["where"]["group_share"]
    if st:
        for s in st["settings"]:
            if s["exp"] == 1.0 and s["eps"] in (1e-3, 1.0):
                bars[f"step-0 top-B, ε={s['eps']:g}"] = s["where_top_B"]["group_share"]
            if s["exp"] == -1.0 and s["eps"] == 1e-3:
                bars["step-0 top-B, ε=1e-3 exp=-1"] = s["where_top_B"]["group_share"]
    ax = axes[0]
    width = 0.8 / max(1, len(bars))
    for i, (label, share) in enumerate(bars.items()):
        ax.bar([j + i * width for j in range(len(groups))], [share.get(g, 0) for g in groups], width, label=label)
    ax.set_xticks([j + 0.4 for j in range(len(groups))], groups, rotation=60, ha="right")
    ax.set_ylabel("share of B")
    ax.set_title("Where the budget goes, by module type")
    ax.legend(fontsize=7)
    ax = axes[1]
    if mk:
        bands = ["0", "1-9", "10-99", "100-999", ">=1000"]
        runs = [(k, r) for k, r in mk["runs"].items() if "word_entries_by_token_freq" in r]
        width = 0.8 / max(1, len(runs))
        for i, (label, r) in enumerate(runs):
            share = r["word_entries_by_token_freq"]
            n = r["word_embedding_entries"]
            ax.bar(
                [j + i * width for j in range(len(bands))],
                [share[b] for b in bands],
                width,
                label=f"{label}: {n:,} word-embedding entries in {r['word_embedding_rows']:,} rows",
            )
        ax.set_xticks([j + 0.4 for j in range(len(bands))], bands)
        ax.set_xlabel("the row's token count over the training set")
        ax.set_ylabel("share of the method's word-embedding entries")
        ax.set_title("Word-embedding rows against token frequency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["static", "masks", "plot"])
    p.add_argument("runs", nargs="*", help="masks: LABEL=RUN_DIR ...; plot: JSON files of static/masks")
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm", help="bench_quality's model and data")
    p.add_argument("--set", nargs="*", default=[], help="config overrides (KEY=VALUE)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batches", type=int, default=8, help="static: batches in each of the two averages")
    p.add_argument("--horizons", type=int, nargs="+", default=[100, 600], help="static: T of one step's k = B/T")
    p.add_argument("--delta", help="static: score at this finished run's weights (RUN_DIR with delta/)")
    p.add_argument("--first-step", type=int, default=0, help="static: the first training step whose batches score")
    p.add_argument("--exps", type=float, nargs="+", default=list(EXPS), help="static: the exp values scored")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--out", default="docs/img/quality-budget.png", help="plot: the PNG")
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.what == "plot":
        a.files = a.runs
        plot(a)
        return
    result = static(a) if a.what == "static" else masks(a)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
