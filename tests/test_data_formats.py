"""Data formats: the loss mask covers exactly the response tokens, labels, malformed records, packing,
the shared token cache, evaluation metrics and `id3-ds preview-data`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from id3_ds.data import IGNORE, DataSpec, cached_dataset, collate, load_records, pack, tokenize_records
from id3_ds.data import cache as cache_mod
from id3_ds.data.evaluate import eval_batches, evaluate, f1_from_counts
from id3_ds.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from id3_ds.errors import ID3Error

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(base_dir) -> str:
    return base_dir


@pytest.fixture(scope="module")
def tok(tok_dir):
    t = AutoTokenizer.from_pretrained(tok_dir)
    t.chat_template = CHAT
    return t


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _hand_built(tok, pieces: list[tuple[str, bool]], eos: bool) -> tuple[list[int], list[int]]:
    ids, labels = [tok.bos_token_id], [IGNORE]
    for text, loss in pieces:
        p = _ids(tok, text)
        ids += p
        labels += p if loss else [IGNORE] * len(p)
    if eos:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return ids, labels


def test_alpaca_loss_covers_exactly_the_response(tok) -> None:
    recs = [
        ("a:1", {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"}),
        ("a:2", {"instruction": "Say hi.", "output": "hi there"}),
    ]
    got = tokenize_records(recs, "alpaca", tok, 512)
    want0 = _hand_built(
        tok, [(ALPACA_WITH_INPUT.format(instruction="Add the numbers.", input="2 + 3"), False), ("5", True)], True
    )
    want1 = _hand_built(tok, [(ALPACA_NO_INPUT.format(instruction="Say hi."), False), ("hi there", True)], True)
    assert (got[0].input_ids, got[0].labels) == want0
    assert (got[1].input_ids, got[1].labels) == want1
    assert tok.decode([x for x in got[1].labels if x != IGNORE]) == "hi there</s>"


def test_messages_loss_covers_exactly_the_assistant_turns(tok) -> None:
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "bye"},
    ]
    (got,) = tokenize_records([("m:1", {"messages": msgs})], "messages", tok, 512)
    pieces = [
        ("<|user|>hi</s><|assistant|>", False),
        ("hello</s>", True),
        ("<|user|>again</s><|assistant|>", False),
        ("bye</s>", True),
    ]
    assert (got.input_ids, got.labels) == _hand_built(tok, pieces, eos=False)
    assert tok.decode([x for x in got.labels if x != IGNORE]) == "hello</s>bye</s>"


def test_text_trains_on_every_token_and_truncates(tok) -> None:
    (got,) = tokenize_records([("t:1", {"text": "the quick brown fox"})], "text", tok, 512)
    assert got.labels[1:] == got.input_ids[1:] and got.labels[0] == IGNORE
    (short,) = tokenize_records([("t:1", {"text": "the quick brown fox " * 20})], "text", tok, 16)
    assert len(short.input_ids) == 16 == len(short.labels)


def test_classification_labels_and_tokens(tok, tmp_path) -> None:
    path = _write(tmp_path / "c.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": 0}])
    recs = load_records(path)
    got = tokenize_records(recs, "classification", tok, 64, ["0", "pos"])
    assert [e.label for e in got] == [1, 0]
    assert got[0].input_ids == tok("good film", truncation=True, max_length=64)["input_ids"]
    batch = collate(got, tok.pad_token_id)
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape[0] == 2
    with pytest.raises(ID3Error, match=r"c.jsonl:2: label '0' is not one of"):
        tokenize_records(recs, "classification", tok, 64, ["neg", "pos"])


@pytest.mark.parametrize(
    "fmt,rows,message",
    [
        (
            "alpaca",
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, {"instruction": "x"}],
            ":3: field 'output'",
        ),
        ("alpaca", [{"instruction": "a", "output": "b"}, "{not json"], ":2: invalid JSON"),
        ("messages", [{"messages": [{"role": "user", "content": "q"}]}], ":1: no assistant message"),
        ("messages", [{"messages": [{"role": "user"}]}], ":1: every message needs"),
        ("text", [{"text": "ok"}, {"text": 5}], ":2: field 'text' must be a string"),
        ("classification", [{"text": "ok", "label": "a"}, {"text": "no label"}], ":2: field 'label'"),
    ],
)
def test_malformed_record_fails_with_its_line_number(fmt, rows, message, tok, tmp_path) -> None:
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ID3Error, match=message.replace("(", r"\(")):
        tokenize_records(load_records(path), fmt, tok, 64, ["a", "b"] if fmt == "classification" else None)


def test_packing_keeps_loss_masks_with_their_tokens(tok) -> None:
    recs = [(f"a:{i}", {"instruction": f"Say {i}.", "output": f"number {i}"}) for i in range(10)]
    examples = tokenize_records(recs, "alpaca", tok, 512)
    packed = pack(examples, 64)
    assert all(len(e.input_ids) == 64 for e in packed[:-1])
    flat_ids = [t for e in examples for t in e.input_ids]
    flat_labels = [t for e in examples for t in e.labels]
    n = sum(len(e.input_ids) for e in packed)
    assert [t for e in packed for t in e.input_ids] == flat_ids[:n]
    assert [t for e in packed for t in e.labels] == flat_labels[:n]


def test_token_cache_is_built_once_and_shared(tok, tok_dir, tmp_path, monkeypatch) -> None:
    data = _write(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    spec = DataSpec(str(data), "classification", 32)
    ds, labels = cached_dataset(spec, tok, tok_dir, tmp_path / "cache")
    assert labels == ["neg", "pos"] and [ds[i].label for i in range(len(ds))] == [1, 0]
    monkeypatch.setattr(cache_mod, "build_examples", lambda *a: pytest.fail("rebuilt a cached dataset"))
    again, _ = cached_dataset(spec, tok, tok_dir, tmp_path / "cache")
    assert [again[i] for i in range(2)] == [ds[i] for i in range(2)]
    monkeypatch.undo()
    data.write_text(data.read_text() + json.dumps({"text": "fine", "label": "pos"}) + "\n")  # an edit: new key
    assert len(cached_dataset(spec, tok, tok_dir, tmp_path / "cache")[0]) == 3


def test_eval_batches_are_in_length_order_and_cover_every_record_once_over_the_ranks() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2]  # by length: 1, 6, 3, 4 (a tie keeps input order), 0, 5, 2
    shares = [eval_batches(lengths, rank, 2, 2) for rank in (0, 1)]
    assert shares[0] == [[(1, True), (3, True)], [(0, True), (2, True)]]
    assert shares[1] == [[(6, True), (4, True)], [(5, True), (0, False)]]  # padded: as many passes as rank 0
    one = eval_batches(lengths, 0, 1, 3)  # one rank: every record, the last batch padded
    assert [[i for i, real in b if real] for b in one] == [[1, 6, 3], [4, 0, 5], [2]]


def test_classification_metrics_accuracy_and_f1(tok) -> None:
    from id3_ds.data.loading import Example, TokenizedDataset

    truth = [1, 1, 0, 0, 1]
    pred = [1, 0, 0, 1, 1]
    ds = TokenizedDataset([Example([5, i + 6], [], t) for i, t in enumerate(truth)])

    def forward(input_ids, attention_mask, labels):
        p = torch.tensor([pred[int(r[1]) - 6] for r in input_ids])
        return SimpleNamespace(logits=torch.nn.functional.one_hot(p, 2).float() * 5)

    vectors: list[torch.Tensor] = []  # two ranks' strided shares, padded with weight-0 rows
    for rank in range(2):
        evaluate(forward, ds, 0, 2, rank=rank, world=2, num_labels=2, all_reduce=lambda v: vectors.append(v.clone()))
    totals = vectors[0] + vectors[1]
    assert int(totals[1]) == 5 and int(totals[2]) == 3  # every example once, 3 correct
    m = evaluate(forward, ds, 0, 2, num_labels=2)
    assert m["eval_accuracy"] == pytest.approx(0.6)
    assert m["eval_f1"] == pytest.approx(2 / 3)  # tp=2, fp=1, fn=1 for the positive class
    assert f1_from_counts(
        torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
    ) == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_lm_eval_loss_is_the_token_weighted_mean(tok, tok_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tok_dir, dtype=torch.float32).eval()
    recs = [(f"t:{i}", {"text": "word " * (i + 2)}) for i in range(5)]
    from id3_ds.data.loading import TokenizedDataset

    ds = TokenizedDataset(tokenize_records(recs, "text", tok, 64))
    got = evaluate(model, ds, tok.pad_token_id, 2)["eval_loss"]
    total, count = 0.0, 0
    with torch.no_grad():
        for e in ds.examples:
            out = model(**collate([e], tok.pad_token_id))
            n = len(e.input_ids) - 1
            total, count = total + float(out.loss) * n, count + n
    assert got == pytest.approx(total / count, rel=1e-5)


def test_preview_data_prints_the_loss_masked_tokens(tmp_path) -> None:
    from typer.testing import CliRunner

    from id3_ds.cli import app

    root = Path(__file__).resolve().parents[1]
    result = CliRunner().invoke(app, ["preview-data", "--config", str(root / "configs" / "tiny_cpu.json"), "--n", "2"])
    assert result.exit_code == 0, result.output
    assert "--- example 1:" in result.output and "--- example 2:" not in result.output
    assert "### Response:\n[[146</s>]]" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"path": "nope.jsonl"}, "train": {"steps": 1}}
        )
    )
    result = CliRunner().invoke(app, ["preview-data", "--config", str(bad)])
    assert result.exit_code == 2 and "does not exist" in result.output


def _bad_file(tmp_path: Path) -> Path:
    rows = [
        json.dumps({"instruction": "Add.", "input": "1 + 2", "output": "3"}),
        "{not json",
        json.dumps({"instruction": "Add.", "output": 5}),
        json.dumps({"instruction": "Add.", "input": "2 + 2", "output": ""}),
        json.dumps({"instruction": "Echo. " * 200, "output": "a"}),
        json.dumps({"instruction": "Add.", "input": "3 + 3", "output": "6 " * 100}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_records_are_rejected_with_their_line_by_default(tok, tmp_path) -> None:
    path = _bad_file(tmp_path)
    with pytest.raises(ID3Error, match=r"bad.jsonl:2: invalid JSON"):
        tokenize_records(load_records(path), "alpaca", tok, 64)


def test_bad_records_are_skipped_and_counted_on_request(tok, tmp_path) -> None:
    from id3_ds.data.loading import RecordPolicy

    policy = RecordPolicy("skip")
    examples = tokenize_records(load_records(_bad_file(tmp_path), policy), "alpaca", tok, 64, policy=policy)
    assert len(examples) == 2  # the good record and the over-long one, truncated
    assert policy.skipped == {"malformed": 2, "empty": 1, "truncated away": 1}
    assert policy.truncated == 2
    assert all(len(e.input_ids) <= 64 for e in examples)
    assert "2 malformed skipped" in policy.summary(len(examples))


def test_jsonl_line_with_a_unicode_line_separator_inside_a_string_is_one_record(tmp_path) -> None:
    """U+2028 is valid inside a JSON string; str.splitlines broke such a line in two (both 'invalid JSON')."""
    path = tmp_path / "d.jsonl"
    rows = [{"text": "first\u2028still first", "label": "positive"}, {"text": "second\r", "label": "negative"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    records = [record for _, record in load_records(path)]
    assert [r["text"] for r in records] == [r["text"] for r in rows]
