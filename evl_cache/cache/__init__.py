"""The cache: its format and storage encodings, extraction into it, planning, checking, and the
dataset and loader that read it back for stage two."""
