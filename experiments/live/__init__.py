"""The live side of validation: a real vLLM server as a subprocess, an open-loop replay client, /metrics.

`server` starts and always stops vLLM's OpenAI-compatible server (own process group);
`client` replays a request table against it with per-token client timestamps and writes
the simulator's request-table schema; `metrics` reads the engine's Prometheus endpoint.
Only the server subprocess imports vLLM; this package needs aiohttp, not vLLM.
"""
