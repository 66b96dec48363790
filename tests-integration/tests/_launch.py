"""Starting the ``mlxlm`` command and pairs of ranks the way ``mlx.launch`` starts them."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (all held open until each is known)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def rank_envs(tmp: Path, base: dict[str, str], ranks: int = 2) -> list[dict[str, str]]:
    """One environment per rank: a ring host file on free ports and ``MLX_RANK``."""
    hostfile = tmp / f"hosts-{time.monotonic_ns()}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
    return [{**base, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)} for r in range(ranks)]


def mlxlm_command() -> list[str]:
    """The installed ``mlxlm`` script, or the module when the environment has no scripts."""
    script = Path(sys.executable).parent / "mlxlm"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mlxlm_core._cli.main import entry; entry()"]
