"""Peers: run NVIDIA kvpress and transformers' QuantizedCache beside kvshrink, through one protocol.

- :mod:`kvshrink.peers.worker`: the protocol, a standalone script run by each environment's Python.
- :mod:`kvshrink.peers.envs`: pinned virtual environments for peers (created once, reused).
- :mod:`kvshrink.peers.compare`: method lists, inputs (token ids, passkey trials), table and plot.

The runner is ``benchmarks/peers.py``; results and the write-up are in ``docs/PEERS.md``.
"""
