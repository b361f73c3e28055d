"""Rank 0's control: the scheduler (admission, chunked prefill, SP placement, step plans), the bookkeeping of
KV pages, state slots and the prefix cache, and the requests as it tracks them. It decides; the ranks execute
(:mod:`server.execution`).
"""
