/* SmolVM guest agent: shared declarations.
 *
 * Wire format (all integers little-endian), both directions:
 *   header (12 bytes): 'S' 'V' | u8 op | u8 flags | u32 stream_id | u32 payload_len
 *   payload (payload_len bytes)
 * A host session starts with SYNC_MAGIC (16 raw bytes, not a frame) followed by a HELLO
 * frame; the agent answers SYNC_MAGIC + HELLO. Whoever sees a bad header discards input
 * until the next SYNC_MAGIC, so a byte stream that outlives its host (virtio-serial)
 * recovers from a host that died in the middle of a frame. See docs in agent.c.
 */
#ifndef SMOLVM_AGENT_H
#define SMOLVM_AGENT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PROTO_VERSION 1
#define AGENT_VERSION "smolvm-agent/1"

#define HDR_LEN         12
#define SYNC_LEN        16
#define MAX_IN_PAYLOAD  (256 * 1024) /* host -> agent frame limit */
#define INBUF_CAP       (HDR_LEN + MAX_IN_PAYLOAD + 4096)
#define OUTBUF_CAP      (512 * 1024)
#define CHUNK           (64 * 1024)         /* data frame size agent -> host */
#define OUT_RESERVE     (16 * 1024)         /* kept free for small replies */
#define STDIN_CAP       (64u * 1024 * 1024) /* stdin bytes buffered per process */
#define POST_EXIT_DRAIN (1024 * 1024)       /* output read after the main process exited */

#define MAX_CHANS      16
#define MAX_PROCS      128
#define MAX_FILES      64
#define MAX_WATCHES    16
#define WATCH_MAX_DIRS 4096 /* directories one recursive watch follows */

/* ops: host -> agent */
enum {
    OP_HELLO = 0x01,        /* u32 version, u64 nonce               -> HELLO */
    OP_PING = 0x02,         /* any bytes                            -> PING (echo) */
    OP_EXEC = 0x10,         /* see proc_exec()                      -> STARTED|ERROR ... EXIT */
    OP_STDIN = 0x11,        /* data; FLAG_EOF closes stdin */
    OP_KILL = 0x12,         /* u32 signal (process) / cancel (file stream, watch) */
    OP_RESIZE = 0x13,       /* u16 cols, u16 rows: a PTY command's window size */
    OP_WRITE_FILE = 0x20,   /* u32 mode, u32 wflags, path -> then FILE_DATA*, FILE_END -> OK */
    OP_FILE_DATA = 0x21,    /* both directions */
    OP_FILE_END = 0x22,     /* both directions */
    OP_READ_FILE = 0x23,    /* path -> FILE_INFO, FILE_DATA*, FILE_END | ERROR */
    OP_FILE_INFO = 0x24,    /* agent -> host: u32 mode, u64 size */
    OP_WATCH = 0x25,        /* u32 wflags, dir path -> OK, then WATCH_EVENT* | ERROR */
    OP_SET_TIME = 0x30,     /* i64 unix ns -> OK(i64 applied offset ns) */
    OP_ADD_ENTROPY = 0x31,  /* bytes (<= 4096) -> OK */
    OP_SET_HOSTNAME = 0x32, /* name -> OK */
    OP_SHUTDOWN = 0x33,     /* -> OK, then poweroff (PID 1) or exit */
    /* agent -> host */
    OP_STARTED = 0x40, /* u32 pid */
    OP_STDOUT = 0x41,
    OP_STDERR = 0x42,
    OP_EXIT = 0x43,        /* i32 code, u32 xflags, u32 signal */
    OP_WATCH_EVENT = 0x44, /* u32 event (EV_*), path (full path, no NUL) */
    OP_OK = 0x7E,
    OP_ERROR = 0x7F, /* u32 errno, utf-8 message */
};

#define FLAG_EOF         0x01
#define EXEC_STDIN       0x01 /* exec flags: give the child a stdin pipe (else /dev/null) */
#define EXEC_ENV_REPLACE 0x02 /* do not start from the default environment */
#define EXEC_DETACH      0x04 /* survives the end of its host session (not killed then) */
#define EXEC_LIMITS      0x08 /* after env: u32 pids_max, u32 memory_mib, u32 cpu_weight */
#define EXEC_HOST        0x10 /* SmolVM's own work (identity push): no session cgroup */
#define EXEC_PTY         0x20 /* after limits: u16 cols, u16 rows; stdio is a new pty */
#define EXEC_LOWPRIO     0x40 /* nice 19: SmolVM's background work yields to commands */
#define WATCH_RECURSIVE  0x01
enum { EV_CREATE = 1, EV_WRITE, EV_REMOVE, EV_RENAME, EV_CHMOD, EV_OVERFLOW };
#define WF_FSYNC     0x01
#define WF_MKDIRS    0x02
#define XF_TIMED_OUT 0x01
#define XF_SIGNALED  0x02

enum { CH_SOCK = 1, CH_PERSIST = 2 };

struct chan {
    int in_use;
    int fd;
    int kind;         /* CH_SOCK: one session per connection; CH_PERSIST: vport/stream */
    int is_vport;     /* POLLHUP means "host went away", not "close" */
    int disconnected; /* vport without a host: not polled */
    int resync;       /* discarding input until SYNC_MAGIC */
    int expect_hello; /* the frame after SYNC must be HELLO */
    unsigned char *in;
    size_t in_len;
    unsigned char *out;
    size_t out_head, out_len; /* pending bytes are out[out_head .. out_head+out_len) */
};

struct proc {
    int in_use;
    pid_t pid;
    struct chan *ch; /* NULL once its session is gone: only reaped */
    uint32_t sid;
    int out_fd, err_fd, in_fd;
    unsigned char *inb; /* pending stdin */
    size_t inb_off, inb_len, inb_cap;
    int in_eof;
    int64_t deadline; /* monotonic ms, 0 = none */
    int timed_out, exited, status;
    size_t drained; /* bytes read after exit */
    unsigned cg;    /* cgroup session group (0: uncontained) */
    int detached;   /* EXEC_DETACH: not killed when its session ends */
    int pty;        /* out_fd is a pty master (in_fd a dup of it) */
};

struct file {
    int in_use;
    int writing;
    struct chan *ch;
    uint32_t sid;
    int fd;
    uint32_t wflags;
    char path[PATH_MAX];
    char tmp[PATH_MAX];
};

extern const unsigned char SYNC_MAGIC[SYNC_LEN];
extern struct chan g_chans[MAX_CHANS];
extern struct proc g_procs[MAX_PROCS];
extern struct file g_files[MAX_FILES];
extern int g_pid1, g_dry_time, g_shutdown;

/* util */
int64_t now_ms(void);
void put32(unsigned char *p, uint32_t v);
uint32_t get32(const unsigned char *p);
uint64_t get64(const unsigned char *p);
void put64(unsigned char *p, uint64_t v);
void logmsg(const char *fmt, ...);

/* agent_cg.c */
int cg_enabled(void);
unsigned cg_create(uint32_t pids_max, uint32_t mem_mib, uint32_t cpu_weight);
int cg_move_self(unsigned id);
void cg_kill(unsigned id);
void cg_release(unsigned id);
void cg_sweep(void);

/* agent_chan.c */
struct chan *chan_open(int fd, int kind, int is_vport);
void chan_close(struct chan *ch);
void chan_end_session(struct chan *ch);
int chan_read(struct chan *ch);  /* <0: channel gone */
int chan_flush(struct chan *ch); /* <0: channel gone */
void chan_parse(struct chan *ch);
size_t out_free(const struct chan *ch);
int emit(struct chan *ch, int op, int flags, uint32_t sid, const void *p, size_t n);
int emit_error(struct chan *ch, uint32_t sid, int err, const char *fmt, ...);
unsigned char *out_reserve(struct chan *ch, size_t n);
void out_commit(struct chan *ch, int op, int flags, uint32_t sid, size_t n);

/* agent_proc.c */
void proc_exec(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void proc_stdin(struct chan *ch, uint32_t sid, int flags, const unsigned char *p, size_t n);
int proc_kill(struct chan *ch, uint32_t sid, int sig);
void proc_resize(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void proc_abandon(struct chan *ch);
void proc_reap(void);
void proc_read(struct proc *pr, int fd);
void proc_write_stdin(struct proc *pr);
void proc_release_groups(void); /* after flushing: see proc_finish() */
void proc_finish(void);
void proc_timeouts(int64_t now);
int64_t proc_next_deadline(void);

/* agent_file.c */
void file_write_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void file_write_data(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void file_write_end(struct chan *ch, uint32_t sid);
void file_read_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void file_read_pump(struct file *f);
int file_cancel(struct chan *ch, uint32_t sid);
void file_abandon(struct chan *ch);
void op_set_time(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void op_add_entropy(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
void op_set_hostname(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);

/* agent_watch.c */
void watch_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n);
int watch_cancel(struct chan *ch, uint32_t sid);
void watch_abandon(struct chan *ch);
int watch_fd(int i); /* -1: unused, or no room to send its events */
void watch_pump(int i);

#endif
