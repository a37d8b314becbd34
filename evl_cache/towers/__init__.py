"""The frozen CLIP towers: the image tower that makes the cache, the text tower that names classes,
their learned prompts, and the conversion of other projects' tower checkpoints."""
