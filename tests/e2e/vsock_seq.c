/*
 * vsock_seq: a tiny AF_VSOCK SOCK_SEQPACKET tool for the real-guest e2e tests (socat and
 * busybox cannot open vsock seqpacket sockets). Built static by build_initramfs.sh and put in
 * the guest's /usr/bin.
 *
 *   vsock_seq listen PORT
 *       Echo server: accepts connections on PORT (any CID), one child process each, and
 *       sends every message back as one message, with MSG_EOR when it arrived with MSG_EOR.
 *       Prints "vsock_seq: listening on PORT" once listening, then one line per message.
 *
 *   vsock_seq connect CID PORT SIZE[e|n]...
 *       Client: connects to CID:PORT, and for each SIZE sends one message of SIZE bytes (a
 *       pattern that differs per message), reads one message back and checks it is the same
 *       (length, no MSG_TRUNC, bytes). Suffix "e": send with MSG_EOR and require MSG_EOR on
 *       the echo; "n": send without and require no MSG_EOR; none: send without, EOR not
 *       checked. Prints one line per message ("vsock_seq: message I: SIZE bytes ok" or
 *       "vsock_seq: FAIL message I: ..."), then "vsock_seq: all N messages ok".
 *       Exit status 0 only when every message came back intact.
 *
 * Messages of up to MAX_MSG bytes (the default vsock buffer, SO_VM_SOCKETS_BUFFER_SIZE, is
 * 256 KiB: a larger message is refused with EMSGSIZE by the sender's kernel anyway).
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define MAX_MSG (256 * 1024)
#define IO_TIMEOUT_S 30

static unsigned char buf[MAX_MSG + 1];
static unsigned char want[MAX_MSG];

__attribute__((noreturn)) static void die(const char *what) {
	printf("vsock_seq: FAIL %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(2);
}

static void set_timeouts(int fd) {
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* One message into buf; returns its length (-1 on error, 0 at EOF) and its flags. */
static ssize_t recv_msg(int fd, int *flags) {
	struct iovec iov = { .iov_base = buf, .iov_len = sizeof(buf) };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n = recvmsg(fd, &m, 0);
	*flags = m.msg_flags;
	return n;
}

static ssize_t send_msg(int fd, const void *p, size_t len, int eor) {
	struct iovec iov = { .iov_base = (void *)p, .iov_len = len };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1 };
	return sendmsg(fd, &m, MSG_NOSIGNAL | (eor ? MSG_EOR : 0));
}

static void echo(int fd) {
	set_timeouts(fd);
	for (;;) {
		int flags;
		ssize_t n = recv_msg(fd, &flags);
		if (n == 0) break;
		if (n < 0) die("recvmsg");
		int eor = (flags & MSG_EOR) != 0;
		if (flags & MSG_TRUNC) printf("vsock_seq: FAIL message truncated\n");
		if (send_msg(fd, buf, n, eor) != n) die("sendmsg");
		printf("vsock_seq: echo %zd bytes eor=%d\n", n, eor);
		fflush(stdout);
	}
	close(fd);
}

static int do_listen(unsigned port) {
	int s = socket(AF_VSOCK, SOCK_SEQPACKET, 0);
	if (s < 0) die("socket(AF_VSOCK, SOCK_SEQPACKET)");
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) die("bind");
	if (listen(s, 16) < 0) die("listen");
	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	printf("vsock_seq: listening on %u\n", port);
	fflush(stdout);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0) {
			if (errno == EINTR) continue;
			die("accept");
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(s);
			echo(c);
			_exit(0);
		}
		close(c);
	}
}

static int do_connect(unsigned cid, unsigned port, int argc, char **argv) {
	int s = socket(AF_VSOCK, SOCK_SEQPACKET, 0);
	if (s < 0) die("socket(AF_VSOCK, SOCK_SEQPACKET)");
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) die("connect");
	set_timeouts(s);
	int failed = 0;
	for (int i = 0; i < argc; i++) {
		char *end;
		unsigned long size = strtoul(argv[i], &end, 10);
		char mode = *end; /* 'e', 'n' or 0 */
		if (end == argv[i] || size > MAX_MSG || (mode && mode != 'e' && mode != 'n')) {
			printf("vsock_seq: FAIL bad size %s\n", argv[i]);
			return 2;
		}
		for (size_t k = 0; k < size; k++) want[k] = (unsigned char)(k * 7 + i * 13 + 1);
		if (send_msg(s, want, size, mode == 'e') != (ssize_t)size) die("sendmsg");
		int flags;
		ssize_t n = recv_msg(s, &flags);
		if (n < 0) die("recvmsg");
		int eor = (flags & MSG_EOR) != 0;
		const char *why = NULL;
		if (n == 0 && size > 0) why = "EOF instead of the echo";
		else if (flags & MSG_TRUNC) why = "echo truncated (MSG_TRUNC)";
		else if ((size_t)n != size) why = "echo has another length";
		else if (memcmp(buf, want, size) != 0) why = "echo differs";
		else if (mode == 'e' && !eor) why = "MSG_EOR lost";
		else if (mode == 'n' && eor) why = "MSG_EOR appeared";
		if (why) {
			printf("vsock_seq: FAIL message %d: %lu bytes sent, %zd received, eor=%d: %s\n", i,
			       size, n, eor, why);
			failed++;
		} else {
			printf("vsock_seq: message %d: %lu bytes ok eor=%d\n", i, size, eor);
		}
		fflush(stdout);
	}
	close(s);
	if (failed) return 1;
	printf("vsock_seq: all %d messages ok\n", argc);
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 3 && strcmp(argv[1], "listen") == 0) return do_listen(strtoul(argv[2], NULL, 10));
	if (argc >= 4 && strcmp(argv[1], "connect") == 0)
		return do_connect(strtoul(argv[2], NULL, 10), strtoul(argv[3], NULL, 10), argc - 4,
				  argv + 4);
	fprintf(stderr, "usage: vsock_seq listen PORT | vsock_seq connect CID PORT SIZE[e|n]...\n");
	return 2;
}
