"""evl-cache: train EVL video models on frozen CLIP features that are extracted once.

Stage one, `extract`, runs the frozen backbone over every video and writes a cache; stage two trains
the EVL decoder from that cache. Every CLI command is a function here with the same options.
"""
__version__ = "0.1.0"
