/*
 * db_workers: uses libmshare the way a database server uses its shared buffer pool.
 *
 * The "postmaster" creates a region, then forks worker processes. Each worker opens the
 * region by name and attaches it itself (as separately started server processes do),
 * fills its own slice with a pattern and exits. The postmaster then attaches the region
 * read-only and checks every slice. Exit status 0 only if everything checked out.
 *
 *   db_workers [-w WORKERS] [-b default|hugetlb|thp|shmem] [-k] PATH SIZE
 *
 * PATH is a region path on an msharefs mount; SIZE is in bytes, with an optional K, M or
 * G suffix (binary units). -k keeps the region instead of unlinking it at the end.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -I libmshare/include db_workers.c
 *        -L target/release -lmshare
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mshare.h"

#define MAX_WORKERS 256

static const char *prog = "db_workers";

/* The value worker `w` stores in word `i` of its slice: never zero, unique per word. */
static uint64_t pattern(unsigned w, uint64_t i)
{
    return ((uint64_t)(w + 1) << 48) ^ i ^ UINT64_C(0x5a5a000000000000);
}

static void report(const char *what, const char *path, int rc)
{
    fprintf(stderr, "%s: %s(%s): %s\n", prog, what, path, mshare_strerror(rc));
}

static int parse_size(const char *s, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno != 0 || end == s)
        return -1;
    unsigned shift = 0;
    switch (*end) {
    case '\0': break;
    case 'k': case 'K': shift = 10; end++; break;
    case 'm': case 'M': shift = 20; end++; break;
    case 'g': case 'G': shift = 30; end++; break;
    default: return -1;
    }
    if (*end != '\0' || v == 0 || v > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)v << shift;
    return 0;
}

static int parse_backing(const char *s, unsigned int *out)
{
    static const struct { const char *name; unsigned int value; } names[] = {
        { "default", MSHARE_BACKING_DEFAULT },
        { "hugetlb", MSHARE_BACKING_HUGETLB },
        { "thp", MSHARE_BACKING_THP },
        { "shmem", MSHARE_BACKING_SHMEM },
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].value;
            return 0;
        }
    }
    return -1;
}

static const char *backing_name(unsigned int b)
{
    switch (b) {
    case MSHARE_BACKING_HUGETLB: return "hugetlb";
    case MSHARE_BACKING_THP: return "thp";
    case MSHARE_BACKING_SHMEM: return "shmem";
    default: return "default";
    }
}

/* A worker process: open, attach read-write, fill slice `w`, detach, close. */
static int worker(const char *path, unsigned w, uint64_t slice_words)
{
    mshare_region *r = NULL;
    int rc = mshare_open(path, O_RDWR, &r);
    if (rc < 0) {
        report("mshare_open", path, rc);
        return 1;
    }
    mshare_region_stat st;
    rc = mshare_stat(r, &st);
    if (rc < 0) {
        report("mshare_stat", path, rc);
        mshare_close(r);
        return 1;
    }
    void *addr = NULL;
    rc = mshare_attach(r, PROT_READ | PROT_WRITE, &addr);
    if (rc < 0) {
        report("mshare_attach", path, rc);
        mshare_close(r);
        return 1;
    }
    int status = 0;
    if ((uintptr_t)addr % st.granule != 0) {
        fprintf(stderr, "%s: worker %u: %p is not aligned to %" PRIu64 "\n", prog, w, addr,
                st.granule);
        status = 1;
    }
    volatile uint64_t *words = (volatile uint64_t *)addr + (uint64_t)w * slice_words;
    for (uint64_t i = 0; i < slice_words; i++)
        words[i] = pattern(w, i);
    rc = mshare_detach(r, addr);
    if (rc < 0) {
        report("mshare_detach", path, rc);
        status = 1;
    }
    mshare_close(r);
    return status;
}

/* The postmaster's check: attach read-only and compare every word. */
static int verify(const char *path, unsigned workers, uint64_t slice_words)
{
    mshare_region *r = NULL;
    int rc = mshare_open(path, O_RDONLY, &r);
    if (rc < 0) {
        report("mshare_open", path, rc);
        return 1;
    }
    uint64_t size = 0;
    void *addr = NULL;
    rc = mshare_size(r, &size);
    if (rc < 0) {
        report("mshare_size", path, rc);
        mshare_close(r);
        return 1;
    }
    rc = mshare_attach(r, PROT_READ, &addr);
    if (rc < 0) {
        report("mshare_attach", path, rc);
        mshare_close(r);
        return 1;
    }
    const volatile uint64_t *words = (const volatile uint64_t *)addr;
    uint64_t total = size / sizeof(uint64_t), bad = 0;
    for (uint64_t i = 0; i < total; i++) {
        uint64_t w = i / slice_words;
        uint64_t want = w < workers ? pattern((unsigned)w, i % slice_words) : 0;
        uint64_t got = words[i];
        if (got != want && bad++ < 5)
            fprintf(stderr, "%s: word %" PRIu64 ": got %#" PRIx64 ", want %#" PRIx64 "\n",
                    prog, i, got, want);
    }
    /* Exercise the read-only rule while the handle is open. */
    void *rw = NULL;
    rc = mshare_attach(r, PROT_READ | PROT_WRITE, &rw);
    if (rc != -EACCES || rw != NULL) {
        fprintf(stderr, "%s: PROT_WRITE on a read-only handle gave %d, want %d\n", prog, rc,
                -EACCES);
        bad++;
    }
    /* After close the mapping stays valid until munmap(addr, size). */
    mshare_close(r);
    if (bad == 0 && words[0] != (workers > 0 ? pattern(0, 0) : 0))
        bad++;
    if (munmap(addr, (size_t)size) != 0) {
        perror("munmap");
        bad++;
    }
    if (bad != 0) {
        fprintf(stderr, "%s: %" PRIu64 " bad words\n", prog, bad);
        return 1;
    }
    printf("%s: ok: %u workers x %" PRIu64 " bytes verified at %p\n", prog, workers,
           slice_words * sizeof(uint64_t), addr);
    return 0;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: %s [-w WORKERS] [-b default|hugetlb|thp|shmem] [-k] PATH SIZE[K|M|G]\n",
            prog);
    return 2;
}

int main(int argc, char **argv)
{
    unsigned workers = 4;
    unsigned int backing = MSHARE_BACKING_DEFAULT;
    int keep = 0, opt;
    while ((opt = getopt(argc, argv, "w:b:k")) != -1) {
        switch (opt) {
        case 'w': workers = (unsigned)strtoul(optarg, NULL, 10); break;
        case 'b':
            if (parse_backing(optarg, &backing) != 0) {
                fprintf(stderr, "%s: unknown backing %s\n", prog, optarg);
                return 2;
            }
            break;
        case 'k': keep = 1; break;
        default: return usage();
        }
    }
    uint64_t size = 0;
    if (argc - optind != 2 || parse_size(argv[optind + 1], &size) != 0 || workers == 0 ||
        workers > MAX_WORKERS)
        return usage();
    const char *path = argv[optind];

    mshare_region *r = NULL;
    int rc = mshare_create(path, size, 0600, backing, &r);
    if (rc < 0) {
        report("mshare_create", path, rc);
        return 1;
    }
    mshare_region_stat st;
    rc = mshare_stat(r, &st);
    mshare_close(r);
    if (rc < 0) {
        report("mshare_stat", path, rc);
        mshare_unlink(path);
        return 1;
    }
    printf("%s: libmshare %s, region %s: %" PRIu64 " bytes, %s backing, %" PRIu64
           "-byte pages, granule %" PRIu64 "%s\n",
           prog, mshare_version(), path, st.size, backing_name(st.backing), st.page_size,
           st.granule, (st.flags & MSHARE_STAT_SHARED_TABLES) ? ", shared page tables" : "");

    uint64_t slice_words = st.size / sizeof(uint64_t) / workers;
    int failed = 0;
    pid_t pids[MAX_WORKERS];
    unsigned started = 0;
    fflush(NULL);
    for (unsigned w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            failed = 1;
            break;
        }
        if (pid == 0)
            _exit(worker(path, w, slice_words));
        pids[started++] = pid;
    }
    for (unsigned i = 0; i < started; i++) {
        int status = 0;
        while (waitpid(pids[i], &status, 0) < 0) {
            if (errno != EINTR) {
                perror("waitpid");
                failed = 1;
                break;
            }
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "%s: worker %u failed (status %#x)\n", prog, i, status);
            failed = 1;
        }
    }
    if (!failed)
        failed = verify(path, workers, slice_words);
    if (!keep) {
        rc = mshare_unlink(path);
        if (rc < 0) {
            report("mshare_unlink", path, rc);
            failed = 1;
        }
    }
    return failed ? 1 : 0;
}
