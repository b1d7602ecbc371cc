/* Times each system call of one attach to a sized hugetlb region of a mounted msharefs,
 * as a fresh process makes it, in microseconds: open, fstat, the GET_INFO ioctl, socket,
 * connect, sendmsg (the request with the region descriptor), recvmsg (the reply with the
 * backing), mmap at a 1 GiB-aligned address, and the touch (one store per 2 MiB page).
 *
 *     cc -O2 -o /tmp/attach_steps bench/attach_steps.c
 *     for i in $(seq 60); do /tmp/attach_steps /mnt/msharefs/REGION; done
 *
 * Each run prints one line; take the medians. Unlike attach_steps.py (which times the
 * same steps from Python, warm or fresh), this shows where a fresh process waits for the
 * daemon: a step is long when the daemon's thread runs in its place (the request is
 * served inside the client's sendmsg when the daemon's thread preempts it). Numbers in
 * docs/BENCHMARKS.md ("Where a fresh attacher waits"). Root is not needed, only read-write
 * access to the region. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define GET_INFO 0x80A07810UL /* _IOR('x', 0x10, struct mshare_region_info), 160 bytes */
#define INFO_LEN 160
#define SOCKET_PATH_OFFSET 48 /* offsetof(struct mshare_region_info, socket_path) */
#define REPLY_LEN 168         /* struct msharefs_attach_reply */
#define GIB (1UL << 30)
#define HUGE (2UL << 20)

static long long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	static const char *names[] = {"open", "fstat", "ioctl", "socket", "connect",
				      "sendmsg", "recvmsg", "mmap", "touch"};
	long long t[10];
	int n = 0;
	if (argc != 2) {
		fprintf(stderr, "usage: %s REGION\n", argv[0]);
		return 2;
	}
	t[n++] = now_ns();
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open");
	t[n++] = now_ns();
	struct stat st;
	if (fstat(fd, &st))
		die("fstat");
	t[n++] = now_ns();
	unsigned char info[INFO_LEN];
	if (ioctl(fd, GET_INFO, info))
		die("GET_INFO");
	t[n++] = now_ns();
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket");
	t[n++] = now_ns();
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	const char *path = (const char *)info + SOCKET_PATH_OFFSET;
	size_t len = strnlen(path, INFO_LEN - SOCKET_PATH_OFFSET);
	if (len == 0 || len >= sizeof addr.sun_path) {
		fprintf(stderr, "GET_INFO gave no usable socket path\n");
		return 1;
	}
	memcpy(addr.sun_path, path, len);
	if (connect(s, (struct sockaddr *)&addr, sizeof addr))
		die("connect");
	t[n++] = now_ns();
	char req = 'w';
	struct iovec iov = {&req, 1};
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	memset(&control, 0, sizeof control);
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
			   .msg_controllen = sizeof control.buf};
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof fd);
	if (sendmsg(s, &m, MSG_NOSIGNAL) != 1)
		die("sendmsg");
	t[n++] = now_ns();
	unsigned char reply[REPLY_LEN];
	struct iovec riov = {reply, sizeof reply};
	memset(&control, 0, sizeof control);
	struct msghdr r = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = control.buf,
			   .msg_controllen = sizeof control.buf};
	ssize_t got = recvmsg(s, &r, MSG_CMSG_CLOEXEC);
	t[n++] = now_ns();
	int status;
	memcpy(&status, reply, sizeof status);
	c = CMSG_FIRSTHDR(&r);
	if (got < (ssize_t)sizeof status || status != 0 || !c || c->cmsg_type != SCM_RIGHTS) {
		fprintf(stderr, "attach refused: %d bytes, status %d\n", (int)got, status);
		return 1;
	}
	int backing;
	memcpy(&backing, CMSG_DATA(c), sizeof backing);
	size_t size = (size_t)st.st_size;
	char *space = mmap(NULL, size + GIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			   -1, 0);
	if (space == MAP_FAILED)
		die("reserve");
	char *aligned = (char *)(((unsigned long)space + GIB - 1) & ~(GIB - 1));
	char *p = mmap(aligned, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, backing, 0);
	if (p == MAP_FAILED)
		die("mmap");
	t[n++] = now_ns();
	for (size_t off = 0; off < size; off += HUGE)
		((volatile char *)p)[off] = 1;
	t[n++] = now_ns();
	for (int k = 1; k < n; k++)
		printf("%s=%lld ", names[k - 1], (t[k] - t[k - 1]) / 1000);
	printf("total=%lld\n", (t[n - 1] - t[0]) / 1000);
	return 0;
}
