"""CORE eval data: the eval bundle (download, verify, cache, parse) and the offline core-lite converter."""
