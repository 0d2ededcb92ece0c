"""The Redis service: ``lorastream serve`` pulls requests from Redis streams and publishes tokens.

| module | owns |
| --- | --- |
| ``protocol`` | wire protocol v1: typed messages, the one codec, validation naming the field |
| ``service`` | the worker: intake, engine driving, publisher, keepalive/claimer, control, drain |
| ``redis_conn`` | URL parsing (ACL, TLS), timeouts above BLOCK, backoff |
| ``registry`` | adapter name → path (``--lora-modules`` + the Redis hash), ``--lora-root`` safety |
| ``metrics`` | Prometheus metrics and the engine stat logger that feeds them |
| ``embedded`` | a private ``redis-server`` for ``serve`` without ``--redis-url``, the demo and tests |
| ``producer`` | a minimal raw producer/subscriber (the demo and tests use it) |
| ``cli`` | ``serve``, ``adapters``, ``demo`` |
"""

from __future__ import annotations
