/*
 * The posted mshare kernel selftests' sequences (tools/testing/selftests/mshare,
 * patch v3, Aug 2025: basic.c's FIXTURE_SETUP and TEST_F(basic, shared_mem), with
 * util.c's helpers), run against an msharefs mount.
 *
 *   mshare_basic MOUNT OBJECT_SIZE anon|hugetlb
 *
 * Setup, as basic.c: read mshare_info (the granule), create mshare-test-XXXXXX with
 * mkstemp, ftruncate it to the granule, MSHAREFS_CREATE_MAPPING one object of
 * OBJECT_SIZE bytes at offset 0 (MAP_ANONYMOUS|MAP_SHARED|MAP_FIXED, plus MAP_HUGETLB
 * for "hugetlb"), close. Test, as shared_mem: fork; parent and child each open the
 * file and mmap the whole region (MAP_SHARED, address chosen by the kernel); the child
 * writes STRING. Beyond the selftest, the parent then writes its own string and the
 * child checks it, so each sees the other's write. Teardown: MSHAREFS_UNMAP of the
 * object (util.c's mshare_ioctl_munmap: offset 0, the object's size), unlink.
 *
 * Prints one line per fact ("name value") for the test to check; exits 0 only when
 * every step succeeded. hugetlb regions need the LD_PRELOAD shim for the mmap (FUSE
 * cannot pass hugetlbfs through).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* include/uapi/linux/msharefs.h (v3) */
struct mshare_create {
	uint64_t region_offset;
	uint64_t size;
	uint64_t offset;
	uint32_t prot;
	uint32_t flags;
	uint32_t fd;
};
struct mshare_unmap {
	uint64_t region_offset;
	uint64_t size;
};
#define MSHAREFS_CREATE_MAPPING _IOW('x', 0, struct mshare_create)
#define MSHAREFS_UNMAP _IOW('x', 1, struct mshare_unmap)

#define STRING "I am Msharefs"
#define PARENT_STRING "parent was here"
#define PARENT_OFFSET 4000 /* inside the first 4 KiB: every object size covers it */

static void die(const char *what)
{
	printf("error %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static size_t mshare_get_info(const char *mount)
{
	char path[4096], req[128] = { 0 };
	snprintf(path, sizeof(path), "%s/mshare_info", mount);
	int fd = open(path, O_RDONLY);
	if (fd == -1)
		die("open mshare_info");
	if (read(fd, req, sizeof(req) - 1) <= 0)
		die("read mshare_info");
	close(fd);
	return strtoull(req, NULL, 10);
}

static int mshare_ioctl_mapping(int fd, size_t size, int flags)
{
	struct mshare_create mcreate;
	memset(&mcreate, 0, sizeof(mcreate));
	mcreate.region_offset = 0;
	mcreate.size = size;
	mcreate.offset = 0;
	mcreate.prot = PROT_READ | PROT_WRITE;
	mcreate.flags = flags;
	mcreate.fd = -1;
	return ioctl(fd, MSHAREFS_CREATE_MAPPING, &mcreate);
}

static int mshare_ioctl_munmap(int fd, size_t size)
{
	struct mshare_unmap munmap;
	munmap.region_offset = 0;
	munmap.size = size;
	return ioctl(fd, MSHAREFS_UNMAP, &munmap);
}

/* KernelPageSize of the VMA at addr, in kB, from /proc/self/smaps. */
static long kernel_page_kb(void *addr)
{
	FILE *f = fopen("/proc/self/smaps", "r");
	char line[512];
	int inside = 0;
	long kb = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long a, b;
		if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' ')) {
			inside = a <= (unsigned long)addr && (unsigned long)addr < b;
			continue;
		}
		if (inside && sscanf(line, "KernelPageSize: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

static char *open_and_map(const char *filename, size_t len, int *fdp)
{
	int fd = open(filename, O_RDWR, 0600);
	if (fd == -1)
		die("open region");
	char *addr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (addr == MAP_FAILED)
		die("mmap region");
	*fdp = fd;
	return addr;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s MOUNT OBJECT_SIZE anon|hugetlb\n", argv[0]);
		return 2;
	}
	const char *mount = argv[1];
	size_t object_size = strtoull(argv[2], NULL, 0);
	int map_flags = MAP_ANONYMOUS | MAP_SHARED | MAP_FIXED;
	if (strcmp(argv[3], "hugetlb") == 0)
		map_flags |= MAP_HUGETLB;

	/* FIXTURE_SETUP(basic) */
	size_t align_size = mshare_get_info(mount);
	printf("align_size %zu\n", align_size);
	char filename[4096];
	snprintf(filename, sizeof(filename), "%s/mshare-test-XXXXXX", mount);
	int fd = mkstemp(filename);
	if (fd == -1)
		die("mkstemp");
	if (ftruncate(fd, align_size) == -1)
		die("ftruncate");
	if (mshare_ioctl_mapping(fd, object_size, map_flags) != 0)
		die("MSHAREFS_CREATE_MAPPING");
	printf("create_mapping 0\n");
	close(fd);

	/* TEST_F(basic, shared_mem), with pipes so each side also sees the other's write */
	int to_child[2], to_parent[2];
	if (pipe(to_child) == -1 || pipe(to_parent) == -1)
		die("pipe");
	fflush(stdout);
	pid_t pid = fork();
	if (pid == -1)
		die("fork");

	int rfd;
	char *addr = open_and_map(filename, align_size, &rfd);
	char c = 0;
	if (pid == 0) {
		memcpy(addr, STRING, sizeof(STRING));
		if (write(to_parent[1], "w", 1) != 1)
			_exit(3);
		if (read(to_child[0], &c, 1) != 1)
			_exit(4);
		_exit(memcmp(addr + PARENT_OFFSET, PARENT_STRING, sizeof(PARENT_STRING)) == 0 ? 0 : 5);
	}
	printf("addr 0x%lx\n", (unsigned long)addr);
	printf("kernel_page_kb %ld\n", kernel_page_kb(addr));
	if (read(to_parent[0], &c, 1) != 1)
		die("read from child");
	int parent_sees_child = memcmp(addr, STRING, sizeof(STRING)) == 0;
	printf("parent_sees_child %d\n", parent_sees_child);
	memcpy(addr + PARENT_OFFSET, PARENT_STRING, sizeof(PARENT_STRING));
	if (write(to_child[1], "w", 1) != 1)
		die("write to child");
	int status;
	if (waitpid(pid, &status, 0) == -1)
		die("waitpid");
	int child_sees_parent = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	printf("child_status %d\n", status);
	printf("child_sees_parent %d\n", child_sees_parent);

	/* teardown: unmap the object as util.c does, then the region */
	if (mshare_ioctl_munmap(rfd, object_size) != 0)
		die("MSHAREFS_UNMAP");
	printf("unmap 0\n");
	printf("after_unmap_first_byte %d\n", addr[0]);
	if (munmap(addr, align_size) != 0)
		die("munmap");
	close(rfd);
	if (unlink(filename) != 0)
		die("unlink");
	printf("done %d\n", parent_sees_child && child_sees_parent);
	return parent_sees_child && child_sees_parent ? 0 : 1;
}
