/* A TCP proxy that delays every chunk it forwards by a fixed time, each way: a
 * remote relay on the loopback, for bench.py's relay scenarios (there is no netem
 * on these machines). One thread, epoll, one FIFO of chunks for all connections:
 * the delay is the same for every chunk, so the order they arrive in is the order
 * they are due in. Costs little CPU next to the consumer (a Python proxy costs a
 * quarter of a core at 3,000 mails/s).
 *
 *     cc -O2 -o delay_proxy delay_proxy.c
 *     ./delay_proxy LISTEN_PORT TARGET_PORT DELAY_MS     (both on 127.0.0.1)
 *
 * It prints "ready" on stdout once it listens. End of stream is delayed too: a
 * side that closes is closed on the other side DELAY_MS later.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536

struct conn;

struct side {                  /* one socket of a proxied connection */
    int fd;
    struct conn *conn;
    struct side *peer;         /* where what this side reads goes */
    struct chunk *out, *out_tail;  /* due chunks waiting to be written to fd */
    size_t out_off;            /* bytes of out already written */
    int want_out;              /* EPOLLOUT registered */
    int reading;               /* EPOLLIN registered: the stream has not ended */
    int registered;            /* in the epoll set */
};

struct conn {
    struct side a, b;          /* a: the client, b: the target */
    int refs;                  /* chunks in flight towards it */
    int closed;
    struct conn *next_dead;    /* freed at the end of the loop's turn, once refs is 0 */
};

struct chunk {
    struct chunk *next;        /* in the delay queue, then in a side's out list */
    double due;
    struct side *to;
    size_t len;                /* 0: end of stream */
    char data[];
};

static int ep;
static double delay;
static struct chunk *queue, *queue_tail;  /* all delayed chunks, in due order */
static struct sockaddr_in target;
static struct conn *dead;  /* closed connections; an event of this turn may still name them */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) { perror(what); exit(1); }

static void nonblocking(int fd) {
    int one = 1;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void unref(struct conn *c) { c->refs--; }

static void bury(void) {
    struct conn **p = &dead;
    while (*p) {
        struct conn *c = *p;
        if (c->refs == 0) {
            *p = c->next_dead;
            free(c);
        } else {
            p = &c->next_dead;
        }
    }
}

static void close_conn(struct conn *c) {
    if (c->closed)
        return;
    c->closed = 1;
    c->next_dead = dead;
    dead = c;
    struct side *sides[2] = {&c->a, &c->b};
    for (int i = 0; i < 2; i++) {
        struct side *s = sides[i];
        while (s->out) {
            struct chunk *k = s->out;
            s->out = k->next;
            free(k);
            unref(c);
        }
        if (s->fd >= 0) {
            close(s->fd);  /* leaves the epoll set too */
            s->fd = -1;
        }
    }
}

/* The events wanted from side s: EPOLLIN while its stream lasts, EPOLLOUT while
 * due output waits for room. */
static void watch(struct side *s, int out) {
    if (s->fd < 0 || (out == s->want_out && s->registered))
        return;
    struct epoll_event ev = {.events = (s->reading ? EPOLLIN : 0) | (out ? EPOLLOUT : 0),
                             .data.ptr = s};
    epoll_ctl(ep, s->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd, &ev);
    s->registered = 1;
    s->want_out = out;
}

/* Write what is due to side s; register for EPOLLOUT if the socket is full. */
static void flush(struct side *s) {
    struct conn *c = s->conn;
    while (s->out && !c->closed) {
        struct chunk *k = s->out;
        if (k->len == 0) {          /* the other side ended its stream */
            close_conn(c);
            return;
        }
        ssize_t n = send(s->fd, k->data + s->out_off, k->len - s->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                watch(s, 1);
                return;
            }
            close_conn(c);
            return;
        }
        s->out_off += n;
        if (s->out_off < k->len) {
            watch(s, 1);
            return;
        }
        s->out = k->next;
        if (!s->out)
            s->out_tail = NULL;
        s->out_off = 0;
        free(k);
        unref(c);
    }
    if (!c->closed)
        watch(s, 0);
}

static void enqueue(struct side *to, const char *data, size_t len) {
    struct chunk *k = malloc(sizeof *k + len);
    if (!k)
        die("malloc");
    k->next = NULL;
    k->due = now() + delay;
    k->to = to;
    k->len = len;
    memcpy(k->data, data, len);
    to->conn->refs++;
    if (queue_tail)
        queue_tail->next = k;
    else
        queue = k;
    queue_tail = k;
}

/* Move the chunks that are due to their sides' out lists and write them. */
static void deliver_due(void) {
    double t = now();
    while (queue && queue->due <= t) {
        struct chunk *k = queue;
        queue = k->next;
        if (!queue)
            queue_tail = NULL;
        k->next = NULL;
        struct side *s = k->to;
        if (s->conn->closed) {
            struct conn *c = s->conn;
            free(k);
            unref(c);
            continue;
        }
        if (s->out_tail)
            s->out_tail->next = k;
        else
            s->out = k;
        s->out_tail = k;
        s->conn->refs++;   /* held while flush may close the connection */
        struct conn *c = s->conn;
        flush(s);
        unref(c);
    }
}

static void accept_one(int listener) {
    int client = accept(listener, NULL, NULL);
    if (client < 0)
        return;
    int server = socket(AF_INET, SOCK_STREAM, 0);
    if (server < 0 || connect(server, (struct sockaddr *)&target, sizeof target) < 0) {
        close(client);
        if (server >= 0)
            close(server);
        return;
    }
    nonblocking(client);
    nonblocking(server);
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        die("calloc");
    c->a.reading = c->b.reading = 1;
    c->a.registered = c->b.registered = 1;
    c->a.fd = client; c->a.conn = c; c->a.peer = &c->b;
    c->b.fd = server; c->b.conn = c; c->b.peer = &c->a;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &c->a};
    epoll_ctl(ep, EPOLL_CTL_ADD, client, &ev);
    ev.data.ptr = &c->b;
    epoll_ctl(ep, EPOLL_CTL_ADD, server, &ev);
}

static void readable(struct side *s) {
    static char buffer[CHUNK];
    ssize_t n = recv(s->fd, buffer, sizeof buffer, 0);
    if (n > 0) {
        enqueue(s->peer, buffer, n);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        /* Read no more; the connection closes when this end of stream is due. A
         * socket whose both directions are shut would report EPOLLHUP forever:
         * it leaves the set (a write to it then fails and closes the connection). */
        s->reading = 0;
        epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
        s->registered = 0;
        if (s->want_out) {
            s->want_out = 0;
            watch(s, 1);
        }
        enqueue(s->peer, NULL, 0);
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s LISTEN_PORT TARGET_PORT DELAY_MS\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    delay = atof(argv[3]) / 1000.0;
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    target.sin_port = htons(atoi(argv[2]));
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0)
        die("bind");
    if (listen(listener, 1024) < 0)
        die("listen");
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    printf("ready\n");
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int timeout = -1;
        if (queue) {
            double wait = queue->due - now();
            timeout = wait <= 0 ? 0 : (int)(wait * 1000) + 1;  /* never early */
        }
        int n = epoll_wait(ep, events, 256, timeout);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct side *s = events[i].data.ptr;
            if (s == NULL) {
                accept_one(listener);
                continue;
            }
            if (s->conn->closed)
                continue;
            if (events[i].events & EPOLLOUT)
                flush(s);
            if (!s->conn->closed && s->reading &&
                events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                readable(s);
        }
        deliver_due();
        bury();
    }
}
