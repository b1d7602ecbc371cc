/* Times each system call of one attach to a sized hugetlb region of a mounted msharefs,
 * as a fresh process makes it, in microseconds: open, fstat, finding the daemon's socket
 * (a stat of its link in /run/msharefs/by-dev, or the GET_INFO ioctl without one), sockets
 * (the reply socket pair and the socket the request is sent from), sendmsg (the request
 * datagram with the reply socket and the region descriptor), recvmsg (the reply with the
 * backing), mmap at a 1 GiB-aligned address, and the touch (one store per 2 MiB page).
 *
 *     cc -O2 -o /tmp/attach_steps bench/attach_steps.c
 *     for i in $(seq 60); do /tmp/attach_steps /mnt/msharefs/REGION; done
 *
 * Each run prints one line; take the medians. Unlike attach_steps.py (which times the
 * same steps from Python, warm or fresh), this shows where a fresh process waits for the
 * daemon: a step is long when the daemon's thread runs in its place (the request is
 * served inside the client's sendmsg when the daemon's thread preempts it). Numbers in
 * docs/BENCHMARKS.md ("Where a fresh attacher waits", "One request per attach"). Root is not needed, only read-write
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
#include <sys/sysmacros.h>
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

/* Writes n in decimal at p with a NUL; returns where the NUL is. */
static char *decimal(char *p, unsigned n)
{
	char digits[10];
	int k = 0;
	do
		digits[k++] = (char)('0' + n % 10);
	while (n /= 10);
	while (k)
		*p++ = digits[--k];
	*p = 0;
	return p;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	static const char *names[] = {"open", "fstat", "find", "sockets", "sendmsg",
				      "recvmsg", "mmap", "touch"};
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
	/* The daemon's socket: its link under the mount's device number, else GET_INFO. */
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	/* Built by hand: a process's first printf-family call costs more than the rest. */
	char *end = stpcpy(addr.sun_path, "/run/msharefs/by-dev/");
	end = decimal(end, major(st.st_dev));
	*end++ = ':';
	decimal(end, minor(st.st_dev));
	struct stat sock_st;
	const char *how = "by-dev";
	if (stat(addr.sun_path, &sock_st) || !S_ISSOCK(sock_st.st_mode)) {
		unsigned char info[INFO_LEN];
		if (ioctl(fd, GET_INFO, info))
			die("GET_INFO");
		const char *path = (const char *)info + SOCKET_PATH_OFFSET;
		size_t len = strnlen(path, INFO_LEN - SOCKET_PATH_OFFSET);
		if (len == 0 || len >= sizeof addr.sun_path) {
			fprintf(stderr, "GET_INFO gave no usable socket path\n");
			return 1;
		}
		memset(addr.sun_path, 0, sizeof addr.sun_path);
		memcpy(addr.sun_path, path, len);
		how = "GET_INFO";
	}
	t[n++] = now_ns();
	/* The request is one datagram that carries the socket the reply comes back on. */
	int pair[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair))
		die("socketpair");
	int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket");
	t[n++] = now_ns();
	char req = 'w';
	struct iovec iov = {&req, 1};
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} control;
	memset(&control, 0, sizeof control);
	struct msghdr m = {.msg_name = &addr, .msg_namelen = sizeof addr, .msg_iov = &iov,
			   .msg_iovlen = 1, .msg_control = control.buf,
			   .msg_controllen = sizeof control.buf};
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(2 * sizeof(int));
	int pass[2] = {pair[1], fd};
	memcpy(CMSG_DATA(c), pass, sizeof pass);
	if (sendmsg(s, &m, MSG_NOSIGNAL) != 1)
		die("sendmsg");
	close(pair[1]);
	t[n++] = now_ns();
	unsigned char reply[REPLY_LEN];
	struct iovec riov = {reply, sizeof reply};
	memset(&control, 0, sizeof control);
	struct msghdr r = {.msg_iov = &riov, .msg_iovlen = 1, .msg_control = control.buf,
			   .msg_controllen = sizeof control.buf};
	ssize_t got = recvmsg(pair[0], &r, MSG_CMSG_CLOEXEC);
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
	printf("total=%lld found=%s\n", (t[n - 1] - t[0]) / 1000, how);
	return 0;
}
