"""Connecting to Ray: an existing cluster ($RAY_ADDRESS / scaling.address) or a local instance.

A local instance started here binds its dashboard to 127.0.0.1 and keeps Ray's token
authentication on (Ray's default for clusters it starts), so nothing listens openly on the
network. ``ray.init`` is only ever called from these functions, never at import time.
"""

from __future__ import annotations

import os
from typing import Any

from trainers.errors import ClusterError

LOCAL_DASHBOARD_HOST = "127.0.0.1"


def ensure_ray(address: str | None = None, **local_kwargs: Any) -> dict[str, float]:
    """Connect (or start a local Ray) once; return the cluster's total resources."""
    import ray

    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        try:
            if target:
                ray.init(address=target, log_to_driver=True)
            else:
                local_kwargs.setdefault("dashboard_host", os.environ.get(
                    "SMALLSHOT_DASHBOARD_HOST", LOCAL_DASHBOARD_HOST))
                # Ray 2.60 itself generates a token and turns token authentication on here
                # (RAY_AUTH_MODE=disabled opts out); tests/reliability checks that it stays so
                # the dashboard serves the State API that Ray Train's placement-group cleaner uses
                local_kwargs.setdefault("include_dashboard", True)
                ray.init(address="local", **local_kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClusterError(f"cannot connect to Ray at {target or 'a new local instance'}: "
                               f"{first[:200]}") from None
    return dict(ray.cluster_resources())
