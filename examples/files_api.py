"""The guest's filesystem as an API: write, list, read, watch, remove; and a terminal."""

from smolvm import SmolVM

with SmolVM() as vm:
    vm.files.make_dir("/work")
    with vm.files.watch("/work") as changes:  # inotify in the guest agent
        vm.files.write("/work/notes.txt", "hello\n")
        for f in vm.files.list("/work"):
            print(f.name, f.type, f.size, oct(f.mode))
        print(vm.files.read_text("/work/notes.txt").strip())
        vm.files.remove("/work/notes.txt")
        print("exists after remove:", vm.files.exists("/work/notes.txt"))
        seen = []
        while (ev := changes.get(timeout=1)) is not None:
            seen.append(ev.type)
        print("changes seen:", "create" in seen, "remove" in seen)
    with vm.pty() as term:  # an interactive login shell on a pseudo-terminal
        term.write("echo $((6 * 7))\n")
        print("terminal says", term.read_until("42\r\n", timeout=30).split()[-1].decode())
