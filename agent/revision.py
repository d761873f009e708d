"""The revision of a service: a versioned hash of exactly the fields its container sees.

The kubelet once hashed the whole pod spec, so each kubelet upgrade that added a field
restarted every container on the node. berth hashes a chosen list of fields, and the hash
carries a version prefix: a later berth that must hash differently bumps the version and
still recognises (and keeps) containers labelled with the older one by recomputing it.
Instance count and rolling strategy are left out, so scaling restarts nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from bootstrap.spec import ServiceSpec

VERSION = "v1"


def revision(spec: ServiceSpec) -> str:
    """`v1-<12 hex>` over image, command, env, resources, storage, prepare, checks, token."""
    data = spec.to_json_dict(reveal_secrets=True)
    metadata = data["metadata"]
    seen: dict[str, Any] = {
        "containers": data["containers"],
        "storage": data.get("storage", []),
        "features": data.get("features", {}),
        "warm_up_data_path": data.get("warm_up_data_path"),
        "resources": {key: metadata.get(key) for key in ("cpu", "memory", "gpu", "shm_size")},
        "rpc": metadata.get("rpc"),
        "grace": metadata.get("eas"),
        # The token reaches the container, so a new token is a new revision; only its hash is kept.
        "token": hashlib.sha256(data["token"].encode()).hexdigest() if data.get("token") else None,
    }
    canonical = json.dumps(seen, sort_keys=True, separators=(",", ":"))
    return f"{VERSION}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
