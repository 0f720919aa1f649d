/* faultfs: a fault injector for the test suite, loaded with LD_PRELOAD into a child process.
 *
 * It wraps the libc calls that write to files (open with O_CREAT, write, pwrite, writev, fsync, fdatasync,
 * ftruncate, rename, link, unlink, mkdir) and, for files under one path prefix only, counts them and fails the n-th
 * one (and the ones after it, for a while) with an errno such as ENOSPC or EIO, or kills the process right there
 * with SIGKILL. Everything that writes through libc is covered: Python's os and io modules, SQLite, fastavro,
 * pyarrow, DuckDB. A failing write can be made partial: it writes half of its bytes for real and returns a short
 * count, as a disk that fills up mid-write does; the next write then fails.
 *
 * Configuration: from the environment when the library loads (FAULTFS_PREFIX, FAULTFS_OPS, FAULTFS_NTH,
 * FAULTFS_COUNT, FAULTFS_ERRNO, FAULTFS_PARTIAL, FAULTFS_KILL), and at run time through the exported faultfs_*
 * functions (tests/faults.py calls them with ctypes).
 *
 * Ops: "create" (open/creat that may create a file, mkdir), "write" (write, pwrite, writev, pwritev),
 * "fsync" (fsync, fdatasync), "truncate" (ftruncate), "rename", "link", "unlink".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

enum { OP_CREATE, OP_WRITE, OP_FSYNC, OP_TRUNCATE, OP_RENAME, OP_LINK, OP_UNLINK, N_OPS };
static const char *OP_NAMES[N_OPS] = {"create", "write", "fsync", "truncate", "rename", "link", "unlink"};

#define MAX_FD 65536
static unsigned char tracked[MAX_FD];
static char prefix[PATH_MAX];
static size_t prefix_len;

static int armed_ops; /* bit mask of the ops that count towards nth */
static long nth;      /* the first failing op, 1-based; 0: never fail */
static long count = 1; /* how many consecutive counted ops fail */
static int fail_errno = ENOSPC;
static int partial;   /* a failing write first writes half of its bytes and returns a short count */
static int kill_mode; /* 1: SIGKILL before the nth op, 2: after it */
static long seen;     /* counted ops so far (those in armed_ops) */
static long totals[N_OPS];
static long failures;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_creat)(const char *, mode_t);
static int (*real_creat64)(const char *, mode_t);
static int (*real_close)(int);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off_t);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_link)(const char *, const char *);
static int (*real_linkat)(int, const char *, int, const char *, int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdir)(const char *, mode_t);
static int (*real_mkdirat)(int, const char *, mode_t);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);

#define RESOLVE(name) real_##name = dlsym(RTLD_NEXT, #name)

static int parse_ops(const char *text) {
    int mask = 0;
    if (text == NULL || *text == '\0') return 0;
    for (int op = 0; op < N_OPS; op++) {
        const char *at = text;
        size_t n = strlen(OP_NAMES[op]);
        while ((at = strstr(at, OP_NAMES[op])) != NULL) {
            int starts = at == text || at[-1] == ',';
            int ends = at[n] == '\0' || at[n] == ',';
            if (starts && ends) mask |= 1 << op;
            at += n;
        }
    }
    if (strcmp(text, "all") == 0) mask = (1 << N_OPS) - 1;
    return mask;
}

void faultfs_set_prefix(const char *path) {
    if (path == NULL) path = "";
    strncpy(prefix, path, sizeof prefix - 1);
    prefix[sizeof prefix - 1] = '\0';
    prefix_len = strlen(prefix);
}

void faultfs_arm(const char *ops, long first, long how_many, int err, int is_partial, int kill_at) {
    __atomic_store_n(&armed_ops, 0, __ATOMIC_SEQ_CST);
    seen = 0;
    failures = 0;
    nth = first;
    count = how_many;
    fail_errno = err;
    partial = is_partial;
    kill_mode = kill_at;
    __atomic_store_n(&armed_ops, parse_ops(ops), __ATOMIC_SEQ_CST);
}

void faultfs_disarm(void) { __atomic_store_n(&armed_ops, 0, __ATOMIC_SEQ_CST); }

/* Ops of this kind on files under the prefix since the library loaded (or since faultfs_reset_totals). */
long faultfs_total(const char *op) {
    for (int i = 0; i < N_OPS; i++)
        if (strcmp(op, OP_NAMES[i]) == 0) return __atomic_load_n(&totals[i], __ATOMIC_SEQ_CST);
    return -1;
}

void faultfs_reset_totals(void) {
    for (int i = 0; i < N_OPS; i++) __atomic_store_n(&totals[i], 0, __ATOMIC_SEQ_CST);
}

/* Counted ops since the last faultfs_arm, and how many of them failed. */
long faultfs_seen(void) { return __atomic_load_n(&seen, __ATOMIC_SEQ_CST); }
long faultfs_failures(void) { return __atomic_load_n(&failures, __ATOMIC_SEQ_CST); }

__attribute__((constructor)) static void faultfs_init(void) {
    RESOLVE(write); RESOLVE(pwrite); RESOLVE(pwrite64); RESOLVE(writev); RESOLVE(pwritev);
    RESOLVE(open); RESOLVE(open64); RESOLVE(openat); RESOLVE(openat64); RESOLVE(creat); RESOLVE(creat64);
    RESOLVE(close); RESOLVE(fsync); RESOLVE(fdatasync); RESOLVE(ftruncate); RESOLVE(ftruncate64);
    RESOLVE(rename); RESOLVE(renameat); RESOLVE(renameat2); RESOLVE(link); RESOLVE(linkat);
    RESOLVE(unlink); RESOLVE(unlinkat); RESOLVE(mkdir); RESOLVE(mkdirat);
    RESOLVE(dup); RESOLVE(dup2); RESOLVE(dup3);
    faultfs_set_prefix(getenv("FAULTFS_PREFIX"));
    const char *ops = getenv("FAULTFS_OPS");
    if (ops != NULL && *ops != '\0') {
        const char *v;
        long first = (v = getenv("FAULTFS_NTH")) ? atol(v) : 0;
        long how_many = (v = getenv("FAULTFS_COUNT")) ? atol(v) : 1;
        int err = (v = getenv("FAULTFS_ERRNO")) ? atoi(v) : ENOSPC;
        int is_partial = (v = getenv("FAULTFS_PARTIAL")) ? atoi(v) : 0;
        int kill_at = (v = getenv("FAULTFS_KILL")) ? atoi(v) : 0;
        faultfs_arm(ops, first, how_many, err, is_partial, kill_at);
    }
}

/* Whether an absolute or dirfd-relative path lies under the prefix. */
static int under_prefix(int dirfd, const char *path) {
    char full[PATH_MAX * 2];
    if (prefix_len == 0 || path == NULL) return 0;
    if (path[0] == '/') {
        return strncmp(path, prefix, prefix_len) == 0;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (getcwd(base, sizeof base) == NULL) return 0;
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        if (n < 0) return 0;
        base[n] = '\0';
    }
    snprintf(full, sizeof full, "%s/%s", base, path);
    return strncmp(full, prefix, prefix_len) == 0;
}

static int is_tracked(int fd) { return fd >= 0 && fd < MAX_FD && __atomic_load_n(&tracked[fd], __ATOMIC_SEQ_CST); }

static void track(int fd, int on) {
    if (fd >= 0 && fd < MAX_FD) __atomic_store_n(&tracked[fd], (unsigned char)on, __ATOMIC_SEQ_CST);
}

/* What to do with one op on a file under the prefix: 0 go on, 1 fail it, 2 fail it partially (writes). */
static int decide(int op) {
    __atomic_add_fetch(&totals[op], 1, __ATOMIC_SEQ_CST);
    if (!(__atomic_load_n(&armed_ops, __ATOMIC_SEQ_CST) & (1 << op))) return 0;
    long n = __atomic_add_fetch(&seen, 1, __ATOMIC_SEQ_CST);
    if (nth <= 0 || n < nth || n >= nth + count) return 0;
    if (kill_mode == 1) raise(SIGKILL);
    if (kill_mode == 2) return 3; /* do it, then die */
    long f = __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
    return (partial && f == 1 && op == OP_WRITE) ? 2 : 1;
}

static void after(int verdict) {
    if (verdict == 3) raise(SIGKILL);
}

#define FAIL_WITH(value) do { errno = fail_errno; return (value); } while (0)

ssize_t write(int fd, const void *buf, size_t n) {
    if (!is_tracked(fd)) return real_write(fd, buf, n);
    int verdict = decide(OP_WRITE);
    if (verdict == 2 && n > 1) return real_write(fd, buf, n / 2);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    ssize_t r = real_write(fd, buf, n);
    after(verdict);
    return r;
}

static ssize_t pwrite_common(ssize_t (*real)(int, const void *, size_t, off_t), int fd, const void *buf, size_t n,
                             off_t at) {
    if (!is_tracked(fd)) return real(fd, buf, n, at);
    int verdict = decide(OP_WRITE);
    if (verdict == 2 && n > 1) return real(fd, buf, n / 2, at);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    ssize_t r = real(fd, buf, n, at);
    after(verdict);
    return r;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t at) { return pwrite_common(real_pwrite, fd, buf, n, at); }
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t at) { return pwrite_common(real_pwrite64, fd, buf, n, at); }

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    if (!is_tracked(fd)) return real_writev(fd, iov, iovcnt);
    int verdict = decide(OP_WRITE);
    if (verdict == 2 && iovcnt > 0 && iov[0].iov_len > 1) return real_write(fd, iov[0].iov_base, iov[0].iov_len / 2);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    ssize_t r = real_writev(fd, iov, iovcnt);
    after(verdict);
    return r;
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t at) {
    if (!is_tracked(fd)) return real_pwritev(fd, iov, iovcnt, at);
    int verdict = decide(OP_WRITE);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    ssize_t r = real_pwritev(fd, iov, iovcnt, at);
    after(verdict);
    return r;
}

static int open_common(int dirfd, const char *path, int flags, mode_t mode,
                       int (*call)(int, const char *, int, mode_t)) {
    int ours = under_prefix(dirfd, path);
    int verdict = 0;
    if (ours && (flags & (O_CREAT | O_TRUNC))) {
        verdict = decide(OP_CREATE);
        if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    }
    int fd = call(dirfd, path, flags, mode);
    if (fd >= 0) track(fd, ours);
    after(verdict);
    return fd;
}

static int call_open(int dirfd, const char *path, int flags, mode_t mode) {
    (void)dirfd;
    return real_open(path, flags, mode);
}
static int call_open64(int dirfd, const char *path, int flags, mode_t mode) {
    (void)dirfd;
    return real_open64(path, flags, mode);
}
static int call_openat(int dirfd, const char *path, int flags, mode_t mode) {
    return real_openat(dirfd, path, flags, mode);
}
static int call_openat64(int dirfd, const char *path, int flags, mode_t mode) {
    return real_openat64(dirfd, path, flags, mode);
}

#define MODE_ARG(flags) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | __O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }

int open(const char *path, int flags, ...) { MODE_ARG(flags); return open_common(AT_FDCWD, path, flags, mode, call_open); }
int open64(const char *path, int flags, ...) { MODE_ARG(flags); return open_common(AT_FDCWD, path, flags, mode, call_open64); }
int openat(int dirfd, const char *path, int flags, ...) { MODE_ARG(flags); return open_common(dirfd, path, flags, mode, call_openat); }
int openat64(int dirfd, const char *path, int flags, ...) { MODE_ARG(flags); return open_common(dirfd, path, flags, mode, call_openat64); }
int creat(const char *path, mode_t mode) { return open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, call_open); }
int creat64(const char *path, mode_t mode) { return open_common(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode, call_open64); }

int close(int fd) {
    track(fd, 0);
    return real_close(fd);
}

int dup(int fd) {
    int copy = real_dup(fd);
    if (copy >= 0) track(copy, is_tracked(fd));
    return copy;
}

int dup2(int fd, int to) {
    int copy = real_dup2(fd, to);
    if (copy >= 0) track(copy, is_tracked(fd));
    return copy;
}

int dup3(int fd, int to, int flags) {
    int copy = real_dup3(fd, to, flags);
    if (copy >= 0) track(copy, is_tracked(fd));
    return copy;
}

static int fd_op(int op, int fd, int (*call)(int)) {
    if (!is_tracked(fd)) return call(fd);
    int verdict = decide(op);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    int r = call(fd);
    after(verdict);
    return r;
}

int fsync(int fd) { return fd_op(OP_FSYNC, fd, real_fsync); }
int fdatasync(int fd) { return fd_op(OP_FSYNC, fd, real_fdatasync); }

static int truncate_common(int (*real)(int, off_t), int fd, off_t length) {
    if (!is_tracked(fd)) return real(fd, length);
    int verdict = decide(OP_TRUNCATE);
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1);
    int r = real(fd, length);
    after(verdict);
    return r;
}

int ftruncate(int fd, off_t length) { return truncate_common(real_ftruncate, fd, length); }
int ftruncate64(int fd, off_t length) { return truncate_common(real_ftruncate64, fd, length); }

static int path_verdict(int op, int dirfd1, const char *a, int dirfd2, const char *b) {
    if (!under_prefix(dirfd1, a) && !(b != NULL && under_prefix(dirfd2, b))) return 0;
    return decide(op);
}

#define PATH_OP(op, d1, a, d2, b, expr) do { \
    int verdict = path_verdict(op, d1, a, d2, b); \
    if (verdict == 1 || verdict == 2) FAIL_WITH(-1); \
    int r = (expr); \
    after(verdict); \
    return r; \
} while (0)

int rename(const char *a, const char *b) { PATH_OP(OP_RENAME, AT_FDCWD, a, AT_FDCWD, b, real_rename(a, b)); }
int renameat(int d1, const char *a, int d2, const char *b) { PATH_OP(OP_RENAME, d1, a, d2, b, real_renameat(d1, a, d2, b)); }
int renameat2(int d1, const char *a, int d2, const char *b, unsigned int flags) {
    PATH_OP(OP_RENAME, d1, a, d2, b, real_renameat2(d1, a, d2, b, flags));
}
int link(const char *a, const char *b) { PATH_OP(OP_LINK, AT_FDCWD, a, AT_FDCWD, b, real_link(a, b)); }
int linkat(int d1, const char *a, int d2, const char *b, int flags) {
    PATH_OP(OP_LINK, d1, a, d2, b, real_linkat(d1, a, d2, b, flags));
}
int unlink(const char *a) { PATH_OP(OP_UNLINK, AT_FDCWD, a, AT_FDCWD, NULL, real_unlink(a)); }
int unlinkat(int d, const char *a, int flags) { PATH_OP(OP_UNLINK, d, a, AT_FDCWD, NULL, real_unlinkat(d, a, flags)); }
int mkdir(const char *a, mode_t mode) { PATH_OP(OP_CREATE, AT_FDCWD, a, AT_FDCWD, NULL, real_mkdir(a, mode)); }
int mkdirat(int d, const char *a, mode_t mode) { PATH_OP(OP_CREATE, d, a, AT_FDCWD, NULL, real_mkdirat(d, a, mode)); }
