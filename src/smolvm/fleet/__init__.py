"""Fleet mode: SmolVM sandboxes across a Ray cluster (optional extra ``smolvm[ray]``).

Ray does the scheduling (each sandbox is an actor asking for one unit of the ``smolvm``
resource), the fault detection (a dead node's actors fail; we raise ``SandboxLostError``)
and the data movement (fleet snapshots travel through its object store). SmolVM runs the
sandboxes on each node::

    from smolvm.fleet import Fleet

    with Fleet() as fleet:                      # joins RAY_ADDRESS, or starts a local one
        with fleet.sandbox() as sb:
            sb.run("pip install -q requests")
            sb.snapshot("prepared")
        results = fleet.map(["python3 -c 'print(1)'"] * 24, snapshot="prepared")
"""

from __future__ import annotations

try:
    import ray  # noqa: F401  - the extra's presence is checked here, once
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("smolvm.fleet needs Ray: pip install 'smolvm[ray]'") from exc

from smolvm.exceptions import SandboxLostError
from smolvm.fleet.fleet import Fleet, FleetFiles, FleetProcess, FleetSandbox

__all__ = ["Fleet", "FleetSandbox", "FleetFiles", "FleetProcess", "SandboxLostError"]
