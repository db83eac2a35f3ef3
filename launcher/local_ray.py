"""What a local Ray instance (`lorasp launch` without an address) is exposed to: this host's loopback, and only
holders of its token.

Ray reads both settings once, when it is first imported, so `lorasp launch` sets them before that import:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray then takes 127.0.0.1 for this node's address, as it does on macOS and
  Windows, and its GCS, raylet, object manager, agents and workers listen there instead of on every interface.
  (`ray.init(_node_ip_address="127.0.0.1")` would not do: Ray swaps a loopback address for a reachable one.)
- `RAY_AUTH_MODE=token`, with a fresh random `RAY_AUTH_TOKEN` unless one is set: every request to the instance must
  carry it, and only this process and the instance's own processes hold it (nothing is written to ~/.ray).
"""

from __future__ import annotations

import os
import secrets
import sys

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # the object store of an instance we start (launcher/cluster.py says why)


def isolate_local_instance() -> None:
    if "ray" in sys.modules:
        raise RuntimeError("isolate_local_instance() must run before Ray is imported: Ray reads these settings then")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
