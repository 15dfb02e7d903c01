"""24 rollouts of a script, each in a fresh sandbox started from one prepared snapshot,
spread over a Ray cluster (here: a local one; set RAY_ADDRESS to use yours)."""

from smolvm.fleet import Fleet

ROLLOUT = "python3 -c 'import random, sys; random.seed(int(sys.argv[1])); print(random.randint(0, 99))' {}"

with Fleet(per_node=4) as fleet:
    with fleet.sandbox() as sb:  # prepare the environment once ...
        sb.files.write("/root/task.txt", "guess a number\n")
        sb.snapshot("prepared")  # ... and make it a cluster-wide template
    results = fleet.map([ROLLOUT.format(seed) for seed in range(24)], snapshot="prepared")
    print("rollouts:", len(results), "all ok:", all(r.exit_code == 0 for r in results))
    print("first three:", [r.output for r in results[:3]])
    print("nodes:", len(fleet.nodes()))
