"""The benchmark scripts and the few helpers they share with the tests (launch, projection, results).

Not part of the installed package (pyproject.toml ships id3_ds only): nothing here is needed to train.
"""
