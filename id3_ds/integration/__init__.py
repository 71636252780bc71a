"""ID3 on DeepSpeed: where each rank's slice of a parameter lives, and the step hook.

The algorithm (id3_ds.algorithm) never imports DeepSpeed; this package only supplies slices
(`zero_slices`), the all-gather that merges candidates across ranks (`collectives`), the DeepSpeed
config built from a run config (`ds_config`), and the hook that runs between backward and step (`hook`).
"""
