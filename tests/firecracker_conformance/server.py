"""A stand-in for the ``firecracker`` binary that checks every API request it receives.

It serves Firecracker's REST API (HTTP/1.1 over the ``--api-sock`` UNIX socket) for the
endpoints in ``schema.py`` and behaves as Firecracker does:

* bodies are validated against the schema (required fields, types, enums, unknown fields
  rejected) and bad requests get ``400 {"fault_message": ...}``; good ones ``204``;
* state rules: boot-time resources and ``/snapshot/load`` only before boot; ``/snapshot/load``
  only on a fresh process (nothing but the logger configured); ``InstanceStart`` needs a
  boot source; ``PATCH /vm``, ``/snapshot/create`` and ``SendCtrlAltDel`` only after boot;
  ``/snapshot/create`` only while paused; files named in requests must exist;
* the vsock UDS is bound at ``PUT /vsock`` (fails if the path exists) and speaks the
  ``CONNECT <port>\\n`` / ``OK <n>\\n`` handshake for ports the fake "guest" listens on;
* stdout is the guest serial console (boot messages after ``InstanceStart``), and a
  ``SendCtrlAltDel`` reboots the "guest", which ends the process (``reboot=k``) — unless
  the kernel command line disabled the keyboard controller (``i8042.nokbd``);
* a failed snapshot load ends the process, as Firecracker's does.

Every request is recorded as one JSON line (method, path, body, status, fault) in
``$FAKE_FC_RECORD`` or ``<api-sock>.requests.jsonl``.

Environment knobs (for tests): ``FAKE_FC_FAULTS`` — JSON object ``{"PUT /boot-source":
"message"}`` answering those requests with 400; ``FAKE_FC_VSOCK_PORTS`` — comma-separated
guest ports that accept connections (echo); ``FAKE_FC_SERIAL`` — text printed on the
serial console after boot; ``FAKE_FC_CHECK_TAP=1`` — require ``/sys/class/net/<tap>``.

Run as ``firecracker --api-sock PATH --id ID`` (see the ``firecracker`` script next to this
file) or in-process via :class:`FakeFirecracker`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from firecracker_conformance import schema as S
from firecracker_conformance.validator import validate

VERSION = "1.17.0-conformance"
_API_ID = re.compile(r"^[A-Za-z0-9_]+$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
VMSTATE_MAGIC = "fake-firecracker-vmstate/1"
MIB = 1 << 20


class ApiFault(Exception):
    def __init__(self, message: str, status: int = 400, fatal: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.fatal = fatal


def _os_err(exc: OSError) -> str:
    return f"{exc.strerror} (os error {exc.errno})"


def _match(template: str, path: str) -> dict[str, str] | None:
    t_parts = template.strip("/").split("/") if template != "/" else [""]
    p_parts = path.strip("/").split("/") if path != "/" else [""]
    if len(t_parts) != len(p_parts):
        return None
    params: dict[str, str] = {}
    for t, p in zip(t_parts, p_parts, strict=True):
        if t.startswith("{") and t.endswith("}"):
            params[t[1:-1]] = p
        elif t != p:
            return None
    return params


class FakeFirecracker:
    """The API state machine plus its sockets. ``handle()`` is usable without HTTP."""

    def __init__(
        self,
        api_sock: str | Path,
        instance_id: str = "anonymous-instance",
        *,
        record_path: str | Path | None = None,
        serial: BinaryIO | None = None,
        faults: dict[str, str] | None = None,
        vsock_ports: set[int] | None = None,
        serial_extra: str = "",
        check_tap: bool = False,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.api_sock = str(api_sock)
        self.instance_id = instance_id
        self.record_path = str(record_path) if record_path else self.api_sock + ".requests.jsonl"
        self.serial = serial if serial is not None else sys.stdout.buffer
        self.faults = dict(faults or {})
        self.vsock_ports = set(vsock_ports or ())
        self.serial_extra = serial_extra
        self.check_tap = check_tap
        self.on_exit = on_exit
        self.lock = threading.RLock()
        self.requests: list[dict[str, Any]] = []
        # VM state
        self.state = "Not started"
        self.boot_path = False
        self.machine_config: dict[str, Any] = {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                               "track_dirty_pages": False}  # fmt: skip
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.net: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.logger_path: str | None = None
        self.pending_reboot = False
        self.exited: int | None = None
        self._vsock_listener: socket.socket | None = None
        self._server: socketserver.BaseServer | None = None
        self._log("Running Firecracker v" + VERSION)

    # -- output ---------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.instance_id}:main] {msg}\n"
        if self.logger_path:
            try:
                with open(self.logger_path, "a") as f:
                    f.write(line)
            except OSError:
                pass
        else:  # Firecracker logs to stdout until PUT /logger names a file
            self._serial(line)

    def _serial(self, text: str) -> None:
        try:
            self.serial.write(text.encode())
            self.serial.flush()
        except (OSError, ValueError):
            pass

    def _record(self, entry: dict[str, Any]) -> None:
        self.requests.append(entry)
        try:
            with open(self.record_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            pass

    # -- request entry point ------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        with self.lock:
            body: Any = None
            status, answer, fatal = 204, None, False
            try:
                if raw:
                    try:
                        body = json.loads(raw)
                    except ValueError as exc:
                        body = raw.decode("utf-8", "replace")
                        raise ApiFault(
                            S.MSG_SERDE.format(f"{exc.msg} at line {exc.lineno} column {exc.colno}")
                        ) from None
                answer = self._dispatch(method, path, body)
                status = 200 if answer is not None else 204
            except ApiFault as f:
                status, answer, fatal = f.status, {"fault_message": f.message}, f.fatal
            entry = {"t": time.time(), "method": method, "path": path, "body": body, "status": status}
            if status >= 400 and answer:
                entry["fault_message"] = answer["fault_message"]
                self._log(f"Received Error. Status code: {status}. Message: {answer['fault_message']}")
            else:
                self._log(f"The API server received a {method} request on {path!r}.")
            self._record(entry)
            if fatal:
                self._exit_soon(1)
            return status, answer

    def _dispatch(self, method: str, path: str, body: Any) -> dict[str, Any] | None:
        key = f"{method} {path}"
        if key in self.faults:
            raise ApiFault(self.faults[key])
        endpoint = None
        params: dict[str, str] = {}
        for (m, template), spec in S.ENDPOINTS.items():
            if m == method:
                got = _match(template, path)
                if got is not None:
                    endpoint, params = (template, spec), got
                    break
        if endpoint is None:
            raise ApiFault(S.MSG_BAD_PATH.format(method, path))
        template, spec = endpoint
        if spec["body"] is None:
            if body is not None and method == "GET":
                raise ApiFault("GET request cannot have a body.")
        else:
            if body is None:
                raise ApiFault(S.MSG_EMPTY_BODY.format(method))
            for value in params.values():
                if not value:
                    raise ApiFault(S.MSG_EMPTY_ID)
                if not _API_ID.match(value):
                    raise ApiFault(S.MSG_BAD_ID)
            err = validate(body, spec["body"])
            if err:
                raise ApiFault(S.MSG_SERDE.format(err))
        phase = spec["phase"]
        if template == "/actions":
            phase = S.ACTION_PHASE[body["action_type"]]
        started = self.state != "Not started"
        if phase == "preboot" and started:
            raise ApiFault(S.MSG_PREBOOT_ONLY)
        if phase == "postboot" and not started:
            raise ApiFault(S.MSG_POSTBOOT_ONLY)
        handler = getattr(self, "_h_" + re.sub(r"[^a-z]+", "_", f"{method.lower()} {template}").strip("_"))
        result = handler(body, **params)
        if spec.get("boot_path"):
            self.boot_path = True
        return result

    # -- GET ------------------------------------------------------------------------------

    def _h_get(self, body: Any) -> dict[str, Any]:
        return {"app_name": "Firecracker", "id": self.instance_id, "state": self.state,
                "vmm_version": VERSION}  # fmt: skip

    def _h_get_version(self, body: Any) -> dict[str, Any]:
        return {"firecracker_version": VERSION}

    def _h_get_machine_config(self, body: Any) -> dict[str, Any]:
        return dict(self.machine_config)

    def _h_get_vm_config(self, body: Any) -> dict[str, Any]:
        return {
            "boot-source": self.boot_source,
            "machine-config": self.machine_config,
            "drives": list(self.drives.values()),
            "network-interfaces": list(self.net.values()),
            "vsock": self.vsock,
        }

    # -- pre-boot configuration -----------------------------------------------------------

    def _h_put_logger(self, body: dict[str, Any]) -> None:
        if "log_path" in body:
            try:
                with open(body["log_path"], "a"):
                    pass
            except OSError as exc:
                raise ApiFault(f"Logger error: Failed to open target file: {_os_err(exc)}") from None
            self.logger_path = body["log_path"]

    def _h_put_machine_config(self, body: dict[str, Any]) -> None:
        vcpus = body["vcpu_count"]
        if body.get("smt") and vcpus != 1 and vcpus % 2:
            raise ApiFault("Machine config error: The vCPU number is invalid! The vCPU number can "
                           "only be 1 or an even number when SMT is enabled.")  # fmt: skip
        self.machine_config = {"vcpu_count": vcpus, "mem_size_mib": body["mem_size_mib"],
                               "smt": body.get("smt", False),
                               "track_dirty_pages": body.get("track_dirty_pages", False)}  # fmt: skip

    def _h_put_boot_source(self, body: dict[str, Any]) -> None:
        for field, what in (("kernel_image_path", "The kernel file cannot be opened"),
                            ("initrd_path", "The initrd file cannot be opened due to invalid path or invalid permissions.")):  # fmt: skip
            if field in body:
                try:
                    with open(body[field], "rb"):
                        pass
                except OSError as exc:
                    sep = ": " if field == "kernel_image_path" else " "
                    raise ApiFault(f"Boot source error: {what}{sep}{_os_err(exc)}") from None
        if len(body.get("boot_args", "")) > 2048:
            raise ApiFault("Boot source error: The kernel command line is invalid: too long")
        self.boot_source = dict(body)

    def _h_put_drives_drive_id(self, body: dict[str, Any], drive_id: str) -> None:
        if body["drive_id"] != drive_id:
            raise ApiFault(S.MSG_DRIVE_ID_MISMATCH)
        if "socket" in body:
            if "path_on_host" in body or "is_read_only" in body:
                raise ApiFault("Drive config error: vhost-user-block takes `socket` only")
        else:
            for field in ("path_on_host", "is_read_only"):
                if field not in body:
                    raise ApiFault(S.MSG_SERDE.format(f"missing field `{field}` (required for virtio-block)"))
            try:
                with open(body["path_on_host"], "rb" if body["is_read_only"] else "r+b"):
                    pass
            except OSError as exc:
                raise ApiFault("Drive config error: Unable to create the virtio block device: "
                               f"Virtio backend error: Error manipulating the backing file: "
                               f"{_os_err(exc)} {body['path_on_host']}") from None  # fmt: skip
        if body["is_root_device"]:
            for other in self.drives.values():
                if other["is_root_device"] and other["drive_id"] != drive_id:
                    raise ApiFault("Drive config error: A root block device already exists!")
        self.drives[drive_id] = dict(body)

    def _h_put_network_interfaces_iface_id(self, body: dict[str, Any], iface_id: str) -> None:
        if body["iface_id"] != iface_id:
            raise ApiFault(S.MSG_IFACE_ID_MISMATCH.format(iface_id, body["iface_id"]))
        mac = body.get("guest_mac")
        if mac and any(n.get("guest_mac", "").lower() == mac.lower() and n["iface_id"] != iface_id
                       for n in self.net.values()):  # fmt: skip
            raise ApiFault(f"Network config error: The MAC address is already in use: {mac}")
        if self.check_tap and not os.path.exists(f"/sys/class/net/{body['host_dev_name']}"):
            raise ApiFault("Network config error: Cannot open/create the tap device: Open tap "
                           "device failed: No such device (os error 19)")  # fmt: skip
        self.net[iface_id] = dict(body)

    def _h_put_vsock(self, body: dict[str, Any]) -> None:
        self._bind_vsock(body["uds_path"], fatal=False)
        self.vsock = {"guest_cid": body["guest_cid"], "uds_path": body["uds_path"]}

    def _bind_vsock(self, uds_path: str, fatal: bool) -> None:
        if self._vsock_listener is not None:
            self._vsock_listener.close()
            self._vsock_listener = None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(uds_path)
        except OSError as exc:
            s.close()
            prefix = ("Load snapshot error: Failed to restore from snapshot: Failed to restore "
                      "vsock device: " if fatal else "Vsock config error: ")  # fmt: skip
            raise ApiFault(
                f"{prefix}Cannot create backend for vsock device: Error binding to the host-side "
                f"Unix socket: {_os_err(exc)}", fatal=fatal) from None  # fmt: skip
        s.listen(8)
        self._vsock_listener = s
        threading.Thread(target=self._vsock_accept, args=(s,), daemon=True).start()

    def _vsock_accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._vsock_conn, args=(conn,), daemon=True).start()

    def _vsock_conn(self, conn: socket.socket) -> None:
        with conn:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            m = re.match(rb"^CONNECT (\d+)\n$", line)
            if not m or self.state != "Running" or int(m.group(1)) not in self.vsock_ports:
                return  # Firecracker just closes: bad handshake or nobody listens in the guest
            conn.sendall(b"OK 1073741824\n")
            while True:  # the fake guest service echoes
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    # -- actions --------------------------------------------------------------------------

    def _h_put_actions(self, body: dict[str, Any]) -> None:
        action = body["action_type"]
        if action == "InstanceStart":
            if self.boot_source is None:
                raise ApiFault(S.MSG_NO_KERNEL)
            self.state = "Running"
            mc = self.machine_config
            self._serial(
                "[    0.000000] Linux version 6.1.0-fake (Firecracker conformance server)\n"
                f"[    0.000000] Command line: {self.boot_source.get('boot_args', '')}\n"
                f"[    0.000000] Memory: {mc['mem_size_mib']} MiB, {mc['vcpu_count']} vCPU(s), "
                f"{len(self.drives)} virtio-blk, {len(self.net)} virtio-net, "
                f"vsock {'yes' if self.vsock else 'no'}\n"
            )
            if self.serial_extra:
                self._serial(
                    self.serial_extra if self.serial_extra.endswith("\n") else self.serial_extra + "\n"
                )
        elif action == "SendCtrlAltDel":
            args = (self.boot_source or {}).get("boot_args", "")
            if "i8042.nokbd" in args.split():
                return  # no keyboard controller driver in the guest: the keystroke is lost
            if self.state == "Paused":
                self.pending_reboot = True
            else:
                self._reboot()
        # FlushMetrics: nothing to flush

    def _reboot(self) -> None:
        self._serial("reboot: Restarting system\n")
        self._exit_soon(0)

    def _h_patch_vm(self, body: dict[str, Any]) -> None:
        self.state = "Paused" if body["state"] == "Paused" else "Running"
        if self.state == "Running" and self.pending_reboot:
            self.pending_reboot = False
            self._reboot()

    def _h_patch_drives_drive_id(self, body: dict[str, Any], drive_id: str) -> None:
        if body["drive_id"] != drive_id:
            raise ApiFault(S.MSG_DRIVE_ID_MISMATCH)
        if drive_id not in self.drives:
            raise ApiFault("Drive config error: No block device with the given ID exists.")
        if "path_on_host" in body:
            try:
                with open(body["path_on_host"], "rb"):
                    pass
            except OSError as exc:
                raise ApiFault(
                    f"Drive config error: Unable to patch the block device: {_os_err(exc)}"
                ) from None
            self.drives[drive_id]["path_on_host"] = body["path_on_host"]

    # -- snapshots ------------------------------------------------------------------------

    def _h_put_snapshot_create(self, body: dict[str, Any]) -> None:
        if self.state != "Paused":
            raise ApiFault("Create snapshot error: Cannot save the microVM state: the microVM "
                           f"must be paused first (PATCH /vm Paused); it is {self.state}")  # fmt: skip
        if body.get("snapshot_type", "Full") == "Diff" and not self.machine_config.get("track_dirty_pages"):
            raise ApiFault("Create snapshot error: Diff snapshots are not allowed on uVMs with "
                           "dirty page tracking disabled.")  # fmt: skip
        vmstate = {
            "magic": VMSTATE_MAGIC,
            "machine_config": self.machine_config,
            "boot_source": self.boot_source,
            "drives": self.drives,
            "net": self.net,
            "vsock": self.vsock,
        }
        try:
            with open(body["snapshot_path"], "w") as f:
                json.dump(vmstate, f)
        except OSError as exc:
            raise ApiFault("Create snapshot error: Cannot perform open on the snapshot backing "
                           f"file: {_os_err(exc)}") from None  # fmt: skip
        try:
            with open(body["mem_file_path"], "wb") as f:
                f.truncate(self.machine_config["mem_size_mib"] * MIB)  # sparse
        except OSError as exc:
            raise ApiFault("Create snapshot error: Cannot perform open on the memory backing "
                           f"file: {_os_err(exc)}") from None  # fmt: skip

    def _h_put_snapshot_load(self, body: dict[str, Any]) -> None:
        if ("mem_backend" in body) == ("mem_file_path" in body):
            which = "too many fields: either `mem_backend` or `mem_file_path` exclusively is required" \
                if "mem_backend" in body else "missing field: either `mem_backend` or `mem_file_path` is required"  # fmt: skip
            raise ApiFault(S.MSG_SERDE.format(which))
        if self.boot_path:
            raise ApiFault(S.MSG_LOAD_AFTER_CONFIG)
        fail = "Load snapshot error: Failed to restore from snapshot: "
        try:
            with open(body["snapshot_path"]) as f:
                vmstate = json.load(f)
            if vmstate.get("magic") != VMSTATE_MAGIC:
                raise ValueError("bad magic")
        except OSError as exc:
            raise ApiFault(f"{fail}Failed to get snapshot state from file: Failed to open snapshot "
                           f"file: {_os_err(exc)}", fatal=True) from None  # fmt: skip
        except ValueError:
            raise ApiFault(f"{fail}Failed to get snapshot state from file: invalid snapshot data",
                           fatal=True) from None  # fmt: skip
        mem = body.get("mem_backend") or {"backend_type": "File", "backend_path": body["mem_file_path"]}
        want = vmstate["machine_config"]["mem_size_mib"] * MIB
        if mem["backend_type"] == "File":
            try:
                size = os.stat(mem["backend_path"]).st_size
            except OSError as exc:
                raise ApiFault(f"{fail}Failed to load guest memory: Cannot open the memory file: "
                               f"{_os_err(exc)}", fatal=True) from None  # fmt: skip
            if size != want:
                raise ApiFault(f"{fail}Failed to load guest memory: memory file is {size} bytes, "
                               f"the snapshot needs {want}", fatal=True)  # fmt: skip
        net = {k: dict(v) for k, v in vmstate.get("net", {}).items()}
        for ov in body.get("network_overrides", []):
            if ov["iface_id"] not in net:
                raise ApiFault(f"{fail}Invalid network override: no interface {ov['iface_id']!r} in "
                               "the snapshot", fatal=True)  # fmt: skip
            net[ov["iface_id"]]["host_dev_name"] = ov["host_dev_name"]
        vsock = dict(vmstate["vsock"]) if vmstate.get("vsock") else None
        if "vsock_override" in body:
            if vsock is None:
                raise ApiFault(f"{fail}Invalid vsock override: the snapshot has no vsock device", fatal=True)
            vsock["uds_path"] = body["vsock_override"]["uds_path"]
        drives = vmstate.get("drives", {})
        for d in drives.values():
            if "path_on_host" in d:
                try:
                    with open(d["path_on_host"], "rb"):
                        pass
                except OSError as exc:
                    raise ApiFault(f"{fail}Failed to restore block device {d['drive_id']}: "
                                   f"{_os_err(exc)} {d['path_on_host']}", fatal=True) from None  # fmt: skip
        if vsock is not None:
            self._bind_vsock(vsock["uds_path"], fatal=True)
        self.machine_config = vmstate["machine_config"]
        self.boot_source = vmstate.get("boot_source")
        self.drives, self.net, self.vsock = drives, net, vsock
        self.state = "Running" if body.get("resume_vm") else "Paused"

    # -- process --------------------------------------------------------------------------

    def _exit_soon(self, code: int) -> None:
        self.exited = code

        def go() -> None:
            time.sleep(0.05)  # let the HTTP answer go out first
            self.close()
            if self.on_exit is not None:
                self.on_exit(code)

        threading.Thread(target=go, daemon=True).start()

    def close(self) -> None:
        if self._vsock_listener is not None:
            self._vsock_listener.close()
            self._vsock_listener = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- HTTP -----------------------------------------------------------------------------

    def make_server(self) -> socketserver.BaseServer:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "Firecracker API"
            sys_version = ""

            def _serve(self) -> None:
                if fake.exited is not None:  # the process is going away: no answer
                    self.close_connection = True
                    return
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                status, answer = fake.handle(self.command, self.path, raw)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hung up is not the server's problem

        self._server = Server(self.api_sock, Handler)
        return self._server

    def serve_in_thread(self) -> threading.Thread:
        server = self.make_server()
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="firecracker", description=__doc__.splitlines()[0])
    p.add_argument("--api-sock", default="/run/firecracker.socket")
    p.add_argument("--id", default="anonymous-instance")
    args, _ignored = p.parse_known_args(argv)  # --level, --log-path, --no-seccomp, ...
    if not _INSTANCE_ID.match(args.id):
        print(f"thread 'main' panicked: Invalid instance ID: {args.id!r}", file=sys.stderr)
        return 101
    if os.path.exists(args.api_sock):
        print(f"Failed to open the API socket at: {args.api_sock}. Check that it is not already used.",
              file=sys.stderr)  # fmt: skip
        return 1
    faults = json.loads(os.environ.get("FAKE_FC_FAULTS") or "{}")
    ports = {int(x) for x in os.environ.get("FAKE_FC_VSOCK_PORTS", "").split(",") if x.strip()}
    done = threading.Event()
    code = [0]

    def on_exit(c: int) -> None:
        code[0] = c
        done.set()

    fake = FakeFirecracker(
        args.api_sock, args.id,
        record_path=os.environ.get("FAKE_FC_RECORD") or None,
        faults=faults, vsock_ports=ports,
        serial_extra=os.environ.get("FAKE_FC_SERIAL", "").replace("\\n", "\n"),
        check_tap=os.environ.get("FAKE_FC_CHECK_TAP") == "1",
        on_exit=on_exit,
    )  # fmt: skip
    fake.serve_in_thread()
    done.wait()
    sys.stdout.flush()
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
