"""The subset of Firecracker's API that SmolVM uses, restated as data.

Written from Firecracker's swagger spec (``src/firecracker/swagger/firecracker.yaml``,
API version 1.17.0-dev) and its request parsers (``src/firecracker/src/api_server/``,
``src/vmm/src/vmm_config/``); not a copy of either. Two facts come from the source rather
than the swagger file and matter for conformance:

* Request bodies are deserialized with serde's ``deny_unknown_fields``: an unknown field is
  a 400, not ignored (``strict``). The two snapshot-load override objects are the exception.
* Drive / network-interface ids in the URL must be ``[A-Za-z0-9_]`` and equal the id in the
  body; ``--id`` must be 1-64 characters of ``[A-Za-z0-9-]``.

Schema language (a small JSON-Schema dialect, see ``validator.py``): ``type`` (object,
string, integer, boolean, array), ``required``, ``properties``, ``strict`` (reject unknown
fields), ``enum`` (``enum_ci`` = case-insensitive), ``minimum``/``maximum``, ``pattern``,
``items``, ``$ref``.
"""

from __future__ import annotations

from typing import Any

MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"

_TOKEN_BUCKET = {
    "type": "object",
    "strict": True,
    "required": ["size", "refill_time"],
    "properties": {
        "size": {"type": "integer", "minimum": 0},
        "one_time_burst": {"type": "integer", "minimum": 0},
        "refill_time": {"type": "integer", "minimum": 0},
    },
}

DEFINITIONS: dict[str, dict[str, Any]] = {
    "TokenBucket": _TOKEN_BUCKET,
    "RateLimiter": {
        "type": "object",
        "strict": True,
        "properties": {"bandwidth": {"$ref": "TokenBucket"}, "ops": {"$ref": "TokenBucket"}},
    },
    # PUT /logger — all optional; the level is matched case-insensitively, "Warn" and
    # "Warning" are both accepted.
    "Logger": {
        "type": "object",
        "strict": True,
        "properties": {
            "log_path": {"type": "string"},
            "level": {
                "type": "string",
                "enum_ci": ["Error", "Warning", "Warn", "Info", "Debug", "Trace", "Off"],
            },
            "show_level": {"type": "boolean"},
            "show_log_origin": {"type": "boolean"},
            "module": {"type": "string"},
        },
    },  # fmt: skip
    # PUT /machine-config — both sizes required (PATCH makes them optional).
    "MachineConfiguration": {
        "type": "object",
        "strict": True,
        "required": ["vcpu_count", "mem_size_mib"],
        "properties": {
            "vcpu_count": {"type": "integer", "minimum": 1, "maximum": 32},
            "mem_size_mib": {"type": "integer", "minimum": 1},
            "smt": {"type": "boolean"},
            "track_dirty_pages": {"type": "boolean"},
            "cpu_template": {"type": "string", "enum": ["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]},
            "huge_pages": {"type": "string", "enum": ["None", "Transparent", "2M"]},
        },
    },
    # PUT /boot-source
    "BootSource": {
        "type": "object",
        "strict": True,
        "required": ["kernel_image_path"],
        "properties": {
            "kernel_image_path": {"type": "string"},
            "initrd_path": {"type": "string"},
            "boot_args": {"type": "string"},
        },
    },
    # PUT /drives/{drive_id} — virtio-block needs path_on_host and is_read_only,
    # vhost-user-block needs socket instead (checked in the server).
    "Drive": {
        "type": "object",
        "strict": True,
        "required": ["drive_id", "is_root_device"],
        "properties": {
            "drive_id": {"type": "string"},
            "partuuid": {"type": "string"},
            "is_root_device": {"type": "boolean"},
            "cache_type": {"type": "string", "enum": ["Unsafe", "Writeback"]},
            "is_read_only": {"type": "boolean"},
            "path_on_host": {"type": "string"},
            "rate_limiter": {"$ref": "RateLimiter"},
            "io_engine": {"type": "string", "enum": ["Sync", "Async"]},
            "socket": {"type": "string"},
        },
    },
    # PATCH /drives/{drive_id} — post-boot only.
    "PartialDrive": {
        "type": "object",
        "strict": True,
        "required": ["drive_id"],
        "properties": {
            "drive_id": {"type": "string"},
            "path_on_host": {"type": "string"},
            "rate_limiter": {"$ref": "RateLimiter"},
        },
    },
    # PUT /network-interfaces/{iface_id}
    "NetworkInterface": {
        "type": "object",
        "strict": True,
        "required": ["iface_id", "host_dev_name"],
        "properties": {
            "iface_id": {"type": "string"},
            "host_dev_name": {"type": "string"},
            "guest_mac": {"type": "string", "pattern": MAC_PATTERN},
            "mtu": {"type": "integer", "minimum": 68, "maximum": 65535},
            "rx_rate_limiter": {"$ref": "RateLimiter"},
            "tx_rate_limiter": {"$ref": "RateLimiter"},
        },
    },
    # PUT /vsock — the host side is a UNIX socket Firecracker binds itself.
    "Vsock": {
        "type": "object",
        "strict": True,
        "required": ["guest_cid", "uds_path"],
        "properties": {
            "guest_cid": {"type": "integer", "minimum": 3, "maximum": 0xFFFFFFFF},
            "uds_path": {"type": "string"},
            "vsock_id": {"type": "string", "deprecated": True},
        },
    },
    # PUT /actions
    "InstanceActionInfo": {
        "type": "object",
        "strict": True,
        "required": ["action_type"],
        "properties": {
            "action_type": {"type": "string", "enum": ["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]},
        },
    },
    # PATCH /vm
    "Vm": {
        "type": "object",
        "strict": True,
        "required": ["state"],
        "properties": {"state": {"type": "string", "enum": ["Paused", "Resumed"]}},
    },
    # PUT /snapshot/create — snapshot_type defaults to Full.
    "SnapshotCreateParams": {
        "type": "object",
        "strict": True,
        "required": ["snapshot_path", "mem_file_path"],
        "properties": {
            "snapshot_path": {"type": "string"},
            "mem_file_path": {"type": "string"},
            "snapshot_type": {"type": "string", "enum": ["Full", "Diff"]},
        },
    },
    "MemoryBackend": {
        "type": "object",
        "strict": True,
        "required": ["backend_type", "backend_path"],
        "properties": {
            "backend_type": {"type": "string", "enum": ["File", "Uffd"]},
            "backend_path": {"type": "string"},
        },
    },
    "NetworkOverride": {
        "type": "object",
        "required": ["iface_id", "host_dev_name"],
        "properties": {"iface_id": {"type": "string"}, "host_dev_name": {"type": "string"}},
    },
    "VsockOverride": {
        "type": "object",
        "required": ["uds_path"],
        "properties": {"uds_path": {"type": "string"}},
    },
    # PUT /snapshot/load — exactly one of mem_backend / mem_file_path (checked in the server).
    "SnapshotLoadParams": {
        "type": "object",
        "strict": True,
        "required": ["snapshot_path"],
        "properties": {
            "snapshot_path": {"type": "string"},
            "mem_backend": {"$ref": "MemoryBackend"},
            "mem_file_path": {"type": "string", "deprecated": True},
            "enable_diff_snapshots": {"type": "boolean", "deprecated": True},
            "track_dirty_pages": {"type": "boolean"},
            "resume_vm": {"type": "boolean"},
            "network_overrides": {"type": "array", "items": {"$ref": "NetworkOverride"}},
            "vsock_override": {"$ref": "VsockOverride"},
            "clock_realtime": {"type": "boolean"},
            "huge_pages": {"type": "string", "enum": ["Snapshot", "None", "Transparent", "2M"]},
        },
    },
}

#: (method, path template) -> body definition (None = no body) and the phase in which
#: Firecracker accepts it: "preboot" (before InstanceStart / snapshot load), "postboot"
#: (after), or "any".
ENDPOINTS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/"): {"body": None, "phase": "any"},
    ("GET", "/version"): {"body": None, "phase": "any"},
    ("GET", "/machine-config"): {"body": None, "phase": "any"},
    ("GET", "/vm/config"): {"body": None, "phase": "any"},
    ("PUT", "/logger"): {"body": "Logger", "phase": "preboot"},
    ("PUT", "/machine-config"): {"body": "MachineConfiguration", "phase": "preboot", "boot_path": True},
    ("PUT", "/boot-source"): {"body": "BootSource", "phase": "preboot", "boot_path": True},
    ("PUT", "/drives/{drive_id}"): {"body": "Drive", "phase": "preboot", "boot_path": True},
    ("PATCH", "/drives/{drive_id}"): {"body": "PartialDrive", "phase": "postboot"},
    ("PUT", "/network-interfaces/{iface_id}"): {
        "body": "NetworkInterface",
        "phase": "preboot",
        "boot_path": True,
    },
    ("PUT", "/vsock"): {"body": "Vsock", "phase": "preboot", "boot_path": True},
    ("PUT", "/actions"): {"body": "InstanceActionInfo", "phase": "any"},
    ("PATCH", "/vm"): {"body": "Vm", "phase": "postboot"},
    ("PUT", "/snapshot/create"): {"body": "SnapshotCreateParams", "phase": "postboot"},
    ("PUT", "/snapshot/load"): {"body": "SnapshotLoadParams", "phase": "preboot"},
}

#: Which actions are accepted when (InstanceStart only before boot, the rest after).
ACTION_PHASE = {"InstanceStart": "preboot", "SendCtrlAltDel": "postboot", "FlushMetrics": "postboot"}

# Fault messages, worded as Firecracker words them.
MSG_PREBOOT_ONLY = "The requested operation is not supported after starting the microVM."
MSG_POSTBOOT_ONLY = "The requested operation is not supported before starting the microVM."
MSG_SERDE = "An error occurred when deserializing the json body of a request: {}."
MSG_BAD_ID = "API Resource IDs can only contain alphanumeric characters and underscores."
MSG_EMPTY_ID = "The ID cannot be empty."
MSG_DRIVE_ID_MISMATCH = "The id from the path does not match the id from the body!"
MSG_IFACE_ID_MISMATCH = "The id from the path [{}] does not match the id from the body [{}]!"
MSG_NO_KERNEL = "Start microvm error: Cannot start microvm without kernel configuration."
MSG_LOAD_AFTER_CONFIG = (
    "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources."
)
MSG_EMPTY_BODY = "Empty {} request."
MSG_BAD_PATH = "Invalid request method and/or path: {} {}."
