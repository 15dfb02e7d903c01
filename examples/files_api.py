"""The guest's filesystem as an API: write, list, read, remove."""

from smolvm import SmolVM

with SmolVM() as vm:
    vm.files.make_dir("/work")
    vm.files.write("/work/notes.txt", "hello\n")
    for f in vm.files.list("/work"):
        print(f.name, f.type, f.size, oct(f.mode))
    print(vm.files.read_text("/work/notes.txt").strip())
    vm.files.remove("/work/notes.txt")
    print("exists after remove:", vm.files.exists("/work/notes.txt"))
