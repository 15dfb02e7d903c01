/* SmolVM guest agent: a static, single-threaded poll() loop serving the command channel.
 *
 * Channels: every virtio-serial port named "smolvm.agent", "smolvm.agent.<N>" or "agent"
 * (each a byte stream that outlives host connections; QEMU's chardev serves one host
 * client per port, so the host exposes several and each process takes a free one),
 * AF_VSOCK port 52 (one session per connection) and, for host tests, --listen-unix PATH /
 * --stream-fd N. Every channel has its own sessions. Frames are described in agent.h.
 *
 * Sessions: a host starts each connection with SYNC_MAGIC + HELLO. On a persistent stream
 * a HELLO (or the host hanging up) ends the previous session: its running commands are
 * SIGKILLed (whole process group), unfinished uploads are deleted, queued output dropped.
 *
 * Commands: posix_spawn (vfork speed; no shell: argv as given) with setsid, stdout/stderr
 * pipes and stdin from a pipe or /dev/null. Output is read only while the channel's output
 * buffer has room, so a fast producer blocks on its pipe instead of filling agent memory.
 * EXIT is sent when the command's main process has exited and its pipes are drained; a
 * background grandchild that keeps the pipes open does not delay it. timeout_ms SIGKILLs
 * the process group and flags EXIT as timed out.
 *
 * Usage: agent --pid1 [--ready-wait-port N]         (PID 1 in the guest)
 *        agent --listen-unix PATH [--dry-run-time]  (tests on the host)
 *        options: --guest (vport+vsock without PID 1 duties), --vsock-port N (0 = off),
 *                 --port-name NAME, --stream-fd N
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* <linux/vm_sockets.h> is not in musl's include path. */
#define AF_VSOCK_       40
#define VMADDR_CID_ANY_ 0xFFFFFFFFu
struct sockaddr_vm_ {
    unsigned short svm_family, svm_reserved1;
    unsigned int svm_port, svm_cid;
    unsigned char svm_zero[4];
};

int g_pid1, g_dry_time, g_shutdown;
static int g_sigfd = -1, g_unix_fd = -1, g_vsock_fd = -1;
static const char *g_unix_path;
#define MAX_VPORTS 8
static struct {
    struct chan *ch;
    char dev[72];
} g_vports[MAX_VPORTS];
static int g_nvports;
static const char *g_port_name;
static int g_guest, g_vsock_port = 52, g_ready_port = -1, g_ready_done;
static int64_t g_start, g_next_scan, g_next_check;

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v, p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16), p[3] = (unsigned char)(v >> 24);
}

uint32_t get32(const unsigned char *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void put64(unsigned char *p, uint64_t v)
{
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

uint64_t get64(const unsigned char *p)
{
    return get32(p) | (uint64_t)get32(p + 4) << 32;
}

void logmsg(const char *fmt, ...)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "smolvm-agent: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    (void)!write(2, buf, (size_t)n);
}

static void on_signal(int sig)
{
    (void)sig;
} /* never runs: signals are blocked */

static void setup_signals(void)
{
    static const int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGIO};
    struct sigaction sa;
    sigset_t set;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* PID 1 only gets signals it has a handler for */
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
        sigaction(sigs[i], &sa, NULL);
        sigaddset(&set, sigs[i]);
    }
    sigprocmask(SIG_BLOCK, &set, NULL);
    g_sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
}

static int listen_unix(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path) return -1;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    unlink(path);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

static int listen_vsock(unsigned port)
{
    struct sockaddr_vm_ sa = {
        .svm_family = AF_VSOCK_, .svm_port = port, .svm_cid = VMADDR_CID_ANY_};
    int fd = socket(AF_VSOCK_, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

static int port_wanted(const char *name)
{
    if (g_port_name) return !strcmp(name, g_port_name);
    return !strcmp(name, "smolvm.agent") || !strncmp(name, "smolvm.agent.", 13) ||
           !strcmp(name, "agent");
}

static int vport_known(const char *dev)
{
    for (int i = 0; i < g_nvports; i++)
        if (!strcmp(g_vports[i].dev, dev)) return 1;
    return 0;
}

/* Open every agent port not open yet: /sys/class/virtio-ports/vportNpM/name is the port's
 * name, /dev/vportNpM its device. */
static void scan_vports(void)
{
    char p[300], name[128];
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return;
    struct dirent *e;
    while (g_nvports < MAX_VPORTS && (e = readdir(d))) {
        if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof g_vports[0].dev ||
            vport_known(e->d_name))
            continue;
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
        int nf = open(p, O_RDONLY | O_CLOEXEC);
        if (nf < 0) continue;
        ssize_t r = read(nf, name, sizeof name - 1);
        close(nf);
        if (r <= 0) continue;
        name[r] = 0;
        name[strcspn(name, "\n")] = 0;
        if (!port_wanted(name)) continue;
        snprintf(p, sizeof p, "/dev/%s", e->d_name);
        int fd = open(p, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        if (fd < 0) continue; /* device node not there yet: the next scan retries */
        struct chan *ch = chan_open(fd, CH_PERSIST, 1);
        if (!ch) {
            close(fd);
            break;
        }
        g_vports[g_nvports].ch = ch;
        strcpy(g_vports[g_nvports++].dev, e->d_name);
    }
    closedir(d);
}

/* The host closed the port: it sends SIGIO on reconnect (O_ASYNC); poll would spin on
 * POLLHUP, so the port leaves the poll set until then. A host that reconnected before
 * O_ASYNC was armed sends no SIGIO: one look right after arming catches it (a pool VM
 * resumed with its old host's close and its new host's open both pending waited for the
 * 100 ms check before). That check and a slow timer remain the fallback. */
static void vport_hangup(struct chan *ch)
{
    if (ch->disconnected) return;
    chan_end_session(ch);
    ch->disconnected = 1;
    fcntl(ch->fd, F_SETOWN, getpid());
    fcntl(ch->fd, F_SETFL, O_RDWR | O_NONBLOCK | O_ASYNC);
    g_next_check = now_ms() + 100;
    struct pollfd p = {.fd = ch->fd, .events = POLLIN};
    if (poll(&p, 1, 0) >= 0 && !(p.revents & POLLHUP)) {
        ch->disconnected = 0;
        fcntl(ch->fd, F_SETFL, O_RDWR | O_NONBLOCK); /* SIGIO per frame costs latency */
    }
}

static int vports_down(void)
{
    for (int i = 0; i < g_nvports; i++)
        if (g_vports[i].ch->disconnected) return 1;
    return 0;
}

static void vports_check(void)
{
    g_next_check = now_ms() + 1000;
    for (int i = 0; i < g_nvports; i++) {
        struct chan *ch = g_vports[i].ch;
        struct pollfd p = {.fd = ch->fd, .events = POLLIN};
        if (ch->disconnected && poll(&p, 1, 0) >= 0 && !(p.revents & POLLHUP)) {
            ch->disconnected = 0;
            fcntl(ch->fd, F_SETFL, O_RDWR | O_NONBLOCK); /* SIGIO per frame costs latency */
        }
    }
}

static int port_listening(int port)
{
    static const char *const files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    char line[256];
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "re");
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            unsigned lport, st;
            char *c = strchr(line, ':'); /* "  N: ADDR:PORT REM:PORT ST" */
            c = c ? strchr(c + 1, ':') : NULL;
            if (c && sscanf(c + 1, "%x %*s %x", &lport, &st) == 2 && (int)lport == port &&
                st == 0x0A) {
                fclose(f);
                return 1;
            }
        }
        fclose(f);
    }
    return 0;
}

static void ready_check(int64_t now)
{
    int have = g_nvports || g_vsock_fd >= 0 || g_unix_fd >= 0;
    for (int i = 0; i < MAX_CHANS && !have; i++) have = g_chans[i].in_use;
    if (!have && now < g_start + 5000) return;
    if (g_ready_port >= 0 && now < g_start + 5000 && !port_listening(g_ready_port)) return;
    g_ready_done = 1;
    static const char msg[] = "SMOLVM_READY\n";
    int fd = g_guest ? open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC) : 1;
    if (fd >= 0) {
        (void)!write(fd, msg, sizeof msg - 1);
        if (fd != 1) close(fd);
    }
}

static void wait_children(int ms)
{
    int64_t end = now_ms() + ms;
    struct timespec ts = {0, 10 * 1000000};
    while (now_ms() < end) {
        pid_t p = waitpid(-1, NULL, WNOHANG);
        if (p < 0 && errno == ECHILD) return;
        if (p <= 0) nanosleep(&ts, NULL);
    }
}

static void do_shutdown(void)
{
    int64_t end = now_ms() + 300; /* let the OK of a SHUTDOWN op reach the host */
    for (int i = 0; i < MAX_CHANS; i++) {
        struct chan *ch = &g_chans[i];
        while (ch->in_use && !ch->disconnected && ch->out_len && now_ms() < end) {
            struct pollfd p = {.fd = ch->fd, .events = POLLOUT};
            if (poll(&p, 1, 50) < 0 || (p.revents & (POLLHUP | POLLERR)) || chan_flush(ch)) break;
        }
    }
    if (!g_pid1) {
        for (int i = 0; i < MAX_CHANS; i++)
            if (g_chans[i].in_use) proc_abandon(&g_chans[i]);
        if (g_unix_path) unlink(g_unix_path);
        exit(0);
    }
    logmsg("shutting down");
    sync();
    kill(-1, SIGTERM);
    wait_children(2000);
    kill(-1, SIGKILL);
    wait_children(1000);
    sync();
    mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);
    reboot(RB_AUTOBOOT); /* QEMU -no-reboot / Firecracker: the VM exits */
    for (;;) pause();
}

static void on_sigfd(void)
{
    struct signalfd_siginfo si;
    while (read(g_sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGCHLD)
            proc_reap();
        else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
            g_shutdown = 1;
        else if (si.ssi_signo == SIGIO)
            vports_check();
    }
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (!chan_open(fd, CH_SOCK, 0)) {
            logmsg("too many connections");
            close(fd);
        }
    }
}

static void chan_gone(struct chan *ch)
{
    if (ch->is_vport)
        vport_hangup(ch);
    else
        chan_close(ch);
}

enum { T_SIG, T_LISTEN, T_CHAN, T_POUT, T_PERR, T_PIN, T_FILE, T_WATCH };
#define MAXPFD (4 + MAX_CHANS + 3 * MAX_PROCS + MAX_FILES + MAX_WATCHES)

static void serve(void)
{
    static struct pollfd pfd[MAXPFD];
    static struct {
        unsigned char type;
        short idx;
    } tag[MAXPFD];
    const size_t big = HDR_LEN + CHUNK + OUT_RESERVE;
    for (;;) {
        int n = 0;
#define ADD(fd_, ev_, t_, i_)                                                                      \
    (pfd[n].fd = (fd_), pfd[n].events = (ev_), pfd[n].revents = 0, tag[n].type = (t_),             \
     tag[n].idx = (short)(i_), n++)
        if (g_shutdown) do_shutdown();
        ADD(g_sigfd, POLLIN, T_SIG, 0);
        if (g_unix_fd >= 0) ADD(g_unix_fd, POLLIN, T_LISTEN, 0);
        if (g_vsock_fd >= 0) ADD(g_vsock_fd, POLLIN, T_LISTEN, 0);
        for (int i = 0; i < MAX_CHANS; i++) {
            struct chan *ch = &g_chans[i];
            if (!ch->in_use || ch->disconnected) continue;
            short ev = ch->out_len ? POLLOUT : 0;
            if (ch->in_len < INBUF_CAP && out_free(ch) >= OUT_RESERVE) ev |= POLLIN;
            ADD(ch->fd, ev, T_CHAN, i);
        }
        for (int i = 0; i < MAX_PROCS; i++) {
            struct proc *pr = &g_procs[i];
            if (!pr->in_use || !pr->ch || pr->exited) continue;
            if (out_free(pr->ch) >= big && pr->out_fd >= 0) ADD(pr->out_fd, POLLIN, T_POUT, i);
            if (out_free(pr->ch) >= big && pr->err_fd >= 0) ADD(pr->err_fd, POLLIN, T_PERR, i);
            if (pr->in_fd >= 0 && pr->inb_len > pr->inb_off) ADD(pr->in_fd, POLLOUT, T_PIN, i);
        }
        for (int i = 0; i < MAX_FILES; i++) {
            struct file *f = &g_files[i];
            if (f->in_use && !f->writing && out_free(f->ch) >= big) ADD(f->fd, POLLIN, T_FILE, i);
        }
        for (int i = 0; i < MAX_WATCHES; i++)
            if (watch_fd(i) >= 0) ADD(watch_fd(i), POLLIN, T_WATCH, i);
        int64_t now = now_ms(), dl = proc_next_deadline();
        int timeout = dl ? (dl > now ? (int)(dl - now) : 0) : -1;
#define CAP_TIMEOUT(ms) (timeout = (timeout < 0 || timeout > (ms)) ? (ms) : timeout)
        if (vports_down()) CAP_TIMEOUT(g_next_check > now ? (int)(g_next_check - now) : 0);
        if (g_guest && !g_nvports && now < g_start + 60000)
            CAP_TIMEOUT(100); /* the port may appear after the agent starts */
        if (!g_ready_done) CAP_TIMEOUT(20);
        if (poll(pfd, (nfds_t)n, timeout) < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            struct timespec ts = {0, 50 * 1000000};
            nanosleep(&ts, NULL);
        }
        for (int k = 0; k < n; k++) {
            short re = pfd[k].revents;
            int i = tag[k].idx;
            if (!re) continue;
            switch (tag[k].type) {
            case T_SIG:
                on_sigfd();
                break;
            case T_LISTEN:
                on_accept(pfd[k].fd);
                break;
            case T_CHAN: {
                struct chan *ch = &g_chans[i];
                if (!ch->in_use || ch->fd != pfd[k].fd || ch->disconnected) break;
                if ((re & POLLOUT) && chan_flush(ch) < 0) {
                    chan_gone(ch);
                    break;
                }
                if ((re & POLLIN) && chan_read(ch) < 0) {
                    chan_gone(ch);
                    break;
                }
                if ((re & (POLLHUP | POLLERR | POLLNVAL)) && !(re & POLLIN)) chan_gone(ch);
                break;
            }
            case T_POUT:
            case T_PERR: {
                struct proc *pr = &g_procs[i];
                if (pr->in_use && pr->ch && (pfd[k].fd == pr->out_fd || pfd[k].fd == pr->err_fd))
                    proc_read(pr, pfd[k].fd);
                break;
            }
            case T_PIN: {
                struct proc *pr = &g_procs[i];
                if (pr->in_use && pr->in_fd == pfd[k].fd) proc_write_stdin(pr);
                break;
            }
            case T_FILE: {
                struct file *f = &g_files[i];
                if (f->in_use && !f->writing && f->fd == pfd[k].fd) file_read_pump(f);
                break;
            }
            case T_WATCH:
                if (watch_fd(i) == pfd[k].fd) watch_pump(i);
                break;
            }
        }
        now = now_ms();
        proc_timeouts(now);
        proc_finish();
        /* Flush at once (saves a poll round per reply) and resume parsing input that
         * waited for output room. */
        for (int i = 0; i < MAX_CHANS; i++) {
            struct chan *ch = &g_chans[i];
            if (!ch->in_use || ch->disconnected) continue;
            if (ch->out_len && chan_flush(ch) < 0) {
                chan_gone(ch);
                continue;
            }
            if (ch->in_len >= HDR_LEN && out_free(ch) >= OUT_RESERVE) {
                chan_parse(ch);
                if (ch->out_len && chan_flush(ch) < 0) chan_gone(ch);
            }
        }
        proc_release_groups();
        if (vports_down() && now >= g_next_check) vports_check();
        /* More ports may still appear until SMOLVM_READY (virtio_console adds them right
         * after its probe in stage 1). Not after, unless none was found: a host connects only
         * after READY, and a scan while a snapshot restores costs its first HELLO ~50 ms. */
        if (g_guest && now >= g_next_scan && (!g_nvports || !g_ready_done)) {
            scan_vports();
            g_next_scan = now + 100;
        }
        if (!g_ready_done) ready_check(now);
    }
}

static int usage(void)
{
    fprintf(stderr, "usage: agent --pid1 | --guest | --listen-unix PATH [--stream-fd N]\n"
                    "  [--vsock-port N] [--port-name NAME] [--ready-wait-port N] "
                    "[--dry-run-time]\n");
    return 2;
}

int main(int argc, char **argv)
{
    int stream_fd = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--pid1"))
            g_pid1 = g_guest = 1;
        else if (!strcmp(a, "--guest"))
            g_guest = 1;
        else if (!strcmp(a, "--dry-run-time"))
            g_dry_time = 1;
        else if (!v)
            return usage();
        else if (!strcmp(a, "--listen-unix"))
            g_unix_path = argv[++i];
        else if (!strcmp(a, "--stream-fd"))
            stream_fd = atoi(argv[++i]);
        else if (!strcmp(a, "--vsock-port"))
            g_vsock_port = atoi(argv[++i]);
        else if (!strcmp(a, "--port-name"))
            g_port_name = argv[++i];
        else if (!strcmp(a, "--ready-wait-port"))
            g_ready_port = atoi(argv[++i]);
        else
            return usage();
    }
    if (g_pid1 && getpid() != 1) {
        fprintf(stderr, "agent: --pid1 refused: not process 1 (it would reboot the machine)\n");
        return 2;
    }
    if (!g_guest && !g_unix_path && stream_fd < 0) return usage();
    for (int fd = 0; fd < 3; fd++) /* pipes must not land on 0-2 (posix_spawn dup2) */
        if (fcntl(fd, F_GETFD) < 0 && open(g_pid1 ? "/dev/console" : "/dev/null", O_RDWR) < 0)
            open("/dev/null", O_RDWR);
    if (g_pid1) {
        if (chdir("/") != 0) logmsg("chdir /: %s", strerror(errno));
        reboot(RB_DISABLE_CAD); /* ctrl-alt-del -> SIGINT -> clean shutdown */
    }
    g_start = now_ms();
    setup_signals();
    if (g_unix_path && (g_unix_fd = listen_unix(g_unix_path)) < 0) {
        logmsg("listen %s: %s", g_unix_path, strerror(errno));
        if (!g_pid1) return 1;
    }
    if (stream_fd >= 0) {
        fcntl(stream_fd, F_SETFD, FD_CLOEXEC);
        fcntl(stream_fd, F_SETFL, O_RDWR | O_NONBLOCK);
        chan_open(stream_fd, CH_PERSIST, 0);
    }
    if (g_guest) {
        scan_vports();
        g_next_scan = g_start + 100;
        if (g_vsock_port > 0) g_vsock_fd = listen_vsock((unsigned)g_vsock_port);
    }
    serve();
    return 0;
}
