/**
 * The one libc symbol table of the project.
 *
 * Every system call the backend and the testing library make goes through the
 * symbols below; nothing else in the tree calls `Deno.dlopen`. The C signature of
 * each symbol is given in a comment, for x86_64 Linux (glibc).
 *
 * Two conventions keep the hot paths on Deno's fast FFI path:
 * - Calls whose C result is `ssize_t` (read, write, readv, writev, sendmsg,
 *   recvmsg) are declared with an `i32` result. The project never asks for more
 *   than 2^31 - 1 bytes in one call, so the low 32 bits of the result carry the
 *   whole value (including -1), and no BigInt is created per call.
 * - 64-bit parameters (`size_t`, `off_t`) are passed as BigInt; the hot paths use
 *   readv/writev, whose lengths travel inside the iovec array, so they have none.
 */

export const libc = Deno.dlopen(
  "libc.so.6",
  {
    // int *__errno_location(void);
    __errno_location: { parameters: [], result: "pointer" },
    // char *strerror(int errnum);
    strerror: { parameters: ["i32"], result: "pointer" },
    // int close(int fd);
    close: { parameters: ["i32"], result: "i32" },
    // ssize_t read(int fd, void *buf, size_t count);
    read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
    // ssize_t write(int fd, const void *buf, size_t count);
    write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
    // ssize_t readv(int fd, const struct iovec *iov, int iovcnt);
    readv: { parameters: ["i32", "buffer", "i32"], result: "i32" },
    // ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    writev: { parameters: ["i32", "buffer", "i32"], result: "i32" },
    // int fcntl(int fd, int cmd, int arg);
    fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
    // int pipe2(int pipefd[2], int flags);
    pipe2: { parameters: ["buffer", "i32"], result: "i32" },
    // int dup(int oldfd);
    dup: { parameters: ["i32"], result: "i32" },

    // int socket(int domain, int type, int protocol);
    socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
    // int socketpair(int domain, int type, int protocol, int sv[2]);
    socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
    // int bind(int sockfd, const struct sockaddr *addr, socklen_t addrlen);
    bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
    // int listen(int sockfd, int backlog);
    listen: { parameters: ["i32", "i32"], result: "i32" },
    // int accept4(int sockfd, struct sockaddr *addr, socklen_t *addrlen, int flags);
    accept4: { parameters: ["i32", "pointer", "pointer", "i32"], result: "i32" },
    // int connect(int sockfd, const struct sockaddr *addr, socklen_t addrlen);
    connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
    // int shutdown(int sockfd, int how);
    shutdown: { parameters: ["i32", "i32"], result: "i32" },
    // ssize_t sendmsg(int sockfd, const struct msghdr *msg, int flags);
    sendmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
    // ssize_t recvmsg(int sockfd, struct msghdr *msg, int flags);
    recvmsg: { parameters: ["i32", "buffer", "i32"], result: "i32" },
    // int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen);
    getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
    // int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen);
    setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },

    // int memfd_create(const char *name, unsigned int flags);
    memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
    // off_t lseek(int fd, off_t offset, int whence);
    lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
    // int ftruncate(int fd, off_t length);
    ftruncate: { parameters: ["i32", "i64"], result: "i32" },
    // void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset);
    mmap: { parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"], result: "pointer" },
    // int munmap(void *addr, size_t length);
    munmap: { parameters: ["pointer", "usize"], result: "i32" },

    // int eventfd(unsigned int initval, int flags);
    eventfd: { parameters: ["u32", "i32"], result: "i32" },
    // int epoll_create1(int flags);
    epoll_create1: { parameters: ["i32"], result: "i32" },
    // int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event);
    epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
    // int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
    epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
    // int timerfd_create(int clockid, int flags);
    timerfd_create: { parameters: ["i32", "i32"], result: "i32" },
    // int timerfd_settime(int fd, int flags, const struct itimerspec *new, struct itimerspec *old);
    timerfd_settime: { parameters: ["i32", "i32", "buffer", "pointer"], result: "i32" },
    // int poll(struct pollfd *fds, nfds_t nfds, int timeout);
    poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
    // int poll(struct pollfd *fds, nfds_t nfds, int timeout); on a helper thread, returns a
    // Promise: lets the testing library wait for eventfds without blocking Deno's event loop.
    poll_async: {
      name: "poll",
      parameters: ["buffer", "u64", "i32"],
      result: "i32",
      nonblocking: true,
    },
    // int getrusage(int who, struct rusage *usage);
    getrusage: { parameters: ["i32", "buffer"], result: "i32" },
    // pid_t gettid(void);
    gettid: { parameters: [], result: "i32" },
  } as const satisfies Deno.ForeignLibraryInterface,
);

export const sys = libc.symbols;
