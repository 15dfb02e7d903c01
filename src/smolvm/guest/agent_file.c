/* File transfer (streamed, atomic rename on write) and small system ops. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct file g_files[MAX_FILES];

/* <linux/random.h> is not in musl's include path: _IOW('R', 0x03, int[2]). */
#define RNDADDENTROPY 0x40085203
#define RNDRESEEDCRNG 0x5207 /* _IO('R', 0x07), Linux >= 4.17 */
#define ENTROPY_MAX   4096

static int copy_path(char *dst, const unsigned char *p, size_t n)
{
    if (n == 0 || n >= PATH_MAX || memchr(p, 0, n)) return -1;
    memcpy(dst, p, n);
    dst[n] = 0;
    return 0;
}

static struct file *file_find(struct chan *ch, uint32_t sid)
{
    for (int i = 0; i < MAX_FILES; i++)
        if (g_files[i].in_use && g_files[i].ch == ch && g_files[i].sid == sid) return &g_files[i];
    return NULL;
}

static struct file *file_new(struct chan *ch, uint32_t sid)
{
    if (file_find(ch, sid)) {
        emit_error(ch, sid, EEXIST, "stream in use");
        return NULL;
    }
    for (int i = 0; i < MAX_FILES; i++) {
        struct file *f = &g_files[i];
        if (!f->in_use) {
            f->in_use = 1;
            f->ch = ch;
            f->sid = sid;
            f->fd = -1;
            f->tmp[0] = 0;
            return f;
        }
    }
    emit_error(ch, sid, EMFILE, "too many open transfers");
    return NULL;
}

static void file_free(struct file *f)
{
    if (f->fd >= 0) close(f->fd);
    if (f->writing && f->tmp[0])
        unlink(f->tmp); /* an unfinished upload never replaces the target */
    f->in_use = 0;
    f->fd = -1;
    f->tmp[0] = 0;
}

static void mkdirs(char *path)
{
    for (char *s = path + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        mkdir(path, 0755);
        *s = '/';
    }
}

/* WRITE_FILE payload: u32 mode, u32 wflags, path. Data goes to a temporary file in the
 * same directory, renamed over the target on FILE_END (readers never see a partial file). */
void file_write_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    struct file *f = file_new(ch, sid);
    if (!f) return;
    f->writing = 1;
    if (n < 8 || copy_path(f->path, p + 8, n - 8)) {
        file_free(f);
        emit_error(ch, sid, EINVAL, "malformed WRITE_FILE request");
        return;
    }
    uint32_t mode = get32(p) & 07777;
    f->wflags = get32(p + 4);
    if (f->wflags & WF_MKDIRS) mkdirs(f->path);
    struct stat st;
    if (stat(f->path, &st) == 0 && S_ISDIR(st.st_mode)) {
        emit_error(ch, sid, EISDIR, "write %s", f->path);
        file_free(f);
        return;
    }
    const char *slash = strrchr(f->path, '/');
    int dlen = slash ? (int)(slash - f->path) : 0;
    const char *base = slash ? slash + 1 : f->path;
    if ((size_t)snprintf(f->tmp, PATH_MAX, "%.*s%s.%s.smolvm-XXXXXX", dlen, f->path,
                         slash ? "/" : "", base) >= PATH_MAX) {
        f->tmp[0] = 0;
        emit_error(ch, sid, ENAMETOOLONG, "write %s", f->path);
        file_free(f);
        return;
    }
    f->fd = mkostemp(f->tmp, O_CLOEXEC);
    if (f->fd < 0) {
        f->tmp[0] = 0;
        emit_error(ch, sid, errno, "write %s", f->path);
        file_free(f);
        return;
    }
    if (fchmod(f->fd, mode) != 0) {
        emit_error(ch, sid, errno, "chmod %s", f->path);
        file_free(f);
    }
}

void file_write_data(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    struct file *f = file_find(ch, sid);
    if (!f || !f->writing) return; /* already failed (ERROR sent) or cancelled */
    while (n) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            emit_error(ch, sid, errno, "write %s", f->path);
            file_free(f);
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

void file_write_end(struct chan *ch, uint32_t sid)
{
    struct file *f = file_find(ch, sid);
    if (!f || !f->writing) return;
    if ((f->wflags & WF_FSYNC) && fsync(f->fd) != 0) {
        emit_error(ch, sid, errno, "fsync %s", f->path);
        file_free(f);
        return;
    }
    int rc = close(f->fd);
    f->fd = -1;
    if (rc != 0 || rename(f->tmp, f->path) != 0) {
        emit_error(ch, sid, errno, "write %s", f->path);
        file_free(f);
        return;
    }
    f->tmp[0] = 0;
    if (f->wflags & WF_FSYNC) { /* make the rename itself durable */
        char *slash = strrchr(f->path, '/');
        if (slash) {
            *slash = 0;
            int d = open(slash == f->path ? "/" : f->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (d >= 0) {
                fsync(d);
                close(d);
            }
        }
    }
    file_free(f);
    emit(ch, OP_OK, 0, sid, NULL, 0);
}

/* READ_FILE payload: path. Replies FILE_INFO (u32 mode, u64 size) then FILE_DATA chunks
 * pumped by the main loop as output room allows, then FILE_END. */
void file_read_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    struct file *f = file_new(ch, sid);
    if (!f) return;
    f->writing = 0;
    if (copy_path(f->path, p, n)) {
        file_free(f);
        emit_error(ch, sid, EINVAL, "malformed READ_FILE request");
        return;
    }
    struct stat st;
    f->fd = open(f->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (f->fd < 0 || fstat(f->fd, &st) != 0) {
        emit_error(ch, sid, errno, "read %s", f->path);
        file_free(f);
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        emit_error(ch, sid, EISDIR, "read %s", f->path);
        file_free(f);
        return;
    }
    unsigned char b[12];
    put32(b, st.st_mode & 07777);
    put64(b + 4, S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0);
    emit(ch, OP_FILE_INFO, 0, sid, b, sizeof b);
    file_read_pump(f);
}

void file_read_pump(struct file *f)
{
    struct chan *ch = f->ch;
    while (out_free(ch) >= HDR_LEN + CHUNK + OUT_RESERVE) {
        unsigned char *h = out_reserve(ch, HDR_LEN + CHUNK);
        ssize_t r = read(f->fd, h + HDR_LEN, CHUNK);
        if (r > 0) {
            out_commit(ch, OP_FILE_DATA, 0, f->sid, (size_t)r);
        } else if (r == 0) {
            emit(ch, OP_FILE_END, 0, f->sid, NULL, 0);
            file_free(f);
            return;
        } else if (errno == EAGAIN) {
            return;
        } else if (errno != EINTR) {
            emit_error(ch, f->sid, errno, "read %s", f->path);
            file_free(f);
            return;
        }
    }
}

int file_cancel(struct chan *ch, uint32_t sid)
{
    struct file *f = file_find(ch, sid);
    if (!f) return 0;
    file_free(f);
    return 1;
}

void file_abandon(struct chan *ch)
{
    for (int i = 0; i < MAX_FILES; i++)
        if (g_files[i].in_use && g_files[i].ch == ch) file_free(&g_files[i]);
}

/* SET_TIME: i64 unix time in ns. Replies OK with the applied offset (ns, new - old). */
void op_set_time(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    if (n < 8) {
        emit_error(ch, sid, EINVAL, "malformed SET_TIME request");
        return;
    }
    int64_t ns = (int64_t)get64(p);
    struct timespec now, ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t off = ns - ((int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
    if (!g_dry_time && clock_settime(CLOCK_REALTIME, &ts) != 0) {
        emit_error(ch, sid, errno, "clock_settime");
        return;
    }
    unsigned char b[8];
    put64(b, (uint64_t)off);
    emit(ch, OP_OK, 0, sid, b, 8);
}

/* ADD_ENTROPY: bytes mixed into the kernel pool and credited (8 bits per byte): clones
 * restored from one snapshot must not share RNG state. */
void op_add_entropy(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    static struct {
        int entropy_count;
        int buf_size;
        unsigned char buf[ENTROPY_MAX];
    } rpi;
    if (n == 0 || n > ENTROPY_MAX) {
        emit_error(ch, sid, EINVAL, "ADD_ENTROPY takes 1..%d bytes", ENTROPY_MAX);
        return;
    }
    rpi.entropy_count = (int)n * 8;
    rpi.buf_size = (int)n;
    memcpy(rpi.buf, p, n);
    int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
    int rc = fd < 0 ? -1 : ioctl(fd, RNDADDENTROPY, &rpi);
    int e = errno;
    /* Mixing alone does not reach the output: the CRNG reseeds from the input pool only
       every 60 s, so clones restored from one snapshot would keep producing identical
       /dev/urandom bytes until then. Force the reseed now (best effort: old kernels). */
    if (rc == 0) (void)ioctl(fd, RNDRESEEDCRNG);
    if (fd >= 0) close(fd);
    memset(rpi.buf, 0, n);
    if (rc != 0)
        emit_error(ch, sid, e, "RNDADDENTROPY");
    else
        emit(ch, OP_OK, 0, sid, NULL, 0);
}

void op_set_hostname(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    if (n == 0 || n > 64 || memchr(p, 0, n)) {
        emit_error(ch, sid, EINVAL, "hostname must be 1..64 bytes");
        return;
    }
    if (sethostname((const char *)p, n) != 0)
        emit_error(ch, sid, errno, "sethostname");
    else
        emit(ch, OP_OK, 0, sid, NULL, 0);
}
