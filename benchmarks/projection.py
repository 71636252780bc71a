"""What ID3 costs at real scale, from the same formulas the code follows: mask memory, all-gather, delta.

Every figure here is exact arithmetic on what the implementation stores and sends, so it can be checked
against a measured small run (benchmarks/bench_projection.py --validate does, and tests run it):

- mask state: 16 bytes per chosen entry (int64 position + int32 step chosen + fp32 base value;
  id3_ds.algorithm.mask), held by the rank that owns the entry. ZeRO-3 partitions every parameter evenly,
  so at the end of training a rank holds about 16 * B / world bytes (exactly 16 * B summed over ranks).
- all-gather (id3_ds.integration.collectives), k = u_t = entries unmasked at step t (ceil(B / T) during
  the first B mod T steps, floor after): round A, every step, each rank receives world * ceil(2k / world)
  (score, key) float64 pairs of 16 bytes, about 32 k bytes whatever the world size; round B adds up to
  world * k * 16 bytes only when one rank holds most of a step's winners (0 when they are spread).
- scoring buffers: selection scores CHUNK entries at a time; the fp32 score buffer and the |theta| + eps
  temporary are CHUNK * 4 bytes each, plus one fp32 maximum per BLOCK entries: a constant per rank.
- delta: per tuned tensor an index (int32, int64 for tensors of >= 2^31 entries) and an fp32 value per
  entry, so about B * 8 bytes, plus a JSON header per tensor (safetensors header + delta_config.json
  fingerprint) and 8 bytes per fix-up entry (the few updates no fp32 number carries exactly).
- model state per rank at ZeRO-3 (N weights, B chosen entries, d = bytes of the model dtype; activations,
  DeepSpeed's communication buckets and the CUDA/CPU runtime are not model state and are left out):
  full fine-tuning and dense-state ID3 keep per weight the d-byte partition plus TRAINED_BYTES = 16 (fp32
  master, exp_avg, exp_avg_sq, fp32 gradient partition): (d + 16) N / world, 18 N / world in bf16; dense
  ID3 adds its mask, 16 B / world per chosen entry. Sparse-state ID3 (id3.state: sparse) keeps the frozen
  d-byte partition and 28 B per chosen entry (mask 16 + fp32 master and both moments 12). Its step's
  gradient is streamed (id3_ds/algorithm/streaming.py), so the transient, counted in the peak, is one
  parameter's at a time: the largest tensor's whole gradient (d bytes per entry, as autograd makes it), its
  zero-padded copy when its size is not a multiple of world (the reduce-scatter input), the rank's share of
  it (d bytes x ceil(L / world)), the scoring scratch (scoring_buffer_bytes), and the O(k + chosen) kept
  gradient values: 4 B per chosen entry (B / world at the end of a run) and up to 5k candidates of 16 B
  (fp32 score + int64 key + fp32 gradient). Only with grad_accum > 1 does the fp32 accumulation buffer
  of the rank's gradient partition, 4 N / world, exist, from a step's first backward to its last.
  LoRA keeps the frozen base (d N / world) and trains its A/B matrices like full fine-tuning trains
  weights, (d + 16) bytes each / world.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from id3_ds.algorithm.schedule import UnmaskSchedule, resolve_budget
from id3_ds.algorithm.selection import BLOCK, CHUNK
from id3_ds.delta.format import INT32_LIMIT
from id3_ds.training.batches import total_steps

MASK_BYTES_PER_ENTRY = 16  # int64 position + int32 chosen_at + fp32 base
PAIR_BYTES = 16  # one (score, key) float64 pair in the all-gather
VALUE_BYTES = 4  # fp32 delta value
GAP_BYTES = 2  # uint16 gap code of a sparse position (docs/delta-format.md, "gaps")
HEADER_BYTES_PER_TENSOR = 1024  # generous: up to 4 safetensors header entries + 2 delta_config.json entries
HEADER_BYTES_FIXED = 4096  # delta_config.json's fixed fields and the safetensors preamble
TRAINED_BYTES = 16  # per densely trained weight beyond its d-byte partition: fp32 master + 2 moments + fp32 grad
SPARSE_ENTRY_BYTES = MASK_BYTES_PER_ENTRY + 12  # sparse state per chosen entry: mask + fp32 master + 2 moments
GRAD_BUFFER_BYTES = 4  # sparse state, grad_accum > 1: the fp32 accumulation buffer per weight of the partition
CANDIDATE_BYTES = 16  # sparse state, streamed: one candidate's fp32 score + int64 key + fp32 gradient
CANDIDATES_HELD = 5  # sparse state, streamed: at most 4k candidates held, plus one slice's part of up to k
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
LORA_RANK = 16


@dataclass(frozen=True)
class ModelSpec:
    """A model as the calculator needs it: parameter count, tensor count, largest tensor's entry count, and
    the (in, out) features of the linear layers LoRA adapts (one layer's, repeated `layers` times)."""

    name: str
    params: int
    tensors: int
    largest_tensor: int
    layers: int = 0
    linear_shapes: tuple[tuple[int, int], ...] = ()


def llama(
    name: str, params: float, layers: int, hidden: int, intermediate: int, vocab: int = 32000, kv: int | None = None
) -> ModelSpec:
    """LLaMA: per layer q, k, v, o, gate, up, down + 2 norms; plus embedding, final norm, lm_head.

    kv: the width of the k and v projections (grouped-query attention; the hidden size without it)."""
    kv = hidden if kv is None else kv
    linear = ((hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden))
    linear += ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))
    return ModelSpec(name, int(params), 9 * layers + 3, vocab * hidden, layers, linear)


def llama_exact(name: str, layers: int, hidden: int, intermediate: int, vocab: int, kv: int | None = None) -> ModelSpec:
    """A LLaMA whose parameter count is computed, not quoted (untied embeddings): for the small models the
    benchmarks build, so a prediction can be checked against a measured run of the same model."""
    spec = llama(name, 0, layers, hidden, intermediate, vocab, kv)
    per_layer = sum(i * o for i, o in spec.linear_shapes) + 2 * hidden
    return ModelSpec(name, layers * per_layer + 2 * vocab * hidden + hidden, *dataclasses.astuple(spec)[2:])


MODELS = (
    llama("LLaMA-7B", 6.74e9, 32, 4096, 11008),
    llama("LLaMA-13B", 13.0e9, 40, 5120, 13824),
    llama("LLaMA-70B", 69.0e9, 80, 8192, 28672, kv=1024),
)

ALPACA_EXAMPLES = 52002


def alpaca_steps(epochs: float = 3, global_batch: int = 128, examples: int = ALPACA_EXAMPLES) -> int:
    """Optimizer steps T of a run over Alpaca, counted as launch/train.py counts them (3 epochs at 128: 1218)."""
    return total_steps(examples, global_batch, None, epochs)


def budget_entries(selectable: int, budget: int | float) -> int:
    """B: a count, or a fraction of the selectable entries (rounded down, as the trainer does)."""
    return resolve_budget(budget, selectable)


def per_step(budget: int, steps: int, step: int = 0) -> int:
    """k = u_t, entries unmasked at 0-based step `step`; step 0 is the largest, ceil(B / T)."""
    return UnmaskSchedule(budget, steps).per_step(step)


def mask_bytes_total(budget: int) -> int:
    """Mask state summed over ranks once all B entries are chosen."""
    return MASK_BYTES_PER_ENTRY * budget


def mask_bytes_per_rank(budget: int, world: int) -> float:
    """Expected mask state per rank at the end of a ZeRO-3 run (parameters are partitioned evenly)."""
    return MASK_BYTES_PER_ENTRY * budget / world


def allgather_bytes(budget: int, steps: int, world: int, step: int = 0) -> int:
    """Bytes each rank receives from round A of the selection at `step`: world x ceil(2k / world) pairs.

    This is the whole cost when the winners are spread over the ranks (round B then has nothing to send);
    `allgather_bytes_worst` adds round B's bound. 0 with one rank: no collective.
    """
    if world == 1:
        return 0
    return PAIR_BYTES * world * max(1, -(-2 * per_step(budget, steps, step) // world))


def allgather_bytes_worst(budget: int, steps: int, world: int, step: int = 0) -> int:
    """Round A plus round B at its largest (one rank holds every winner): + world x k pairs."""
    if world == 1:
        return 0
    return allgather_bytes(budget, steps, world, step) + PAIR_BYTES * world * per_step(budget, steps, step)


def allgather_bytes_run(budget: int, steps: int, world: int) -> int:
    """Round A bytes each rank receives over the whole run (winners spread over the ranks)."""
    return sum(allgather_bytes(budget, steps, world, t) for t in range(steps))


def allgather_bytes_run_worst(budget: int, steps: int, world: int) -> int:
    """All-gather bytes per rank over the run if one rank held every step's winners."""
    return allgather_bytes_run(budget, steps, world) + (PAIR_BYTES * world * budget if world > 1 else 0)


def scoring_buffer_bytes() -> int:
    """Transient bytes of scoring one chunk: score buffer + |theta| + eps temporary + block maxima."""
    return 2 * 4 * CHUNK + 4 * (CHUNK // BLOCK)


def lora_params(model: ModelSpec, rank: int = LORA_RANK) -> int:
    """LoRA A (r x in) and B (out x r) on every linear layer of every decoder layer (PEFT's "all-linear":
    q, k, v, o, gate, up, down; the output head is left out, as PEFT leaves it out)."""
    return model.layers * sum(rank * (i + o) for i, o in model.linear_shapes)


@dataclass(frozen=True)
class ModelState:
    """Model-state bytes per rank: what stays for the run, and what one step adds on top (its peak)."""

    persistent: float
    transient: float = 0.0

    @property
    def peak(self) -> float:
        return self.persistent + self.transient


def state_full(params: int, world: int, dtype_bytes: int) -> ModelState:
    """Full fine-tuning (and ID3's dense state less its mask): (d + 16) bytes per weight / world."""
    return ModelState((dtype_bytes + TRAINED_BYTES) * params / world)


def state_dense_id3(params: int, budget: int, world: int, dtype_bytes: int) -> ModelState:
    """Dense-state ID3: full fine-tuning's state plus the mask, 16 B per chosen entry / world."""
    return ModelState(state_full(params, world, dtype_bytes).persistent + MASK_BYTES_PER_ENTRY * budget / world)


def sparse_stream_bytes(largest_tensor: int, budget: int, world: int, dtype_bytes: int, k: int) -> float:
    """The streamed step's transient per rank: one parameter's gradient at a time (the largest: whole, padded
    copy if needed, the rank's share), the scoring scratch, and the kept O(k + chosen) gradient values."""
    whole = dtype_bytes * largest_tensor
    per = -(-largest_tensor // world)
    reduce = 0 if world == 1 else dtype_bytes * per + (dtype_bytes * per * world if largest_tensor % world else 0)
    kept = 4 * budget / world + CANDIDATE_BYTES * CANDIDATES_HELD * k
    return whole + reduce + scoring_buffer_bytes() + kept


def state_sparse_id3(
    params: int, budget: int, world: int, dtype_bytes: int, largest_tensor: int, accum: int = 1, k: int = 0
) -> ModelState:
    """Sparse-state ID3: frozen d-byte partition + 28 B per chosen entry; transient: the streamed step's
    (sparse_stream_bytes) and, only with grad_accum > 1, the fp32 accumulation buffer 4 B x N / world."""
    persistent = (dtype_bytes * params + SPARSE_ENTRY_BYTES * budget) / world
    transient = sparse_stream_bytes(largest_tensor, budget, world, dtype_bytes, k)
    if accum > 1:
        transient += GRAD_BUFFER_BYTES * params / world
    return ModelState(persistent, transient)


def state_lora(params: int, adapter: int, world: int, dtype_bytes: int) -> ModelState:
    """LoRA: the frozen base (d bytes per weight) + adapter weights trained densely ((d + 16) bytes each)."""
    return ModelState((dtype_bytes * params + (dtype_bytes + TRAINED_BYTES) * adapter) / world)


def delta_payload_bytes(budget: int, largest_tensor: int = 0, index: str = "gaps") -> int:
    """Index + value bytes of a sparse delta of B entries.

    index "gaps" (export's default, format version 3): a 2-byte gap code per entry (the rare escape codes of
    gaps above 65535 are left to the header allowance). "flat": int32 positions, int64 if any tensor has
    >= 2^31 entries (a worst case: every entry is charged 8 index bytes as soon as one tensor needs them).
    """
    if index == "gaps":
        return budget * (GAP_BYTES + VALUE_BYTES)
    width = 8 if largest_tensor >= INT32_LIMIT else 4
    return budget * (width + VALUE_BYTES)


def delta_bytes_bound(budget: int, tensors: int, largest_tensor: int = 0, fixups: int = 0) -> int:
    """Upper bound of the delta directory's size: payload + fix-ups + headers."""
    return (
        delta_payload_bytes(budget, largest_tensor)
        + 8 * fixups
        + HEADER_BYTES_FIXED
        + HEADER_BYTES_PER_TENSOR * tensors
    )


@dataclass(frozen=True)
class Projection:
    model: str
    world: int
    fraction: float
    steps: int
    budget: int
    k: int
    mask_per_rank: float
    scoring_buffer: int
    allgather_per_step: int
    allgather_per_step_worst: int
    allgather_run: int
    delta_bytes: int


def project(model: ModelSpec, world: int, fraction: float, steps: int) -> Projection:
    """Every figure for one (model, world size, budget) at ZeRO-3, all entries selectable."""
    b = budget_entries(model.params, fraction)
    return Projection(
        model=model.name,
        world=world,
        fraction=fraction,
        steps=steps,
        budget=b,
        k=per_step(b, steps),
        mask_per_rank=mask_bytes_per_rank(b, world),
        scoring_buffer=scoring_buffer_bytes(),
        allgather_per_step=allgather_bytes(b, steps, world),
        allgather_per_step_worst=allgather_bytes_worst(b, steps, world),
        allgather_run=allgather_bytes_run(b, steps, world),
        delta_bytes=delta_bytes_bound(b, model.tensors, model.largest_tensor),
    )


def human(n: float) -> str:
    """Bytes in binary units, 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def table(rows: list[Projection]) -> str:
    lines = [
        "| model | GPUs | budget | B (entries) | k = ceil(B/T) | mask/rank | scoring buffer/rank "
        "| all-gather/step/rank (spread; one rank wins all) | all-gather/run/rank (spread) | delta |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in rows:
        lines.append(
            f"| {p.model} | {p.world} | {p.fraction * 100:g} % | {p.budget:,} | {p.k:,} | {human(p.mask_per_rank)} "
            f"| {human(p.scoring_buffer)} | {human(p.allgather_per_step)}; {human(p.allgather_per_step_worst)} "
            f"| {human(p.allgather_run)} "
            f"| {human(p.delta_bytes)} |"
        )
    return "\n".join(lines)


def default_grid(steps: int) -> list[Projection]:
    return [project(m, w, f, steps) for m in MODELS for w in (8, 64, 512) for f in (0.0001, 0.001, 0.01)]


@dataclass(frozen=True)
class StateRow:
    """Per-rank model state of one (model, world, budget, dtype) under every method, ZeRO-3."""

    model: str
    world: int
    dtype: str
    fraction: float
    budget: int
    adapter: int
    full: ModelState
    dense: ModelState
    sparse: ModelState  # grad_accum 1: the gradient streamed
    sparse_accum: ModelState  # grad_accum > 1: plus the fp32 accumulation buffer
    lora: ModelState


def state_row(model: ModelSpec, world: int, fraction: float, dtype: str = "bf16", steps: int = 0) -> StateRow:
    """Every method's model state for one case, all entries selectable, LoRA r=16 on every linear layer;
    `steps` (T) sets the streamed candidates' k = ceil(B / T) (default: 3 epochs of Alpaca)."""
    d, n = DTYPE_BYTES[dtype], model.params
    b, adapter = budget_entries(n, fraction), lora_params(model)
    k = per_step(b, steps or alpaca_steps())
    return StateRow(
        model.name,
        world,
        dtype,
        fraction,
        b,
        adapter,
        full=state_full(n, world, d),
        dense=state_dense_id3(n, b, world, d),
        sparse=state_sparse_id3(n, b, world, d, model.largest_tensor, accum=1, k=k),
        sparse_accum=state_sparse_id3(n, b, world, d, model.largest_tensor, accum=2, k=k),
        lora=state_lora(n, adapter, world, d),
    )


def state_grid() -> list[StateRow]:
    """LLaMA-7B and LLaMA-70B on 8 GPUs at B = 0.1 % and 1 %, bf16."""
    return [state_row(m, 8, f) for m in MODELS if m.name in ("LLaMA-7B", "LLaMA-70B") for f in (0.001, 0.01)]


def state_table(rows: list[StateRow]) -> str:
    lines = [
        "| model | GPUs | dtype | budget | B (entries) | full | dense ID3 "
        "| sparse ID3, grad_accum 1: persistent + transient = peak | sparse ID3, grad_accum > 1: peak "
        "| LoRA r=16 (adapter weights) | sparse peak / full | sparse peak / dense ID3 | sparse peak / LoRA "
        "| same, grad_accum > 1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sp, sa = r.sparse, r.sparse_accum
        lines.append(
            f"| {r.model} | {r.world} | {r.dtype} | {r.fraction * 100:g} % | {r.budget:,} | {human(r.full.peak)} "
            f"| {human(r.dense.peak)} | {human(sp.persistent)} + {human(sp.transient)} = {human(sp.peak)} "
            f"| {human(sa.peak)} | {human(r.lora.peak)} ({r.adapter:,}) | {sp.peak / r.full.peak:.3f} "
            f"| {sp.peak / r.dense.peak:.3f} | {sp.peak / r.lora.peak:.2f} | {sa.peak / r.lora.peak:.2f} |"
        )
    return "\n".join(lines)
