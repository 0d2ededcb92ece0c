"""A real local Redis Cluster for the tests: three masters, no replicas.

Three ``redis-server --cluster-enabled yes`` on free loopback ports, joined by
``redis-cli --cluster create`` (the official tool assigns the 16,384 slots), ready once
every node reports ``cluster_state:ok``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

from broker.embedded import RedisServer, find_redis_server


class LocalCluster:
    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        for i in range(masters):
            node_dir = data_dir / f"node{i}"
            node_dir.mkdir(parents=True)
            args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                    "--cluster-config-file", str(node_dir / "nodes.conf"))  # fmt: skip
            self.nodes.append(RedisServer(data_dir=node_dir, extra_args=args))

    @property
    def url(self) -> str:
        """The lorastream URL of the cluster (any node finds the others)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not all(self._ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        client = redis.Redis(port=node.port)
        try:
            return "cluster_state:ok" in client.execute_command("CLUSTER", "INFO").decode()
        finally:
            client.close()

    def flush(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            try:
                client.flushall()
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
