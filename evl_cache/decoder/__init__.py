"""Stage two: the EVL decoder and its heads, trained and evaluated from the cache, and the run folder."""
