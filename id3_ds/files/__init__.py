"""How id3-ds puts bytes on disk and reads them back: one atomic writer, one safetensors reader.

`atomic` is the only place that writes a file or a directory (temp name, fsync, rename, fsync the
parent), so a crash at any point leaves either the old result or the new one, never half of one.
`safetensors_io` is the only safetensors reader (a strict parser: every malformed file is one ID3Error)
and the streaming writer merge uses. Everything above (checkpoints, masks, deltas, caches) goes
through these two.
"""
