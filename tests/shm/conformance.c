/*
 * POSIX and System V shared memory, the same sequence of calls for a segment of SIZE
 * bytes: run once with SIZE below MSHARE_SHM_MIN (the kernel's own segments, the oracle)
 * and once above it (segments on msharefs, under libmshare_preload.so), and every line
 * of standard output must be the same. Lines starting with '#' are observations that
 * may differ (where the memory is mapped); tests/shm_conformance.rs reads them.
 *
 *   conformance SIZE TAG        run everything; TAG makes names and keys unique
 *   conformance posix-exec NAME SIZE        (internal) a freshly exec'd opener
 *   conformance posix-recv SOCKFD SIZE      (internal) receives a descriptor
 *   conformance sysv-exec ID SIZE           (internal) attached through exec
 *
 * Runs as root (it drops to uid 65534 in children to check permissions).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOBODY 65534
#define GIB (1ul << 30)

static size_t S;
static const char *self_exe = "/proc/self/exe";

static const char *ename(int e)
{
    switch (e) {
    case 0: return "ok";
    case EACCES: return "EACCES";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case ENOENT: return "ENOENT";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EPERM: return "EPERM";
    case EIDRM: return "EIDRM";
    case EBADF: return "EBADF";
    case ENOMEM: return "ENOMEM";
    case ENOSPC: return "ENOSPC";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "errno%d", e);
        return buf;
    }
    }
}

/* A size, relative to SIZE where it is one. */
static const char *sz(unsigned long long v)
{
    static char buf[4][48];
    static int i;
    char *b = buf[i++ % 4];
    if (v == S) snprintf(b, 48, "S");
    else if (v == 0) snprintf(b, 48, "0");
    else if (v == S / 2) snprintf(b, 48, "S/2");
    else snprintf(b, 48, "%llu", v);
    return b;
}

#define OUT(...) printf(__VA_ARGS__)
/* Result of a call returning -1/errno: "ok" or the errno's name. */
#define RC(step, call) do { errno = 0; long r_ = (long)(call); \
    OUT("%s: %s\n", step, r_ == -1 ? ename(errno) : "ok"); } while (0)

static int check_fd(const char *step, int fd)
{
    OUT("%s: %s\n", step, fd < 0 ? ename(errno) : "ok");
    return fd;
}

/* Whether the mapping at `p` is one msharefs placed: 1 GiB-aligned, on the daemon's
 * hugetlb backing store. An observation line, not compared. */
static void observe(const char *what, const void *p)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int placed = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && lo <= (unsigned long)p &&
            (unsigned long)p < hi)
            placed = strstr(line, "/backing/hugetlb/") != NULL && lo % GIB == 0;
    }
    if (f) fclose(f);
    OUT("# placed %s %d %p\n", what, placed, p);
}

/* Runs `fn` in a child (as uid 65534 when `nobody`); prints how it ended. */
static void in_child(const char *step, int nobody, void (*fn)(void *), void *arg)
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        if (nobody && (setgid(NOBODY) || setuid(NOBODY))) _exit(90);
        fn(arg);
        fflush(stdout);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    if (WIFSIGNALED(st)) OUT("%s: child killed by %s\n", step, strsignal(WTERMSIG(st)));
    else OUT("%s: child exit %d\n", step, WEXITSTATUS(st));
}

static void run_exec(const char *step, char *const argv[])
{
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        execv(self_exe, argv);
        _exit(91);
    }
    int st;
    waitpid(pid, &st, 0);
    OUT("%s: exit %d\n", step, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
}

static void pattern(unsigned char *p, unsigned char v)
{
    p[0] = v;
    p[S / 2] = v + 1;
    p[S - 1] = v + 2;
}

static const char *seen(const unsigned char *p, unsigned char v)
{
    return p[0] == v && p[S / 2] == v + 1 && p[S - 1] == v + 2 ? "pattern" : "other";
}

/* ---- POSIX ------------------------------------------------------------------------ */

static char pname[64], pname2[64];
static unsigned char *pmap;

static void posix_child_open(void *arg)
{
    (void)arg;
    int fd = shm_open(pname, O_RDWR, 0);
    if (check_fd("posix fork: shm_open", fd) < 0) return;
    struct stat st;
    fstat(fd, &st);
    OUT("posix fork: st_size %s\n", sz(st.st_size));
    unsigned char *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    OUT("posix fork: mmap %s\n", p == MAP_FAILED ? ename(errno) : "ok");
    if (p == MAP_FAILED) return;
    observe("posix-fork", p);
    OUT("posix fork: sees %s\n", seen(p, 10));
    p[1] = 77;
    RC("posix fork: munmap unrounded", munmap(p, st.st_size));
    close(fd);
}

static void posix_nobody(void *arg)
{
    (void)arg;
    errno = 0;
    int fd = shm_open(pname, O_RDWR, 0);
    OUT("posix nobody: shm_open rdwr %s\n", fd < 0 ? ename(errno) : "ok");
    if (fd >= 0) close(fd);
    fd = shm_open(pname, O_RDONLY, 0);
    OUT("posix nobody: shm_open rdonly %s\n", fd < 0 ? ename(errno) : "ok");
    if (fd >= 0) {
        unsigned char *p = mmap(NULL, S, PROT_READ, MAP_SHARED, fd, 0);
        OUT("posix nobody: mmap read %s\n", p == MAP_FAILED ? ename(errno) : "ok");
        if (p != MAP_FAILED) {
            OUT("posix nobody: sees %s\n", seen(p, 10));
            munmap(p, S);
        }
        errno = 0;
        p = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        OUT("posix nobody: mmap write %s\n", p == MAP_FAILED ? ename(errno) : "ok");
        close(fd);
    }
    RC("posix nobody: shm_unlink", shm_unlink(pname));
}

static void posix_unlinker(void *arg)
{
    (void)arg;
    RC("posix other process: shm_unlink", shm_unlink(pname));
}

static int send_fd(int sock, int fd)
{
    char c = 'x';
    struct iovec iov = {&c, 1};
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof u.buf;
    struct cmsghdr *c0 = CMSG_FIRSTHDR(&m);
    c0->cmsg_level = SOL_SOCKET;
    c0->cmsg_type = SCM_RIGHTS;
    c0->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c0), &fd, sizeof fd);
    return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock)
{
    char c;
    struct iovec iov = {&c, 1};
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof u.buf;
    if (recvmsg(sock, &m, 0) != 1) return -1;
    struct cmsghdr *c0 = CMSG_FIRSTHDR(&m);
    int fd = -1;
    if (c0 && c0->cmsg_type == SCM_RIGHTS) memcpy(&fd, CMSG_DATA(c0), sizeof fd);
    return fd;
}

/* A freshly exec'd process that receives a descriptor of the segment: no shm_open. */
static int posix_recv(int sock)
{
    int fd = recv_fd(sock);
    if (check_fd("posix scm_rights: received", fd) < 0) return 1;
    struct stat st;
    fstat(fd, &st);
    OUT("posix scm_rights: st_size %s\n", sz(st.st_size));
    unsigned char *p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    OUT("posix scm_rights: mmap %s\n", p == MAP_FAILED ? ename(errno) : "ok");
    if (p == MAP_FAILED) return 1;
    observe("posix-scm", p);
    OUT("posix scm_rights: sees %s\n", seen(p, 10));
    p[2] = 88;
    unsigned char b;
    OUT("posix scm_rights: pread %zd %d\n", pread(fd, &b, 1, 1), b);
    munmap(p, st.st_size);
    return 0;
}

static int posix_exec(const char *name)
{
    int fd = shm_open(name, O_RDWR, 0);
    if (check_fd("posix exec: shm_open", fd) < 0) return 1;
    struct stat st;
    fstat(fd, &st);
    OUT("posix exec: st_size %s mode %o\n", sz(st.st_size), st.st_mode & 07777);
    unsigned char *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    OUT("posix exec: mmap %s\n", p == MAP_FAILED ? ename(errno) : "ok");
    if (p == MAP_FAILED) return 1;
    observe("posix-exec", p);
    OUT("posix exec: sees %s and %d\n", seen(p, 10), p[1]);
    munmap(p, st.st_size);
    close(fd);
    return 0;
}

static void posix(const char *tag)
{
    snprintf(pname, sizeof pname, "/mshare-conf-%s", tag);
    snprintf(pname2, sizeof pname2, "/mshare-conf2-%s", tag);
    char longname[300];
    memset(longname, 'n', sizeof longname);
    longname[0] = '/';
    longname[sizeof longname - 1] = 0;

    /* Names, as glibc and the kernel check them. */
    errno = 0;
    OUT("posix: empty name %s\n", shm_open("", O_RDWR | O_CREAT, 0600) < 0 ? ename(errno) : "ok");
    errno = 0;
    OUT("posix: slash inside %s\n", shm_open("/a/b", O_RDWR | O_CREAT, 0600) < 0 ? ename(errno) : "ok");
    errno = 0;
    OUT("posix: too long %s\n", shm_open(longname, O_RDWR | O_CREAT, 0600) < 0 ? ename(errno) : "ok");
    errno = 0;
    OUT("posix: missing %s\n", shm_open(pname, O_RDWR, 0) < 0 ? ename(errno) : "ok");
    RC("posix: shm_unlink missing", shm_unlink(pname));

    int fd = check_fd("posix: create", shm_open(pname, O_RDWR | O_CREAT | O_EXCL, 0600));
    if (fd < 0) return;
    errno = 0;
    OUT("posix: create again excl %s\n",
        shm_open(pname, O_RDWR | O_CREAT | O_EXCL, 0600) < 0 ? ename(errno) : "ok");
    struct stat st;
    fstat(fd, &st);
    OUT("posix: st_size before %s\n", sz(st.st_size));
    RC("posix: ftruncate", ftruncate(fd, S));
    fstat(fd, &st);
    OUT("posix: st_size %s mode %o uid %d\n", sz(st.st_size), st.st_mode & 07777, st.st_uid);
    RC("posix: ftruncate same size again", ftruncate(fd, S));
    pmap = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    OUT("posix: mmap %s\n", pmap == MAP_FAILED ? ename(errno) : "ok");
    if (pmap == MAP_FAILED) return;
    observe("posix", pmap);
    pattern(pmap, 10);
    pmap[1] = 0;

    /* The descriptor reads and writes what the mapping holds. */
    unsigned char b = 0;
    OUT("posix: pread %zd -> %d\n", pread(fd, &b, 1, S - 1), b);
    OUT("posix: pwrite %zd\n", pwrite(fd, "\x05", 1, 3));
    OUT("posix: mapping sees pwrite %d\n", pmap[3]);
    OUT("posix: lseek %s\n", sz(lseek(fd, S / 2, SEEK_SET)));
    OUT("posix: read %zd -> %d\n", read(fd, &b, 1), b);
    OUT("posix: read at end %zd\n", pread(fd, &b, 1, S));

    /* Every way a descriptor travels. */
    int d1 = dup(fd), d2 = fcntl(fd, F_DUPFD_CLOEXEC, 100);
    OUT("posix: dup %s fcntl cloexec %s flags %d\n", d1 < 0 ? ename(errno) : "ok",
        d2 < 0 ? ename(errno) : "ok", fcntl(d2, F_GETFD));
    fstat(d2, &st);
    OUT("posix: dup st_size %s\n", sz(st.st_size));
    unsigned char *q = mmap(NULL, S, PROT_READ, MAP_SHARED, d1, 0);
    OUT("posix: mmap through dup %s sees %s\n", q == MAP_FAILED ? ename(errno) : "ok",
        q == MAP_FAILED ? "-" : seen(q, 10));
    if (q != MAP_FAILED) {
        observe("posix-dup", q);
        munmap(q, S);
    }
    close(d1);
    close(d2);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int d3 = open(path, O_RDWR);
    check_fd("posix: open /proc/self/fd", d3);
    if (d3 >= 0) {
        fstat(d3, &st);
        OUT("posix: /proc/self/fd st_size %s\n", sz(st.st_size));
        OUT("posix: /proc/self/fd pread %zd -> %d\n", pread(d3, &b, 1, 0), b);
        close(d3);
    }
    in_child("posix fork", 0, posix_child_open, NULL);
    OUT("posix: parent sees child's write %d\n", pmap[1]);
    char ssz[32];
    snprintf(ssz, sizeof ssz, "%zu", S);
    char *ea[] = {(char *)"conformance", (char *)"posix-exec", pname, ssz, NULL};
    run_exec("posix exec", ea);
    int sv[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
    char sfd[16];
    snprintf(sfd, sizeof sfd, "%d", sv[1]);
    fflush(stdout);
    pid_t r = fork();
    if (r == 0) {
        close(sv[0]);
        char *ra[] = {(char *)"conformance", (char *)"posix-recv", sfd, ssz, NULL};
        execv(self_exe, ra);
        _exit(91);
    }
    close(sv[1]);
    OUT("posix: send_fd %d\n", send_fd(sv[0], fd));
    int rst;
    waitpid(r, &rst, 0);
    OUT("posix scm_rights: exit %d\n", WEXITSTATUS(rst));
    close(sv[0]);
    OUT("posix: parent sees receiver's write %d\n", pmap[2]);

    /* Access modes and permissions. */
    int ro = shm_open(pname, O_RDONLY, 0);
    check_fd("posix: open rdonly", ro);
    errno = 0;
    q = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0);
    OUT("posix: mmap write through rdonly %s\n", q == MAP_FAILED ? ename(errno) : "ok");
    q = mmap(NULL, S, PROT_READ, MAP_SHARED, ro, 0);
    OUT("posix: mmap read through rdonly %s\n", q == MAP_FAILED ? ename(errno) : "ok");
    if (q != MAP_FAILED) munmap(q, S);
    q = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_PRIVATE, ro, 0);
    OUT("posix: mmap private %s\n", q == MAP_FAILED ? ename(errno) : "ok");
    if (q != MAP_FAILED) {
        q[0] = 99;
        OUT("posix: private copy %d shared stays %d\n", q[0], pmap[0]);
        munmap(q, S);
    }
    close(ro);
    in_child("posix nobody 0600", 1, posix_nobody, NULL);
    RC("posix: fchmod 0644", fchmod(fd, 0644));
    fstat(fd, &st);
    OUT("posix: mode now %o\n", st.st_mode & 07777);
    in_child("posix nobody 0644", 1, posix_nobody, NULL);

    /* O_TRUNC empties the segment; a new size starts from zeros. */
    int t = shm_open(pname, O_RDWR | O_TRUNC, 0);
    check_fd("posix: open trunc", t);
    fstat(t, &st);
    OUT("posix: after trunc st_size %s\n", sz(st.st_size));
    RC("posix: size again", ftruncate(t, S));
    q = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_SHARED, t, 0);
    OUT("posix: new mapping %s sees %s\n", q == MAP_FAILED ? ename(errno) : "ok",
        q == MAP_FAILED ? "-" : (q[0] == 0 && q[S / 2] == 0 && q[S - 1] == 0 ? "zeros" : "old"));
    if (q != MAP_FAILED) {
        observe("posix-trunc", q);
        pattern(q, 30);
    }

    /* shm_unlink from another process: the name goes at once, the memory stays. */
    in_child("posix unlink", 0, posix_unlinker, NULL);
    errno = 0;
    OUT("posix: open after unlink %s\n", shm_open(pname, O_RDWR, 0) < 0 ? ename(errno) : "ok");
    OUT("posix: mapping after unlink sees %s\n", q == MAP_FAILED ? "-" : seen(q, 30));
    int fresh = shm_open(pname, O_RDWR | O_CREAT | O_EXCL, 0600);
    check_fd("posix: create same name again", fresh);
    fstat(fresh, &st);
    OUT("posix: new segment st_size %s\n", sz(st.st_size));
    RC("posix: unlink new", shm_unlink(pname));
    close(fresh);
    if (q != MAP_FAILED) RC("posix: munmap unrounded", munmap(q, S));
    RC("posix: munmap first", munmap(pmap, S));
    close(t);
    RC("posix: close", close(fd));

    /* Sizing as PostgreSQL 16+ (posix_fallocate only) and PyTorch (ftruncate, write). */
    fd = check_fd("posix: create 2", shm_open(pname2, O_RDWR | O_CREAT | O_EXCL, 0640));
    OUT("posix: posix_fallocate %s\n", ename(posix_fallocate(fd, 0, S)));
    fstat(fd, &st);
    OUT("posix: st_size %s mode %o\n", sz(st.st_size), st.st_mode & 07777);
    OUT("posix: posix_fallocate again %s\n", ename(posix_fallocate(fd, 0, S)));
    OUT("posix: write one byte %zd\n", write(fd, "", 1));
    q = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    OUT("posix: mmap 2 %s\n", q == MAP_FAILED ? ename(errno) : "ok");
    if (q != MAP_FAILED) {
        observe("posix-fallocate", q);
        RC("posix: munmap 2", munmap(q, st.st_size));
    }
    close(fd);
    RC("posix: unlink 2", shm_unlink(pname2));
    fd = shm_open(pname2, O_RDWR | O_CREAT | O_EXCL, 0600);
    RC("posix: fallocate", fallocate(fd, 0, 0, S));
    fstat(fd, &st);
    OUT("posix: fallocate st_size %s\n", sz(st.st_size));
    close(fd);
    RC("posix: unlink 3", shm_unlink(pname2));
}

/* ---- System V ----------------------------------------------------------------------- */

static int sid;
static unsigned char *smap;

static void sysv_stat(const char *step, int id)
{
    struct shmid_ds ds;
    errno = 0;
    if (shmctl(id, IPC_STAT, &ds) < 0) {
        OUT("%s: IPC_STAT %s\n", step, ename(errno));
        return;
    }
    OUT("%s: segsz %s nattch %lu mode %o dest %d cpid_is_me %d\n", step, sz(ds.shm_segsz),
        (unsigned long)ds.shm_nattch, ds.shm_perm.mode & 0777, !!(ds.shm_perm.mode & SHM_DEST),
        ds.shm_cpid == getpid());
}

static void sysv_child(void *arg)
{
    (void)arg;
    sysv_stat("sysv fork child", sid);
    OUT("sysv fork child: sees %s\n", seen(smap, 40));
    smap[1] = 41;
    unsigned char *p = shmat(sid, NULL, SHM_RDONLY);
    OUT("sysv fork child: attach rdonly %s\n", p == (void *)-1 ? ename(errno) : "ok");
    if (p != (void *)-1) {
        observe("sysv-rdonly", p);
        OUT("sysv fork child: rdonly sees %s\n", seen(p, 40));
        sysv_stat("sysv fork child attached twice", sid);
        p[0] = 1; /* SIGSEGV: read-only */
    }
}

static void sysv_nobody(void *arg)
{
    key_t key = *(key_t *)arg;
    errno = 0;
    int id = shmget(key, 0, 0);
    OUT("sysv nobody: shmget %s same %d\n", id < 0 ? ename(errno) : "ok", id == sid);
    errno = 0;
    void *p = shmat(sid, NULL, 0);
    OUT("sysv nobody: shmat rw %s\n", p == (void *)-1 ? ename(errno) : "ok");
    errno = 0;
    p = shmat(sid, NULL, SHM_RDONLY);
    OUT("sysv nobody: shmat ro %s\n", p == (void *)-1 ? ename(errno) : "ok");
    if (p != (void *)-1) {
        OUT("sysv nobody: sees %s\n", seen(p, 40));
        RC("sysv nobody: shmdt", shmdt(p));
    }
    struct shmid_ds ds;
    RC("sysv nobody: IPC_RMID", shmctl(sid, IPC_RMID, &ds));
}

static int sysv_exec(int id)
{
    sysv_stat("sysv exec", id);
    unsigned char *p = shmat(id, NULL, 0);
    OUT("sysv exec: shmat %s\n", p == (void *)-1 ? ename(errno) : "ok");
    if (p == (void *)-1) return 1;
    observe("sysv-exec", p);
    OUT("sysv exec: sees %s\n", seen(p, 40));
    sysv_stat("sysv exec attached", id);
    /* exec, exit and kill -9 detach: this process now waits to be killed. */
    if (getenv("CONF_WAIT_FOR_KILL")) {
        printf("ready\n");
        fflush(stdout);
        pause();
    }
    return 0;
}

static void sysv(const char *tag)
{
    key_t key = 0x4d530000 + (getpid() & 0xffff), key2 = key + 0x10000;
    (void)tag;
    errno = 0;
    OUT("sysv: lookup missing %s\n", shmget(key, S, 0600) < 0 ? ename(errno) : "ok");
    sid = shmget(key, S, IPC_CREAT | IPC_EXCL | 0600);
    OUT("sysv: create %s\n", sid < 0 ? ename(errno) : "ok");
    if (sid < 0) return;
    errno = 0;
    OUT("sysv: create again excl %s\n",
        shmget(key, S, IPC_CREAT | IPC_EXCL | 0600) < 0 ? ename(errno) : "ok");
    int id = shmget(key, S, IPC_CREAT | 0600);
    OUT("sysv: create without excl finds it %d\n", id == sid);
    OUT("sysv: lookup smaller same %d\n", shmget(key, S / 2, 0) == sid);
    OUT("sysv: lookup size 0 same %d\n", shmget(key, 0, 0) == sid);
    errno = 0;
    OUT("sysv: lookup larger %s\n", shmget(key, S * 2, 0) < 0 ? ename(errno) : "ok");
    sysv_stat("sysv: new", sid);

    smap = shmat(sid, NULL, 0);
    OUT("sysv: shmat %s\n", smap == (void *)-1 ? ename(errno) : "ok");
    if (smap == (void *)-1) return;
    observe("sysv", smap);
    pattern(smap, 40);
    smap[1] = 0;
    sysv_stat("sysv: attached", sid);
    in_child("sysv fork", 0, sysv_child, NULL);
    OUT("sysv: parent sees child's write %d\n", smap[1]);
    sysv_stat("sysv: after child", sid);
    char sid_s[32], ssz[32];
    snprintf(sid_s, sizeof sid_s, "%d", sid);
    snprintf(ssz, sizeof ssz, "%zu", S);
    char *ea[] = {(char *)"conformance", (char *)"sysv-exec", sid_s, ssz, NULL};
    run_exec("sysv exec", ea);
    sysv_stat("sysv: after exec", sid);

    /* kill -9 of an attacher: it no longer counts. */
    int pfd[2];
    pipe(pfd);
    fflush(stdout);
    pid_t k = fork();
    if (k == 0) {
        dup2(pfd[1], 1);
        setenv("CONF_WAIT_FOR_KILL", "1", 1);
        execv(self_exe, ea);
        _exit(91);
    }
    close(pfd[1]);
    FILE *kf = fdopen(pfd[0], "r");
    char line[256];
    while (fgets(line, sizeof line, kf) && strcmp(line, "ready\n") != 0) {
        if (line[0] != '#') fputs(line, stdout);
    }
    sysv_stat("sysv: victim attached", sid);
    kill(k, SIGKILL);
    int kst;
    waitpid(k, &kst, 0);
    fclose(kf);
    OUT("sysv: victim %s\n", WIFSIGNALED(kst) ? strsignal(WTERMSIG(kst)) : "exited");
    sysv_stat("sysv: after kill -9", sid);

    /* Attach at a given address. */
    char *hole = mmap(NULL, 4 * GIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    char *at = (char *)(((uintptr_t)hole + GIB - 1) & ~(GIB - 1));
    munmap(hole, 4 * GIB);
    unsigned char *f = shmat(sid, at, 0);
    OUT("sysv: shmat at address %s same %d\n", f == (void *)-1 ? ename(errno) : "ok", (char *)f == at);
    if (f != (void *)-1) {
        observe("sysv-fixed", f);
        OUT("sysv: fixed sees %s\n", seen(f, 40));
        errno = 0;
        void *g = shmat(sid, at, 0);
        OUT("sysv: shmat over it %s\n", g == (void *)-1 ? ename(errno) : "ok");
        g = shmat(sid, at, SHM_REMAP);
        OUT("sysv: shmat SHM_REMAP %s same %d\n", g == (void *)-1 ? ename(errno) : "ok",
            (char *)g == at);
        sysv_stat("sysv: remapped", sid);
        RC("sysv: shmdt fixed", shmdt(at));
    }
    errno = 0;
    void *g = shmat(sid, at + 123, 0);
    OUT("sysv: shmat misaligned %s\n", g == (void *)-1 ? ename(errno) : "ok");
    g = shmat(sid, at + 123, SHM_RND);
    OUT("sysv: shmat SHM_RND %s same %d\n", g == (void *)-1 ? ename(errno) : "ok", (char *)g == at);
    if (g != (void *)-1) RC("sysv: shmdt rnd", shmdt(g));
    errno = 0;
    g = shmat(sid, NULL, SHM_REMAP);
    OUT("sysv: shmat NULL SHM_REMAP %s\n", g == (void *)-1 ? ename(errno) : "ok");
    RC("sysv: shmdt not attached", shmdt(at + 4096));
    sysv_stat("sysv: after fixed", sid);

    /* IPC_SET and permissions of others. */
    struct shmid_ds ds;
    shmctl(sid, IPC_STAT, &ds);
    ds.shm_perm.mode = 0604;
    RC("sysv: IPC_SET 0604", shmctl(sid, IPC_SET, &ds));
    in_child("sysv nobody 0604", 1, sysv_nobody, &key);
    sysv_stat("sysv: after nobody", sid);
    RC("sysv: SHM_LOCK", shmctl(sid, SHM_LOCK, NULL));
    RC("sysv: SHM_UNLOCK", shmctl(sid, SHM_UNLOCK, NULL));

    /* IPC_RMID while attached: the key is free at once, the segment lives until the last
     * detach. */
    RC("sysv: IPC_RMID", shmctl(sid, IPC_RMID, NULL));
    sysv_stat("sysv: removed", sid);
    errno = 0;
    OUT("sysv: key after RMID %s\n", shmget(key, S, 0600) < 0 ? ename(errno) : "ok");
    int sid2 = shmget(key, S, IPC_CREAT | IPC_EXCL | 0600);
    OUT("sysv: key reused %s new %d\n", sid2 < 0 ? ename(errno) : "ok", sid2 != sid);
    OUT("sysv: removed still sees %s\n", seen(smap, 40));
    RC("sysv: shmdt last", shmdt(smap));
    sysv_stat("sysv: gone", sid);
    if (sid2 >= 0) {
        unsigned char *p2 = shmat(sid2, NULL, 0);
        OUT("sysv: new segment %s zero %d\n", p2 == (void *)-1 ? ename(errno) : "ok",
            p2 != (void *)-1 && p2[0] == 0 && p2[S - 1] == 0);
        if (p2 != (void *)-1) observe("sysv-new", p2);
        if (p2 != (void *)-1) RC("sysv: shmdt new", shmdt(p2));
        /* ipcrm, without the shim, removes it as it removes any segment. */
        char cmd[128];
        snprintf(cmd, sizeof cmd, "env -u LD_PRELOAD ipcrm -m %d", sid2);
        fflush(stdout);
        OUT("sysv: ipcrm status %d\n", system(cmd));
        sysv_stat("sysv: after ipcrm", sid2);
    }

    /* IPC_PRIVATE, and a segment created without IPC_EXCL. */
    int p = shmget(IPC_PRIVATE, S, IPC_CREAT | 0600);
    OUT("sysv: private %s\n", p < 0 ? ename(errno) : "ok");
    int p2 = shmget(IPC_PRIVATE, S, IPC_CREAT | 0600);
    OUT("sysv: private again distinct %d\n", p2 >= 0 && p2 != p);
    unsigned char *pp = shmat(p, NULL, 0);
    if (pp != (void *)-1) {
        observe("sysv-private", pp);
        pattern(pp, 50);
        OUT("sysv: private sees %s\n", seen(pp, 50));
        shmdt(pp);
    }
    RC("sysv: private RMID", shmctl(p, IPC_RMID, NULL));
    RC("sysv: private 2 RMID", shmctl(p2, IPC_RMID, NULL));
    int c = shmget(key2, S, IPC_CREAT | 0600);
    OUT("sysv: create without excl %s\n", c < 0 ? ename(errno) : "ok");
    pp = shmat(c, NULL, 0);
    if (pp != (void *)-1) {
        observe("sysv-noexcl", pp);
        shmdt(pp);
    }
    RC("sysv: noexcl RMID", shmctl(c, IPC_RMID, NULL));
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 4 && strcmp(argv[1], "posix-exec") == 0) {
        S = strtoull(argv[3], NULL, 10);
        return posix_exec(argv[2]);
    }
    if (argc == 4 && strcmp(argv[1], "posix-recv") == 0) {
        S = strtoull(argv[3], NULL, 10);
        return posix_recv(atoi(argv[2]));
    }
    if (argc == 4 && strcmp(argv[1], "sysv-exec") == 0) {
        S = strtoull(argv[3], NULL, 10);
        return sysv_exec(atoi(argv[2]));
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s SIZE TAG\n", argv[0]);
        return 2;
    }
    S = strtoull(argv[1], NULL, 10);
    posix(argv[2]);
    sysv(argv[2]);
    OUT("done\n");
    return 0;
}
