"""Fine-tuning methods under one `method` key: ID3, the paper's static baselines, and dense references.

Every masked method is the shared mask core (`id3_ds.algorithm.ID3`) with a different score, schedule or
set of selectable tensors; none copies the selection, masking, checkpointing or export machinery:

    id3     |g| / (|theta| + eps)^exp, B/T entries per step (the default)
    random  a hash of the entry's global key: uniform, and identical however the model is sliced
    pafi    -|theta| of the pretrained weights: the B smallest magnitudes (PaFi, Liao et al. 2023)
    fish    empirical Fisher, sum of g^2 over N sample batches before training (FISH, Sung et al. 2021)
    bitfit  1-D tensors only (biases and norm weights; Ben Zaken et al. 2022)

The four baselines are static: all of B at step 0, never grown. `full` (dense fine-tuning) and `lora`
(dense PEFT LoRA) train without a mask.
"""

from id3_ds.methods.registry import DENSE, MASKED, METHODS, STATIC, MethodSpec, method_spec, selector_for_module
from id3_ds.methods.scorers import FisherScorer, bitfit_keep, hash_scores, pafi_scorer, random_scorer

__all__ = [
    "DENSE",
    "MASKED",
    "METHODS",
    "STATIC",
    "FisherScorer",
    "MethodSpec",
    "bitfit_keep",
    "hash_scores",
    "method_spec",
    "pafi_scorer",
    "random_scorer",
    "selector_for_module",
]
