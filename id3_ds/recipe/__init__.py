"""The shipped training recipe (train.py: check, setup, train, save) and the checks it runs before anything
starts (preflight.py). launch/train.py and `id3-ds train` both run it."""
