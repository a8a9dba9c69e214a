"""
relayer's benchmarks: ``python -m benchmarks`` (``--quick`` for a short run, ``--help``).

Every scenario runs in a fresh process of its own against a sink process (a twisted.web server on
127.0.0.1) that decodes and verifies every transaction. See ``docs/performance.md``.
"""
