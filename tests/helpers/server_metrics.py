"""Reading a running vLLM server's Prometheus metrics in tests."""

from __future__ import annotations

import urllib.request
from typing import Any


def prefix_cache_hits(server: Any) -> float:
    """Total prefix-cache hit tokens so far (``vllm:prefix_cache_hits_total``, all labels):
    a test compares it before and after a request to see whether cached KV was reused."""
    text = urllib.request.urlopen(server.root_url + "/metrics", timeout=30).read().decode()
    vals = [
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("vllm:prefix_cache_hits_total")
    ]
    assert vals, "vllm:prefix_cache_hits_total not exported"
    return sum(vals)
