/* Channels: framing, resynchronisation, output buffering and op dispatch. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Starts with a NUL so it can never be mistaken for a frame header ('S','V',...). */
const unsigned char SYNC_MAGIC[SYNC_LEN] = {0x00, 'S', 'M', 'O', 'L',  'V',  'M',  0x01,
                                            'S',  'Y', 'N', 'C', 0xA5, 0x5A, 0xC3, 0x3C};
struct chan g_chans[MAX_CHANS];

struct chan *chan_open(int fd, int kind, int is_vport)
{
    for (int i = 0; i < MAX_CHANS; i++) {
        struct chan *ch = &g_chans[i];
        if (ch->in_use) continue;
        /* Buffers stay allocated with the slot: reconnects do not churn the heap. */
        if (!ch->in) ch->in = malloc(INBUF_CAP);
        if (!ch->out) ch->out = malloc(OUTBUF_CAP);
        if (!ch->in || !ch->out) return NULL;
        ch->in_use = 1;
        ch->fd = fd;
        ch->kind = kind;
        ch->is_vport = is_vport;
        ch->disconnected = 0;
        ch->in_len = ch->out_head = ch->out_len = 0;
        ch->resync = 1;
        ch->expect_hello = 1;
        return ch;
    }
    return NULL;
}

/* Forget everything the previous host session started, except buffered input. */
static void session_reset(struct chan *ch)
{
    proc_abandon(ch);
    file_abandon(ch);
    watch_abandon(ch);
    ch->out_head = ch->out_len = 0;
}

void chan_end_session(struct chan *ch)
{
    session_reset(ch);
    ch->in_len = 0;
    ch->resync = 1;
    ch->expect_hello = 1;
}

void chan_close(struct chan *ch)
{
    chan_end_session(ch);
    close(ch->fd);
    ch->fd = -1;
    ch->in_use = 0;
}

size_t out_free(const struct chan *ch)
{
    return OUTBUF_CAP - ch->out_len;
}

/* Room for n contiguous bytes at the end of the output buffer (returned pointer). */
unsigned char *out_reserve(struct chan *ch, size_t n)
{
    if (ch->out_len + n > OUTBUF_CAP) return NULL;
    if (ch->out_len == 0) ch->out_head = 0;
    if (ch->out_head + ch->out_len + n > OUTBUF_CAP) {
        memmove(ch->out, ch->out + ch->out_head, ch->out_len);
        ch->out_head = 0;
    }
    return ch->out + ch->out_head + ch->out_len;
}

static void put_hdr(unsigned char *h, int op, int flags, uint32_t sid, size_t n)
{
    h[0] = 'S';
    h[1] = 'V';
    h[2] = (unsigned char)op;
    h[3] = (unsigned char)flags;
    put32(h + 4, sid);
    put32(h + 8, (uint32_t)n);
}

/* Commit a frame whose payload (n bytes) was written after a reserved header. */
void out_commit(struct chan *ch, int op, int flags, uint32_t sid, size_t n)
{
    unsigned char *h = ch->out + ch->out_head + ch->out_len;
    put_hdr(h, op, flags, sid, n);
    ch->out_len += HDR_LEN + n;
}

int emit(struct chan *ch, int op, int flags, uint32_t sid, const void *p, size_t n)
{
    unsigned char *h = out_reserve(ch, HDR_LEN + n);
    if (!h) {
        logmsg("output buffer full, dropped op 0x%02x", op);
        return -1;
    }
    if (n) memcpy(h + HDR_LEN, p, n);
    out_commit(ch, op, flags, sid, n);
    return 0;
}

int emit_error(struct chan *ch, uint32_t sid, int err, const char *fmt, ...)
{
    unsigned char buf[4 + 1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)buf + 4, 1000, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if (n > 999) n = 999;
    if (err) n += snprintf((char *)buf + 4 + n, sizeof buf - 4 - n, ": %s", strerror(err));
    put32(buf, (uint32_t)err);
    return emit(ch, OP_ERROR, 0, sid, buf, 4 + (size_t)n);
}

int chan_flush(struct chan *ch)
{
    while (ch->out_len) {
        ssize_t w;
        if (ch->kind == CH_SOCK)
            w = send(ch->fd, ch->out + ch->out_head, ch->out_len, MSG_NOSIGNAL);
        else
            w = write(ch->fd, ch->out + ch->out_head, ch->out_len);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        ch->out_head += (size_t)w;
        ch->out_len -= (size_t)w;
    }
    ch->out_head = 0;
    return 0;
}

int chan_read(struct chan *ch)
{
    if (ch->in_len >= INBUF_CAP) return 0; /* parser is waiting for output room */
    ssize_t r = read(ch->fd, ch->in + ch->in_len, INBUF_CAP - ch->in_len);
    if (r == 0) return -1; /* socket EOF; on a vport: the host is not connected */
    if (r < 0) return (errno == EAGAIN || errno == EINTR || errno == EWOULDBLOCK) ? 0 : -1;
    ch->in_len += (size_t)r;
    chan_parse(ch);
    return 0;
}

static int host_op(int op)
{
    switch (op) {
    case OP_HELLO:
    case OP_PING:
    case OP_EXEC:
    case OP_STDIN:
    case OP_KILL:
    case OP_RESIZE:
    case OP_WATCH:
    case OP_WRITE_FILE:
    case OP_FILE_DATA:
    case OP_FILE_END:
    case OP_READ_FILE:
    case OP_SET_TIME:
    case OP_ADD_ENTROPY:
    case OP_SET_HOSTNAME:
    case OP_SHUTDOWN:
        return 1;
    }
    return 0;
}

static void op_hello(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    unsigned char r[64];
    size_t vlen = strlen(AGENT_VERSION);
    session_reset(ch); /* a new host: drop what the previous one left behind */
    ch->expect_hello = 0;
    unsigned char *s = out_reserve(ch, SYNC_LEN);
    if (s) {
        memcpy(s, SYNC_MAGIC, SYNC_LEN);
        ch->out_len += SYNC_LEN;
    }
    put32(r, PROTO_VERSION);
    memset(r + 4, 0, 8);
    if (n >= 12) memcpy(r + 4, p + 4, 8); /* echo the nonce: the host matches it */
    put32(r + 12, (uint32_t)getpid());
    put32(r + 16, g_pid1 ? 1u : 0u);
    memcpy(r + 20, AGENT_VERSION, vlen);
    emit(ch, OP_HELLO, 0, sid, r, 20 + vlen);
}

static void dispatch(struct chan *ch, int op, int flags, uint32_t sid, const unsigned char *p,
                     size_t n)
{
    switch (op) {
    case OP_HELLO:
        op_hello(ch, sid, p, n);
        break;
    case OP_PING:
        emit(ch, OP_PING, 0, sid, p, n > 4096 ? 4096 : n);
        break;
    case OP_EXEC:
        proc_exec(ch, sid, p, n);
        break;
    case OP_STDIN:
        proc_stdin(ch, sid, flags, p, n);
        break;
    case OP_KILL: {
        int sig = n >= 4 ? (int)get32(p) : SIGKILL;
        if (!proc_kill(ch, sid, sig) && !file_cancel(ch, sid)) watch_cancel(ch, sid);
        break;
    }
    case OP_RESIZE:
        proc_resize(ch, sid, p, n);
        break;
    case OP_WATCH:
        watch_open(ch, sid, p, n);
        break;
    case OP_WRITE_FILE:
        file_write_open(ch, sid, p, n);
        break;
    case OP_FILE_DATA:
        file_write_data(ch, sid, p, n);
        break;
    case OP_FILE_END:
        file_write_end(ch, sid);
        break;
    case OP_READ_FILE:
        file_read_open(ch, sid, p, n);
        break;
    case OP_SET_TIME:
        op_set_time(ch, sid, p, n);
        break;
    case OP_ADD_ENTROPY:
        op_add_entropy(ch, sid, p, n);
        break;
    case OP_SET_HOSTNAME:
        op_set_hostname(ch, sid, p, n);
        break;
    case OP_SHUTDOWN:
        emit(ch, OP_OK, 0, sid, NULL, 0);
        g_shutdown = 1;
        break;
    }
}

/* Consume every complete frame in the input buffer (while there is room for replies). */
void chan_parse(struct chan *ch)
{
    size_t off = 0;
    while (ch->in_use) {
        unsigned char *b = ch->in + off;
        size_t avail = ch->in_len - off;
        if (ch->resync) {
            unsigned char *m = memmem(b, avail, SYNC_MAGIC, SYNC_LEN);
            if (m) {
                off += (size_t)(m - b) + SYNC_LEN;
                ch->resync = 0;
                ch->expect_hello = 1;
                continue;
            }
            if (avail >= SYNC_LEN) /* keep a tail that may be a split magic */
                off += avail - (SYNC_LEN - 1);
            break;
        }
        if (avail < HDR_LEN) break;
        uint32_t plen = get32(b + 8);
        if (b[0] != 'S' || b[1] != 'V' || !host_op(b[2]) || plen > MAX_IN_PAYLOAD) {
            logmsg("bad frame header, resynchronising");
            ch->resync = 1;
            continue;
        }
        if (avail < HDR_LEN + plen) break;
        if (out_free(ch) < OUT_RESERVE) break; /* resumed by the main loop once output drains */
        int op = b[2];
        off += HDR_LEN + plen;
        if (ch->expect_hello && op != OP_HELLO) {
            ch->resync = 1; /* a stale frame of a dead session */
            continue;
        }
        dispatch(ch, op, b[3], get32(b + 4), b + HDR_LEN, plen);
    }
    if (!ch->in_use) return;
    if (off >= ch->in_len) {
        ch->in_len = 0;
    } else if (off) {
        memmove(ch->in, ch->in + off, ch->in_len - off);
        ch->in_len -= off;
    }
}
