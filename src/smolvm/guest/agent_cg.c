/* Command containment: every command session runs in its own cgroup v2 group under
 * CG_CMD (created by init with caps below the VM's memory, a pids cap and a low CPU
 * weight), so a fork bomb, memory hog or spinner in one session never starves the agent,
 * init or the SSH server, which stay in other groups. Killing a session (timeout, kill,
 * host gone) writes cgroup.kill: every process in it dies, including those that escaped
 * with setsid or a double fork. Without cgroup v2 (host tests, other images) commands run
 * uncontained, as before.
 *
 * The agent is single-threaded: to spawn a command into its group it moves itself into
 * the group, posix_spawns (the child inherits the group before it can fork), and moves
 * itself back. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CG_ROOT     "/sys/fs/cgroup"
#define CG_CMD      CG_ROOT "/smolvm-cmd"
#define MAX_PENDING 256
#define MAX_FREE    16

/* Empty groups kept for reuse (creating and removing a cgroup costs more than a command
 * under TCG), with the caps last written to them. */
static struct {
    unsigned id;
    uint64_t pids, mem, weight;
} g_free[MAX_FREE];
static int g_nfree;

static int g_cg = -1;      /* -1 unknown, 0 off, 1 on */
static unsigned g_seq;     /* last group id */
static uint64_t g_mem_cap; /* CG_CMD's memory.max in bytes (0 = "max") */
static unsigned g_pending[MAX_PENDING];

static int write_str(const char *path, const char *s)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = write(fd, s, strlen(s));
    int e = errno;
    close(fd);
    errno = e;
    return n < 0 ? -1 : 0;
}

static int write_u64(const char *dir, const char *file, uint64_t v)
{
    char p[128], s[32];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    snprintf(s, sizeof s, "%llu", (unsigned long long)v);
    return write_str(p, s);
}

int cg_enabled(void)
{
    if (g_cg < 0) {
        g_cg = access(CG_CMD "/cgroup.subtree_control", W_OK) == 0;
        if (g_cg) {
            char buf[32] = {0};
            int fd = open(CG_CMD "/memory.max", O_RDONLY | O_CLOEXEC);
            if (fd >= 0) {
                if (read(fd, buf, sizeof buf - 1) > 0 && buf[0] >= '0' && buf[0] <= '9')
                    g_mem_cap = strtoull(buf, NULL, 10);
                close(fd);
            }
        }
    }
    return g_cg;
}

static void group_path(char *p, size_t n, unsigned id)
{
    snprintf(p, n, CG_CMD "/s%u", id);
}

/* A new session group with its caps (0 = the default: 512 processes, 3/4 of the command
 * memory, CPU weight 100 among sessions); returns its id, or 0 when containment is off. */
unsigned cg_create(uint32_t pids_max, uint32_t mem_mib, uint32_t cpu_weight)
{
    if (!cg_enabled()) return 0;
    char p[96];
    uint64_t mem = mem_mib ? (uint64_t)mem_mib << 20 : (g_mem_cap ? g_mem_cap / 4 * 3 : 0);
    uint64_t pids = pids_max ? pids_max : 512;
    uint64_t weight = cpu_weight ? (cpu_weight < 10000 ? cpu_weight : 10000) : 100;
    if (g_nfree > 0) { /* reuse an empty group; write only the caps that differ */
        g_nfree--;
        unsigned id = g_free[g_nfree].id;
        group_path(p, sizeof p, id);
        if (g_free[g_nfree].pids != pids) write_u64(p, "pids.max", pids);
        if (mem && g_free[g_nfree].mem != mem) write_u64(p, "memory.max", mem);
        if (g_free[g_nfree].weight != weight) write_u64(p, "cpu.weight", weight);
        return id;
    }
    unsigned id = 0;
    for (int tries = 0; tries < 8 && !id; tries++) {
        unsigned cand = ++g_seq ? g_seq : ++g_seq;
        group_path(p, sizeof p, cand);
        if (mkdir(p, 0755) == 0)
            id = cand;
        else if (errno != EEXIST)
            break;
    }
    if (!id) {
        logmsg("cgroup: cannot create a session group (%s); running uncontained", strerror(errno));
        return 0;
    }
    write_u64(p, "pids.max", pids);
    if (mem) {
        write_u64(p, "memory.max", mem);
        write_u64(p, "memory.swap.max", 0);
    }
    write_u64(p, "cpu.weight", weight);
    return id;
}

/* Move the agent into group id (0: back to the root group). */
int cg_move_self(unsigned id)
{
    char p[112], s[24];
    if (id) {
        group_path(p, sizeof p - 16, id);
        strcat(p, "/cgroup.procs");
    } else {
        snprintf(p, sizeof p, CG_ROOT "/cgroup.procs");
    }
    snprintf(s, sizeof s, "%d", (int)getpid());
    return write_str(p, s);
}

/* SIGKILL every process in the group (escaped ones included). */
void cg_kill(unsigned id)
{
    if (!id) return;
    char p[112];
    group_path(p, sizeof p - 16, id);
    strcat(p, "/cgroup.kill");
    if (write_str(p, "1") != 0 && errno != ENOENT)
        logmsg("cgroup.kill s%u: %s", id, strerror(errno));
}

static int try_remove(unsigned id)
{
    char p[96];
    group_path(p, sizeof p, id);
    return rmdir(p) == 0 || errno == ENOENT;
}

static int populated(const char *group)
{
    char p[128], buf[128] = {0};
    snprintf(p, sizeof p, "%s/cgroup.events", group);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n <= 0 || !strstr(buf, "populated 0");
}

static uint64_t read_u64(const char *group, const char *file)
{
    char p[128], buf[32] = {0};
    snprintf(p, sizeof p, "%s/%s", group, file);
    int fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 && buf[0] >= '0' && buf[0] <= '9' ? strtoull(buf, NULL, 10) : UINT64_MAX;
}

/* The session is over: keep its group for reuse (or remove it) once its last process is
 * gone. What it left running in the background yields the CPU to live sessions
 * (weight 1) until then. */
void cg_release(unsigned id)
{
    if (!id) return;
    char p[96];
    group_path(p, sizeof p, id);
    if (!populated(p)) {
        if (g_nfree < MAX_FREE) {
            g_free[g_nfree].id = id;
            g_free[g_nfree].pids = read_u64(p, "pids.max");
            g_free[g_nfree].mem = read_u64(p, "memory.max");
            g_free[g_nfree].weight = read_u64(p, "cpu.weight");
            g_nfree++;
            return;
        }
        if (try_remove(id)) return;
    }
    write_u64(p, "cpu.weight", 1);
    for (int i = 0; i < MAX_PENDING; i++)
        if (!g_pending[i]) {
            g_pending[i] = id;
            return;
        }
    logmsg("cgroup: too many groups waiting for their last process; s%u kept", id);
}

/* Called after reaping: remove released groups that have emptied. */
void cg_sweep(void)
{
    for (int i = 0; i < MAX_PENDING; i++)
        if (g_pending[i] && try_remove(g_pending[i])) g_pending[i] = 0;
}
