"""Real parts for the test suite: a Docker engine, a registry, an S3 server, a faulty network.

Each part is started when absent and stopped when the suite started it. A part that cannot
be had skips its tests on a developer's machine and fails them under CI (`CI=true`).
"""
