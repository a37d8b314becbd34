"""Stage one's input: find a dataset's videos, plan each view's frames, decode them, make clips."""
