/* Directory watches (inotify): WATCH opens one, events stream as WATCH_EVENT frames until
 * the host cancels it (KILL) or its session ends. Events are read only while the channel has
 * room, so a flood waits in the kernel's queue; when that overflows the host gets
 * EV_OVERFLOW (events were lost) instead of an unbounded buffer here. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#define WATCH_MASK                                                                                 \
    (IN_CREATE | IN_MODIFY | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB |                 \
     IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK)

struct wdir {
    int wd;
    char *path;
};

struct watch {
    int in_use;
    struct chan *ch;
    uint32_t sid;
    int fd;
    int recursive;
    int root_wd;
    int lost; /* an event found no room: report EV_OVERFLOW */
    struct wdir *dirs;
    int ndirs, cap;
};

static struct watch g_watches[MAX_WATCHES];

static struct watch *watch_find(struct chan *ch, uint32_t sid)
{
    for (int i = 0; i < MAX_WATCHES; i++)
        if (g_watches[i].in_use && g_watches[i].ch == ch && g_watches[i].sid == sid)
            return &g_watches[i];
    return NULL;
}

static void watch_free(struct watch *w)
{
    if (w->fd >= 0) close(w->fd); /* removes every inotify watch of it */
    for (int i = 0; i < w->ndirs; i++) free(w->dirs[i].path);
    free(w->dirs);
    memset(w, 0, sizeof *w);
    w->fd = -1;
}

static const char *dir_path(struct watch *w, int wd)
{
    for (int i = 0; i < w->ndirs; i++)
        if (w->dirs[i].wd == wd) return w->dirs[i].path;
    return NULL;
}

static void forget_dir(struct watch *w, int wd)
{
    for (int i = 0; i < w->ndirs; i++)
        if (w->dirs[i].wd == wd) {
            free(w->dirs[i].path);
            w->dirs[i] = w->dirs[--w->ndirs];
            return;
        }
}

static void emit_event(struct watch *w, uint32_t ev, const char *dir, const char *name);

/* Watch `path` (and, recursive, the directories under it, up to WATCH_MAX_DIRS). */
static int add_dir(struct watch *w, const char *path, int depth, int announce)
{
    if (w->ndirs >= WATCH_MAX_DIRS) return 0;
    int wd = inotify_add_watch(w->fd, path, WATCH_MASK);
    if (wd < 0) return -1;
    if (!dir_path(w, wd)) {
        if (w->ndirs == w->cap) {
            int cap = w->cap ? w->cap * 2 : 16;
            struct wdir *nd = realloc(w->dirs, (size_t)cap * sizeof *nd);
            if (!nd) return -1;
            w->dirs = nd, w->cap = cap;
        }
        char *copy = strdup(path);
        if (!copy) return -1;
        w->dirs[w->ndirs++] = (struct wdir){wd, copy};
    }
    if (!w->recursive || depth > 64) return 0;
    DIR *d = opendir(path);
    if (!d) return 0;
    struct dirent *e;
    char sub[PATH_MAX];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        /* A new directory may have filled before its watch existed: report what is there. */
        if (announce) emit_event(w, EV_CREATE, path, e->d_name);
        if (e->d_type != DT_DIR && e->d_type != DT_UNKNOWN) continue;
        if (snprintf(sub, sizeof sub, "%s/%s", path, e->d_name) >= (int)sizeof sub) continue;
        struct stat st;
        if (e->d_type == DT_UNKNOWN && (lstat(sub, &st) || !S_ISDIR(st.st_mode))) continue;
        add_dir(w, sub, depth + 1, announce); /* one that vanished meanwhile is no error */
    }
    closedir(d);
    return 0;
}

/* WATCH payload: u32 wflags (WATCH_RECURSIVE), path of a directory. */
void watch_open(struct chan *ch, uint32_t sid, const unsigned char *p, size_t n)
{
    char path[PATH_MAX];
    if (n < 5 || n - 4 >= sizeof path || memchr(p + 4, 0, n - 4)) {
        emit_error(ch, sid, EINVAL, "malformed WATCH request");
        return;
    }
    memcpy(path, p + 4, n - 4);
    path[n - 4] = 0;
    size_t len = strlen(path);
    while (len > 1 && path[len - 1] == '/') path[--len] = 0;
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        int e = stat(path, &st) != 0 ? errno : ENOTDIR;
        emit_error(ch, sid, e, "watch %s", path);
        return;
    }
    struct watch *w = NULL;
    for (int i = 0; i < MAX_WATCHES && !w; i++)
        if (!g_watches[i].in_use) w = &g_watches[i];
    if (!w || watch_find(ch, sid)) {
        emit_error(ch, sid, w ? EEXIST : EMFILE, w ? "stream in use" : "too many watches");
        return;
    }
    memset(w, 0, sizeof *w);
    w->fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (w->fd < 0) {
        emit_error(ch, sid, errno, "inotify");
        w->fd = -1;
        return;
    }
    w->in_use = 1, w->ch = ch, w->sid = sid, w->recursive = (get32(p) & WATCH_RECURSIVE) != 0;
    if (add_dir(w, path, 0, 0) != 0) {
        int e = errno;
        watch_free(w);
        emit_error(ch, sid, e, "watch %s", path);
        return;
    }
    w->root_wd = w->dirs[0].wd;
    emit(ch, OP_OK, 0, sid, NULL, 0); /* events after this reply are reported */
}

int watch_cancel(struct chan *ch, uint32_t sid)
{
    struct watch *w = watch_find(ch, sid);
    if (!w) return 0;
    watch_free(w);
    return 1;
}

void watch_abandon(struct chan *ch)
{
    for (int i = 0; i < MAX_WATCHES; i++)
        if (g_watches[i].in_use && g_watches[i].ch == ch) watch_free(&g_watches[i]);
}

/* Each event read may become a frame of up to FRAME_MAX bytes, and takes >= 16 bytes of a
 * read (struct inotify_event); one event takes at most 16 + NAME_MAX + 1, padded. */
#define FRAME_MAX  (HDR_LEN + 4 + PATH_MAX)
#define MIN_FRAMES 18 /* 18 * 16 bytes hold the largest single event */

static size_t frames_room(struct chan *ch)
{
    size_t f = out_free(ch);
    return f > OUT_RESERVE ? (f - OUT_RESERVE) / FRAME_MAX : 0;
}

int watch_fd(int i)
{
    struct watch *w = &g_watches[i];
    return w->in_use && frames_room(w->ch) >= MIN_FRAMES ? w->fd : -1;
}

static void emit_event(struct watch *w, uint32_t ev, const char *dir, const char *name)
{
    unsigned char *h = frames_room(w->ch) ? out_reserve(w->ch, FRAME_MAX) : NULL;
    if (!h) {
        w->lost = 1;
        return;
    }
    int n = name && *name ? snprintf((char *)h + HDR_LEN + 4, PATH_MAX, "%s/%s", dir, name)
                          : snprintf((char *)h + HDR_LEN + 4, PATH_MAX, "%s", dir);
    if (n < 0 || n >= PATH_MAX) return;
    put32(h + HDR_LEN, ev);
    out_commit(w->ch, OP_WATCH_EVENT, 0, w->sid, 4 + (size_t)n);
}

/* Read as many events as the channel has room to send. */
void watch_pump(int i)
{
    struct watch *w = &g_watches[i];
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    size_t room = frames_room(w->ch);
    if (room < MIN_FRAMES) return;
    if (w->lost) {
        w->lost = 0;
        emit_event(w, EV_OVERFLOW, "", NULL);
        room--;
    }
    size_t want = room * 16 < sizeof buf ? room * 16 : sizeof buf;
    ssize_t r = read(w->fd, buf, want);
    if (r <= 0) return;
    for (char *q = buf; q < buf + r;) {
        struct inotify_event *e = (struct inotify_event *)q;
        q += sizeof *e + e->len;
        if (e->mask & IN_Q_OVERFLOW) {
            emit_event(w, EV_OVERFLOW, "", NULL);
            continue;
        }
        const char *dir = dir_path(w, e->wd);
        if (!dir) continue;
        const char *name = e->len ? e->name : NULL;
        if (e->mask & IN_IGNORED) {
            forget_dir(w, e->wd);
            continue;
        }
        if ((e->mask & (IN_DELETE_SELF | IN_MOVE_SELF)) && e->wd != w->root_wd)
            continue; /* a subdirectory: its parent reported it */
        uint32_t ev = (e->mask & (IN_CREATE | IN_MOVED_TO))        ? EV_CREATE
                      : (e->mask & IN_MODIFY)                      ? EV_WRITE
                      : (e->mask & (IN_DELETE | IN_DELETE_SELF))   ? EV_REMOVE
                      : (e->mask & (IN_MOVED_FROM | IN_MOVE_SELF)) ? EV_RENAME
                      : (e->mask & IN_ATTRIB)                      ? EV_CHMOD
                                                                   : 0;
        if (!ev) continue;
        if (w->recursive && (e->mask & IN_ISDIR) && (e->mask & (IN_CREATE | IN_MOVED_TO)) && name) {
            char sub[PATH_MAX];
            emit_event(w, ev, dir, name);
            if (snprintf(sub, sizeof sub, "%s/%s", dir, name) < (int)sizeof sub)
                add_dir(w, sub, 1, 1);
            continue;
        }
        emit_event(w, ev, dir, name);
    }
}
