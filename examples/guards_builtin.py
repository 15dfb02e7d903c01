"""SmolVM's own guards: a shell-aware SafetyGuard and an AuditLog in the state database."""

from smolvm import CommandBlockedError, SmolVM
from smolvm.guards import AuditLog, SafetyGuard

audit = AuditLog()
with SmolVM(callbacks=[SafetyGuard(), audit]) as vm:
    print(vm.run("echo 'rm -rf /' is just text here").output)
    for cmd in ("bash -c 'rm -fr /'", "echo ok && dd if=/dev/zero of=/dev/vda"):
        try:
            vm.run(cmd)
        except CommandBlockedError as exc:
            print("blocked:", exc.message)
    for rec in audit.query(vm_id=vm.vm_id):
        print(rec.status, rec.command)
