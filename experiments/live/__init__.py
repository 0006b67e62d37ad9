"""The live side of validation: a real vLLM engine, in this process or as a server, and what it did.

`inprocess` (the default mode) builds vLLM's engine in this process, replays a request table
by stepping it, records the engine's own timestamps and every step, and times reference steps
for the speed calibration; `inprocess_mode` is the validate app's in-process run. `server`
starts and always stops vLLM's OpenAI-compatible server (own process group); `client` replays
a request table against it with per-token client timestamps; `metrics` reads the engine's
Prometheus endpoint. `workloads` (request pools, open-loop and burst runs) and `simulate` (the
simulated replica, the report, noise accounting) serve both modes. vLLM is imported only
inside functions (in-process) or by the server subprocess.
"""
