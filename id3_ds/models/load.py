"""Loading the model a run trains (causal LM or sequence classifier with a fresh head) and wrapping it in LoRA."""

from __future__ import annotations

from typing import Any

from id3_ds.errors import ID3Error


def load_tokenizer(model_dir: str):
    """The model's tokenizer, as the data pipeline and the eval use it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_model(model_dir: str, classification: bool, dtype: Any, labels: list[str] | None = None, pad_id=None):
    """A causal LM, or a sequence classifier with a fresh head over `labels` (the paper's GLUE setting)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if not classification:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        dtype=dtype,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    if model.config.pad_token_id is None and pad_id is not None:  # decoder heads find the last real token by it
        model.config.pad_token_id = pad_id
    return model


def wrap_lora(model, rank: int, alpha: float, dropout: float, target_modules: list[str] | None, classification: bool):
    """PEFT LoRA around `model`: only A/B (and, for classification, a trainable copy of the head) train.

    LoRA B starts at zero, so the wrapped model computes exactly the base model's function at step 0.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ID3Error(
            f"lora: {str(e).splitlines()[0]} (set lora.target_modules to module names of this model)"
        ) from None
