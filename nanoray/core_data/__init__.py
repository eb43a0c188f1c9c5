"""CORE eval data: the eval bundle (download, verify, cache, parse) and the core-lite converter (BIG-bench's
six CORE tasks, from the bigbench sdist on PyPI, downloaded once, or a local copy)."""
