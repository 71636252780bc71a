"""Files shipped with the package: the embedded default dataset."""
