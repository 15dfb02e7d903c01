/* Commands: spawn (no shell interpolation: argv is passed as-is), stream, reap, time out. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

struct proc g_procs[MAX_PROCS];

/* Environment every command starts from (EXEC env entries override these keys). */
static const char *const DEFAULT_ENV[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "TERM=xterm",
    "LANG=C.UTF-8",
    "USER=root",
    "LOGNAME=root",
    NULL,
};

#define MAX_ARGS 4096
#define MAX_ENV  4096
static char *g_argv[MAX_ARGS + 1];
static char *g_given[MAX_ENV];
static char *g_envp[MAX_ENV + 8];

static const char *next_str(const unsigned char **p, const unsigned char *end)
{
    const unsigned char *s = *p;
    const unsigned char *z = memchr(s, 0, (size_t)(end - s));
    if (!z) return NULL;
    *p = z + 1;
    return (const char *)s;
}

static int same_key(const char *a, const char *b)
{
    while (*a && *a == *b && *a != '=') a++, b++;
    return *a == '=' && *b == '=';
}

static const char *env_get(char **envp, const char *key)
{
    size_t k = strlen(key);
    for (; *envp; envp++)
        if (!strncmp(*envp, key, k) && (*envp)[k] == '=') return *envp + k + 1;
    return NULL;
}

/* argv[0] without a '/' is looked up in the command's own PATH (not the agent's). */
static const char *resolve(const char *file, char **envp, char *buf)
{
    if (strchr(file, '/')) return file;
    const char *path = env_get(envp, "PATH");
    if (!path) path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        const char *c = strchr(path, ':');
        size_t len = c ? (size_t)(c - path) : strlen(path);
        if (snprintf(buf, PATH_MAX, "%.*s/%s", (int)len, len ? path : ".", file) < PATH_MAX &&
            access(buf, X_OK) == 0)
            return buf;
        if (!c) break;
        path = c + 1;
    }
    return NULL;
}

static struct proc *proc_find(struct chan *ch, uint32_t sid)
{
    for (int i = 0; i < MAX_PROCS; i++)
        if (g_procs[i].in_use && g_procs[i].ch == ch && g_procs[i].sid == sid) return &g_procs[i];
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void drop_stdin(struct proc *pr)
{
    close_fd(&pr->in_fd);
    free(pr->inb);
    pr->inb = NULL;
    pr->inb_off = pr->inb_len = pr->inb_cap = 0;
}

static void proc_free(struct proc *pr)
{
    close_fd(&pr->out_fd);
    close_fd(&pr->err_fd);
    drop_stdin(pr);
    cg_release(pr->cg); /* background processes it left keep the group until they exit */
    memset(pr, 0, sizeof *pr);
    pr->out_fd = pr->err_fd = pr->in_fd = -1;
}

/* A pty master for EXEC_PTY (window cols x rows); its slave's path goes to sname. */
static int open_pty(unsigned cols, unsigned rows, char *sname, size_t len)
{
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    if (grantpt(m) || unlockpt(m) || ptsname_r(m, sname, len) || ioctl(m, TIOCSWINSZ, &ws)) {
        int e = errno;
        close(m);
        errno = e;
        return -1;
    }
    return m;
}

/* EXEC payload: u32 timeout_ms (0 = none), u32 flags, u16 argc, u16 envc, then
 * NUL-terminated strings: cwd ("" = $HOME or /), argv[argc], env[envc] ("KEY=value"),
 * then u32 pids_max, memory_mib, cpu_weight (EXEC_LIMITS), then u16 cols, rows (EXEC_PTY). */
void proc_exec(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    static char exe[PATH_MAX];
    const unsigned char *q = p + 12, *end = p + n;
    if (n < 12) goto bad;
    uint32_t timeout_ms = get32(p), xflags = get32(p + 4);
    unsigned argc = p[8] | (unsigned)p[9] << 8, envc = p[10] | (unsigned)p[11] << 8;
    const char *cwd = next_str(&q, end);
    if (!cwd || argc == 0 || argc > MAX_ARGS || envc > MAX_ENV) goto bad;
    for (unsigned i = 0; i < argc; i++)
        if (!(g_argv[i] = (char *)next_str(&q, end))) goto bad;
    g_argv[argc] = NULL;
    for (unsigned i = 0; i < envc; i++) {
        g_given[i] = (char *)next_str(&q, end);
        if (!g_given[i] || g_given[i][0] == '=' || !strchr(g_given[i], '=')) goto bad;
    }
    uint32_t lim_pids = 0, lim_mem = 0, lim_cpu = 0;
    if (xflags & EXEC_LIMITS) {
        if (end - q < 12) goto bad;
        lim_pids = get32(q), lim_mem = get32(q + 4), lim_cpu = get32(q + 8);
        q += 12;
    }
    unsigned cols = 0, rows = 0;
    if (xflags & EXEC_PTY) {
        if (end - q < 4) goto bad;
        cols = q[0] | (unsigned)q[1] << 8, rows = q[2] | (unsigned)q[3] << 8;
        if (!cols || !rows) goto bad;
    }
    size_t ne = 0;
    if (!(xflags & EXEC_ENV_REPLACE)) {
        for (const char *const *d = DEFAULT_ENV; *d; d++) {
            unsigned i = 0;
            while (i < envc && !same_key(*d, g_given[i])) i++;
            if (i == envc) g_envp[ne++] = (char *)*d;
        }
    }
    for (unsigned i = 0; i < envc; i++) g_envp[ne++] = g_given[i];
    g_envp[ne] = NULL;

    struct stat st;
    if (!*cwd) {
        const char *home = env_get(g_envp, "HOME");
        cwd = (home && stat(home, &st) == 0 && S_ISDIR(st.st_mode)) ? home : "/";
    } else if (stat(cwd, &st) != 0 || !S_ISDIR(st.st_mode)) {
        emit_error(ch, sid, stat(cwd, &st) != 0 ? errno : ENOTDIR, "cwd %s", cwd);
        return;
    }
    const char *path = resolve(g_argv[0], g_envp, exe);
    if (!path) {
        emit_error(ch, sid, ENOENT, "exec %s", g_argv[0]);
        return;
    }
    struct proc *pr = NULL;
    for (int i = 0; i < MAX_PROCS && !pr; i++)
        if (!g_procs[i].in_use) pr = &g_procs[i];
    if (!pr || proc_find(ch, sid)) {
        emit_error(ch, sid, pr ? EEXIST : EAGAIN, pr ? "stream in use" : "too many processes");
        return;
    }
    int po[2] = {-1, -1}, pe[2] = {-1, -1}, pi[2] = {-1, -1}, pty = -1;
    char sname[64];
    if (xflags & EXEC_PTY) {
        if ((pty = open_pty(cols, rows, sname, sizeof sname)) < 0 ||
            (pi[1] = fcntl(pty, F_DUPFD_CLOEXEC, 3)) < 0) {
            int e = errno;
            close_fd(&pty);
            emit_error(ch, sid, e, "pty");
            return;
        }
    } else if (pipe2(po, O_CLOEXEC) || pipe2(pe, O_CLOEXEC) ||
               ((xflags & EXEC_STDIN) && pipe2(pi, O_CLOEXEC))) {
        int e = errno;
        close_fd(&po[0]), close_fd(&po[1]), close_fd(&pe[0]), close_fd(&pe[1]);
        close_fd(&pi[0]), close_fd(&pi[1]);
        emit_error(ch, sid, e, "pipe");
        return;
    }
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, def;
    posix_spawn_file_actions_init(&fa);
    if (pty >= 0) {
        /* After setsid (glibc and musl run it before file actions): opening the slave makes
         * it the new session's controlling terminal, so job control and ^C work. */
        posix_spawn_file_actions_addopen(&fa, 0, sname, O_RDWR, 0);
        posix_spawn_file_actions_adddup2(&fa, 0, 1);
        posix_spawn_file_actions_adddup2(&fa, 0, 2);
    } else {
        if (pi[0] >= 0)
            posix_spawn_file_actions_adddup2(&fa, pi[0], 0);
        else
            posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, po[1], 1);
        posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    }
    posix_spawn_file_actions_addchdir_np(&fa, cwd);
    posix_spawnattr_init(&at);
    sigemptyset(&none);
    sigemptyset(&def);
    sigaddset(&def, SIGPIPE); /* ignored by the agent; ignored dispositions survive exec */
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &def);
    /* setsid: the command leads its own process group, so timeout/kill reach its children. */
    posix_spawnattr_setflags(&at,
                             POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    pid_t pid;
    /* Spawn into the session's own cgroup (see agent_cg.c): the agent steps in and out. */
    unsigned cg = (xflags & EXEC_HOST) ? 0 : cg_create(lim_pids, lim_mem, lim_cpu);
    if (cg && cg_move_self(cg) != 0) {
        logmsg("cgroup: cannot enter s%u: %s", cg, strerror(errno));
        cg_release(cg);
        cg = 0;
    }
    /* EXEC_LOWPRIO: the child inherits nice 19 from the agent for the spawn's instant (as
     * with the cgroup), so it never runs at the default; root may lower it back after. */
    int nice0 = (xflags & EXEC_LOWPRIO) ? getpriority(PRIO_PROCESS, 0) : 0;
    if ((xflags & EXEC_LOWPRIO) && setpriority(PRIO_PROCESS, 0, 19))
        logmsg("setpriority 19: %s", strerror(errno));
    int rc = posix_spawn(&pid, path, &fa, &at, g_argv, g_envp);
    if ((xflags & EXEC_LOWPRIO) && setpriority(PRIO_PROCESS, 0, nice0))
        logmsg("setpriority %d: %s", nice0, strerror(errno));
    if (cg && cg_move_self(0) != 0) logmsg("cgroup: cannot leave s%u: %s", cg, strerror(errno));
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close_fd(&po[1]), close_fd(&pe[1]), close_fd(&pi[0]);
    if (pty >= 0) po[0] = pty; /* output: the master; input: its dup in pi[1] */
    if (rc) {
        close_fd(&po[0]), close_fd(&pe[0]), close_fd(&pi[1]);
        cg_release(cg);
        emit_error(ch, sid, rc, "exec %s", path);
        return;
    }
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    if (pe[0] >= 0) fcntl(pe[0], F_SETFL, O_NONBLOCK);
    if (pi[1] >= 0) fcntl(pi[1], F_SETFL, O_NONBLOCK);
    memset(pr, 0, sizeof *pr);
    pr->in_use = 1;
    pr->pid = pid;
    pr->ch = ch;
    pr->sid = sid;
    pr->out_fd = po[0];
    pr->err_fd = pe[0];
    pr->in_fd = pi[1];
    pr->deadline = timeout_ms ? now_ms() + timeout_ms : 0;
    pr->cg = cg;
    pr->detached = (xflags & EXEC_DETACH) != 0;
    pr->pty = pty >= 0;
    unsigned char b[4];
    put32(b, (uint32_t)pid);
    emit(ch, OP_STARTED, 0, sid, b, 4);
    return;
bad:
    emit_error(ch, sid, EINVAL, "malformed EXEC request");
}

void proc_write_stdin(struct proc *pr)
{
    while (pr->in_fd >= 0 && pr->inb_off < pr->inb_len) {
        ssize_t w = write(pr->in_fd, pr->inb + pr->inb_off, pr->inb_len - pr->inb_off);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) drop_stdin(pr); /* EPIPE: the command closed its stdin */
            return;
        }
        pr->inb_off += (size_t)w;
    }
    if (pr->inb_off == pr->inb_len) {
        pr->inb_off = pr->inb_len = 0;
        if (pr->inb_cap > (1u << 20)) { /* give big buffers back */
            free(pr->inb);
            pr->inb = NULL;
            pr->inb_cap = 0;
        }
        if (pr->in_eof) close_fd(&pr->in_fd);
    }
}

void proc_stdin(struct chan *ch, uint32_t sid, int flags, const unsigned char *p, size_t n)
{
    struct proc *pr = proc_find(ch, sid);
    if (!pr || pr->in_fd < 0) return;
    if (n) {
        if (pr->inb_len + n > STDIN_CAP) {
            drop_stdin(pr);
            emit_error(ch, sid, ENOBUFS, "stdin: more than %u bytes pending", STDIN_CAP);
            return;
        }
        if (pr->inb_len + n > pr->inb_cap) {
            size_t cap = pr->inb_cap ? pr->inb_cap : 65536;
            while (cap < pr->inb_len + n) cap *= 2;
            unsigned char *nb = realloc(pr->inb, cap);
            if (!nb) {
                drop_stdin(pr);
                emit_error(ch, sid, ENOMEM, "stdin");
                return;
            }
            pr->inb = nb;
            pr->inb_cap = cap;
        }
        memcpy(pr->inb + pr->inb_len, p, n);
        pr->inb_len += n;
    }
    if (flags & FLAG_EOF) pr->in_eof = 1;
    proc_write_stdin(pr);
}

int proc_kill(struct chan *ch, uint32_t sid, int sig)
{
    struct proc *pr = proc_find(ch, sid);
    if (!pr) return 0;
    if (!pr->exited && kill(-pr->pid, sig) != 0) kill(pr->pid, sig);
    if (sig == SIGKILL) cg_kill(pr->cg); /* the whole session, escaped processes too */
    return 1;
}

/* RESIZE: u16 cols, u16 rows. The kernel sends SIGWINCH to the terminal's foreground. */
void proc_resize(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    struct proc *pr = proc_find(ch, sid);
    if (!pr || !pr->pty || pr->out_fd < 0 || n < 4) return;
    struct winsize ws = {.ws_col = (unsigned short)(p[0] | p[1] << 8),
                         .ws_row = (unsigned short)(p[2] | p[3] << 8)};
    if (ws.ws_col && ws.ws_row) ioctl(pr->out_fd, TIOCSWINSZ, &ws);
}

/* The host session is gone: kill its running commands; keep slots until reaped. */
void proc_abandon(struct chan *ch)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *pr = &g_procs[i];
        if (!pr->in_use || pr->ch != ch) continue;
        if (pr->exited) {
            proc_free(pr);
            continue;
        }
        if (pr->detached) { /* keeps running; reaped (and its group removed) when it exits */
            close_fd(&pr->out_fd);
            close_fd(&pr->err_fd);
            drop_stdin(pr);
            pr->ch = NULL;
            continue;
        }
        kill(-pr->pid, SIGKILL);
        kill(pr->pid, SIGKILL);
        cg_kill(pr->cg);
        close_fd(&pr->out_fd);
        close_fd(&pr->err_fd);
        drop_stdin(pr);
        pr->ch = NULL;
    }
}

/* Reap every child (as PID 1 also orphans); ours are reported by proc_finish(). */
void proc_reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_PROCS; i++) {
            struct proc *pr = &g_procs[i];
            if (!pr->in_use || pr->pid != pid || pr->exited) continue;
            if (!pr->ch) {
                proc_free(pr);
            } else {
                pr->exited = 1;
                pr->status = st;
                drop_stdin(pr);
            }
            break;
        }
    }
    cg_sweep();
}

/* Forward one chunk of fd's output, if the channel has room. After the command exited,
 * EAGAIN means "drained" (a background grandchild may hold the pipe open forever). */
void proc_read(struct proc *pr, int fd)
{
    int *slot = fd == pr->out_fd ? &pr->out_fd : &pr->err_fd;
    int op = fd == pr->out_fd ? OP_STDOUT : OP_STDERR;
    if (out_free(pr->ch) < HDR_LEN + CHUNK + OUT_RESERVE) return;
    unsigned char *h = out_reserve(pr->ch, HDR_LEN + CHUNK);
    if (!h) return;
    ssize_t r = read(fd, h + HDR_LEN, CHUNK);
    if (r > 0) {
        out_commit(pr->ch, op, 0, pr->sid, (size_t)r);
        if (pr->exited && (pr->drained += (size_t)r) > POST_EXIT_DRAIN) close_fd(slot);
    } else if (r == 0 || (errno != EINTR && (errno != EAGAIN || pr->exited))) {
        close_fd(slot);
    }
}

/* Groups of finished sessions, released after the main loop flushed their EXIT frames:
 * releasing reads cgroupfs, ~1 ms under TCG that a caller should not wait for. */
static unsigned g_released[MAX_PROCS];
static int g_nreleased;

void proc_release_groups(void)
{
    while (g_nreleased > 0) cg_release(g_released[--g_nreleased]);
}

/* Send EXIT for commands that exited and whose output is drained. */
void proc_finish(void)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *pr = &g_procs[i];
        if (!pr->in_use || !pr->exited || !pr->ch) continue;
        while (pr->out_fd >= 0 && out_free(pr->ch) >= HDR_LEN + CHUNK + OUT_RESERVE)
            proc_read(pr, pr->out_fd);
        while (pr->err_fd >= 0 && out_free(pr->ch) >= HDR_LEN + CHUNK + OUT_RESERVE)
            proc_read(pr, pr->err_fd);
        if (pr->out_fd >= 0 || pr->err_fd >= 0 || out_free(pr->ch) < OUT_RESERVE) continue;
        unsigned char b[12];
        int st = pr->status, sig = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
        put32(b, (uint32_t)(sig ? 128 + sig : WEXITSTATUS(st)));
        put32(b + 4, (pr->timed_out ? XF_TIMED_OUT : 0) | (sig ? XF_SIGNALED : 0));
        put32(b + 8, (uint32_t)sig);
        emit(pr->ch, OP_EXIT, 0, pr->sid, b, sizeof b);
        if (pr->cg && g_nreleased < MAX_PROCS) {
            g_released[g_nreleased++] = pr->cg;
            pr->cg = 0;
        }
        proc_free(pr);
    }
}

void proc_timeouts(int64_t now)
{
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *pr = &g_procs[i];
        if (!pr->in_use || pr->exited || !pr->deadline || now < pr->deadline) continue;
        kill(-pr->pid, SIGKILL);
        kill(pr->pid, SIGKILL);
        cg_kill(pr->cg);
        pr->timed_out = 1;
        pr->deadline = 0;
    }
}

int64_t proc_next_deadline(void)
{
    int64_t d = 0;
    for (int i = 0; i < MAX_PROCS; i++) {
        struct proc *pr = &g_procs[i];
        if (pr->in_use && !pr->exited && pr->deadline && (!d || pr->deadline < d)) d = pr->deadline;
    }
    return d;
}
